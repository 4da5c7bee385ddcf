"""The live telemetry view shared by the worker processes of one controller.

Each worker feeds its own LiveTelemetry from the streams it holds, and writes a copy of it to
`<dir>/worker-<i>.pickle` every SNAPSHOT_INTERVAL_S (when it changed). Whichever worker answers a
scrape of /metrics or a dashboard page reads its peers' latest copies and merges them with its
own, so what it shows is the whole fleet, at most an interval old for the devices of other workers:
  - latest point per device: the newest by batch end (a device that moved between workers
    leaves an older point behind in the worker it left);
  - fleet latency histograms and per-device totals: summed, since each counts only the batches
    its worker stored, and every batch is stored by one worker only.
A worker restarted in the place of a dead one (same index) starts from the copy its predecessor
left, so totals do not go back by what the dead worker had counted.

The files are pickles of plain dataclasses and numpy arrays, written by this controller's own
processes into its state directory (mode 0700 like the rest of it, which also holds the keys).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.controller.store.base import TelemetryPoint
from edgefleet.controller.telemetry.ingest import LiveTelemetry

log = logging.getLogger("edgefleet.controller.telemetry.live_share")

SNAPSHOT_INTERVAL_S = 1.0
FORMAT_VERSION = 1

Snapshot = tuple[dict[str, TelemetryPoint], dict[tuple[str, str], np.ndarray],
                 dict[tuple[str, str, str], tuple[int, int]]]


class SharedLiveTelemetry(LiveTelemetry):
    """A worker's LiveTelemetry whose `snapshot` is the merge of every worker's."""

    def __init__(self, directory: Path, index: int) -> None:
        super().__init__()
        self.directory = directory
        self.path = directory / f"worker-{index}.pickle"
        self._version = 0  # bumped by every point, so an unchanged view is not written again
        self._written = 0
        self._peers: dict[Path, tuple[int, Snapshot]] = {}  # path -> (mtime_ns, snapshot), re-read when it changes
        self._peers_lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def __call__(self, point: TelemetryPoint, counts: list[np.ndarray]) -> None:
        with self.lock:
            self._add(point, counts)
            self._version += 1

    def restore(self) -> bool:
        """Start from the copy a previous worker of this index left; False when there is none."""
        snapshot = _read(self.path)
        if snapshot is None:
            return False
        with self.lock:
            self.latest, self.fleet, self.totals = snapshot
        return True

    def local_snapshot(self) -> Snapshot:
        return super().snapshot()

    def write(self) -> bool:
        """Write this worker's copy when it changed since the last write; True when written."""
        with self.lock:
            version = self._version
        if version == self._written:
            return False
        data = pickle.dumps((FORMAT_VERSION, self.local_snapshot()), protocol=pickle.HIGHEST_PROTOCOL)
        temp = self.path.with_suffix(f".tmp{os.getpid()}")
        # No fsync: a copy lost to a power cut is rebuilt from the streams in seconds.
        temp.write_bytes(data)
        os.replace(temp, self.path)
        self._written = version
        return True

    def snapshot(self) -> Snapshot:
        latest, fleet, totals = self.local_snapshot()
        for peer in self._peer_snapshots():
            peer_latest, peer_fleet, peer_totals = peer
            for device_id, point in peer_latest.items():
                mine = latest.get(device_id)
                if mine is None or point.end_ms > mine.end_ms:
                    latest[device_id] = point
            for key, counts in peer_fleet.items():
                mine_counts = fleet.get(key)
                if mine_counts is None:
                    fleet[key] = counts.copy()
                elif mine_counts.shape == counts.shape:
                    fleet[key] = mine_counts + counts
            for series, (count, errors) in peer_totals.items():
                had = totals.get(series, (0, 0))
                totals[series] = (had[0] + count, had[1] + errors)
        return latest, fleet, totals

    def _peer_snapshots(self) -> list[Snapshot]:
        found = []
        with self._peers_lock:
            seen = set()
            for path in sorted(self.directory.glob("worker-*.pickle")):
                if path == self.path:
                    continue
                seen.add(path)
                try:
                    mtime = path.stat().st_mtime_ns
                except FileNotFoundError:
                    continue
                cached = self._peers.get(path)
                if cached is None or cached[0] != mtime:
                    snapshot = _read(path)
                    if snapshot is None:
                        continue
                    cached = self._peers[path] = (mtime, snapshot)
                found.append(cached[1])
            for gone in set(self._peers) - seen:
                del self._peers[gone]
        return found


def _read(path: Path) -> Snapshot | None:
    try:
        data: Any = pickle.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except Exception as exc:  # a torn or foreign file: skip it, the next write replaces it
        log.warning("unreadable live telemetry snapshot", extra={"path": str(path), "error": str(exc)[:200]})
        return None
    if not isinstance(data, tuple) or len(data) != 2 or data[0] != FORMAT_VERSION:
        return None
    snapshot: Snapshot = data[1]
    return snapshot


class SharedSessionCounts:
    """How many device streams each worker holds, for a /healthz that counts the whole fleet
    whichever worker answers: `<dir>/sessions-<i>.json` holds a worker's pid and count, written
    when the count changed (checked every SNAPSHOT_INTERVAL_S). A file whose pid is gone (a killed
    worker, not yet restarted) counts nothing: that worker's streams ended with it."""

    def __init__(self, directory: Path, index: int) -> None:
        self.directory = directory
        self.path = directory / f"sessions-{index}.json"
        self._written: int | None = None
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def write(self, sessions: int) -> bool:
        """Record this worker's count when it changed since the last write; True when written."""
        if sessions == self._written:
            return False
        temp = self.path.with_suffix(f".tmp{os.getpid()}")
        temp.write_text(json.dumps({"pid": os.getpid(), "sessions": sessions}))
        os.replace(temp, self.path)
        self._written = sessions
        return True

    def total(self, own: int) -> int:
        """`own` (this worker's count now) plus each live peer's last written count."""
        total = own
        for path in self.directory.glob("sessions-*.json"):
            if path == self.path:
                continue
            try:
                data = json.loads(path.read_text())
                pid, sessions = int(data["pid"]), int(data["sessions"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # gone or torn between a peer's write and rename: the next read sees it
            if _alive(pid):
                total += sessions
        return total


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
