"""The agent's link to the controller: one interface, two transports (gRPC `AgentSession`, `MqttLink`).

What does not depend on the transport lives here once, and both links use it:
  TelemetryPump       batches from the on-disk outbox, oldest first, at most `window` un-acked;
                      everything still on disk is sent again on every new connection and when the
                      oldest un-acked batch has waited `ack_timeout_s` (its ack, or the batch, was
                      lost); the controller de-duplicates on (device, seq)
  ControllerDispatch  what the controller sends: heartbeat acks, telemetry acks, commands

The daemon only sees `ControllerLink`; the few things one transport has and the other has not
(MQTT's retained desired model) it reaches through that transport's own class.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from edgefleet.agent.outbox import TelemetryOutbox
from edgefleet.firmware.sources import ControllerArtifact
from edgefleet.protos.v1 import fleet_pb2

log = logging.getLogger("edgefleet.agent.link")

DEFAULT_WINDOW = 64
DEFAULT_ACK_TIMEOUT_S = 10.0

CommandHandler = Callable[[fleet_pb2.Command], None]
Serving = Callable[[], tuple[str, int]]
SendMessage = Callable[[fleet_pb2.AgentMessage], Awaitable[bool]]  # False: not sent, the link is down


class ControllerLink(Protocol):
    """What the daemon needs from a link, whichever transport it runs on."""

    device_id: str
    connected: bool
    telemetry_ready: asyncio.Event  # set when the outbox has something new to send
    on_command: CommandHandler | None
    serving: Serving | None  # (model, version) now served, told to the controller on every connect
    last_rtt_ms: float | None

    async def run(self) -> None:
        """Stay connected until cancelled."""
        ...

    def send_ack(self, ack: fleet_pb2.CommandAck) -> None:
        """Queue a command ack; it goes out now or on the next connection."""
        ...

    def artifact_source(self, sha256: str, size: int) -> ControllerArtifact:
        """Where an install or a measurement reads a bundle from, over this transport."""
        ...


class TelemetryPump:
    """Sends the outbox's batches over one connection at a time, and forgets them on their acks."""

    def __init__(self, outbox: TelemetryOutbox, ready: asyncio.Event, *, device_id: str,
                 window: int = DEFAULT_WINDOW, ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.outbox = outbox
        self.ready = ready
        self.device_id = device_id
        self.window = window
        self.ack_timeout_s = ack_timeout_s
        self.clock = clock
        self.inflight: dict[int, float] = {}  # seq -> when it was sent
        self.resends = 0

    async def run(self, send: SendMessage) -> None:
        """Pump until cancelled, over one connection; call again for the next one (it starts over)."""
        self.inflight.clear()  # whatever was in flight on the last connection is resent
        last_sent = 0
        while True:
            self.ready.clear()
            now = self.clock()
            if self.inflight and now - min(self.inflight.values()) > self.ack_timeout_s:
                log.info("telemetry acks overdue; resending", extra={"device": self.device_id,
                                                                     "inflight": len(self.inflight)})
                self.resends += 1
                self.inflight.clear()
                last_sent = 0
            room = self.window - len(self.inflight)
            batches = self.outbox.pending(last_sent, room) if room > 0 else []
            for batch in batches:
                if not await send(fleet_pb2.AgentMessage(telemetry=batch)):
                    break  # the link is down; the next connection starts over
                self.inflight[batch.seq] = now
                last_sent = batch.seq
            else:
                if len(batches) == room and room > 0:
                    await asyncio.sleep(0)
                    continue  # more may be waiting
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ready.wait(), timeout=min(1.0, self.ack_timeout_s))

    def on_ack(self, ack: fleet_pb2.TelemetryAck) -> None:
        seqs = list(ack.seqs) + [r.seq for r in ack.rejected]
        for rejected in ack.rejected:
            log.warning("telemetry batch rejected by the controller",
                        extra={"device": self.device_id, "seq": rejected.seq, "reason": rejected.reason})
        self.outbox.ack(seqs)
        for seq in seqs:
            self.inflight.pop(seq, None)
        self.ready.set()


class ControllerDispatch:
    """One dispatch of ControllerMessages for both links."""

    def __init__(self, link: ControllerLink, pump: TelemetryPump | None) -> None:
        self.link = link
        self.pump = pump

    def handle(self, message: fleet_pb2.ControllerMessage) -> None:
        kind = message.WhichOneof("body")
        if kind == "heartbeat_ack":
            self.link.last_rtt_ms = time.time() * 1000 - message.heartbeat_ack.sent_at_unix_ms
        elif kind == "telemetry_ack":
            if self.pump is not None:
                self.pump.on_ack(message.telemetry_ack)
        elif kind == "command" and self.link.on_command is not None:
            self.link.on_command(message.command)
        else:
            command_id = message.command.command_id if kind == "command" else ""
            log.warning("controller message dropped: nothing here handles it",
                        extra={"device": self.link.device_id, "kind": kind, "command": command_id})
