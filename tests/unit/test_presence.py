"""Presence: the silence sweep ends the streams that went quiet, once each, and no others."""

from __future__ import annotations

from pathlib import Path

from edgefleet.controller.fleet.presence import PresenceTracker
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
