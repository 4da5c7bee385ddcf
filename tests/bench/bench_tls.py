"""What mutual TLS costs (the security issue): handshakes, telemetry ingest and a rollout, each over
mTLS and over plaintext side by side in one run, reported as the ratio mTLS / plaintext.

Run: ``.venv/bin/pytest -s tests/bench/bench_tls.py`` (knobs, with their defaults:
EDGEFLEET_BENCH_TLS_DEVICES=1000 (handshakes), EDGEFLEET_BENCH_TLS_INGEST_DEVICES=200,
EDGEFLEET_BENCH_TLS_INGEST_RATE=1000 (batches/s, the whole fleet), EDGEFLEET_BENCH_TLS_INGEST_S=15,
EDGEFLEET_BENCH_TLS_ROLLOUT_DEVICES=200 (0 leaves the rollout out), EDGEFLEET_BENCH_TLS_ROLLOUT_HIDDEN=2304
and EDGEFLEET_BENCH_TLS_ROLLOUT_LAYERS=2 (a ~10 MB int8 bundle, as bench_rollout); a quick look:
DEVICES=100 INGEST_DEVICES=50 INGEST_RATE=200 INGEST_S=5 ROLLOUT_DEVICES=20 ROLLOUT_HIDDEN=256).

Two real controller processes run at once: one with TLS (Enroll on its TLS port, devices on the
mutual-TLS device port with certificates from CSRs of their own keys), one with ``--insecure``
(device secrets on one plaintext port). This one asyncio process plays the devices of both over
the real protocol, with bench_ingest's and bench_rollout's simulated devices; each part runs
plaintext first, then mTLS, with the same load, so each ratio is taken side by side.

- Handshakes: DEVICES enrolled devices, each with a gRPC channel of its own (so a TCP connection
  and, over mTLS, a full TLS handshake each, its client certificate checked by the controller),
  all open their Session stream at once; the time until every one got SessionAccepted gives
  handshakes/s. This is a fleet reconnecting after a controller restart or a network outage.
- Ingest: INGEST_DEVICES devices, a channel each, send bench_ingest's telemetry batches (real
  HdrHistograms) at INGEST_RATE batches/s in all for INGEST_S seconds after a settling period:
  stored batches/s (the controller's own counter), p99 ingest lag (its histogram, bucket upper
  bound), send-to-ack p99 and controller CPU per stored batch.
- Rollout: ROLLOUT_DEVICES devices, a channel each (Session and FetchArtifact on it, with the
  agent's TRANSFER_CHANNEL_OPTIONS), get mlp:1 through ``edgefleet rollout create --waves
  1,10%,100% --soak 0s``, fetching and checking the bundle and acking "committed" as in
  bench_rollout. Each controller builds the class build cold (compile, one device measures), so
  both end-to-end times include that; distribution (first install -> completed) is where the
  transport is.

Targets (the last line, MET or MISSED): DEVICES mTLS handshakes within 10 s (1,000 devices: >=
100/s); mTLS ingest stores >= 0.8x the plaintext rate with p99 ingest lag <= 2 s; mTLS rollout
distribution <= 1.25x the plaintext one. A missed target does not fail the test; an error does
(a refused handshake, a rejected batch, a broken stream, a rollout that does not complete).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from bench_ingest import Fleet, SimulatedDevice, lag_p99, scrape, template_batch
from bench_rollout import FleetLog, SimulatedAgent, operator, phases, wait_for_rollout
from bench_support import (
    bench_profile,
    close_streams,
    cpu_seconds,
    enroll_many,
    env_flag,
    print_table,
    report_targets,
)

from edgefleet.agent.certificates import csr_pem, key_pem, new_key
from edgefleet.agent.commands import TRANSFER_CHANNEL_OPTIONS
from edgefleet.agent.identity import Identity
from edgefleet.protos.capability import CAPABILITY_VERSION
from edgefleet.protos.v1 import control_pb2, fleet_pb2, fleet_pb2_grpc, profile_pb2
from fleet_harness import ControllerProc, wait_until
from model_factory import mlp_onnx

pytestmark = pytest.mark.integration

DEVICES = env_flag("EDGEFLEET_BENCH_TLS_DEVICES", 1000)
INGEST_DEVICES = env_flag("EDGEFLEET_BENCH_TLS_INGEST_DEVICES", 200)
INGEST_RATE = env_flag("EDGEFLEET_BENCH_TLS_INGEST_RATE", 1000)
INGEST_S = env_flag("EDGEFLEET_BENCH_TLS_INGEST_S", 15)
ROLLOUT_DEVICES = env_flag("EDGEFLEET_BENCH_TLS_ROLLOUT_DEVICES", 200)
ROLLOUT_HIDDEN = env_flag("EDGEFLEET_BENCH_TLS_ROLLOUT_HIDDEN", 2304)
ROLLOUT_LAYERS = env_flag("EDGEFLEET_BENCH_TLS_ROLLOUT_LAYERS", 2)
HEARTBEAT_S = 5.0  # bench_ingest's devices heartbeat every 5 s; the controllers expect that
HANDSHAKE_TARGET_S = 10.0
INGEST_TARGET_RATIO = 0.8
LAG_TARGET_S = 2.0
ROLLOUT_TARGET_RATIO = 1.25
ROLLOUT_LABEL = "rollout"


@dataclass(frozen=True)
class BenchDevice:
    """An enrolled simulated device and how it reaches its controller: over mTLS with its own key
    and certificate, or plaintext with its secret (then `key` and `certificate` are empty)."""

    identity: Identity
    key: bytes = b""
    certificate: bytes = b""


class Transport:
    """One controller and its devices' way to it; every channel is a connection of its own."""

    def __init__(self, name: str, controller: ControllerProc) -> None:
        self.name = name
        self.controller = controller
        self.ca = b"" if controller.insecure else controller.ca_path.read_bytes()

    def channel(self, device: BenchDevice, options: tuple[tuple[str, Any], ...] = ()) -> grpc.aio.Channel:
        # A local subchannel pool: channels never share a connection, so each one handshakes.
        options = (("grpc.use_local_subchannel_pool", 1), *options)
        if self.controller.insecure:
            return grpc.aio.insecure_channel(self.controller.device_address, options=options)
        credentials = grpc.ssl_channel_credentials(self.ca, device.key, device.certificate)
        return grpc.aio.secure_channel(self.controller.device_address, credentials, options=options)

    async def enroll(self, count: int, profile: profile_pb2.HardwareProfile,
                     labels: dict[str, str] | None = None) -> list[BenchDevice]:
        """`count` devices through Fleet.Enroll from one multi-use token: secrets over plaintext,
        or a CSR of a fresh key each over the TLS port, as the agent enrolls."""
        token = await asyncio.to_thread(self.controller.create_token, uses=count, labels=labels)
        address = self.controller.grpc_address
        if self.controller.insecure:
            return [BenchDevice(identity) for identity in await enroll_many(address, token, count, profile)]
        limit = asyncio.Semaphore(64)
        credentials = grpc.ssl_channel_credentials(self.ca)
        async with grpc.aio.secure_channel(address, credentials) as channel:
            stub = fleet_pb2_grpc.FleetStub(channel)

            async def one() -> BenchDevice:
                key = new_key()
                request = fleet_pb2.EnrollRequest(token=token, capability_version=CAPABILITY_VERSION,
                                                  agent_version="bench-tls", profile=profile, csr_pem=csr_pem(key))
                async with limit:
                    reply = await stub.Enroll(request, timeout=60)
                identity = Identity(reply.device_id, "", address, dict(reply.labels), int(time.time() * 1000))
                return BenchDevice(identity, key_pem(key), reply.certificate.certificate_pem.encode())

            return list(await asyncio.gather(*(one() for _ in range(count))))


# -- handshakes --------------------------------------------------------------------------------
async def handshakes(transport: Transport, enrolled: list[BenchDevice], hello: fleet_pb2.Hello) -> dict[str, float]:
    """Every device opens its Session at once on a fresh channel: seconds until all are accepted."""
    fleet = Fleet()
    template = template_batch().SerializeToString()
    channels = [transport.channel(device) for device in enrolled]
    devices = [SimulatedDevice(device.identity, channel, fleet, hello, template)
               for device, channel in zip(enrolled, channels, strict=True)]
    pid = transport.controller.popen.pid if transport.controller.popen else 0
    cpu0, own0 = cpu_seconds(pid), time.process_time()
    started = time.perf_counter()
    try:
        await asyncio.gather(*(device.open() for device in devices))
        elapsed = time.perf_counter() - started
        cpu, own = cpu_seconds(pid) - cpu0, time.process_time() - own0
    finally:
        fleet.running = False
        await close_streams(devices, channels)
    assert not fleet.errors, fleet.errors[:5]
    return {"seconds": elapsed, "per_s": len(devices) / elapsed, "ctrl_cpu_ms": cpu / len(devices) * 1000,
            "devices_cpu_ms": own / len(devices) * 1000}


# -- ingest ------------------------------------------------------------------------------------
async def ingest(transport: Transport, enrolled: list[BenchDevice], hello: fleet_pb2.Hello) -> dict[str, float]:
    """INGEST_RATE batches/s from the devices for INGEST_S seconds, after one period to settle."""
    fleet = Fleet(period_s=len(enrolled) / INGEST_RATE)
    template = template_batch().SerializeToString()
    channels = [transport.channel(device) for device in enrolled]
    devices = [SimulatedDevice(device.identity, channel, fleet, hello, template)
               for device, channel in zip(enrolled, channels, strict=True)]
    controller = transport.controller
    assert controller.popen is not None
    senders: list[asyncio.Task[None]] = []
    try:
        await asyncio.gather(*(device.open() for device in devices))
        rng = np.random.default_rng(1)
        senders = [asyncio.create_task(device.send_loop(float(rng.random()))) for device in devices]
        await asyncio.sleep(fleet.period_s + 2.0)
        stored0, buckets0 = await asyncio.to_thread(scrape, controller.http_address)
        read0 = time.perf_counter()
        sent0 = fleet.sent
        cpu0, own0 = cpu_seconds(controller.popen.pid), time.process_time()
        fleet.ack_latency.clear()
        await asyncio.sleep(INGEST_S)
        sent_rate = (fleet.sent - sent0) / (time.perf_counter() - read0)
        cpu, own = cpu_seconds(controller.popen.pid) - cpu0, time.process_time() - own0
        stored1, buckets1 = await asyncio.to_thread(scrape, controller.http_address)
        elapsed = time.perf_counter() - read0
        acks = np.asarray(fleet.ack_latency) if fleet.ack_latency else np.asarray([np.nan])
    finally:
        fleet.running = False
        for task in senders:
            task.cancel()
        await close_streams(devices, channels)
    assert not fleet.errors, fleet.errors[:5]
    stored = (stored1 - stored0) / elapsed
    return {"sent_per_s": sent_rate, "stored_per_s": stored, "p99_lag_s": lag_p99(buckets0, buckets1),
            "ack_p99_ms": float(np.percentile(acks, 99) * 1000), "ctrl_cpu": cpu / elapsed,
            "ctrl_cpu_ms_per_batch": cpu / max(stored1 - stored0, 1.0) * 1000, "devices_cpu": own / elapsed}


# -- rollout -----------------------------------------------------------------------------------
async def rollout(transport: Transport, enrolled: list[BenchDevice], hello: fleet_pb2.Hello, workdir: Path,
                  model_args: tuple[str, ...]) -> dict[str, Any]:
    """bench_rollout's run, with a channel per device: add mlp:1, roll it out to the devices
    labelled fleet=rollout and wait until it completed. Returns bench_rollout's phases."""
    controller = transport.controller
    assert controller.popen is not None
    log = FleetLog()
    log.controller_pid = controller.popen.pid
    channels = [transport.channel(device, TRANSFER_CHANNEL_OPTIONS) for device in enrolled]
    agents = [SimulatedAgent(device.identity, channel, hello, log, workdir)
              for device, channel in zip(enrolled, channels, strict=True)]
    try:
        for start in range(0, len(agents), 50):
            await asyncio.gather(*(agent.start() for agent in agents[start:start + 50]))
        ids = {device.identity.device_id for device in enrolled}

        def all_online() -> bool:
            return sum(d.online for d in controller.devices() if d.device_id in ids) == len(agents)

        await asyncio.to_thread(wait_until, all_online, 60, "all rollout devices online")
        await asyncio.to_thread(operator, controller, "models", "add", *model_args)
        created = time.perf_counter()
        info = await asyncio.to_thread(operator, controller, "rollout", "create", "mlp:1", "--to",
                                       f"label fleet={ROLLOUT_LABEL}", "--waves", "1,10%,100%", "--soak", "0s")

        def state() -> control_pb2.RolloutInfo:
            return controller.call("GetRollout", control_pb2.GetRolloutRequest(rollout_id=info["rollout_id"]))

        current, running_at, completed = await wait_for_rollout(
            state, created, f"{transport.name} rollout {info['rollout_id']}")
        cpu_at_completion = (cpu_seconds(log.controller_pid), time.process_time())
        assert current.state == "completed", f"{transport.name} rollout: {current.state} ({current.reason})"
        assert [d.state for d in current.devices] == ["committed"] * len(agents)
    finally:
        log.running = False
        for agent in agents:
            await agent.stop()
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.close()
    assert not log.errors, log.errors[:5]
    assert log.installs == len(agents)
    result = {"log": log, "created": created, "running": running_at, "completed": completed, "rollout": current,
              "cpu_at_completion": cpu_at_completion}
    return {**phases(result), "bundle_bytes": max(size for _, _, size in log.fetches)}


# -- the benchmark -----------------------------------------------------------------------------
def side_by_side(part: Callable[[Transport], Any], transports: list[Transport]) -> dict[str, Any]:
    """One part, plaintext then mTLS, in this process: {transport name: its figures}."""
    figures = {}
    for transport in transports:
        started = time.perf_counter()
        figures[transport.name] = asyncio.run(part(transport))
        print(f"{part.__name__} over {transport.name}: {time.perf_counter() - started:.1f} s", flush=True)
    return figures


def test_mtls_against_plaintext(tmp_path: Path) -> None:
    plain_dir, tls_dir = tmp_path / "plaintext", tmp_path / "mtls"
    plain_dir.mkdir()
    tls_dir.mkdir()
    controllers = [ControllerProc(plain_dir, heartbeat_s=HEARTBEAT_S, insecure=True),
                   ControllerProc(tls_dir, heartbeat_s=HEARTBEAT_S)]
    try:
        for controller in controllers:
            controller.start()
        transports = [Transport("plaintext", controllers[0]), Transport("mTLS", controllers[1])]
        profile = bench_profile()
        hello = fleet_pb2.Hello(capability_version=CAPABILITY_VERSION, agent_version="bench-tls", profile=profile)
        fleets: dict[str, list[BenchDevice]] = {}
        rollout_fleets: dict[str, list[BenchDevice]] = {}
        for transport in transports:
            started = time.perf_counter()
            fleets[transport.name] = asyncio.run(transport.enroll(max(DEVICES, INGEST_DEVICES), profile))
            if ROLLOUT_DEVICES:
                rollout_fleets[transport.name] = asyncio.run(
                    transport.enroll(ROLLOUT_DEVICES, profile, {"fleet": ROLLOUT_LABEL}))
            print(f"\nenrolled {len(fleets[transport.name]) + ROLLOUT_DEVICES} devices over {transport.name} "
                  f"in {time.perf_counter() - started:.1f} s", flush=True)

        async def connect(transport: Transport) -> dict[str, float]:
            return await handshakes(transport, fleets[transport.name][:DEVICES], hello)

        async def telemetry(transport: Transport) -> dict[str, float]:
            return await ingest(transport, fleets[transport.name][:INGEST_DEVICES], hello)

        connected = side_by_side(connect, transports)
        ingested = side_by_side(telemetry, transports)
        rolled: dict[str, Any] = {}
        if ROLLOUT_DEVICES:
            model = mlp_onnx(tmp_path / "mlp.onnx", hidden=ROLLOUT_HIDDEN, extra_matmuls=ROLLOUT_LAYERS)
            calib = tmp_path / "calib.npz"
            np.savez(calib, x=np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
            model_args = (str(model), "--name", "mlp", "--version", "1", "--calib", str(calib))

            async def distribute(transport: Transport) -> dict[str, Any]:
                return await rollout(transport, rollout_fleets[transport.name], hello, tmp_path, model_args)

            rolled = side_by_side(distribute, transports)
    finally:
        for controller in controllers:
            controller.stop()
            controller.close_channel()

    def ratio(figures: dict[str, Any], key: str) -> float:
        return float(figures["mTLS"][key] / figures["plaintext"][key])

    print_table(f"Handshakes: {DEVICES} enrolled devices open their Session at once, a channel (connection) each "
                "(controller and devices share the machine)",
                ["", "all accepted s", "handshakes/s", "ctrl CPU ms/handshake", "devices CPU ms/handshake"],
                [[name, f["seconds"], f"{f['per_s']:.0f}", f["ctrl_cpu_ms"], f["devices_cpu_ms"]]
                 for name, f in connected.items()]
                + [["mTLS / plaintext", f"{ratio(connected, 'seconds'):.2f}x", f"{ratio(connected, 'per_s'):.2f}x",
                    f"{ratio(connected, 'ctrl_cpu_ms'):.2f}x", f"{ratio(connected, 'devices_cpu_ms'):.2f}x"]])
    print_table(f"Telemetry ingest: {INGEST_DEVICES} devices, a channel each, {INGEST_RATE} batches/s offered "
                f"for {INGEST_S} s",
                ["", "sent/s", "stored/s", "p99 lag s (bucket)", "ack p99 ms", "ctrl CPU", "ctrl CPU ms/batch",
                 "devices CPU"],
                [[name, f"{f['sent_per_s']:.0f}", f"{f['stored_per_s']:.0f}", f"<= {f['p99_lag_s']:g}",
                  f"{f['ack_p99_ms']:.0f}", f"{f['ctrl_cpu']:.0%}", f"{f['ctrl_cpu_ms_per_batch']:.3f}",
                  f"{f['devices_cpu']:.0%}"] for name, f in ingested.items()]
                + [["mTLS / plaintext", "", f"{ratio(ingested, 'stored_per_s'):.2f}x", "",
                    f"{ratio(ingested, 'ack_p99_ms'):.2f}x", "", f"{ratio(ingested, 'ctrl_cpu_ms_per_batch'):.2f}x",
                    ""]])
    checks = [
        (f"{DEVICES} mTLS handshakes in {connected['mTLS']['seconds']:.2f} s "
         f"({connected['mTLS']['per_s']:.0f}/s; plaintext {connected['plaintext']['per_s']:.0f}/s) "
         f"<= {HANDSHAKE_TARGET_S:g} s", connected["mTLS"]["seconds"] <= HANDSHAKE_TARGET_S),
        (f"mTLS ingest {ingested['mTLS']['stored_per_s']:.0f}/s = {ratio(ingested, 'stored_per_s'):.2f}x plaintext "
         f">= {INGEST_TARGET_RATIO:g}x", ratio(ingested, "stored_per_s") >= INGEST_TARGET_RATIO),
        (f"mTLS p99 ingest lag <= {ingested['mTLS']['p99_lag_s']:g} s <= {LAG_TARGET_S:g} s",
         ingested["mTLS"]["p99_lag_s"] <= LAG_TARGET_S),
    ]
    if rolled:
        mb = rolled["mTLS"]["bundle_bytes"] / (1 << 20)
        print_table(f"Rollout of mlp:1 ({mb:.1f} MB bundle) to {ROLLOUT_DEVICES} devices, a channel each, waves "
                    "1,10%,100%, soak 0s, class build cold on each controller",
                    ["", "end to end s", "planning s", "distribution s", "on the wire s", "ctrl CPU (distribution)",
                     "devices CPU (distribution)"],
                    [[name, f["e2e"], f["planning"], f["distribution"], f["wire"], f"{f['controller_cpu']:.2f}",
                      f"{f['simulator_cpu']:.2f}"] for name, f in rolled.items()]
                    + [["mTLS / plaintext", f"{ratio(rolled, 'e2e'):.2f}x", f"{ratio(rolled, 'planning'):.2f}x",
                        f"{ratio(rolled, 'distribution'):.2f}x", f"{ratio(rolled, 'wire'):.2f}x", "", ""]])
        checks.append((f"mTLS rollout distribution {rolled['mTLS']['distribution']:.2f} s = "
                       f"{ratio(rolled, 'distribution'):.2f}x plaintext <= {ROLLOUT_TARGET_RATIO:g}x "
                       f"(end to end {ratio(rolled, 'e2e'):.2f}x)",
                       ratio(rolled, "distribution") <= ROLLOUT_TARGET_RATIO))
    report_targets("mTLS", checks)
