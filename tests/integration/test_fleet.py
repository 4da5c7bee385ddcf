"""A controller and three agents as real processes: enroll, presence, identity reuse, restarts."""

from __future__ import annotations

import json
import os
import signal
import stat
import time

import pytest

from edgefleet.protos.v1 import control_pb2
from fleet_harness import HEARTBEAT_S, wait_until

pytestmark = pytest.mark.integration


def online_ids(controller) -> set[str]:  # type: ignore[no-untyped-def]
    return {d.device_id for d in controller.devices() if d.online}


def test_three_agents_enroll_go_offline_and_come_back_with_the_same_identity(controller, start_agent):
    token = controller.create_token(uses=3, labels={"site": "lab"})
    agents = [start_agent(f"agent-{i}", token) for i in range(3)]

    wait_until(lambda: len(online_ids(controller)) == 3, 30, "3 agents online")
    devices = {d.device_id: d for d in controller.devices()}
    assert set(devices) == {a.device_id for a in agents}
    for agent in agents:
        identity = agent.state_dir / "identity.json"
        assert stat.S_IMODE(os.stat(identity).st_mode) == 0o600
        device = controller.device(agent.device_id)
        assert device.labels["site"] == "lab"
        assert device.profile.cpu.logical_cores >= 1
        assert device.profile.os.hostname
        assert device.hardware_class

    # A killed agent (closed stream) goes offline well within 3 heartbeat intervals.
    victim = agents[0]
    victim_id = victim.device_id
    victim.kill()
    killed_at = time.monotonic()
    wait_until(lambda: victim_id not in online_ids(controller), 3 * HEARTBEAT_S + 5, "victim offline")
    assert time.monotonic() - killed_at < 3 * HEARTBEAT_S + 5
    assert "offline" in controller.device(victim_id).presence
    assert online_ids(controller) == {a.device_id for a in agents[1:]}

    # Restarted with the same command line: it reuses its identity and never enrolls twice.
    victim.start()
    wait_until(lambda: victim_id in online_ids(controller), 30, "victim back online")
    assert victim.device_id == victim_id
    assert len(controller.devices()) == 3
    assert "already enrolled; ignoring --token" in victim.log()


def test_silent_agent_goes_offline_within_three_heartbeats(controller, start_agent):
    agent = start_agent("quiet", controller.create_token())
    wait_until(lambda: agent.device_id and agent.device_id in online_ids(controller), 30, "online")
    agent.signal(signal.SIGSTOP)  # the stream stays open but nothing is sent
    try:
        stopped_at = time.monotonic()
        wait_until(lambda: agent.device_id not in online_ids(controller), 3 * HEARTBEAT_S + 5, "silent offline")
        assert time.monotonic() - stopped_at <= 3 * HEARTBEAT_S + 2.5
        # The controller ends the silent stream itself (its silence sweep) rather than keeping it open.
        wait_until(lambda: "ended silent sessions" in controller.log(), 10, "the silent stream ended")
    finally:
        agent.signal(signal.SIGCONT)
    wait_until(lambda: agent.device_id in online_ids(controller), 30, "reconnected after SIGCONT")


def test_controller_restart_keeps_devices_and_tokens_and_agents_reconnect(controller, start_agent):
    token = controller.create_token(uses=5, labels={"k": "v"})
    agents = [start_agent(f"agent-{i}", token) for i in range(2)]
    wait_until(lambda: len(online_ids(controller)) == 2, 30, "2 online")
    ids = {a.device_id for a in agents}

    controller.stop()
    controller.close_channel()
    controller.start()

    wait_until(lambda: online_ids(controller) == ids, 30, "agents reconnected after controller restart")
    tokens = controller.call("ListEnrollmentTokens", control_pb2.ListEnrollmentTokensRequest()).tokens
    assert [(t.uses_total, t.uses_left, dict(t.labels)) for t in tokens] == [(5, 3, {"k": "v"})]
    # The same token still works for the remaining uses after the restart.
    third = start_agent("agent-3", token)
    wait_until(lambda: len(online_ids(controller)) == 3, 30, "third agent online")
    assert third.device_id not in ids
    endpoint = json.loads((controller.state_dir / "controller.json").read_text())
    assert endpoint["grpc"] == controller.grpc_address
