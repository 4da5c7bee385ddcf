"""The agent's Session sender: heartbeats only on an otherwise idle stream."""

from __future__ import annotations

import asyncio
import itertools
import time

from edgefleet.agent.identity import Identity
from edgefleet.agent.session import AgentSession
from edgefleet.protos.v1 import fleet_pb2, profile_pb2


class RecordingCall:
    """What the heartbeat loop writes to: the messages, with when they went out."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, str]] = []

    async def write(self, message: fleet_pb2.AgentMessage) -> None:
        self.sent.append((time.monotonic(), message.WhichOneof("body")))


def test_heartbeats_go_out_only_when_nothing_else_did() -> None:
    session = AgentSession("127.0.0.1:1", Identity("dev-1", "secret", "127.0.0.1:1", {}, 0),
                           lambda: profile_pb2.HardwareProfile())
    call = RecordingCall()
    interval = 0.2

    async def scenario() -> None:
        beats = asyncio.create_task(session._heartbeat_loop(call, interval))
        busy_until = time.monotonic() + 1.0
        while time.monotonic() < busy_until:  # telemetry twice per interval: no heartbeat needed
            await session._send(call, fleet_pb2.AgentMessage(telemetry=fleet_pb2.TelemetryBatch(seq=1)))
            await asyncio.sleep(interval / 2)
        assert [kind for _, kind in call.sent].count("heartbeat") == 0
        await asyncio.sleep(1.3)  # idle: a heartbeat every interval
        beats.cancel()

    asyncio.run(scenario())
    kinds = [kind for _, kind in call.sent]
    assert 3 <= kinds.count("heartbeat") <= 7, kinds
    assert session.heartbeats_sent == kinds.count("heartbeat")
    times = [t for t, _ in call.sent]
    # Never silent for the controller's limit (3 intervals), busy or idle.
    assert max(b - a for a, b in itertools.pairwise(times)) < 3 * interval
