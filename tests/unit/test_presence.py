"""Presence: the silence sweep ends the streams that went quiet, once each, and no others; streams
closing together are written offline in one batch, and streams opening together (a reconnect storm)
online in one batch, with nothing but presence for devices that came back as they were."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.store.base import SESSION_OPEN_FIELDS, DeviceRecord, EnrollmentTokenRecord, SessionOpen
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
        self.single_writes = 0
        self.batched_closes: list[int] = []
        self.batched_opens: list[list[SessionOpen]] = []

    def update_device_session(self, device_id: str, **fields: Any) -> None:
        self.single_closes += not fields["connected"]
        self.single_writes += 1
        super().update_device_session(device_id, **fields)

    def set_device_model(self, device_id: str, model: str, version: int) -> None:
        self.single_writes += 1
        super().set_device_model(device_id, model, version)

    def open_device_sessions(self, opens: Any, owner: str) -> None:
        self.batched_opens.append(list(opens))
        super().open_device_sessions(opens, owner)

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


def test_a_reconnect_storm_is_written_in_one_batch_and_unchanged_devices_write_only_presence(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "c.db")
    store.create_enrollment_token(EnrollmentTokenRecord("t", "h", 200, 200, 0, 2**50, {}))
    for i in range(200):
        store.enroll_device("h", 0, DeviceRecord(f"d{i}", "s", {}, 0))

    def open_all(presence: PresenceTracker, agent_version: str = "1.0") -> list[Any]:
        return [presence.session_opened(f"d{i}", agent_version=agent_version if i == 0 else "1.0",
                                        capability_version=7, hardware_class="c", profile=b"profile-bytes",
                                        hostname="h", model=("m", 1), previous=store.get_device(f"d{i}"))
                for i in range(200)]

    async def storm() -> None:
        first = PresenceTracker(store, heartbeat_interval_s=1.0, owner="replica-a")
        open_all(first)  # first connect: everything the hello says, in one write
        await asyncio.sleep(first.close_delay_s * 5)
        assert [len(b) for b in store.batched_opens] == [200]
        assert all(o.profile == b"profile-bytes" and o.model == "m" for o in store.batched_opens[0])

        # The controller restarts (its start closed the stale sessions): every device reconnects at
        # once, as it was, but d0 with a new agent. One write, and only d0 says more than presence.
        store.reset_connections("replica-a")
        second = PresenceTracker(store, heartbeat_interval_s=1.0, owner="replica-a")
        open_all(second, agent_version="1.1")
        await asyncio.sleep(second.close_delay_s * 5)
        assert [len(b) for b in store.batched_opens] == [200, 200]
        said = {o.device_id: {f: getattr(o, f) for f in SESSION_OPEN_FIELDS if getattr(o, f) is not None}
                for o in store.batched_opens[1]}
        assert said.pop("d0") == {"agent_version": "1.1"} and not any(said.values()), said
        assert all(d.connected and d.connected_by == "replica-a" for d in store.list_devices())

        # Streams replaced while the old one is still open here (a device that redials): no write.
        open_all(second, agent_version="1.1")
        await asyncio.sleep(second.close_delay_s * 5)
        assert len(store.batched_opens) == 2 and second.unchanged_opens == 200
        assert second.online_count() == 200 and len(second.take_dirty()) == 200  # last_seen, via the flush

        # An install acked while the device's open is still queued: the open carries the new model
        # rather than writing the hello's older one over it afterwards.
        store.reset_connections("replica-a")
        third = PresenceTracker(store, heartbeat_interval_s=1.0, owner="replica-a")
        third.session_opened("d1", agent_version="1.0", capability_version=7, hardware_class="c",
                             profile=b"profile-bytes", hostname="h", model=("m", 1), previous=store.get_device("d1"))
        third.record_model("d1", "m", 2)
        await asyncio.sleep(third.close_delay_s * 5)
        d1 = store.get_device("d1")
        assert d1 is not None and d1.connected and d1.model_version == 2
        third.record_model("d1", "m", 3)  # nothing queued: written at once
        d1 = store.get_device("d1")
        assert d1 is not None and d1.model_version == 3

    asyncio.run(storm())
    assert store.single_writes == 1  # the last record_model, with no open queued
    device = store.get_device("d0")
    assert device is not None and (device.agent_version, device.profile, device.model) == ("1.1", b"profile-bytes", "m")


def test_online_flags_agree_with_presence_for_every_kind_of_device(tmp_path: Path) -> None:
    from edgefleet.controller.store.base import DeviceBrief

    clock = Clock()
    presence = PresenceTracker(SQLiteStore(tmp_path / "c.db"), heartbeat_interval_s=1.0, clock=clock)
    now_ms = int(clock.now * 1000)
    held = presence.session_opened("here", agent_version="t", capability_version=1, hardware_class="c",
                                   profile=b"", hostname="h")
    presence._closed["closed"] = now_ms  # a stream closed here whose offline is not written yet (on a loop it waits)
    # Rows as the store might hold them: streams here, on another worker (fresh, silent, just past
    # the flush allowance), closed, never connected.
    rows = [DeviceBrief("here", "c", True, 0),
            DeviceBrief("closed", "c", True, now_ms),
            DeviceBrief("elsewhere", "c", True, now_ms - 1000),
            DeviceBrief("elsewhere-edge", "c", True, now_ms - 5000),
            DeviceBrief("elsewhere-silent", "c", True, now_ms - 5001),
            DeviceBrief("offline", "c", False, now_ms),
            DeviceBrief("never", "c", False, 0)]
    assert presence.online_flags(rows) == [True, False, True, True, False, False, False]
    for step_s in (0.0, 2.0, 1.0, 0.5, 3.0):
        clock.now += step_s
        expected = [presence.presence(r).online for r in rows]
        assert presence.online_flags(rows) == expected, (step_s, expected)
        if step_s == 2.0:
            presence.seen(held)
