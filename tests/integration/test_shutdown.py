"""SIGTERM stops the controller and the agent within SHUTDOWN_S, exit code 0, with their state flushed.

Real processes on free ports: telemetry flows, then the process is sent SIGTERM while it is busy
(streams open, a workload running, ingest groups in flight). What it must leave behind is read
from its own files after it exits: the controller's SQLite store holds every batch it acked and
the device's last-seen time; the agent's outbox still holds every batch the controller did not ack,
and its sequence counter carries on across the restart.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.firmware.slots import active_model
from fleet_harness import AgentProc, ControllerProc, Proc, wait_until
from model_factory import install_offline, mlp_onnx, signed_bundle
from mqtt_harness import Broker, mqtt_controller, outbox_state, stored_seqs

pytestmark = pytest.mark.integration

SHUTDOWN_S = 2.0
AGENT_ARGS = ["--telemetry-interval", "0.1s", "--workload", "golden:50/s"]


def sigterm_and_time(proc: Proc, timeout_s: float = 15.0) -> tuple[float, int]:
    """Seconds from SIGTERM to the process being gone, and its exit code."""
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    code = proc.wait(timeout_s)
    return time.monotonic() - started, code


def store_rows(db: Path, device_id: str) -> tuple[list[int], int | None]:
    """The seqs stored for a device and its last-seen time, read straight from the SQLite file."""
    con = sqlite3.connect(db)
    try:
        seqs = [r[0] for r in con.execute(
            "SELECT seq FROM telemetry_batches WHERE device_id = ? ORDER BY seq", (device_id,))]
        row = con.execute("SELECT last_seen_ms FROM devices WHERE device_id = ?", (device_id,)).fetchone()
    finally:
        con.close()
    return seqs, (row[0] if row else None)


def outbox_seqs(agent: AgentProc) -> tuple[list[int], int]:
    """Unacked seqs still in the agent's outbox, and the next seq it will hand out."""
    con = sqlite3.connect(agent.state_dir / "telemetry.db")
    try:
        left = [r[0] for r in con.execute("SELECT seq FROM batches ORDER BY seq")]
        next_seq = int(con.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
    finally:
        con.close()
    return left, next_seq


@pytest.fixture
def busy_agent(tmp_path: Path, controller: ControllerProc, start_agent) -> AgentProc:  # type: ignore[no-untyped-def]
    bundle, key = signed_bundle(tmp_path, mlp_onnx(tmp_path / "mlp.onnx"))
    install_offline(tmp_path / "a1", bundle, key)
    agent: AgentProc = start_agent("a1", controller.create_token(), AGENT_ARGS)
    device = wait_until(lambda: agent.device_id, 30, "enrolled")
    db = controller.state_dir / "controller.db"
    wait_until(lambda: len(store_rows(db, device)[0]) >= 10, 30, "10 telemetry batches stored")
    return agent


def test_controller_sigterm_exits_fast_and_keeps_what_it_acked(busy_agent: AgentProc, controller: ControllerProc):
    device = busy_agent.device_id
    assert device is not None
    db = controller.state_dir / "controller.db"
    controller.close_channel()
    elapsed, code = sigterm_and_time(controller)
    print(f"controller shutdown {elapsed:.3f}s")
    assert code == 0, controller.log()[-3000:]
    assert elapsed < SHUTDOWN_S, f"controller took {elapsed:.2f}s to exit after SIGTERM"
    assert "controller stopped" in controller.log()
    stopped_at_ms = int(time.time() * 1000)
    seqs, last_seen = store_rows(db, device)
    # Presence is written at stop, not only once per flush interval: last-seen is from just before it.
    assert last_seen is not None and stopped_at_ms - last_seen < 5_000
    assert len(seqs) == len(set(seqs))
    # Every batch the controller acked was durable: the agent deleted exactly those, so stored and
    # still-queued seqs together have no gap (a batch acked but not stored would be one).
    time.sleep(0.5)  # the agent keeps cutting into its outbox while the controller is away
    left, _ = outbox_seqs(busy_agent)
    assert left, "the agent should be holding the batches cut while the controller was down"
    assert sorted(set(seqs) | set(left)) == list(range(1, max(seqs + left) + 1)), "a batch is missing"
    assert not (controller.state_dir / "controller.json").exists()  # the endpoint file is removed
    # After a restart the store is whole and the outbox drains into it, each seq once.
    controller.start()
    wait_until(lambda: set(store_rows(db, device)[0]) >= set(left), 30, "the outbox drained after restart")
    after, _ = store_rows(db, device)
    assert after == list(range(1, max(after) + 1))


def test_agent_sigterm_exits_fast_and_keeps_its_outbox(busy_agent: AgentProc, controller: ControllerProc):
    device = busy_agent.device_id
    assert device is not None
    elapsed, code = sigterm_and_time(busy_agent)
    print(f"agent shutdown {elapsed:.3f}s")
    assert code == 0, busy_agent.log()[-3000:]
    assert elapsed < SHUTDOWN_S, f"agent took {elapsed:.2f}s to exit after SIGTERM"
    left, next_seq = outbox_seqs(busy_agent)
    db = controller.state_dir / "controller.db"
    stored = wait_until(lambda: store_rows(db, device)[0], 10, "stored seqs")
    # Nothing acked is kept and nothing unacked is lost: stored + outbox is every seq handed out.
    assert sorted(set(stored) | set(left)) == list(range(1, next_seq)), "a batch is missing"
    # The installer's state is intact: the same model is still the committed one, and after a
    # restart the agent serves it and its outbox drains with the sequence carrying on.
    active = active_model(busy_agent.state_dir)
    assert active is not None and active.committed and active.manifest.name == "mlp"
    busy_agent.start()
    wait_until(lambda: len(store_rows(db, device)[0]) >= next_seq, 30, "batches after restart")
    after, _ = store_rows(db, device)
    assert after == list(range(1, max(after) + 1))
    elapsed, code = sigterm_and_time(busy_agent)
    assert code == 0 and elapsed < SHUTDOWN_S, f"second stop: {elapsed:.2f}s, code {code}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path).start()
    yield broker
    broker.stop(signal.SIGKILL)


def test_mqtt_controller_and_agent_sigterm_exit_fast(tmp_path: Path, broker: Broker, procs: list[Proc]):
    """With the MQTT bridge running, and an agent that speaks only MQTT."""
    controller = mqtt_controller(tmp_path, broker)
    procs.append(controller)
    controller.start()
    bundle, key = signed_bundle(tmp_path, mlp_onnx(tmp_path / "mlp.onnx"))
    install_offline(tmp_path / "agent", bundle, key)
    agent = AgentProc(tmp_path, "agent", controller, controller.create_token(), ["--transport", "mqtt", *AGENT_ARGS])
    procs.append(agent)
    agent.start()
    device = wait_until(lambda: agent.device_id, 30, "enrolled")
    wait_until(lambda: len(stored_seqs(controller.state_dir, device)) >= 10, 30, "10 batches over MQTT")
    controller.close_channel()
    elapsed, code = sigterm_and_time(controller)
    print(f"mqtt controller shutdown {elapsed:.3f}s")
    assert code == 0, controller.log()[-3000:]
    assert elapsed < SHUTDOWN_S, f"controller (MQTT) took {elapsed:.2f}s to exit after SIGTERM"
    elapsed, code = sigterm_and_time(agent)
    print(f"mqtt agent shutdown {elapsed:.3f}s")
    assert code == 0, agent.log()[-3000:]
    assert elapsed < SHUTDOWN_S, f"agent (MQTT) took {elapsed:.2f}s to exit after SIGTERM"
    stored = [seq for _, seq in stored_seqs(controller.state_dir, device)]
    left, next_seq = outbox_state(agent.state_dir)
    assert sorted(set(stored) | set(left)) == list(range(1, next_seq)), "a batch is missing"
