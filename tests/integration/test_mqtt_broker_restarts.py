"""Five broker restarts (graceful and SIGKILL) under a live telemetry stream: no seq lost or stored twice."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_harness import AgentProc, ControllerProc, Proc, wait_until
from mqtt_harness import Broker, metric, mqtt_controller, outbox_state, stored_seqs

pytestmark = pytest.mark.integration

RESTARTS = 5


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path).start()
    yield broker
    broker.stop(signal.SIGKILL)


def test_telemetry_survives_broker_restarts(tmp_path: Path, broker: Broker, procs: list[Proc]) -> None:
    controller: ControllerProc = mqtt_controller(tmp_path, broker)
    procs.append(controller)
    controller.start()
    agent = AgentProc(tmp_path, "agent", controller, controller.create_token(),
                      ["--transport", "mqtt", "--telemetry-interval", "0.05s"])
    procs.append(agent)
    agent.start()
    device_id = wait_until(lambda: agent.device_id, 30, "enrollment")
    wait_until(lambda: len(stored_seqs(controller.state_dir, device_id)) >= 10, 20, "the stream to start")

    for i in range(RESTARTS):
        # Alternate a clean stop (the broker saves its sessions) with SIGKILL (it loses what it had
        # not autosaved, in-flight messages and acks included).
        broker.restart(signal.SIGKILL if i % 2 else signal.SIGTERM, down_s=0.5)
        before = len(stored_seqs(controller.state_dir, device_id))
        wait_until(lambda b=before: len(stored_seqs(controller.state_dir, device_id)) > b + 5, 30,
                   f"the stream to resume after restart {i + 1}")
    assert broker.restarts == RESTARTS

    wait_until(lambda: len(outbox_state(agent.state_dir)[0]) <= 5, 30, "the backlog to drain")
    time.sleep(0.3)
    agent.stop()
    pending, next_seq = outbox_state(agent.state_dir)
    rows = stored_seqs(controller.state_dir, device_id)
    seqs = [seq for _, seq in rows]
    assert len(seqs) == len(set(seqs)), "a batch was stored twice"
    missing = set(range(1, next_seq)) - set(seqs) - set(pending)
    assert not missing, f"sequence numbers lost: {sorted(missing)[:20]}"
    assert next_seq > 50
    # The agent re-sent what it could not prove stored; the controller recognised the repeats.
    duplicates = metric(controller.http_address, "edgefleet_telemetry_batches_total", 'result="duplicate"')
    print(f"batches={next_seq - 1} stored={len(seqs)} still_queued={len(pending)} duplicates_dropped={duplicates}")
