"""Presence: which devices are online, kept from their open Session streams and heartbeats.

A device is online while its stream is open and it has spoken within 3 heartbeat intervals.
Heartbeats update memory only; last_seen is flushed to the store in batches (every
`flush_interval_s`), so a large fleet's 1 Hz heartbeats do not turn into 1 write each.
Closed streams are written offline in batches too: a close is queued and, on the event loop,
written `close_delay_s` later together with every close queued meanwhile (one transaction). When
a controller stops at 10,000 streams they all end at once; one write each took ~2.5 s, past the
2 s a supervisor is promised. Until its close is written a device already reads offline here.
Opened streams are batched the same way (the reconnect storm after a restart, as MQTT's bridge
batches its own): one write per `close_delay_s` for every open queued meanwhile, with only the
presence columns for a device that reconnected as it was (same agent, capability, profile and
model), and no write at all when its row already says this replica holds it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from edgefleet.common.units import format_duration
from edgefleet.controller.store.base import SESSION_OPEN_FIELDS, DeviceBrief, DeviceRecord, SessionOpen, Store
from edgefleet.protos.v1 import fleet_pb2

log = logging.getLogger("edgefleet.controller.fleet.presence")

SILENT_INTERVALS = 3


@dataclasses.dataclass
class LiveSession:
    session_id: int
    device_id: str
    opened_at_ms: int
    last_seen_ms: int
    send: Callable[[fleet_pb2.ControllerMessage], None] | None = None  # the transport's outbox
    # How the transport ends a stream that fell silent (`PresenceTracker.expire_silent`); None
    # where the transport watches silence itself.
    end_silent: Callable[[], object] | None = None
    silent: bool = False
    revoked: bool = False  # set before `end_silent` is called to end the stream of a revoked device


@dataclasses.dataclass(frozen=True)
class Presence:
    online: bool
    reason: str
    last_seen_ms: int


class PresenceTracker:
    def __init__(
        self,
        store: Store,
        heartbeat_interval_s: float,
        clock: Callable[[], float] = time.time,
        flush_interval_s: float = 2.0,
        owner: str = "",
    ) -> None:
        self.store = store
        self.owner = owner  # this replica, recorded on the device rows whose streams it holds
        self.heartbeat_interval_s = heartbeat_interval_s
        self.flush_interval_s = flush_interval_s
        self.clock = clock
        self._live: dict[str, LiveSession] = {}
        # Devices revoked (loaded at start, added by revocations on this replica). The MQTT bridge
        # drops their messages: the broker cannot be made to end a connection it already accepted.
        self.revoked: set[str] = set()
        self._dirty: dict[str, int] = {}
        # Closed streams whose offline is not written yet: device -> last_seen_ms.
        self._closed: dict[str, int] = {}
        self._opened: dict[str, SessionOpen] = {}  # opened streams not written yet
        self.unchanged_opens = 0  # opens that needed no store write (the row already said so)
        self._close_write_scheduled = False
        self.close_delay_s = 0.02
        self._ids = itertools.count(1)

    @property
    def silence_limit_s(self) -> float:
        return SILENT_INTERVALS * self.heartbeat_interval_s

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def session_opened(
        self,
        device_id: str,
        *,
        agent_version: str,
        capability_version: int,
        hardware_class: str,
        profile: bytes,
        hostname: str,
        model: tuple[str, int] | None = None,
        previous: DeviceRecord | None = None,
    ) -> LiveSession:
        """Register a new stream. A second stream for the same device replaces the first.

        `previous`: the device's row as read when the stream authenticated; what it already says
        is not written again."""
        now = self._now_ms()
        session = LiveSession(next(self._ids), device_id, now, now)
        replaced = self._live.get(device_id)
        self._live[device_id] = session
        self._dirty.pop(device_id, None)
        close_pending = self._closed.pop(device_id, None) is not None  # superseded by this open
        opened = SessionOpen(device_id, now, agent_version, capability_version, hardware_class, profile, hostname,
                             *(model if model is not None else (None, None)))
        pending = device_id in self._opened  # then written in full: it replaces that open's fields
        if previous is not None and not pending:
            same: dict[str, Any] = {f: None for f in SESSION_OPEN_FIELDS if getattr(opened, f) == getattr(previous, f)}
            opened = dataclasses.replace(opened, **same)
        unchanged = all(getattr(opened, f) is None for f in SESSION_OPEN_FIELDS)
        # The row says this replica holds the device (read at authentication, and here a stream
        # is still open or its close is not written yet, so nothing since undid that): last_seen only.
        held_here = previous is not None and previous.connected and previous.connected_by == self.owner \
            and (replaced is not None or close_pending)
        if unchanged and held_here:
            self.unchanged_opens += 1
            self._dirty[device_id] = now
        else:
            self._opened[device_id] = opened
            self._schedule_write()
        log.info(
            "device online",
            extra={"device": device_id, "session": session.session_id, "replaced": bool(replaced)},
        )
        return session

    def record_model(self, device_id: str, model: str, version: int) -> None:
        """What a device serves now (an install ack, an MQTT state update): written at once, or, while
        an open of it is still queued, carried by that open, so the hello's older model it holds
        cannot overwrite this one when the batch is written."""
        pending = self._opened.get(device_id)
        if pending is not None:
            self._opened[device_id] = dataclasses.replace(pending, model=model, model_version=version)
            return
        self.store.set_device_model(device_id, model, version)

    def seen(self, session: LiveSession) -> None:
        now = self._now_ms()
        session.last_seen_ms = now
        if self._live.get(session.device_id) is session:
            self._dirty[session.device_id] = now

    def session_closed(self, session: LiveSession, reason: str) -> None:
        if self._live.get(session.device_id) is not session:
            return  # superseded by a newer stream; that one owns the device's presence
        del self._live[session.device_id]
        self._dirty.pop(session.device_id, None)
        self._closed[session.device_id] = session.last_seen_ms
        log.info("device offline", extra={"device": session.device_id, "reason": reason})
        self._schedule_write()

    def _schedule_write(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a synchronous caller): write it now
            self.write_closed()
            return
        if not self._close_write_scheduled:
            self._close_write_scheduled = True
            loop.call_later(self.close_delay_s, self._write_closed_later)

    def _write_closed_later(self) -> None:
        self._close_write_scheduled = False
        try:
            self.write_closed()
        except Exception:
            log.exception("writing opened or closed sessions failed; retried with the next change or flush")

    def write_closed(self) -> int:
        """Write the queued opens, then the queued closes, one store write each; returns how many
        closes. On the event loop, where both are queued, so a close is never written after a newer
        open of the same device, nor an open after its own close."""
        opened, self._opened = self._opened, {}
        if opened:
            try:
                self.store.open_device_sessions(list(opened.values()), self.owner)
            except Exception:
                self._opened = {**opened, **self._opened}
                raise
        closed, self._closed = self._closed, {}
        if not closed:
            return 0
        try:
            self.store.close_device_sessions(closed.items(), self.owner)
        except Exception:
            self._closed = {**closed, **self._closed}
            raise
        return len(closed)

    def expire_silent(self) -> int:
        """End the streams silent for longer than the limit; returns how many.

        One sweep for every session instead of a timeout on every read: arming and cancelling a
        timer per message was a third of the controller's per-message cost at fleet scale."""
        cutoff = self._now_ms() - int(self.silence_limit_s * 1000)
        expired = 0
        for session in list(self._live.values()):
            if session.last_seen_ms < cutoff and session.end_silent is not None and not session.silent:
                session.silent = True
                session.end_silent()
                expired += 1
        return expired

    def end_revoked(self, device_id: str) -> bool:
        """End the open stream of a revoked device at once (on this replica); True when there was one."""
        self.revoked.add(device_id)
        session = self._live.get(device_id)
        if session is None:
            return False
        session.revoked = True
        if session.end_silent is None:  # MQTT: offline now; the bridge drops what it still sends
            self.session_closed(session, "revoked")
        else:
            session.end_silent()
        return True

    def sender(self, device_id: str) -> Callable[[fleet_pb2.ControllerMessage], None] | None:
        live = self._live.get(device_id)
        return live.send if live else None

    def is_current(self, session: LiveSession) -> bool:
        return self._live.get(session.device_id) is session

    def flush(self) -> None:
        self.write_closed()
        self.store.touch_devices(self.take_dirty())

    def take_dirty(self) -> list[tuple[str, int]]:
        """The last_seen values not yet written; call on the event loop (where `seen` runs)."""
        dirty, self._dirty = self._dirty, {}
        return list(dirty.items())

    def _online(self, record: DeviceRecord | DeviceBrief, now_ms: int) -> bool:
        """The one rule for online: a stream open here that spoke within the silence limit, or one
        the store says another controller holds (it flushes last_seen every flush_interval_s,
        hence the extra allowance), not closed here since."""
        live = self._live.get(record.device_id)
        if live is not None:
            return now_ms - max(record.last_seen_ms, live.last_seen_ms) <= self.silence_limit_s * 1000
        if not record.connected or record.device_id in self._closed:
            return False
        return now_ms - record.last_seen_ms <= (self.silence_limit_s + self.flush_interval_s) * 1000

    def presence(self, record: DeviceRecord | DeviceBrief) -> Presence:
        """Online/offline for one device, with the reason an operator would want to see."""
        now = self._now_ms()
        live = self._live.get(record.device_id)
        last_seen = max(record.last_seen_ms, live.last_seen_ms if live else self._closed.get(record.device_id, 0))
        if self._online(record, now):
            return Presence(True, "online", last_seen)
        silent_s = max(0.0, (now - last_seen) / 1000)
        if live is None and (not record.connected or record.device_id in self._closed):
            if last_seen == 0:
                return Presence(False, "offline: never connected", 0)
            return Presence(False, f"offline: stream closed {format_duration(silent_s)} ago", last_seen)
        return Presence(False, f"offline: silent for {format_duration(silent_s)}", last_seen)

    def online_flags(self, records: Sequence[DeviceRecord | DeviceBrief]) -> list[bool]:
        """`presence(r).online` for each record, without building the reasons: what a /metrics
        scrape counts over the whole fleet (10,000 calls of `presence` took 40 ms of a 125 ms scrape)."""
        now = self._now_ms()
        return [self._online(record, now) for record in records]

    def online_count(self) -> int:
        return len(self._live)
