"""Rollout of a ~10 MB bundle to 200 devices (issue 8): end-to-end time against a plain loopback copy.

Run: ``.venv/bin/pytest -s tests/bench/bench_rollout.py`` (knobs, with their defaults:
EDGEFLEET_BENCH_ROLLOUT_DEVICES=200; EDGEFLEET_BENCH_ROLLOUT_HIDDEN=2304 and
EDGEFLEET_BENCH_ROLLOUT_LAYERS=2 size the model: ~41 MB fp32, a ~10 MB int8 bundle).

A real controller process; 200 devices simulated by this one asyncio process over the real
protocol: Fleet.Enroll (one multi-use token), a Session stream each (Hello with this machine's
real profile, heartbeats), Command.install received on the stream, the bundle fetched with
FetchArtifact (on channels with the agent's own TRANSFER_CHANNEL_OPTIONS), and a final CommandAck
"committed". Every byte is checked: the first fetch of a bundle is parsed and sha256-checked
against the command, and every later fetch's ArtifactChunk replies are compared, as they came
off the wire, byte for byte with that first fetch's (offsets, data and sizes). (A real device
parses and hashes its own 10 MB on its own CPU in ~35 ms; doing that for 200 devices on this one
2-core machine would measure the simulation, not the fleet.)
The one device the compiler asks to time candidates (MeasureCandidates) fetches
them and times them with the agent's own ``edgefleet.agent.measure.time_candidates``. The model
goes in with ``edgefleet models add`` and out with ``edgefleet rollout create --waves 1,10%,100%
--soak 0s`` (the operator CLI, in process).

Two fleets of 200 devices of the same class (labels fleet=a and fleet=b), one after the other:
fleet A gets mlp:1 cold (the class build is compiled and measured during planning), then fleet B
gets the same mlp:1 with the class build cached, as every later rollout of that version to that
class does.

Reported for each: end-to-end (create -> completed), split into planning (compile, device
measurement, bundle signing) and distribution (first install command -> completed); distribution
is split again into time on the wire (the union of the intervals in which at least one device
was fetching) and time in the controller (the rest: dispatch, acks, wave changes). The baseline,
run twice on the same machine right after the rollouts (the bundle exists only once it is built),
the median of the two kept: DEVICES sequential copies of the same bundle through a loopback TCP
socket (``socket.sendfile`` into ``recv_into``).
Target: within 3x of that copy, for distribution in both rollouts and end to end once the class
build is cached. A cold end to end includes compiling a 41 MB model into several candidates and
timing them on a device; it is reported, not held to the copy. The last line says MET or MISSED
for each; a missed target does not fail the test, a rollout that does not complete does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from bench_support import (
    MB,
    cpu_seconds,
    device_metadata,
    enroll_many,
    env_flag,
    median,
    print_table,
    report_targets,
    verdict,
)
from click.testing import CliRunner

from edgefleet.agent.commands import FETCH_CHUNK, TRANSFER_CHANNEL_OPTIONS
from edgefleet.agent.identity import Identity
from edgefleet.agent.measure import time_candidates
from edgefleet.agent.profiler import collect_profile
from edgefleet.controller.cli.main import cli
from edgefleet.protos.capability import CAPABILITY_VERSION
from edgefleet.protos.v1 import control_pb2, fleet_pb2, fleet_pb2_grpc
from fleet_harness import ControllerProc, wait_until
from model_factory import mlp_onnx

pytestmark = pytest.mark.integration

DEVICES = env_flag("EDGEFLEET_BENCH_ROLLOUT_DEVICES", 200)
HIDDEN = env_flag("EDGEFLEET_BENCH_ROLLOUT_HIDDEN", 2304)  # ~42 MB fp32; int8 makes the bundle ~10 MB
LAYERS = env_flag("EDGEFLEET_BENCH_ROLLOUT_LAYERS", 2)
HEARTBEAT_S = 2.0
TARGET_FACTOR = 3.0
STREAMS_PER_CHANNEL = 25


class FleetLog:
    def __init__(self) -> None:
        self.fetches: list[tuple[float, float, int]] = []  # (start, end, bytes) of install fetches
        self.fetched_by: dict[str, tuple[float, float, int]] = {}  # the same, by device
        self.first_install_at: float | None = None
        self.cpu_at_first_install: tuple[float, float] = (0.0, 0.0)  # (controller, this process) CPU seconds
        self.controller_pid = 0
        self.installs = 0
        self.measures = 0
        self.errors: list[str] = []
        self.running = True
        # sha256 -> the ArtifactChunk replies of the first fetch of that artifact, which was sha256-checked
        self.references: dict[str, list[bytes]] = {}
        self.reference_sizes: dict[str, int] = {}
        self.hashed_fetches = 0


def fetch_call(channel: grpc.aio.Channel, identity: Identity, sha: str, raw: bool) -> Any:
    """FetchArtifact from offset 0; with raw=True the replies come as their wire bytes."""
    return channel.unary_stream(
        "/edgefleet.v1.Fleet/FetchArtifact",
        request_serializer=fleet_pb2.FetchArtifactRequest.SerializeToString,
        response_deserializer=None if raw else fleet_pb2.ArtifactChunk.FromString,
    )(fleet_pb2.FetchArtifactRequest(sha256=sha, offset=0, chunk_size=FETCH_CHUNK),
      metadata=device_metadata(identity))


async def fetch(channel: grpc.aio.Channel, identity: Identity, sha: str) -> tuple[list[bytes], dict[int, bytes], str,
                                                                                   int]:
    """The first fetch of an artifact, parsed and hashed as the bytes arrive.

    Returns (the ArtifactChunk replies as sent, {offset: data}, sha256, size)."""
    digest, size, wire, chunks = hashlib.sha256(), 0, [], {}
    async for message in fetch_call(channel, identity, sha, raw=True):
        chunk = fleet_pb2.ArtifactChunk.FromString(message)
        if chunk.offset != size:
            raise RuntimeError(f"chunk at {chunk.offset}, expected {size}")
        digest.update(chunk.data)
        wire.append(message)
        chunks[size] = chunk.data
        size += len(chunk.data)
    return wire, chunks, digest.hexdigest(), size


async def fetch_compare(channel: grpc.aio.Channel, identity: Identity, sha: str, reference: list[bytes]) -> None:
    """FetchArtifact from offset 0, every reply compared byte for byte with the first (hashed)
    fetch's reply at that position: offsets, data and total size all have to match."""
    index = 0
    async for message in fetch_call(channel, identity, sha, raw=True):
        if index >= len(reference) or message != reference[index]:
            raise RuntimeError(f"reply {index} ({len(message)} bytes) differs from the artifact")
        index += 1
    if index != len(reference):
        raise RuntimeError(f"{index} replies, the artifact has {len(reference)}")


class SimulatedAgent:
    def __init__(self, identity: Identity, channel: grpc.aio.Channel, hello: fleet_pb2.Hello, log: FleetLog,
                 workdir: Path) -> None:
        self.identity = identity
        self.channel = channel
        self.hello = hello
        self.log = log
        self.workdir = workdir
        self.accepted = asyncio.Event()
        self.outbox: asyncio.Queue[fleet_pb2.AgentMessage] = asyncio.Queue()
        self.tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        self.outbox.put_nowait(fleet_pb2.AgentMessage(hello=self.hello))
        self.call = fleet_pb2_grpc.FleetStub(self.channel).Session(self._messages(),
                                                                    metadata=device_metadata(self.identity))
        self.tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._heartbeats())]
        await asyncio.wait_for(self.accepted.wait(), 60)

    async def _messages(self) -> Any:
        while True:
            yield await self.outbox.get()

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self.outbox.put_nowait(fleet_pb2.AgentMessage(heartbeat=fleet_pb2.Heartbeat(
                sent_at_unix_ms=int(time.time() * 1000))))

    async def _read(self) -> None:
        try:
            async for message in self.call:
                kind = message.WhichOneof("body")
                if kind == "accepted":
                    self.accepted.set()
                elif kind == "command":
                    self.tasks.append(asyncio.create_task(self._execute(message.command)))
        except grpc.aio.AioRpcError as exc:
            if self.log.running:
                self.log.errors.append(f"{self.identity.device_id} session: {exc.code().name} {exc.details()}")

    async def _execute(self, command: fleet_pb2.Command) -> None:
        try:
            action = command.WhichOneof("action")
            if action == "install":
                ack = await self._install(command)
            elif action == "measure":
                ack = await self._measure(command)
            else:
                ack = fleet_pb2.CommandAck(command_id=command.command_id, result="failed", reason="unsupported")
        except Exception as exc:
            self.log.errors.append(f"{self.identity.device_id} {command.command_id}: {exc!r}")
            ack = fleet_pb2.CommandAck(command_id=command.command_id, result="failed", reason="bench_error",
                                       message=str(exc))
        ack.final = True
        self.outbox.put_nowait(fleet_pb2.AgentMessage(command_ack=ack))

    async def _install(self, command: fleet_pb2.Command) -> fleet_pb2.CommandAck:
        install = command.install
        started = time.perf_counter()
        if self.log.first_install_at is None:
            self.log.first_install_at = started
            self.log.cpu_at_first_install = (cpu_seconds(self.log.controller_pid), time.process_time())
        reference = self.log.references.get(install.sha256)
        if reference is None:
            wire, _, sha, size = await fetch(self.channel, self.identity, install.sha256)
            if sha != install.sha256 or size != install.size:
                raise RuntimeError(f"fetched {size} bytes with sha256 {sha[:12]}; the command says {install.size} "
                                   f"bytes, {install.sha256[:12]}")
            self.log.references[install.sha256] = wire
            self.log.reference_sizes[install.sha256] = size
            self.log.hashed_fetches += 1
        else:
            await fetch_compare(self.channel, self.identity, install.sha256, reference)
            size = self.log.reference_sizes[install.sha256]
        ended = time.perf_counter()
        self.log.fetches.append((started, ended, size))
        self.log.fetched_by[self.identity.device_id] = (started, ended, size)
        self.log.installs += 1
        return fleet_pb2.CommandAck(command_id=command.command_id, result="committed", model=install.name,
                                    version=install.version)

    async def _measure(self, command: fleet_pb2.Command) -> fleet_pb2.CommandAck:
        spec = command.measure
        files = {}
        for candidate in spec.candidates:
            _, chunks, sha, _ = await fetch(self.channel, self.identity, candidate.sha256)
            assert sha == candidate.sha256
            path = self.workdir / f"{self.identity.device_id}-{candidate.name}.onnx"
            path.write_bytes(b"".join(chunks[offset] for offset in sorted(chunks)))
            files[candidate.name] = path
        timings = await asyncio.to_thread(time_candidates, files, spec, 2)
        self.log.measures += 1
        return fleet_pb2.CommandAck(command_id=command.command_id, result="done", timings=timings)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.call.cancel()


def loopback_copies(bundle: Path, count: int) -> float:
    """`count` sequential copies of the file through a loopback TCP connection each: seconds."""
    size = bundle.stat().st_size
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        for _ in range(count):
            conn, _ = server.accept()
            with conn, open(bundle, "rb") as f:
                conn.sendfile(f)

    thread = threading.Thread(target=serve, daemon=True)
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    started = time.perf_counter()
    thread.start()
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as conn:
            received = 0
            while received < size:
                n = conn.recv_into(view)
                if not n:
                    break
                received += n
            assert received == size
    elapsed = time.perf_counter() - started
    thread.join(10)
    server.close()
    return elapsed


def union_s(intervals: list[tuple[float, float, int]]) -> float:
    total, current_start, current_end = 0.0, None, None
    for start, end, _ in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None and current_start is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None and current_start is not None:
        total += current_end - current_start
    return total


def operator(controller: ControllerProc, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(cli, [*args, "--json", "--state-dir", str(controller.state_dir)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


async def run_rollout(controller: ControllerProc, identities: list[Identity], workdir: Path,
                      model_args: tuple[str, ...] | None, selector: str) -> dict[str, Any]:
    """Bring `identities` online, add the model (when model_args are given), roll mlp:1 out to
    `selector` and wait for it to complete; the simulated devices go offline afterwards."""
    profile = collect_profile(microbench=False)
    hello = fleet_pb2.Hello(capability_version=CAPABILITY_VERSION, agent_version="bench-rollout", profile=profile)
    log = FleetLog()
    assert controller.popen is not None
    log.controller_pid = controller.popen.pid
    channels = [grpc.aio.insecure_channel(controller.grpc_address, options=[
        ("grpc.use_local_subchannel_pool", 1), *TRANSFER_CHANNEL_OPTIONS])
        for _ in range(max(1, len(identities) // STREAMS_PER_CHANNEL))]
    agents = [SimulatedAgent(identity, channels[i % len(channels)], hello, log, workdir)
              for i, identity in enumerate(identities)]
    try:
        for start in range(0, len(agents), 50):
            await asyncio.gather(*(a.start() for a in agents[start:start + 50]))
        ids = {i.device_id for i in identities}
        await asyncio.to_thread(wait_until, lambda: sum(d.online for d in controller.devices() if d.device_id in ids)
                                == len(agents), 60, "all simulated devices online")
        if model_args is not None:
            await asyncio.to_thread(operator, controller, "models", "add", *model_args)
        created = time.perf_counter()
        info = await asyncio.to_thread(operator, controller, "rollout", "create", "mlp:1", "--to", selector,
                                       "--waves", "1,10%,100%", "--soak", "0s")
        rollout_id = info["rollout_id"]

        def state() -> control_pb2.RolloutInfo:
            return controller.call("GetRollout", control_pb2.GetRolloutRequest(rollout_id=rollout_id))

        current, running_at, completed = await wait_for_rollout(state, created, f"rollout {rollout_id}")
        cpu_at_completion = (cpu_seconds(log.controller_pid), time.process_time())
        assert current.state == "completed", current.reason
        assert [d.state for d in current.devices] == ["committed"] * len(agents)
        builds = [(b.hardware_class, b.state, b.measured_on) for b in current.builds]
        return {"log": log, "created": created, "running": running_at, "completed": completed, "builds": builds,
                "rollout": current, "cpu_at_completion": cpu_at_completion}
    finally:
        log.running = False
        for agent in agents:
            await agent.stop()
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.close()


async def wait_for_rollout(state: Any, created: float, what: str,
                           limit_s: float = 600.0) -> tuple[control_pb2.RolloutInfo, float | None, float]:
    """Poll ``state()`` until the rollout leaves planning/running: (its last state, when it started
    running, when it stopped), on perf_counter; an AssertionError after ``limit_s``."""
    running_at = None
    while True:
        current = await asyncio.to_thread(state)
        if running_at is None and current.state == "running":
            running_at = time.perf_counter()
        if current.state not in ("planning", "running"):
            return current, running_at, time.perf_counter()
        if time.perf_counter() - created > limit_s:
            raise AssertionError(f"{what} still {current.state} after {limit_s:g} s; see the controller log")
        await asyncio.sleep(0.05)


def phases(result: dict[str, Any]) -> dict[str, Any]:
    """One rollout's timings: end to end, planning, distribution, wire and controller time, CPU."""
    log: FleetLog = result["log"]
    distribution_start = log.first_install_at or result["running"]
    distribution = result["completed"] - distribution_start
    wire = union_s(log.fetches)
    waves: dict[int, list[tuple[float, float, int]]] = {}
    wave_of = {d.device_id: d.wave for d in result["rollout"].devices}
    for device_id, interval in log.fetched_by.items():
        waves.setdefault(wave_of[device_id], []).append(interval)
    return {
        "e2e": result["completed"] - result["created"],
        "planning": distribution_start - result["created"],
        "distribution": distribution,
        "wire": wire,
        "controller": distribution - wire,
        "controller_cpu": (result["cpu_at_completion"][0] - log.cpu_at_first_install[0]) / distribution,
        "simulator_cpu": (result["cpu_at_completion"][1] - log.cpu_at_first_install[1]) / distribution,
        "fetch_times": [end - start for start, end, _ in log.fetches],
        "waves": {w: v for w, v in sorted(waves.items())},
        "start": distribution_start,
    }


def test_rollout_of_10mb_to_200_devices(tmp_path: Path) -> None:
    """Two fleets of DEVICES devices of one class. Fleet A gets mlp:1 cold: the class build is
    compiled and measured during planning. Fleet B then gets the same mlp:1: the class build is
    cached, as for every later rollout of a version to a class already built."""
    model = mlp_onnx(tmp_path / "mlp.onnx", hidden=HIDDEN, extra_matmuls=LAYERS)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    controller = ControllerProc(tmp_path, heartbeat_s=HEARTBEAT_S, insecure=True).start()  # device secrets
    results: dict[str, dict[str, Any]] = {}
    try:
        profile = collect_profile(microbench=False)
        fleets = {name: asyncio.run(enroll_many(
            controller.grpc_address, controller.create_token(uses=DEVICES, labels={"fleet": name}), DEVICES, profile))
            for name in ("a", "b")}
        model_args = (str(model), "--name", "mlp", "--version", "1", "--calib", str(calib))
        results["cold"] = asyncio.run(run_rollout(controller, fleets["a"], tmp_path, model_args, "label fleet=a"))
        results["cached"] = asyncio.run(run_rollout(controller, fleets["b"], tmp_path, None, "label fleet=b"))
        sizes = set()
        for result in results.values():
            log: FleetLog = result["log"]
            assert not log.errors, log.errors[:5]
            assert log.installs == DEVICES
            sizes |= {size for _, _, size in log.fetches}
        assert len(sizes) == 1, "both fleets fetch the one class build"
        assert results["cached"]["log"].measures == 0, "a cached build is not measured again"
        bundle_size = sizes.pop()
        bundle_path = next(p for p in controller.state_dir.rglob("*") if p.is_file() and p.stat().st_size
                           == bundle_size)  # the bundle in the artifact store, for the baseline
    finally:
        controller.stop()
        controller.close_channel()
    copies_first = loopback_copies(bundle_path, DEVICES)
    cold, cached = phases(results["cold"]), phases(results["cached"])
    copies_second = loopback_copies(bundle_path, DEVICES)
    copies = median([copies_first, copies_second])
    build = results["cold"]["rollout"].builds[0]
    mb = bundle_size / MB

    def cells(p: dict[str, Any], key: str, target: bool = False) -> list[Any]:
        ratio = f"{p[key] / copies:.1f}x"
        return [p[key], f"{ratio} {verdict(p[key] <= TARGET_FACTOR * copies)}" if target else ratio]

    rows = [("end to end (create -> completed)", "e2e", False, True),
            ("  planning (compile, measure, sign)", "planning", False, False),
            ("  distribution (first install -> completed)", "distribution", True, True),
            ("    on the wire (>= 1 fetch running)", "wire", False, False),
            ("    in the controller (the rest)", "controller", False, False)]
    print_table(f"Rollout of mlp:1 to {DEVICES} simulated devices, waves 1,10%,100%, soak 0s; bundle {mb:.1f} MB "
                f"(model {model.stat().st_size / MB:.1f} MB fp32; build {build.hardware_class}, "
                f"measured on {build.measured_on or '-'}); target <= 3x the copy",
                ["phase", "cold: seconds", "x copy", "build cached: seconds", "x copy"],
                [[label, *cells(cold, key, cold_target), *cells(cached, key, cached_target)]
                 for label, key, cold_target, cached_target in rows]
                + [[f"loopback copy of {DEVICES} x {mb:.1f} MB (two runs)",
                    f"{copies_first:.2f} / {copies_second:.2f}", "1x", "", ""]])
    for name, p, result in (("cold", cold, results["cold"]), ("build cached", cached, results["cached"])):
        print(f"{name}: per-device fetch median {median(p['fetch_times']):.2f} s, max {max(p['fetch_times']):.2f} s; "
              f"aggregate over the wire {DEVICES * mb / max(p['wire'], 1e-9):.0f} MB/s, "
              f"copy {DEVICES * mb / copies:.0f} MB/s; candidate measurements answered: {result['log'].measures}")
        print("  by wave (devices, first fetch start -> last fetch end, relative to the first install, MB/s): "
              + "; ".join(
                  f"wave {w}: {len(v)}, {min(a for a, _, _ in v) - p['start']:.2f} -> "
                  f"{max(b for _, b, _ in v) - p['start']:.2f} s, "
                  f"{sum(n for _, _, n in v) / MB / max(max(b for _, b, _ in v) - min(a for a, _, _ in v), 1e-9):.0f}"
                  for w, v in p["waves"].items()))
        print(f"  CPU during distribution (in cores, 2 on this machine): controller {p['controller_cpu']:.2f}, "
              f"simulated devices (this process) {p['simulator_cpu']:.2f}")
    report_targets("rollout", [
        (f"{label} {p[key]:.2f} s = {p[key] / copies:.1f}x the copy <= {TARGET_FACTOR:g}x",
         p[key] <= TARGET_FACTOR * copies)
        for label, p, key in (("cold distribution", cold, "distribution"),
                              ("cached distribution", cached, "distribution"),
                              ("cached end to end", cached, "e2e"))])
