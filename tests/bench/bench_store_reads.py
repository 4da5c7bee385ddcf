"""Reads under write load and /metrics at fleet scale (issue 18), side by side in one run.

Run: ``flock /work/bench.lock .venv/bin/pytest -s tests/bench/bench_store_reads.py`` (knobs, with their
defaults: EDGEFLEET_BENCH_READS_STREAMS=1000, EDGEFLEET_BENCH_READS_CALLS=300,
EDGEFLEET_BENCH_READS_LOAD=0.8, EDGEFLEET_BENCH_READS_SCRAPE_DEVICES=10000).

1. ``SQLiteStore.list_rollouts`` (50 rollouts) in process, timed on one thread while another writes
   telemetry with ``ingest_telemetry`` in groups of GROUP points (what TelemetryIngest writes per
   flush at ~2,000 batches/s): first idle, then at LOAD x the write ceiling, measured in this run
   by writing as fast as the store takes it. This isolates the store: a read used to wait for the
   lock a group write holds for its whole transaction.
2. ``ListRollouts`` through the real Control RPC (operator token, auth interceptor, 50 rollouts)
   against a real controller (each setup below), timed from a separate probe
   process so the simulated fleet's CPU use here does not delay the calls: first idle (streams
   open, no telemetry), then while the fleet sends telemetry at LOAD x the ingest ceiling. The
   ceiling is measured in the same run: the devices (bench_ingest's SimulatedDevice: one gRPC
   Session per device, real HdrHistograms) offer more than the controller stores, and the stored
   rate (the controller's own counter) is the ceiling. 1,000 streams rather than 10,000: on a
   2-core box the simulated fleet and the controller share the CPUs; the store sees the same
   group writes either way. Run once per setup (EDGEFLEET_BENCH_READS_TRANSPORTS, default
   "tls-workers,tls,insecure"):
   - tls-workers: TLS with --workers 2 (the default on a 2-core host): devices on the mutual-TLS
     device port of two device workers, Control on --grpc in the supervisor's Control process,
     which runs no device stream and no ingest (controller/supervisor.py);
   - tls: TLS with --workers 1, one process: Control on --grpc has its own gRPC server, thread and
     event loop (controller/api/control_server.py), in the interpreter the ingest keeps busy;
   - insecure: --workers 1, devices and Control share --grpc, one server and the one event loop
     the ingest keeps busy, so the call waits for that loop's turns (the 287 ms p95 of issue 18).
3. A /metrics scrape over the real HTTP server (HttpApi over a SQLite store) of SCRAPE_DEVICES
   enrolled devices in four hardware classes, each with a telemetry batch in the live view, with
   per-device series off, at the default cap (DEFAULT_PER_DEVICE_CAP) and for every device ('all',
   what every scrape did before the cap). Five scrapes each, after one warm-up.

Targets (the last line, MET or MISSED; a miss does not fail the test, an error does):
``list_rollouts`` p95 under 5 ms while ingest writes at LOAD x its ceiling, in the store and over the
Control RPC (each transport); a scrape (median) under 200 ms at 10,000 devices with the default per-device cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from bench_ingest import HEARTBEAT_S, STREAMS_PER_CHANNEL, Fleet, SimulatedDevice, scrape, template_batch
from bench_support import bench_profile, close_streams, enroll_many, env_flag, print_table, report_targets
from bench_tls import Transport
from prometheus_client import CollectorRegistry

from edgefleet.controller.api.http_server import HttpApi
from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.store.base import RolloutRecord, TelemetryPoint
from edgefleet.controller.store.sqlite import SQLiteStore
from edgefleet.controller.telemetry.ingest import LiveTelemetry, convert
from edgefleet.controller.telemetry.metrics import DEFAULT_PER_DEVICE_CAP
from edgefleet.protos.capability import CAPABILITY_VERSION
from edgefleet.protos.v1 import fleet_pb2
from fleet_harness import ControllerProc

pytestmark = pytest.mark.integration

STREAMS = env_flag("EDGEFLEET_BENCH_READS_STREAMS", 1000)
CALLS = env_flag("EDGEFLEET_BENCH_READS_CALLS", 300)
LOAD = float(os.environ.get("EDGEFLEET_BENCH_READS_LOAD", "0.8"))
SCRAPE_DEVICES = env_flag("EDGEFLEET_BENCH_READS_SCRAPE_DEVICES", 10_000)
TRANSPORTS = [t for t in os.environ.get("EDGEFLEET_BENCH_READS_TRANSPORTS", "tls-workers,tls,insecure").split(",")
              if t]
SETUPS = {"tls-workers": (False, 2), "tls": (False, 1), "insecure": (True, 1)}  # (--insecure, --workers)
ROLLOUTS = 50
GROUP = 100
STORE_DEVICES = 2000
CEILING_OFFER = 3000  # batches/s offered to find the ceiling: well past what one controller stores here
CEILING_S = 8.0
CALL_GAP_S = 0.02
SETTLE_MAX_S = 60.0
LIST_TARGET_MS = 5.0
SCRAPE_TARGET_MS = 200.0

# The probe: its own process, so the GIL of the simulated fleet here does not delay its calls.
PROBE = """
import json, sys, time, grpc
from edgefleet.protos.v1 import control_pb2, control_pb2_grpc
address, token, calls, gap, ca = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[6]
channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(open(ca, "rb").read())) if ca
           else grpc.insecure_channel(address))
stub = control_pb2_grpc.ControlStub(channel)
metadata = (("authorization", "Bearer " + token),)
stub.ListRollouts(control_pb2.ListRolloutsRequest(), timeout=60, metadata=metadata)  # connect
times = []
for _ in range(calls):
    started = time.perf_counter()
    reply = stub.ListRollouts(control_pb2.ListRolloutsRequest(), timeout=60, metadata=metadata)
    times.append((time.perf_counter() - started) * 1000)
    assert len(reply.rollouts) == int(sys.argv[5]), len(reply.rollouts)
    time.sleep(gap)
print(json.dumps(times))
"""


def probe_list_rollouts(controller: ControllerProc, phase: str) -> np.ndarray:
    """CALLS ListRollouts calls, CALL_GAP_S apart, from a fresh process; their latencies in ms."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, controller.grpc_address, controller.operator_token, str(CALLS),
         str(CALL_GAP_S), str(ROLLOUTS), "" if controller.insecure else str(controller.ca_path)],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"ListRollouts probe ({phase}) failed: {result.stderr[-2000:]}"
    return np.asarray(json.loads(result.stdout.strip().splitlines()[-1]))


def seed_rollouts(store: SQLiteStore) -> None:
    """Finished rollouts (a controller's engine resumes none of them)."""
    for i in range(ROLLOUTS):
        store.put_rollout(RolloutRecord(f"r-{i:03d}", "det", 3, "all", "1,50%,100%", 30.0, 0.1, "[]", 120.0,
                                        True, state="completed", created_at_ms=1_700_000_000_000 + i))


def timed_list_rollouts(store: SQLiteStore) -> np.ndarray:
    times = []
    for _ in range(CALLS):
        started = time.perf_counter()
        assert len(store.list_rollouts()) == ROLLOUTS
        times.append((time.perf_counter() - started) * 1000)
        time.sleep(CALL_GAP_S)
    return np.asarray(times)


class ReadsUnderTheWriteLock(SQLiteStore):
    """The control: reads as they were before per-thread read connections, on the writer's
    connection under its lock (what every read method did: `with self._lock: self._db.execute`)."""

    @contextlib.contextmanager
    def _reading(self, *, snapshot: bool = False) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db


def store_reads_under_writes(path: Path, store_class: type[SQLiteStore]
                             ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(idle ms, loaded ms, write ceiling points/s, written points/s at load) for the store alone."""
    store = store_class(path)
    seed_rollouts(store)
    batch = template_batch()
    now = int(time.time() * 1000)
    batch.seq, batch.start_unix_ms, batch.end_unix_ms = 1, now - 5000, now
    template, _ = convert("dev", batch, now, lambda reason: None)
    seqs = dict.fromkeys(range(STORE_DEVICES), 0)
    written = 0

    def group() -> list[TelemetryPoint]:
        points = []
        for _ in range(GROUP):
            device = written % STORE_DEVICES
            seqs[device] += 1
            points.append(dataclasses.replace(template, device_id=f"dev-{device:05d}", seq=seqs[device]))
        return points

    def write(rate: float | None, seconds: float, stop: threading.Event | None = None) -> float:
        nonlocal written
        started = time.perf_counter()
        count = 0
        while time.perf_counter() - started < seconds and not (stop is not None and stop.is_set()):
            assert all(store.ingest_telemetry(group()))
            written += GROUP
            count += GROUP
            if rate is not None:  # paced: the next group when the rate says so
                time.sleep(max(0.0, started + count / rate - time.perf_counter()))
        return count / (time.perf_counter() - started)

    try:
        idle = timed_list_rollouts(store)
        ceiling = write(None, 3.0)
        stop = threading.Event()
        rate: list[float] = []
        writer = threading.Thread(target=lambda: rate.append(write(LOAD * ceiling, 600, stop)))
        writer.start()
        try:
            time.sleep(0.5)
            loaded = timed_list_rollouts(store)
        finally:
            stop.set()
            writer.join()
    finally:
        store.close()
    return idle, loaded, ceiling, rate[0]


def stored_rate(controller: ControllerProc, seconds: float) -> float:
    """Batches/s the controller stored over `seconds`, from its own counter."""
    before, _ = scrape(controller.http_address)
    started = time.perf_counter()
    time.sleep(seconds)
    after, _ = scrape(controller.http_address)
    return (after - before) / (time.perf_counter() - started)


async def reads_under_load(controller: ControllerProc) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """(idle ms, loaded ms, ceiling/s, offered/s at load, stored/s at load)."""
    hello = fleet_pb2.Hello(capability_version=CAPABILITY_VERSION, agent_version="bench-reads",
                            profile=bench_profile())
    template = template_batch().SerializeToString()
    fleet = Fleet()
    if controller.insecure:
        token = controller.create_token(uses=STREAMS)
        identities = await enroll_many(controller.grpc_address, token, STREAMS, bench_profile())
        channels = [grpc.aio.insecure_channel(controller.grpc_address,
                                              options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(max(1, STREAMS // STREAMS_PER_CHANNEL))]
        devices = [SimulatedDevice(identity, channels[i % len(channels)], fleet, hello, template)
                   for i, identity in enumerate(identities)]
    else:  # a certificate, so a channel, per device (bench_tls's way to enroll them)
        transport = Transport("tls", controller)
        enrolled = await transport.enroll(STREAMS, bench_profile())
        channels = [transport.channel(device) for device in enrolled]
        devices = [SimulatedDevice(device.identity, channel, fleet, hello, template)
                   for device, channel in zip(enrolled, channels, strict=True)]
    senders: list[asyncio.Task[None]] = []
    try:
        for start in range(0, len(devices), 200):
            await asyncio.gather(*(d.open() for d in devices[start:start + 200]))
        await asyncio.sleep(HEARTBEAT_S / 2)
        idle = await asyncio.to_thread(probe_list_rollouts, controller, "idle")

        fleet.period_s = STREAMS / CEILING_OFFER
        rng = np.random.default_rng(1)
        senders = [asyncio.create_task(d.send_loop(float(rng.random()))) for d in devices]
        await asyncio.sleep(2.0)
        ceiling = await asyncio.to_thread(stored_rate, controller, CEILING_S)

        offered = LOAD * ceiling
        fleet.period_s = STREAMS / offered
        # The backlog of the ceiling phase drains: wait until the store takes in what is offered.
        deadline = time.monotonic() + SETTLE_MAX_S
        while await asyncio.to_thread(stored_rate, controller, 2.0) > 1.1 * offered:
            assert time.monotonic() < deadline, f"still draining the ceiling phase's backlog after {SETTLE_MAX_S} s"
        sent0, t0 = fleet.sent, time.perf_counter()
        stored0, _ = await asyncio.to_thread(scrape, controller.http_address)
        loaded = await asyncio.to_thread(probe_list_rollouts, controller, "under load")
        stored1, _ = await asyncio.to_thread(scrape, controller.http_address)
        elapsed = time.perf_counter() - t0
        sent_rate, stored = (fleet.sent - sent0) / elapsed, (stored1 - stored0) / elapsed
        print(f"\nload phase: offered {offered:.0f}/s, sent {sent_rate:.0f}/s, stored {stored:.0f}/s "
              f"over {elapsed:.1f} s")
    finally:
        fleet.running = False
        for task in senders:
            task.cancel()
        await close_streams(devices, channels)
    assert not fleet.errors, fleet.errors[:5]
    return idle, loaded, ceiling, offered, stored


def scrape_times(devices: int) -> list[list[object]]:
    """Rows of (setting, samples, median ms, max ms, bytes) for a /metrics of `devices` devices."""
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "c.db")
        profile = bench_profile().SerializeToString()
        with store._tx() as db:  # enrolled devices, as Fleet.Enroll leaves them (bulk: this is setup)
            db.executemany(
                "INSERT INTO devices (device_id, secret_hash, labels, enrolled_at_ms, hardware_class, profile, "
                "connected, last_seen_ms) VALUES (?, 'x', '{}', ?, ?, ?, 1, ?)",
                [(f"dev-{i:05d}", i, f"x86_64-bench-{i % 4}", profile, int(time.time() * 1000))
                 for i in range(devices)])
        live = LiveTelemetry()
        batch = template_batch()
        now = int(time.time() * 1000)
        batch.seq, batch.start_unix_ms, batch.end_unix_ms = 1, now - 5000, now
        for i in range(devices):
            live(*convert(f"dev-{i:05d}", batch, now, lambda reason: None))
        try:
            for label, cap in (("off", 0), (f"cap {DEFAULT_PER_DEVICE_CAP} (default)", DEFAULT_PER_DEVICE_CAP),
                               ("all (as before the cap)", None)):
                http = HttpApi(store, PresenceTracker(store, 5.0), live, CollectorRegistry(), metrics_per_device=cap)
                port = http.start("127.0.0.1", 0)
                try:
                    times, size, lines = [], 0, 0
                    for attempt in range(6):
                        started = time.perf_counter()
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as reply:
                            body = reply.read()
                        if attempt:  # the first one warms up
                            times.append((time.perf_counter() - started) * 1000)
                        size, lines = len(body), sum(1 for line in body.splitlines() if not line.startswith(b"#"))
                finally:
                    http.stop()
                rows.append([label, lines, f"{np.median(times):.0f}", f"{max(times):.0f}", f"{size / 1e6:.2f}"])
        finally:
            store.close()
    return rows


def test_reads_do_not_wait_behind_writes_and_metrics_stay_cheap(tmp_path: Path) -> None:
    store_runs = {name: store_reads_under_writes(tmp_path / f"{name}.db", store_class) for name, store_class in (
        ("per-thread read connections (now)", SQLiteStore),
        ("reads under the write lock (before, emulated)", ReadsUnderTheWriteLock))}
    _, store_loaded, _, write_rate = store_runs["per-thread read connections (now)"]
    rpc_runs = {}
    for transport in TRANSPORTS:
        assert transport in SETUPS, \
            f"EDGEFLEET_BENCH_READS_TRANSPORTS: {transport!r}; use some of {','.join(SETUPS)}"
        insecure, workers = SETUPS[transport]
        workdir = tmp_path / transport
        (workdir / "controller").mkdir(parents=True)
        seeded = SQLiteStore(workdir / "controller" / "controller.db")
        seed_rollouts(seeded)
        seeded.close()
        controller = ControllerProc(workdir, heartbeat_s=HEARTBEAT_S, insecure=insecure, workers=workers).start()
        try:
            rpc_runs[transport] = asyncio.run(reads_under_load(controller))
        finally:
            controller.stop()
            controller.close_channel()
        _, _, _, offered, stored = rpc_runs[transport]
        assert stored >= 0.5 * offered, \
            f"{transport}: the controller stored {stored:.0f}/s of {offered:.0f}/s offered: no load test"
    def row(phase: str, t: np.ndarray, load: str) -> list[object]:
        return [phase, f"{np.percentile(t, 50):.2f}", f"{np.percentile(t, 95):.2f}", f"{np.percentile(t, 99):.2f}",
                f"{t.max():.1f}", load]

    store_rows: list[list[object]] = []
    for name, (idle_ms, loaded_ms, ceiling_rate, rate) in store_runs.items():
        store_rows += [[name, *row("idle", idle_ms, "-")],
                       [name, *row(f"writes at {LOAD:.0%} of ceiling", loaded_ms,
                                   f"{rate:.0f} points/s (ceiling {ceiling_rate:.0f})")]]
    print_table(f"SQLiteStore.list_rollouts in process ({ROLLOUTS} rollouts, {CALLS} calls {CALL_GAP_S * 1000:.0f} ms "
                f"apart) while another thread writes telemetry in groups of {GROUP}, the write ceiling measured "
                "in this run for each store",
                ["reads", "phase", "p50 ms", "p95 ms", "p99 ms", "max ms", "writes"], store_rows)
    rows = []
    for transport, (idle, loaded, ceiling, offered, stored) in rpc_runs.items():
        rows += [[transport, *row("idle (streams open, no telemetry)", idle, f"ceiling {ceiling:.0f}/s")],
                 [transport, *row(f"ingest at {LOAD:.0%} of ceiling", loaded,
                                  f"{offered:.0f}/s offered, {stored:.0f}/s stored")]]
    print_table(f"ListRollouts over the Control RPC ({ROLLOUTS} rollouts, {CALLS} calls {CALL_GAP_S * 1000:.0f} ms "
                f"apart from a probe process); {STREAMS} gRPC Session streams; ingest ceiling (batches/s) measured "
                "this run for each setup. tls-workers: --workers 2, Control in a process of its own; tls: one "
                "process, Control on its own thread and loop; insecure: one process, one shared loop",
                ["transport", "phase", "p50 ms", "p95 ms", "p99 ms", "max ms", "ingest"], rows)
    scrapes = scrape_times(SCRAPE_DEVICES)
    print_table(f"/metrics over HTTP at {SCRAPE_DEVICES} devices (4 classes), 5 scrapes each after a warm-up",
                ["per-device series", "samples", "median ms", "max ms", "MB"], scrapes)
    store_p95 = float(np.percentile(store_loaded, 95))
    default_scrape = float(scrapes[1][2])  # type: ignore[arg-type]
    report_targets("store reads and /metrics", [
        (f"store list_rollouts p95 {store_p95:.2f} ms under writes at {LOAD:.0%} of their ceiling "
         f"({write_rate:.0f} points/s) < {LIST_TARGET_MS:g} ms", store_p95 < LIST_TARGET_MS),
        *((f"Control RPC ListRollouts ({transport}) p95 {np.percentile(loaded, 95):.2f} ms under ingest at "
           f"{LOAD:.0%} of its ceiling ({offered:.0f}/s, {STREAMS} streams) < {LIST_TARGET_MS:g} ms",
           bool(np.percentile(loaded, 95) < LIST_TARGET_MS))
          for transport, (_, loaded, _, offered, _) in rpc_runs.items()),
        (f"/metrics scrape {default_scrape:.0f} ms (median) at {SCRAPE_DEVICES} devices, per-device cap "
         f"{DEFAULT_PER_DEVICE_CAP} < {SCRAPE_TARGET_MS:g} ms", default_scrape < SCRAPE_TARGET_MS),
    ])
