"""The embedded store: one SQLite file in WAL mode under the controller's state directory."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from edgefleet.controller.store.base import DeviceRecord, EnrollmentRefused, EnrollmentTokenRecord, Store

# Schema changes are appended here, never edited: index + 1 is the schema version.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE operator_tokens (
        token_hash TEXT PRIMARY KEY,
        created_at_ms INTEGER NOT NULL
    );
    CREATE TABLE enrollment_tokens (
        token_id TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL UNIQUE,
        uses_total INTEGER NOT NULL,
        uses_left INTEGER NOT NULL,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        labels TEXT NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        labels TEXT NOT NULL,
        enrolled_at_ms INTEGER NOT NULL,
        hostname TEXT NOT NULL DEFAULT '',
        agent_version TEXT NOT NULL DEFAULT '',
        capability_version INTEGER NOT NULL DEFAULT 0,
        hardware_class TEXT NOT NULL DEFAULT '',
        profile BLOB NOT NULL DEFAULT x'',
        last_seen_ms INTEGER NOT NULL DEFAULT 0,
        connected INTEGER NOT NULL DEFAULT 0,
        token_id TEXT NOT NULL DEFAULT ''
    );
    """,
]


class SQLiteStore(Store):
    backend_name = "sqlite"

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: writers queue instead of failing half-way."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            current = row[0] if row else 0
            if current > len(MIGRATIONS):
                raise RuntimeError(
                    f"store {self.path} has schema version {current}, newer than this controller "
                    f"({len(MIGRATIONS)}); upgrade edgefleet"
                )
            for script in MIGRATIONS[current:]:
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
            if row is None:
                db.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS),))
            else:
                db.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))

    # -- operator tokens -------------------------------------------------------------------
    def add_operator_token(self, token_hash: str, created_at_ms: int) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO operator_tokens VALUES (?, ?)", (token_hash, created_at_ms)
            )

    def is_operator_token(self, token_hash: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM operator_tokens WHERE token_hash = ?", (token_hash,)
            ).fetchone()
        return row is not None

    # -- enrollment tokens -----------------------------------------------------------------
    def create_enrollment_token(self, record: EnrollmentTokenRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO enrollment_tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.token_id,
                    record.secret_hash,
                    record.uses_total,
                    record.uses_left,
                    record.created_at_ms,
                    record.expires_at_ms,
                    json.dumps(record.labels, sort_keys=True),
                    int(record.revoked),
                ),
            )

    def list_enrollment_tokens(self) -> list[EnrollmentTokenRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM enrollment_tokens ORDER BY created_at_ms").fetchall()
        return [_token(r) for r in rows]

    def revoke_enrollment_token(self, token_id: str) -> EnrollmentTokenRecord | None:
        with self._tx() as db:
            db.execute("UPDATE enrollment_tokens SET revoked = 1 WHERE token_id = ?", (token_id,))
            row = db.execute("SELECT * FROM enrollment_tokens WHERE token_id = ?", (token_id,)).fetchone()
        return _token(row) if row else None

    def enroll_device(self, token_hash: str, now_ms: int, device: DeviceRecord) -> DeviceRecord:
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM enrollment_tokens WHERE secret_hash = ?", (token_hash,)
            ).fetchone()
            if row is None:
                raise EnrollmentRefused("unknown enrollment token")
            token = _token(row)
            if token.revoked:
                raise EnrollmentRefused(f"enrollment token {token.token_id} was revoked")
            if token.expires_at_ms <= now_ms:
                raise EnrollmentRefused(f"enrollment token {token.token_id} has expired")
            if token.uses_left <= 0:
                raise EnrollmentRefused(
                    f"enrollment token {token.token_id} is used up ({token.uses_total} of {token.uses_total})"
                )
            db.execute(
                "UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE token_id = ?",
                (token.token_id,),
            )
            labels = {**device.labels, **token.labels}
            enrolled = dataclasses.replace(
                device, labels=labels, token_id=token.token_id, enrolled_at_ms=now_ms
            )
            db.execute(
                "INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    enrolled.device_id,
                    enrolled.secret_hash,
                    json.dumps(labels, sort_keys=True),
                    enrolled.enrolled_at_ms,
                    enrolled.hostname,
                    enrolled.agent_version,
                    enrolled.capability_version,
                    enrolled.hardware_class,
                    enrolled.profile,
                    enrolled.last_seen_ms,
                    int(enrolled.connected),
                    enrolled.token_id,
                ),
            )
        return enrolled

    # -- devices ---------------------------------------------------------------------------
    def get_device(self, device_id: str) -> DeviceRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        return _device(row) if row else None

    def list_devices(self) -> list[DeviceRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM devices ORDER BY enrolled_at_ms, device_id").fetchall()
        return [_device(r) for r in rows]

    def update_device_session(
        self,
        device_id: str,
        *,
        connected: bool,
        last_seen_ms: int,
        agent_version: str | None = None,
        capability_version: int | None = None,
        hardware_class: str | None = None,
        profile: bytes | None = None,
        hostname: str | None = None,
    ) -> None:
        updates: dict[str, object] = {"connected": int(connected), "last_seen_ms": last_seen_ms}
        optional = {
            "agent_version": agent_version,
            "capability_version": capability_version,
            "hardware_class": hardware_class,
            "profile": profile,
            "hostname": hostname,
        }
        updates.update({k: v for k, v in optional.items() if v is not None})
        assignments = ", ".join(f"{column} = ?" for column in updates)
        with self._tx() as db:
            db.execute(
                f"UPDATE devices SET {assignments} WHERE device_id = ?", (*updates.values(), device_id)
            )

    def touch_devices(self, last_seen: Iterable[tuple[str, int]]) -> None:
        pairs = [(ms, device_id, ms) for device_id, ms in last_seen]
        if not pairs:
            return
        with self._tx() as db:
            db.executemany(
                "UPDATE devices SET last_seen_ms = ? WHERE device_id = ? AND last_seen_ms < ?", pairs
            )

    def reset_connections(self) -> int:
        with self._tx() as db:
            return db.execute("UPDATE devices SET connected = 0 WHERE connected = 1").rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _token(row: sqlite3.Row) -> EnrollmentTokenRecord:
    return EnrollmentTokenRecord(
        token_id=row["token_id"],
        secret_hash=row["secret_hash"],
        uses_total=row["uses_total"],
        uses_left=row["uses_left"],
        created_at_ms=row["created_at_ms"],
        expires_at_ms=row["expires_at_ms"],
        labels=json.loads(row["labels"]),
        revoked=bool(row["revoked"]),
    )


def _device(row: sqlite3.Row) -> DeviceRecord:
    return DeviceRecord(
        device_id=row["device_id"],
        secret_hash=row["secret_hash"],
        labels=json.loads(row["labels"]),
        enrolled_at_ms=row["enrolled_at_ms"],
        hostname=row["hostname"],
        agent_version=row["agent_version"],
        capability_version=row["capability_version"],
        hardware_class=row["hardware_class"],
        profile=bytes(row["profile"]),
        last_seen_ms=row["last_seen_ms"],
        connected=bool(row["connected"]),
        token_id=row["token_id"],
    )
