"""The telemetry outbox: every batch is written to disk before it is sent, and deleted on ack.

SQLite (WAL) under the agent's state dir. The queue has a cap; when full the oldest batches are
dropped and the number dropped is reported in the next batch, so a loss is never silent. The
sequence counter lives here too, so sequence numbers keep increasing across restarts.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from edgefleet.protos.v1 import fleet_pb2

DEFAULT_CAP = 20_000


class TelemetryOutbox:
    def __init__(self, path: Path, cap: int = DEFAULT_CAP) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS batches (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        for key in ("next_seq", "dropped_unreported", "dropped_total"):
            self._db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, 1 if key == "next_seq" else 0))

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def append(self, batch: fleet_pb2.TelemetryBatch) -> fleet_pb2.TelemetryBatch:
        """Assign the next sequence number, carry the drop count, persist; returns the stored batch."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._meta("next_seq")
                batch.seq = seq
                batch.dropped_batches = self._meta("dropped_unreported")
                self._db.execute("INSERT INTO batches VALUES (?, ?)", (seq, batch.SerializeToString()))
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
                self._db.execute("UPDATE meta SET value = 0 WHERE key = 'dropped_unreported'")
                excess = self._db.execute("SELECT COUNT(*) FROM batches").fetchone()[0] - self.cap
                if excess > 0:
                    oldest = self._db.execute("SELECT seq, payload FROM batches ORDER BY seq LIMIT ?", (excess,))
                    dropped = oldest.fetchall()
                    # A dropped batch may itself carry an earlier drop count: pass that on too.
                    carried = sum(fleet_pb2.TelemetryBatch.FromString(p).dropped_batches for _, p in dropped)
                    self._db.executemany("DELETE FROM batches WHERE seq = ?", [(q,) for q, _ in dropped])
                    self._db.execute(
                        "UPDATE meta SET value = value + ? WHERE key = 'dropped_unreported'", (excess + carried,)
                    )
                    self._db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped_total'", (excess,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return batch

    def pending(self, after_seq: int = 0, limit: int = 100) -> list[fleet_pb2.TelemetryBatch]:
        with self._lock:
            rows = self._db.execute(
                "SELECT payload FROM batches WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
            ).fetchall()
        return [fleet_pb2.TelemetryBatch.FromString(row[0]) for row in rows]

    def ack(self, seqs: list[int]) -> None:
        if not seqs:
            return
        with self._lock:
            self._db.executemany("DELETE FROM batches WHERE seq = ?", [(s,) for s in seqs])

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM batches").fetchone()[0])

    @property
    def dropped_total(self) -> int:
        with self._lock:
            return self._meta("dropped_total")

    def close(self) -> None:
        with self._lock:
            self._db.close()
