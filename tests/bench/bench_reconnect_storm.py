"""A reconnect storm's store writes (issue 18): DEVICES streams opening at once, as after a restart.

Run: ``flock /work/bench.lock .venv/bin/pytest -s tests/bench/bench_reconnect_storm.py`` (knob:
EDGEFLEET_BENCH_STORM_DEVICES=10000).

The presence layer (controller/fleet/presence.py) over a real SQLiteStore on disk, on one event
loop as in the controller: every device's `session_opened` is called in one burst (each gRPC
Session handler calls it once its hello arrives), then the loop runs until every open is written.
Two ways side by side:
- per stream (before, emulated): what `session_opened` did until now, an `update_device_session`
  (every column, the profile too) and a `set_device_model` per stream, on the loop;
- batched (now): one `open_device_sessions` per `close_delay_s`, with only presence columns for a
  device that came back as it was, and no write for one whose row already says this process has it.
Three phases: the first connect (every row changes), the reconnect after a restart (the start reset
the rows; every device comes back as it was) and a redial while the old stream is still open here.
Reported: seconds from the first open until everything is written, store write calls, and the
longest the loop was blocked by one callback (the other streams' messages wait that long).

Target (the last line, MET or MISSED): the batched restart reconnect of DEVICES devices written
in under a quarter of the per-stream time, with no profile written for an unchanged device.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from bench_support import bench_profile, env_flag, print_table, report_targets

from edgefleet.controller.fleet.presence import LiveSession, PresenceTracker
from edgefleet.controller.store.base import DeviceRecord, EnrollmentTokenRecord, SessionOpen
from edgefleet.controller.store.sqlite import SQLiteStore

pytestmark = pytest.mark.integration

DEVICES = env_flag("EDGEFLEET_BENCH_STORM_DEVICES", 10_000)
OWNER = "controller-bench"
TARGET_RATIO = 0.25


class CountingStore(SQLiteStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writes = 0
        self.profiles_written = 0

    def update_device_session(self, device_id: str, **fields: Any) -> None:
        self.writes += 1
        self.profiles_written += fields.get("profile") is not None
        super().update_device_session(device_id, **fields)

    def set_device_model(self, device_id: str, model: str, version: int) -> None:
        self.writes += 1
        super().set_device_model(device_id, model, version)

    def open_device_sessions(self, opens: Sequence[SessionOpen], owner: str) -> None:
        self.writes += 1
        self.profiles_written += sum(o.profile is not None for o in opens)
        super().open_device_sessions(opens, owner)


class PerStreamPresence(PresenceTracker):
    """The control: every open written at once, on its own, in full (the code before batching)."""

    def session_opened(self, device_id: str, *, agent_version: str, capability_version: int,
                       hardware_class: str, profile: bytes, hostname: str,
                       model: tuple[str, int] | None = None, previous: DeviceRecord | None = None) -> LiveSession:
        now = self._now_ms()
        session = LiveSession(next(self._ids), device_id, now, now)
        self._live[device_id] = session
        self._closed.pop(device_id, None)
        self.store.update_device_session(device_id, connected=True, last_seen_ms=now, agent_version=agent_version,
                                         capability_version=capability_version, hardware_class=hardware_class,
                                         profile=profile, hostname=hostname, owner=self.owner)
        if model is not None:
            self.store.set_device_model(device_id, *model)
        return session


async def storm(presence: PresenceTracker, store: CountingStore, profile: bytes) -> dict[str, float]:
    """Open every device's stream in one burst; the loop then runs until the opens are written."""
    previous = {d.device_id: d for d in store.list_devices()}  # each handler has its row from authenticating
    writes0, profiles0 = store.writes, store.profiles_written
    longest = 0.0
    started = time.perf_counter()
    for start in range(0, DEVICES, 100):  # a hundred hellos per loop turn, as they arrive
        turn = time.perf_counter()
        for i in range(start, min(start + 100, DEVICES)):
            device_id = f"dev-{i:05d}"
            presence.session_opened(device_id, agent_version="1.0", capability_version=7, hardware_class="x86_64",
                                    profile=profile, hostname=device_id, model=("det", 3),
                                    previous=previous[device_id])
        longest = max(longest, time.perf_counter() - turn)
        await asyncio.sleep(0)
    while presence._opened:  # the batched writes still queued
        turn = time.perf_counter()
        await asyncio.sleep(presence.close_delay_s / 4)
        longest = max(longest, time.perf_counter() - turn - presence.close_delay_s / 4)
    elapsed = time.perf_counter() - started
    assert sum(d.connected and d.connected_by == OWNER for d in store.list_devices()) == DEVICES
    return {"seconds": elapsed, "writes": store.writes - writes0, "profiles": store.profiles_written - profiles0,
            "longest_ms": longest * 1000}


def run(path: Path, presence_class: type[PresenceTracker]) -> dict[str, dict[str, float]]:
    store = CountingStore(path)
    profile = bench_profile().SerializeToString()
    store.create_enrollment_token(EnrollmentTokenRecord("t", "h", DEVICES, DEVICES, 0, 2**50, {}))
    for i in range(DEVICES):
        store.enroll_device("h", 0, DeviceRecord(f"dev-{i:05d}", "s", {}, 0))

    async def phases() -> dict[str, dict[str, float]]:
        first = presence_class(store, heartbeat_interval_s=5.0, owner=OWNER)
        figures = {"first connect": await storm(first, store, profile)}
        store.reset_connections(OWNER)  # what the restarted controller's start does
        restarted = presence_class(store, heartbeat_interval_s=5.0, owner=OWNER)
        figures["reconnect after a restart"] = await storm(restarted, store, profile)
        figures["redial, old stream still open"] = await storm(restarted, store, profile)
        return figures

    try:
        return asyncio.run(phases())
    finally:
        store.close()


def test_reconnect_storm_writes(tmp_path: Path) -> None:
    runs = {"per stream (before, emulated)": run(tmp_path / "before.db", PerStreamPresence),
            "batched (now)": run(tmp_path / "now.db", PresenceTracker)}
    rows = [[name, phase, f"{f['seconds']:.2f}", int(f["writes"]), int(f["profiles"]), f"{f['longest_ms']:.1f}"]
            for name, figures in runs.items() for phase, f in figures.items()]
    print_table(f"{DEVICES} streams opening in one burst (100 per loop turn), presence over SQLite on disk",
                ["writes", "phase", "seconds", "store writes", "profiles written", "longest loop block ms"], rows)
    before = runs["per stream (before, emulated)"]["reconnect after a restart"]
    now = runs["batched (now)"]["reconnect after a restart"]
    report_targets("reconnect storm", [
        (f"restart reconnect of {DEVICES} written in {now['seconds']:.2f} s < {TARGET_RATIO:g} x "
         f"{before['seconds']:.2f} s per stream", now["seconds"] < TARGET_RATIO * before["seconds"]),
        (f"{int(now['profiles'])} profiles written for unchanged devices == 0", now["profiles"] == 0),
    ])
