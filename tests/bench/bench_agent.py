"""Agent overhead and footprint (issue 6).

Run: ``.venv/bin/pytest -s tests/bench/bench_agent.py``.

1. Overhead over the Unix socket: a real agent process serving an installed model, called through
   ``LocalClient``, against a bare onnxruntime ``session.run`` of the same model file with the
   agent's thread count (the profile's physical cores), in this process. Blocks of requests
   alternate between the two, so both see the same machine load. Target: +0.3 ms at p50.
   The model is a small MLP (tens of microseconds of compute), so the difference is the overhead.
2. Overhead in process: ``InferenceService.infer`` on an asyncio loop (queue, batching check,
   worker thread hop, telemetry recording) against bare ``session.run``, interleaved the same way,
   on a model whose compute is a few ms so that a 5% target means something. Target: < 5% at p50.
3. Footprint: idle CPU of the agent process (telemetry every 5 s, controller heartbeat 1 s) over
   ~20 s of psutil ``cpu_times``, target < 1% of a core; RSS with the model loaded.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil
import pytest
from bench_support import bench_profile, median, print_table, verdict

from edgefleet.agent.client import LocalClient
from edgefleet.agent.device_stats import DeviceSampler
from edgefleet.agent.outbox import TelemetryOutbox
from edgefleet.agent.power import PowerMeter, load_power_models, power_model_for
from edgefleet.agent.runtime import load_model
from edgefleet.agent.serving import InferenceService
from edgefleet.agent.telemetry import TelemetryCollector
from edgefleet.firmware.slots import active_model
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
    controller = ControllerProc(tmp, heartbeat_s=1.0).start()
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
    assert share < 0.05, f"idle agent used {share:.1%} of a core"  # 5x the target: a real regression, not noise


def test_local_api_overhead_over_the_unix_socket(fleet: Any) -> None:
    _, agent, model = fleet
    threads = agent_threads()
    session = bare_session(model, threads)
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    samples: dict[str, list[float]] = {"bare": [], "api": [], "status": []}
    with LocalClient(f"unix://{agent.state_dir / 'agent.sock'}") as client:
        calls = {"bare": lambda: session.run(None, {"x": x}), "api": lambda: client.infer({"x": x}),
                 "status": client.status}
        for _ in range(200):  # warm-up: channel, ORT arenas, both sides
            for call in calls.values():
                call()
        # Blocks in rotating order: the same load hits all three. Blocks rather than single calls,
        # because two onnxruntime thread pools (the agent's and this one) spinning against each
        # other on a 2-core box would slow the bare baseline down, flattering the agent.
        for index in range(PAIRS // BLOCK):
            names = list(calls)
            names = names[index % 3:] + names[:index % 3]
            for name in names:
                for _ in range(BLOCK):
                    started = time.perf_counter()
                    calls[name]()
                    samples[name].append(time.perf_counter() - started)
    bare_p50, bare_p99 = percentiles(samples["bare"])
    api_p50, api_p99 = percentiles(samples["api"])
    status_p50, status_p99 = percentiles(samples["status"])
    overhead = api_p50 - bare_p50
    status_overhead = status_p50 - bare_p50
    print_table(f"Local API over the Unix socket vs bare session.run (small MLP, batch 1, {threads} threads, "
                f"{PAIRS} calls each, interleaved in blocks of {BLOCK})",
                ["path", "p50 ms", "p99 ms", "p50 overhead ms", "target"],
                [["bare session.run", bare_p50, bare_p99, "", ""],
                 ["LocalClient.infer", api_p50, api_p99, overhead,
                  f"< +{SOCKET_TARGET_MS} ms {verdict(overhead < SOCKET_TARGET_MS)}"],
                 ["LocalClient.status (no inference)", status_p50, status_p99, status_overhead,
                  "gRPC round trip alone"]])
    # The target is reported above; only a gross regression fails (the box is shared and small).
    assert overhead < 20 * SOCKET_TARGET_MS, f"the local API adds {overhead:.2f} ms at p50"


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


async def interleaved_in_process(service: InferenceService, session: Any, x: np.ndarray,
                                 pairs: int) -> dict[str, list[float]]:
    """Call by call in rotating order: bare run, the same run through asyncio.to_thread (the thread
    hop the service makes, alone), and InferenceService.infer."""
    worker = asyncio.create_task(service.run())
    samples: dict[str, list[float]] = {"bare": [], "to_thread": [], "served": []}
    feed = {"x": x}

    async def bare() -> None:
        session.run(None, feed)

    async def hop() -> None:
        await asyncio.to_thread(session.run, None, feed)

    async def served() -> None:
        await service.infer(feed)

    calls = {"bare": bare, "to_thread": hop, "served": served}
    try:
        for _ in range(20):
            for call in calls.values():
                await call()
        for index in range(pairs):
            names = list(calls)
            for name in names[index % 3:] + names[:index % 3]:
                started = time.perf_counter()
                await calls[name]()
                samples[name].append(time.perf_counter() - started)
    finally:
        worker.cancel()
    return samples


def test_in_process_overhead(tmp_path: Path) -> None:
    threads = agent_threads()
    cases = [  # (label, model kwargs, batch rows, pairs)
        ("small MLP, batch 1", {}, 1, PAIRS),
        ("MLP 1024x4, batch 16 (a few ms)", {"hidden": 1024, "extra_matmuls": 4}, 16, 300),
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
        samples = asyncio.run(interleaved_in_process(service, session, x, pairs))
        bare = samples["bare"]
        bare_p50, bare_p99 = percentiles(bare)
        for arm, name in (("to_thread", "asyncio.to_thread(session.run)"), ("served", "InferenceService.infer")):
            p50, p99 = percentiles(samples[arm])
            share = median([s / b for s, b in zip(samples[arm], bare, strict=True)]) - 1  # median of paired ratios
            if arm == "served":
                shares.append((bare_p50, share))
                target = f"< 5% {verdict(share < IN_PROCESS_TARGET)}" if bare_p50 >= 1.0 else "n/a (compute < 1 ms)"
            else:
                target = "the thread hop alone"
            rows.append([label, name, bare_p50, p50, p50 - bare_p50, f"{share:+.1%}", bare_p99, p99, target])
    print_table(f"InferenceService.infer (asyncio) vs bare session.run, in process, {threads} threads, interleaved",
                ["model", "path", "bare p50 ms", "path p50 ms", "+ms (p50s)", "+% (paired)", "bare p99", "path p99",
                 "target"], rows)
    heavy_bare, heavy_share = shares[-1]
    assert heavy_bare >= 1.0, f"the 'few ms' model ran in {heavy_bare:.2f} ms; resize it"
    assert heavy_share < 1.0, f"InferenceService adds {heavy_share:.0%} to a {heavy_bare:.1f} ms model"
