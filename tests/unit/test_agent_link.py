"""The agent's one link interface: the shared telemetry pump and dispatch, on both transports."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from edgefleet.agent.identity import Identity
from edgefleet.agent.link import ControllerDispatch, ControllerLink, TelemetryPump
from edgefleet.agent.mqtt_link import MqttLink
from edgefleet.agent.outbox import TelemetryOutbox
from edgefleet.agent.session import AgentSession
from edgefleet.protos.v1 import fleet_pb2, mqtt_pb2, profile_pb2

IDENTITY = Identity("dev-1", "secret", "127.0.0.1:1", {}, 0)
PROFILE = profile_pb2.HardwareProfile(hardware_class="x86_64-avx2")


def links(outbox: TelemetryOutbox) -> list[ControllerLink]:
    login = fleet_pb2.MqttCredentials(url="mqtt://127.0.0.1:1", username="dev-1", password="pw")
    return [
        AgentSession("127.0.0.1:1", IDENTITY, lambda: PROFILE, outbox=outbox, ack_timeout_s=0.3),
        MqttLink(IDENTITY, login, outbox=outbox, profile=lambda: PROFILE, ack_timeout_s=0.3),
    ]


def fill(outbox: TelemetryOutbox, count: int) -> None:
    for _ in range(count):
        outbox.append(fleet_pb2.TelemetryBatch())


@pytest.mark.parametrize("transport", [0, 1], ids=["grpc", "mqtt"])
def test_both_links_resend_telemetry_when_acks_are_overdue(tmp_path: Path, transport: int) -> None:
    outbox = TelemetryOutbox(tmp_path / "outbox.db")
    link = links(outbox)[transport]  # made with an empty outbox, as the daemon makes it
    fill(outbox, 3)
    pump = link.pump  # type: ignore[attr-defined]
    assert isinstance(pump, TelemetryPump)
    sent: list[int] = []

    async def send(message: fleet_pb2.AgentMessage) -> bool:
        sent.append(message.telemetry.seq)
        return True

    async def scenario() -> None:
        task = asyncio.create_task(pump.run(send))
        await asyncio.sleep(0.1)
        assert sent == [1, 2, 3]  # the first round
        link.dispatch.handle(fleet_pb2.ControllerMessage(  # type: ignore[attr-defined]
            telemetry_ack=fleet_pb2.TelemetryAck(seqs=[1])))
        await asyncio.sleep(1.5)  # no ack for 2 and 3 within 0.3 s: sent again
        task.cancel()

    asyncio.run(scenario())
    assert sent[:3] == [1, 2, 3] and sent[3:5] == [2, 3], sent
    assert 1 not in sent[3:] and pump.resends >= 1
    assert [b.seq for b in outbox.pending()] == [2, 3]  # acked ones are gone from disk, the rest kept


def test_pump_stops_at_a_down_link_and_starts_over_on_the_next_connection(tmp_path: Path) -> None:
    outbox = TelemetryOutbox(tmp_path / "outbox.db")
    fill(outbox, 4)
    pump = TelemetryPump(outbox, asyncio.Event(), device_id="dev-1", window=2, ack_timeout_s=60)
    sent: list[int] = []
    up = True

    async def send(message: fleet_pb2.AgentMessage) -> bool:
        if up:
            sent.append(message.telemetry.seq)
        return up

    async def scenario() -> None:
        nonlocal up
        task = asyncio.create_task(pump.run(send))
        await asyncio.sleep(0.1)
        assert sent == [1, 2]  # the window is full until acks come
        task.cancel()
        up = False
        pump.on_ack(fleet_pb2.TelemetryAck(seqs=[1]))
        up = True
        task = asyncio.create_task(pump.run(send))  # a new connection: everything still on disk again
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(scenario())
    assert sent == [1, 2, 2, 3]


def commands_seen(into: list[str]) -> Callable[[fleet_pb2.Command], None]:
    return lambda command: into.append(command.command_id)


def test_one_dispatch_for_both_links(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)  # an earlier in-process CLI run may have left the root logger quieter
    outbox = TelemetryOutbox(tmp_path / "outbox.db")
    for link in links(outbox):
        commands: list[str] = []
        link.on_command = commands_seen(commands)
        dispatch = link.dispatch  # type: ignore[attr-defined]
        assert isinstance(dispatch, ControllerDispatch)
        dispatch.handle(fleet_pb2.ControllerMessage(command=fleet_pb2.Command(command_id="cmd-1")))
        dispatch.handle(fleet_pb2.ControllerMessage(heartbeat_ack=fleet_pb2.HeartbeatAck(sent_at_unix_ms=1)))
        assert commands == ["cmd-1"] and link.last_rtt_ms is not None
        link.on_command = None
        dispatch.handle(fleet_pb2.ControllerMessage(command=fleet_pb2.Command(command_id="cmd-2")))
    assert caplog.text.count("controller message dropped") == 2  # never dropped silently


def test_mqtt_state_carries_the_full_profile(tmp_path: Path) -> None:
    link = links(TelemetryOutbox(tmp_path / "outbox.db"))[1]
    assert isinstance(link, MqttLink)
    online = mqtt_pb2.DeviceState.FromString(link._state(True))
    assert online.profile == PROFILE and online.capability_version >= 6
    assert not mqtt_pb2.DeviceState.FromString(link._state(False)).HasField("profile")  # the Last Will
