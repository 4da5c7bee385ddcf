"""Commands to devices: persisted, delivered over whatever session the device has, acked once.

A command is stored before it is sent, so a device that is offline gets it when it comes back
(every new session receives the device's open commands). Each carries a nonce and an expiry;
the device executes a nonce at most once and answers a redelivered command with the outcome it
already recorded. The first final ack finishes a command; later ones change nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable

from edgefleet.controller.errors import NotFound
from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.store.base import CommandRecord, Store
from edgefleet.protos.v1 import fleet_pb2

log = logging.getLogger("edgefleet.controller.fleet.commands")

DEFAULT_TTL_S = 3600
# The install outcomes (CommandAck.result) after which the device serves the bundle it was sent.
INSTALLED_RESULTS = ("committed", "already_installed")

# A command in one of these may still be delivered and acked; finish_command moves it to "done".
OPEN_COMMAND_STATES = ("pending", "sent")
FINISHED_COMMAND_STATES = ("done", "expired")
# How often `wait` looks in the store for an outcome recorded by another process.
WAIT_POLL_S = 0.25


def command_expired(record: CommandRecord, now_ms: int) -> bool:
    """An open command past its expiry is never delivered again: the device would refuse it anyway."""
    return record.state in OPEN_COMMAND_STATES and record.expires_at_ms <= now_ms


def expired_commands(records: list[CommandRecord], now_ms: int) -> list[CommandRecord]:
    """The records among `records` that expire at `now_ms`, as they are to be stored: both store
    backends call this from open_commands, inside the transaction that reads them."""
    return [dataclasses.replace(r, state="expired", result="expired", updated_at_ms=now_ms)
            for r in records if command_expired(r, now_ms)]


AckListener = Callable[[CommandRecord, fleet_pb2.CommandAck], None]


class CommandDispatcher:
    def __init__(self, store: Store, presence: PresenceTracker, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.presence = presence
        self.clock = clock
        self.listeners: list[AckListener] = []
        # Called with every new command (the MQTT bridge publishes the retained desired model).
        self.issue_listeners: list[Callable[[CommandRecord, fleet_pb2.Command], None]] = []
        self._waiters: dict[str, list[asyncio.Future[CommandRecord]]] = {}

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def issue(
        self,
        device_id: str,
        *,
        install: fleet_pb2.InstallBundle | None = None,
        measure: fleet_pb2.MeasureCandidates | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        rollout_id: str = "",
        command_id: str | None = None,
    ) -> CommandRecord:
        """Store and send a command. A caller that must not issue twice (a rollout resuming after a
        crash) passes a deterministic `command_id`: issuing it again returns the existing command."""
        if self.store.get_device(device_id) is None:
            raise NotFound(f"no device {device_id!r}; see `edgefleet devices list`")
        if command_id is not None:
            existing = self.store.get_command(command_id)
            if existing is not None:
                self.deliver_open(device_id)
                return existing
        now = self._now_ms()
        command = fleet_pb2.Command(
            command_id=command_id or "cmd-" + secrets.token_hex(6),
            nonce=secrets.token_hex(16),
            expires_at_unix_ms=now + int(ttl_s * 1000),
            rollout_id=rollout_id,
        )
        if install is not None:
            command.install.CopyFrom(install)
        elif measure is not None:
            command.measure.CopyFrom(measure)
        kind = command.WhichOneof("action") or ""
        record = CommandRecord(
            command_id=command.command_id, device_id=device_id, kind=kind, payload=command.SerializeToString(),
            created_at_ms=now, expires_at_ms=command.expires_at_unix_ms, rollout_id=rollout_id,
        )
        self.store.add_command(record)
        for listener in self.issue_listeners:
            listener(record, command)
        log.info("command issued", extra={"device": device_id, "command": record.command_id, "kind": kind,
                                          "rollout": rollout_id})
        self.deliver_open(device_id)
        return record

    def deliver_open(self, device_id: str) -> int:
        """Send the device every open command; called on issue and whenever a session opens."""
        send = self.presence.sender(device_id)
        if send is None:
            return 0
        records = self.store.open_commands(device_id, self._now_ms())
        for record in records:
            send(fleet_pb2.ControllerMessage(command=fleet_pb2.Command.FromString(record.payload)))
            self.store.mark_command_sent(record.command_id, self._now_ms())
        return len(records)

    def on_ack(self, device_id: str, ack: fleet_pb2.CommandAck) -> None:
        record = self.store.get_command(ack.command_id)
        if record is None or record.device_id != device_id:
            log.warning("ack for an unknown command", extra={"device": device_id, "command": ack.command_id})
            return
        if not ack.final:
            log.info("command progress", extra={"device": device_id, "command": ack.command_id,
                                                "result": ack.result, "detail": ack.message})
            return
        finished = self.store.finish_command(
            ack.command_id, state="done", result=ack.result, reason=ack.reason, message=ack.message,
            ack=ack.SerializeToString(), now_ms=self._now_ms(),
        )
        if finished is None:
            return  # already finished by an earlier ack
        log.info("command done", extra={"device": device_id, "command": ack.command_id, "result": ack.result,
                                        "reason": ack.reason, "rollout": finished.rollout_id})
        if finished.kind == "install" and ack.result in INSTALLED_RESULTS:
            self.presence.record_model(device_id, ack.model, int(ack.version))
        for listener in self.listeners:
            try:
                listener(finished, ack)
            except Exception:
                log.exception("command listener failed", extra={"command": ack.command_id})
        for waiter in self._waiters.pop(ack.command_id, []):
            if not waiter.done():
                waiter.set_result(finished)

    async def wait(self, command_id: str, timeout_s: float) -> CommandRecord:
        """The finished command, or its current record when `timeout_s` passes first."""
        record = self.store.get_command(command_id)
        if record is None:
            raise NotFound(f"no command {command_id!r}")
        if record.state in FINISHED_COMMAND_STATES:
            return record
        loop = asyncio.get_running_loop()
        future: asyncio.Future[CommandRecord] = loop.create_future()
        self._waiters.setdefault(command_id, []).append(future)
        deadline = loop.time() + timeout_s
        try:
            while True:
                # The ack may come to another worker or replica (the one holding the device's
                # stream), which finishes the command in the store but cannot wake this future.
                try:
                    return await asyncio.wait_for(asyncio.shield(future),
                                                  max(0.0, min(WAIT_POLL_S, deadline - loop.time())))
                except asyncio.TimeoutError:
                    current = await asyncio.to_thread(self.store.get_command, command_id)
                    if current is not None and current.state in FINISHED_COMMAND_STATES:
                        return current
                    if loop.time() >= deadline:
                        return current or record
        finally:
            waiters = self._waiters.get(command_id, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(command_id, None)
