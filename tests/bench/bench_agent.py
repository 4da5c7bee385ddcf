"""Agent overhead and footprint (issue 6).

Run: ``.venv/bin/pytest -s tests/bench/bench_agent.py``.

1. Overhead over the Unix socket: a real agent process serving an installed model, called through
   ``LocalClient`` (its InferStream, and plain unary Infer calls), against a bare onnxruntime
   ``session.run`` of the same model file with the agent's thread count (the profile's physical
   cores), in this process. Beside them, an echo stream to a do-nothing gRPC server in another
   process (tests/bench/grpc_echo.py): the transport's own floor on this machine. Blocks of
   requests alternate between the arms, so all see the same machine load. Target: +0.3 ms at
   p50. The model is a small MLP (microseconds of compute), so the difference is the overhead.
2. Overhead in process: ``InferenceService.infer_blocking`` (the model runs on the caller's
   thread, batching check and telemetry recording included) against bare ``session.run`` of the
   very same ORT session, interleaved call by call, as the median of paired ratios. Two models:
   the small MLP (shown; too little compute for a share to mean anything) and an MLP whose
   compute is a few ms, which the target is judged on. ``await InferenceService.infer`` (asyncio
   callers: a hop to an inference thread and back) is reported beside it. Target: < 5% at p50.
3. Footprint: idle CPU of the agent process (telemetry every 5 s, controller heartbeat 1 s) over
   20 s of psutil ``cpu_times``, target < 1% of a core; RSS with the model loaded.

Each test ends with one line: its target, what was measured, MET or MISSED. A missed target is
reported, not failed; a test fails only when it could not measure.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import psutil
import pytest
from bench_support import bench_profile, median, print_table, report_targets, verdict
from grpc_echo import ECHO_METHOD

from edgefleet.agent.client import LocalClient, to_tensor
from edgefleet.agent.device_stats import DeviceSampler
from edgefleet.agent.outbox import TelemetryOutbox
from edgefleet.agent.power import PowerMeter, load_power_models, power_model_for
from edgefleet.agent.runtime import load_model
from edgefleet.agent.serving import InferenceService
from edgefleet.agent.telemetry import TelemetryCollector
from edgefleet.firmware.slots import active_model
from edgefleet.protos.v1 import local_pb2
from fleet_harness import AgentProc, ControllerProc, wait_until
from model_factory import install_offline, mlp_onnx, signed_bundle

pytestmark = pytest.mark.integration

SOCKET_TARGET_MS = 0.3
IN_PROCESS_TARGET = 0.05
IDLE_CPU_TARGET = 0.01
IDLE_WINDOW_S = 20.0
PAIRS = 1000
BLOCK = 20


def bare_session(model: Path, threads: int) -> Any:
    """What the agent's runtime builds (runtime._load_onnx), without the agent around it."""
    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def percentiles(samples: list[float]) -> tuple[float, float]:
    values = np.asarray(samples) * 1000
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def agent_threads() -> int:
    return int(bench_profile().cpu.physical_cores or 0)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("agent")
    model = mlp_onnx(tmp / "small.onnx")
    bundle, key = signed_bundle(tmp, model)
    install_offline(tmp / "a1", bundle, key)
    controller = ControllerProc(tmp, heartbeat_s=1.0, insecure=True).start()  # device secrets, plaintext
    agent = AgentProc(tmp, "a1", controller, controller.create_token(), ["--telemetry-interval", "5s"]).start()
    try:
        socket = agent.state_dir / "agent.sock"
        wait_until(lambda: agent.device_id and socket.exists(), 60, "agent enrolled with its local API up")
        with LocalClient(f"unix://{socket}") as client:
            wait_until(lambda: client.status().connected and client.status().model == "mlp", 30, "agent serving")
        yield controller, agent, model
    finally:
        agent.stop()
        controller.stop()
        controller.close_channel()


def test_idle_footprint(fleet: Any) -> None:
    _, agent, _ = fleet
    assert agent.popen is not None
    process = psutil.Process(agent.popen.pid)
    time.sleep(6.0)  # past start-up work and the first telemetry batch
    before, started = process.cpu_times(), time.monotonic()
    time.sleep(IDLE_WINDOW_S)
    after, elapsed = process.cpu_times(), time.monotonic() - started
    cpu_s = (after.user - before.user) + (after.system - before.system)
    share = cpu_s / elapsed
    rss_mb = process.memory_info().rss / 2**20
    threads = process.num_threads()
    print_table(f"Agent idle footprint (telemetry 5 s, heartbeat 1 s, {elapsed:.0f} s window, small MLP loaded)",
                ["idle CPU (% of a core)", "target", "RSS (MiB)", "threads"],
                [[f"{share:.2%}", f"< 1% {verdict(share < IDLE_CPU_TARGET)}", rss_mb, threads]])
    report_targets("agent idle footprint",
                   [(f"idle CPU {share:.2%} of a core < {IDLE_CPU_TARGET:.0%}", share < IDLE_CPU_TARGET)])


def test_local_api_overhead_over_the_unix_socket(fleet: Any) -> None:
    _, agent, model = fleet
    threads = agent_threads()
    session = bare_session(model, threads)
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    samples: dict[str, list[float]] = {"bare": [], "stream": [], "unary": [], "status": [], "echo": []}
    address = f"unix://{agent.state_dir / 'agent.sock'}"
    request_bytes = len(local_pb2.InferRequest(inputs=[to_tensor("x", x)]).SerializeToString())
    with LocalClient(address) as client, LocalClient(address, stream=False) as unary_client, \
            echo_stream(agent.state_dir.parent / "echo.sock", request_bytes) as echo:
        calls = {"bare": lambda: session.run(None, {"x": x}), "stream": lambda: client.infer({"x": x}),
                 "unary": lambda: unary_client.infer({"x": x}), "status": client.status,
                 "echo": lambda: echo(b"\0" * request_bytes)}
        for _ in range(200):  # warm-up: channel, ORT arenas, both sides
            for call in calls.values():
                call()
        # Blocks in rotating order: the same load hits every arm. Blocks rather than single calls,
        # because two onnxruntime thread pools (the agent's and this one) spinning against each
        # other on a 2-core box would slow the bare baseline down, flattering the agent.
        names = list(calls)
        for index in range(PAIRS // BLOCK):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                for _ in range(BLOCK):
                    started = time.perf_counter()
                    calls[name]()
                    samples[name].append(time.perf_counter() - started)
    bare_p50, bare_p99 = percentiles(samples["bare"])
    rows: list[list[Any]] = [["bare session.run", bare_p50, bare_p99, "", ""]]
    overheads = {}
    for arm, label, target in (
        ("stream", "LocalClient.infer (InferStream, the default)", True),
        ("unary", "LocalClient(stream=False).infer (one Infer call each)", False),
        ("status", "LocalClient.status (no inference)", False),
        ("echo", "echo stream in another process (no work, no protobuf)", False),
    ):
        p50, p99 = percentiles(samples[arm])
        overheads[arm] = p50 - bare_p50
        note = (f"< +{SOCKET_TARGET_MS} ms {verdict(overheads[arm] < SOCKET_TARGET_MS)}" if target
                else {"status": "a unary round trip of the agent", "echo": "Python gRPC's floor here"}.get(arm, ""))
        rows.append([label, p50, p99, overheads[arm], note])
    print_table(f"Local API over the Unix socket vs bare session.run (small MLP, batch 1, {threads} threads, "
                f"{PAIRS} calls each, interleaved in blocks of {BLOCK})",
                ["path", "p50 ms", "p99 ms", "p50 overhead ms", "target"], rows)
    report_targets("local API over the Unix socket",
                   [(f"InferStream p50 overhead +{overheads['stream']:.3f} ms < +{SOCKET_TARGET_MS} ms "
                     f"(Python gRPC's own echo floor here: +{overheads['echo']:.3f} ms)",
                     overheads["stream"] < SOCKET_TARGET_MS)])


@contextlib.contextmanager
def echo_stream(path: Path, reply_bytes: int) -> Iterator[Callable[[bytes], bytes]]:
    """An open stream to tests/bench/grpc_echo.py in its own process: one round trip per call."""
    address = f"unix://{path}"
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("grpc_echo.py")), address,
                               str(reply_bytes)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        with grpc.insecure_channel(address) as channel:
            requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
            replies = channel.stream_stream(ECHO_METHOD)(iter(requests.get, None))

            def round_trip(message: bytes) -> bytes:
                requests.put(message)
                return next(replies)  # type: ignore[no-any-return]

            yield round_trip
            requests.put(None)
            replies.cancel()
    finally:
        server.kill()
        server.wait()


def in_process_service(tmp: Path, model: Path, threads: int) -> InferenceService:
    """An InferenceService as the daemon builds one (agent/daemon.py), around an installed bundle."""
    profile = bench_profile()
    bundle, key = signed_bundle(tmp, model)
    install_offline(tmp / "device", bundle, key)
    active = active_model(tmp / "device")
    assert active is not None
    power = PowerMeter(profile.power_sensors, power_model_for(profile.hardware_class, load_power_models(None)))
    collector = TelemetryCollector(TelemetryOutbox(tmp / "telemetry.db"), power, DeviceSampler())
    service = InferenceService(collector)
    service.swap(load_model(active.model_path, active.manifest, threads))
    return service


def interleaved_in_process(service: InferenceService, session: Any, x: np.ndarray,
                           pairs: int) -> dict[str, list[float]]:
    """Call by call in rotating order: bare run, InferenceService.infer_blocking on this thread
    (what an application embedding the agent calls), and InferenceService.infer awaited on an
    asyncio loop (what the synthetic workload calls: one hop to an inference thread and back)."""
    feed = {"x": x}
    loop = asyncio.new_event_loop()
    calls = {
        "bare": lambda: session.run(None, feed),
        "blocking": lambda: service.infer_blocking(feed),
        "asyncio": lambda: loop.run_until_complete(service.infer(feed)),
    }
    samples: dict[str, list[float]] = {name: [] for name in calls}
    try:
        for _ in range(20):
            for call in calls.values():
                call()
        names = list(calls)
        for index in range(pairs):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                started = time.perf_counter()
                calls[name]()
                samples[name].append(time.perf_counter() - started)
    finally:
        loop.close()
        service.close()
    return samples


def test_in_process_overhead(tmp_path: Path) -> None:
    threads = agent_threads()
    cases = [  # (label, model kwargs, batch rows, pairs)
        ("small MLP, batch 1", {}, 1, PAIRS),
        ("MLP 2048x4, batch 16 (a few ms)", {"hidden": 2048, "extra_matmuls": 4}, 16, 300),
    ]
    rows, shares = [], []
    for index, (label, kwargs, batch, pairs) in enumerate(cases):
        work = tmp_path / f"case{index}"
        work.mkdir()
        model = mlp_onnx(work / "model.onnx", **kwargs)
        service = in_process_service(work, model, threads)
        assert service.model is not None
        session = service.model.runner.session  # type: ignore[attr-defined]  # the very same ORT session
        x = np.random.default_rng(0).standard_normal((batch, 64)).astype(np.float32)
        samples = interleaved_in_process(service, session, x, pairs)
        bare = samples["bare"]
        bare_p50, bare_p99 = percentiles(bare)
        for arm, name in (("blocking", "InferenceService.infer_blocking"),
                          ("asyncio", "await InferenceService.infer (asyncio)")):
            p50, p99 = percentiles(samples[arm])
            share = median([s / b for s, b in zip(samples[arm], bare, strict=True)]) - 1  # median of paired ratios
            if arm == "blocking":
                shares.append((bare_p50, share))
                target = f"< 5% {verdict(share < IN_PROCESS_TARGET)}" if bare_p50 >= 1.0 else "n/a (compute < 1 ms)"
            else:
                target = "+ a thread hop each way"
            rows.append([label, name, bare_p50, p50, p50 - bare_p50, f"{share:+.1%}", bare_p99, p99, target])
    print_table(f"InferenceService vs bare session.run, in process, {threads} threads, interleaved",
                ["model", "path", "bare p50 ms", "path p50 ms", "+ms (p50s)", "+% (paired)", "bare p99", "path p99",
                 "target"], rows)
    heavy_bare, heavy_share = shares[-1]
    # Not a target but the setup: on a sub-millisecond model the share would measure timer noise.
    assert heavy_bare >= 1.0, f"the 'few ms' model ran in {heavy_bare:.2f} ms; resize it"
    report_targets("in-process InferenceService",
                   [(f"infer_blocking {heavy_share:+.1%} at p50 on a {heavy_bare:.1f} ms model "
                     f"< {IN_PROCESS_TARGET:.0%}", heavy_share < IN_PROCESS_TARGET)])
