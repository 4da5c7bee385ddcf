"""Presence: the silence sweep ends the streams that went quiet, once each, and no others; streams
closing together are written offline in one batch."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.store.base import DeviceRecord, EnrollmentTokenRecord
from edgefleet.controller.store.sqlite import SQLiteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_silent_streams_are_ended_once_and_talkers_kept(tmp_path: Path) -> None:
    clock = Clock()
    presence = PresenceTracker(SQLiteStore(tmp_path / "c.db"), heartbeat_interval_s=1.0, clock=clock)
    ended: list[str] = []
    sessions = {}
    for name in ("quiet", "talker", "mqtt"):
        session = presence.session_opened(name, agent_version="t", capability_version=1, hardware_class="c",
                                          profile=b"", hostname=name)
        if name != "mqtt":  # a transport that watches silence itself registers no callback
            session.end_silent = lambda name=name: ended.append(name)
        sessions[name] = session
    for _ in range(5):
        clock.now += 1.0
        presence.seen(sessions["talker"])
        presence.expire_silent()
    assert ended == ["quiet"]  # silent past 3 intervals; ended once although swept again
    assert sessions["quiet"].silent and not sessions["talker"].silent
    clock.now += 2.9
    assert presence.expire_silent() == 0
    clock.now += 0.2
    assert presence.expire_silent() == 1 and ended == ["quiet", "talker"]


class CountingStore(SQLiteStore):
    """Counts the writes presence makes, by kind."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.single_closes = 0
        self.batched_closes: list[int] = []

    def update_device_session(self, device_id: str, **fields: Any) -> None:
        self.single_closes += not fields["connected"]
        super().update_device_session(device_id, **fields)

    def close_device_sessions(self, closed: Iterable[tuple[str, int]], owner: str = "") -> None:
        closed = list(closed)
        self.batched_closes.append(len(closed))
        super().close_device_sessions(closed, owner)


def test_streams_closing_together_are_written_offline_in_one_write(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "c.db")
    store.create_enrollment_token(EnrollmentTokenRecord("t", "h", 200, 200, 0, 2**50, {}))
    for i in range(200):
        store.enroll_device("h", 0, DeviceRecord(f"d{i}", "s", {}, 0))
    presence = PresenceTracker(store, heartbeat_interval_s=1.0, owner="replica-a")

    async def close_all_then_reopen_one() -> None:
        sessions = [presence.session_opened(f"d{i}", agent_version="t", capability_version=1, hardware_class="c",
                                            profile=b"", hostname="h") for i in range(200)]
        for session in sessions:  # a controller stopping: every stream's handler ends in one burst
            presence.session_closed(session, "controller stopping")
        assert not presence.presence(store.get_device("d0")).online  # type: ignore[arg-type]  # before the write
        presence.session_opened("d7", agent_version="t", capability_version=1, hardware_class="c", profile=b"",
                                hostname="h")  # reconnected before the batch was written: stays online
        await asyncio.sleep(presence.close_delay_s * 5)

    asyncio.run(close_all_then_reopen_one())
    assert store.single_closes == 0 and store.batched_closes == [199]
    connected = {d.device_id for d in store.list_devices() if d.connected}
    assert connected == {"d7"}
    presence.session_closed(presence._live["d7"], "stream closed")  # no loop: written at once
    assert store.batched_closes == [199, 1] and not any(d.connected for d in store.list_devices())
