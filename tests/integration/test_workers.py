"""`controller serve --workers N` (issue 18): worker processes sharing the ports, store and lease.

Real processes on free ports: a controller with two workers (TLS: server-auth Control/Enroll port,
mutual-TLS device port, HTTP), real agents streaming telemetry every 0.1 s. A worker holding
devices is SIGKILLed: the supervisor logs and restarts it, the devices reconnect, and every seq
each device cut is stored exactly once. /metrics answers for the whole fleet whichever worker the
connection lands on; SIGTERM stops everything within the 2 s promised.

Devices simulated at the wire (a Session stream each, on a connection of its own, so the kernel
gives each to either worker): /healthz counts every worker's streams whichever worker answers, and
a revocation answered by one worker ends the revoked device's stream in the other within seconds.

With TLS, --grpc is served by a Control process of its own: it enrolls, answers from the store,
is restarted when killed without touching the device workers, and its revocation ends a stream
held by a device worker.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_postgres_controller import store_url  # noqa: F401  (the fresh-schema fixture)

from edgefleet.controller.telemetry.live_share import SNAPSHOT_INTERVAL_S
from edgefleet.protos.capability import CAPABILITY_VERSION
from edgefleet.protos.v1 import control_pb2, fleet_pb2, fleet_pb2_grpc, profile_pb2
from fleet_harness import AgentProc, ControllerProc, Proc, enroll_request, wait_until

pytestmark = pytest.mark.integration

SHUTDOWN_S = 2.0
AGENT_ARGS = ["--telemetry-interval", "0.1s"]


def endpoint(controller: ControllerProc) -> dict[str, object]:
    return dict(json.loads((controller.state_dir / "controller.json").read_text()))


def query(db: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    con = sqlite3.connect(db, timeout=30)
    try:
        return list(con.execute(sql, args))
    finally:
        con.close()


def scrape(http_address: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://{http_address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    families: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            families.setdefault(sample.name, []).append((sample.labels, sample.value))
    return families


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def second_controller(tmp_path: Path, grpc_address: str, workers: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet.controller.cli", "controller", "serve", "--state-dir",
         str(tmp_path / f"second-{workers}"), "--grpc", grpc_address, "--http", "off", "--insecure",
         "--workers", str(workers)],
        capture_output=True, text=True, timeout=60,
    )


def test_workers_share_the_ports_and_a_killed_worker_loses_nothing(tmp_path: Path, procs: list[Proc]) -> None:
    # Presence of another worker's device is read from the store, flushed every 2 s: a heartbeat of
    # 1 s (silent after 3 s, plus that flush) keeps a loaded 2-core machine from showing it offline.
    controller = ControllerProc(tmp_path, workers=2, heartbeat_s=1.0)
    procs.append(controller)
    controller.start()
    info = endpoint(controller)
    assert controller.popen is not None and info["pid"] == controller.popen.pid and info["workers"] == 2
    assert info["grpc"] == controller.grpc_address and info["device_grpc"] == controller.device_address
    worker_pids = [int(p) for p in info["worker_pids"]]  # type: ignore[union-attr]

    # The ports are this controller's: another one, with or without workers, is refused in one line.
    for workers in (1, 2):
        result = second_controller(tmp_path, controller.grpc_address, workers)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and controller.grpc_address in errors[0], result.stderr[-2000:]

    token = controller.create_token(uses=4)
    agents = [AgentProc(tmp_path, f"a{i}", controller, token, AGENT_ARGS) for i in range(4)]
    procs.extend(agents)
    for agent in agents:
        agent.start()
    ids = [wait_until(lambda a=agent: a.device_id, 30, "enrolled") for agent in agents]  # type: ignore[misc]
    db = controller.state_dir / "controller.db"

    def owners() -> dict[str, str]:
        return {str(d): str(o) for d, o in query(db, "SELECT device_id, connected_by FROM devices WHERE connected")}

    wait_until(lambda: len(owners()) == 4, 30, "all four streams open")
    wait_until(lambda: all(query(db, "SELECT COUNT(*) FROM telemetry_batches WHERE device_id = ?", d)[0][0] >= 5
                           for d in ids), 30, "telemetry from every device")

    # Whichever worker answers /metrics shows the whole fleet (each connection may land on either),
    # the other workers' devices as of their last snapshot (at most SNAPSHOT_INTERVAL_S old).
    assert controller.http_address
    http = controller.http_address

    def fleet_view() -> tuple[list[float], set[str], bool]:
        families = scrape(http)
        online = [v for labels, v in families["edgefleet_devices"] if labels["state"] == "online"]
        powered = {labels["device"] for labels, _ in families.get("edgefleet_device_power_watts", [])}
        stored = sum(v for labels, v in families["edgefleet_telemetry_batches_total"] if labels["result"] == "stored")
        return online, set(ids) - powered, stored >= 20

    whole = ([4.0], set(), True)
    wait_until(lambda: fleet_view() == whole, 10, "the whole fleet in /metrics")
    time.sleep(SNAPSHOT_INTERVAL_S * 1.5)  # the first answer may have come from the worker holding them all
    for _ in range(4):
        assert fleet_view() == whole
    # `telemetry watch` (TelemetrySummary) reads the store: the whole fleet from either worker too.
    for _ in range(4):
        controller.close_channel()  # a new connection, which may land on the other worker
        rows = controller.call("TelemetrySummary", control_pb2.TelemetrySummaryRequest()).rows
        assert {r.device_id for r in rows if r.online and r.last_batch_unix_ms} == set(ids)

    # SIGKILL the worker holding the most streams; the supervisor restarts it, its devices come back.
    by_worker: dict[int, int] = {}
    for owner in owners().values():
        index = int(owner.rpartition("-w")[2])
        by_worker[index] = by_worker.get(index, 0) + 1
    victim = max(by_worker, key=lambda i: by_worker[i])
    moved = [d for d, o in owners().items() if o.endswith(f"-w{victim}")]
    seq_at_kill = {d: query(db, "SELECT MAX(seq) FROM telemetry_batches WHERE device_id = ?", d)[0][0] for d in ids}
    os.kill(worker_pids[victim], signal.SIGKILL)
    wait_until(lambda: "worker died; restarting it" in controller.log(), 10, "the supervisor to log the death")
    wait_until(lambda: not pid_alive(worker_pids[victim]), 5, "the worker gone")

    def caught_up() -> bool:
        if len(owners()) < 4:
            return False
        latest = dict(query(db, "SELECT device_id, MAX(seq) FROM telemetry_batches GROUP BY device_id"))
        return all(int(latest.get(d, 0)) >= int(seq_at_kill[d]) + 10 for d in ids)  # type: ignore[call-overload]

    wait_until(caught_up, 40, "every device streaming again, the moved ones too")
    assert moved, by_worker
    assert "worker restarted and serving" in wait_until(
        lambda: "worker restarted and serving" in controller.log() and controller.log(), 30, "the restart")
    # The singleton lease is held, by one live process, within seconds of the kill.
    now_ms = int(time.time() * 1000)
    holders = query(db, "SELECT holder FROM leases WHERE expires_at_ms > ?", now_ms)
    assert len(holders) == 1, holders

    # Exactly once: after the agents stop, each device's stored seqs plus what is left in its
    # outbox are 1..n with nothing missing, and nothing stored twice.
    for agent in agents:
        agent.stop()
    for agent, device_id in zip(agents, ids, strict=True):
        stored_seqs = [int(r[0]) for r in query(db, "SELECT seq FROM telemetry_batches WHERE device_id = ? "  # type: ignore[call-overload]
                                                     "ORDER BY seq", device_id)]
        left = [int(r[0]) for r in query(agent.state_dir / "telemetry.db", "SELECT seq FROM batches")]  # type: ignore[call-overload]
        assert len(stored_seqs) == len(set(stored_seqs))
        everything = sorted(set(stored_seqs) | set(left))
        assert everything == list(range(1, max(everything) + 1)), f"{device_id}: a sequence number is missing"

    # SIGTERM: every worker gone, the endpoint file removed, within the 2 s promised.
    pids = [int(p) for p in endpoint(controller)["worker_pids"]]  # type: ignore[union-attr]
    controller.close_channel()
    started = time.monotonic()
    controller.signal(signal.SIGTERM)
    code = controller.wait(15)
    elapsed = time.monotonic() - started
    assert code == 0, controller.log()[-3000:]
    assert elapsed < SHUTDOWN_S, f"stopped in {elapsed:.2f}s"
    assert not any(pid_alive(p) for p in pids + worker_pids)
    assert not (controller.state_dir / "controller.json").exists()


def test_workers_on_postgres(tmp_path: Path, procs: list[Proc], store_url: str) -> None:  # noqa: F811
    import psycopg

    controller = ControllerProc(tmp_path, workers=2, insecure=True, extra_args=["--store", store_url])
    procs.append(controller)
    controller.start()
    agent = AgentProc(tmp_path, "a1", controller, controller.create_token(), AGENT_ARGS)
    procs.append(agent)
    agent.start()
    device_id = wait_until(lambda: agent.device_id, 30, "enrolled")

    def stored() -> int:
        with psycopg.connect(store_url) as con:
            row = con.execute("SELECT COUNT(*) FROM telemetry_batches WHERE device_id = %s", (device_id,)).fetchone()
            return int(row[0]) if row else 0

    wait_until(lambda: stored() >= 5, 30, "telemetry stored in PostgreSQL")
    with psycopg.connect(store_url) as con:
        holders = con.execute("SELECT holder FROM leases WHERE expires_at_ms > %s",
                              (int(time.time() * 1000),)).fetchall()
    assert len(holders) == 1 and holders[0][0].rpartition("-w")[2] in ("0", "1")
    assert controller.device(device_id).online


class DeviceStream:
    """One device's Session stream on a connection of its own (a local subchannel pool), sending a
    heartbeat every 0.3 s until the controller ends the stream; then `code` and `details` say how."""

    def __init__(self, controller: ControllerProc, reply: fleet_pb2.EnrollResponse) -> None:
        self.device_id = reply.device_id
        self.channel = grpc.insecure_channel(controller.grpc_address, options=[("grpc.use_local_subchannel_pool", 1)])
        self.outgoing: queue.Queue[fleet_pb2.AgentMessage | None] = queue.Queue()
        self.accepted = threading.Event()
        self.ended = threading.Event()
        self.code: grpc.StatusCode | None = None
        self.details = ""
        metadata = (("edgefleet-device-id", reply.device_id), ("edgefleet-device-secret", reply.device_secret))
        self.call = fleet_pb2_grpc.FleetStub(self.channel).Session(self._requests(), metadata=metadata)
        threading.Thread(target=self._read, daemon=True).start()

    def _requests(self) -> Iterator[fleet_pb2.AgentMessage]:
        yield fleet_pb2.AgentMessage(hello=fleet_pb2.Hello(
            capability_version=CAPABILITY_VERSION, agent_version="test-workers",
            profile=profile_pb2.HardwareProfile(hardware_class="x86_64-test")))
        while not self.ended.is_set():
            try:
                message = self.outgoing.get(timeout=0.3)
            except queue.Empty:
                message = fleet_pb2.AgentMessage(heartbeat=fleet_pb2.Heartbeat(sent_at_unix_ms=int(time.time() * 1000)))
            if message is None:
                return
            yield message

    def _read(self) -> None:
        try:
            for message in self.call:
                if message.WhichOneof("body") == "accepted":
                    self.accepted.set()
        except grpc.RpcError as exc:
            self.code, self.details = exc.code(), exc.details() or ""
        self.ended.set()

    def close(self) -> None:
        self.outgoing.put(None)
        self.channel.close()


def healthz(http_address: str) -> dict[str, int]:
    with urllib.request.urlopen(f"http://{http_address}/healthz", timeout=10) as reply:  # a new connection each
        return {k: v for k, v in json.loads(reply.read()).items() if k != "status"}


def test_healthz_counts_every_worker_and_a_revocation_ends_the_stream_in_the_other_worker(
        tmp_path: Path, procs: list[Proc]) -> None:
    controller = ControllerProc(tmp_path, workers=2, heartbeat_s=1.0, insecure=True)
    procs.append(controller)
    controller.start()
    db = controller.state_dir / "controller.db"
    assert controller.http_address
    token = controller.create_token(uses=16)

    def owners() -> dict[str, str]:
        return {str(d): str(o) for d, o in query(db, "SELECT device_id, connected_by FROM devices WHERE connected")}

    # Streams on new connections until both workers hold some (the kernel picks one per connection).
    streams: list[DeviceStream] = []
    try:
        while len(streams) < 4 or len(set(owners().values())) < 2:
            assert len(streams) < 16, f"16 connections, all to one worker: {owners()}"
            reply = enroll_request(controller, fleet_pb2.EnrollRequest(
                token=token, capability_version=CAPABILITY_VERSION, agent_version="test-workers",
                profile=profile_pb2.HardwareProfile(hardware_class="x86_64-test")))
            stream = DeviceStream(controller, reply)
            streams.append(stream)
            assert stream.accepted.wait(10), f"no SessionAccepted: {stream.code} {stream.details}"
            wait_until(lambda s=stream: s.device_id in owners(), 10, "the stream recorded")  # type: ignore[misc]
        held = {w: sum(1 for o in owners().values() if o == w) for w in set(owners().values())}
        assert len(held) == 2 and sum(held.values()) == len(streams), held

        # /healthz counts both workers' streams whichever worker answers (each answer below is a
        # connection of its own; neither worker holds them all, so `process_sessions` < the total).
        # Each worker writes its count at most SNAPSHOT_INTERVAL_S after it changed, so wait until 12
        # answers in a row agree: with fewer, all of them may come from the worker whose peer's count
        # it reads is already current while the other worker still reads a stale one.
        total = len(streams)
        http = str(controller.http_address)

        def every_answer_counts_all() -> list[dict[str, int]] | None:
            answers = [healthz(http) for _ in range(12)]
            return answers if all(a["sessions"] == total for a in answers) else None

        answers = wait_until(every_answer_counts_all, 10, "/healthz to count every worker's streams")
        assert all(a["process_sessions"] < total for a in answers), answers
        assert {a["process_sessions"] for a in answers} <= set(held.values()), (answers, held)

        # Revoke every device through one connection, so one worker answers every RevokeDevice: the
        # streams in the other worker end too, within seconds, refused as revoked.
        controller.close_channel()
        started = time.monotonic()
        for stream in streams:
            controller.call("RevokeDevice", control_pb2.RevokeDeviceRequest(device_id=stream.device_id))
        for stream in streams:
            assert stream.ended.wait(max(0.1, 5.0 - (time.monotonic() - started))), \
                f"{stream.device_id} ({owners().get(stream.device_id)}) still streams 5 s after its revocation"
            assert stream.code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in stream.details, \
                (stream.code, stream.details)
        wait_until(lambda: not owners(), 5, "every revoked stream closed in the store")
        wait_until(lambda: all(healthz(controller.http_address)["sessions"] == 0  # type: ignore[arg-type]
                               for _ in range(4)), 10, "/healthz to count no streams")
    finally:
        for stream in streams:
            stream.close()


def test_with_tls_control_is_a_process_of_its_own_that_reaches_the_device_workers_through_the_store(
        tmp_path: Path, procs: list[Proc]) -> None:
    controller = ControllerProc(tmp_path, workers=2, heartbeat_s=1.0)
    procs.append(controller)
    controller.start()
    info = endpoint(controller)
    control_pid = int(info["control_pid"])  # type: ignore[call-overload]
    device_pids = [int(p) for p in info["worker_pids"]]  # type: ignore[union-attr]
    assert len(device_pids) == 2 and control_pid not in device_pids and pid_alive(control_pid)
    assert info["grpc"] == controller.grpc_address and info["device_grpc"] == controller.device_address
    listening = [line for line in controller.log().splitlines() if "worker listening" in line]
    assert sum("role=control" in line for line in listening) == 1, listening
    assert sum("role=devices" in line for line in listening) == 2, listening
    db = controller.state_dir / "controller.db"

    # Enrolled through the Control process (it logs the enrollment as worker 2), streaming to a device worker.
    agent = AgentProc(tmp_path, "a0", controller, controller.create_token(uses=1), AGENT_ARGS)
    procs.append(agent)
    agent.start()
    device_id = wait_until(lambda: agent.device_id, 30, "enrolled")
    assert any("device enrolled" in line and "worker=2" in line for line in controller.log().splitlines())
    owner = wait_until(lambda: query(db, "SELECT connected_by FROM devices WHERE device_id = ? AND connected",
                                     device_id), 30, "the stream open")[0][0]
    assert str(owner).endswith(("-w0", "-w1")), owner
    # What the Control process answers comes from the store: the device online with its telemetry.
    wait_until(lambda: any(r.device_id == device_id and r.online and r.last_batch_unix_ms for r in controller.call(
        "TelemetrySummary", control_pb2.TelemetrySummaryRequest()).rows), 10, "the device online over Control")

    # A dead Control process is restarted; the device workers, and the device's stream, carry on.
    os.kill(control_pid, signal.SIGKILL)
    wait_until(lambda: "worker died; restarting it" in controller.log(), 10, "the supervisor to log the death")
    controller.close_channel()
    wait_until(lambda: _answers(controller), 30, "Control answering again")
    assert all(pid_alive(p) for p in device_pids)
    assert query(db, "SELECT connected_by FROM devices WHERE device_id = ?", device_id)[0][0] == owner

    # A revocation answered by the Control process, which holds no stream, ends the one in the device worker.
    controller.call("RevokeDevice", control_pb2.RevokeDeviceRequest(device_id=device_id))
    wait_until(lambda: not query(db, "SELECT 1 FROM devices WHERE device_id = ? AND connected", device_id), 5,
               "the revoked device's stream ended in its worker")
    assert "stream of a device revoked elsewhere ended" in controller.log()


def _answers(controller: ControllerProc) -> bool:
    try:
        controller.call("ListRollouts", control_pb2.ListRolloutsRequest())
    except grpc.RpcError:
        controller.close_channel()
        return False
    return True
