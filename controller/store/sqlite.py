"""The embedded store: one SQLite file in WAL mode under the controller's state directory.

Writes go through one connection, one IMMEDIATE transaction at a time (a lock queues them). Reads
do not take that lock: each thread reads on a connection of its own, and under WAL a reader sees
the last committed state without waiting for an open write transaction. A Control call such as
ListRollouts used to queue behind the ingest's group write (tens of ms under load); now it waits
for nothing but its own query.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sqlite3
import threading
import weakref
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgefleet.controller.fleet.commands import OPEN_COMMAND_STATES, expired_commands
from edgefleet.controller.fleet.credentials import token_refusal
from edgefleet.controller.rollouts.states import ACTIVE_ROLLOUT_STATES
from edgefleet.controller.store.base import (
    SESSION_OPEN_FIELDS,
    AuditRecord,
    BuildRecord,
    CommandRecord,
    DeviceBrief,
    DeviceRecord,
    EnrollmentRefused,
    EnrollmentTokenRecord,
    LoginSessionRecord,
    ModelPoint,
    ModelRecord,
    OperatorTokenRecord,
    RolloutDeviceRecord,
    RolloutRecord,
    Rollup,
    SessionOpen,
    Store,
    StoreError,
    TelemetryPoint,
    session_columns,
)

# Schema changes are appended here, never edited: index + 1 is the schema version. Each has its twin
# in controller/store/postgres.py; tests/unit/test_store_contract.py checks both build the same tables.
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
    """
    CREATE TABLE telemetry_batches (
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        start_ms INTEGER NOT NULL,
        end_ms INTEGER NOT NULL,
        received_ms INTEGER NOT NULL,
        watts REAL NOT NULL,
        power_source TEXT NOT NULL,
        cpu_system REAL NOT NULL,
        cpu_process REAL NOT NULL,
        rss_bytes INTEGER NOT NULL,
        memory_available_bytes INTEGER NOT NULL,
        temperature_c REAL,
        load1 REAL NOT NULL,
        dropped_batches INTEGER NOT NULL,
        PRIMARY KEY (device_id, seq)
    );
    CREATE INDEX telemetry_batches_by_time ON telemetry_batches (device_id, end_ms);
    CREATE TABLE telemetry_models (
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        count INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        p50_ms REAL NOT NULL,
        p95_ms REAL NOT NULL,
        p99_ms REAL NOT NULL,
        max_ms REAL NOT NULL,
        latency_hdr BLOB NOT NULL,
        energy_mj REAL NOT NULL,
        energy_source TEXT NOT NULL,
        runtime TEXT NOT NULL,
        PRIMARY KEY (device_id, seq, model, version)
    );
    CREATE TABLE telemetry_rollups (
        device_id TEXT NOT NULL,
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        minute_ms INTEGER NOT NULL,
        count INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        latency_hdr BLOB NOT NULL,
        p50_ms REAL NOT NULL,
        p95_ms REAL NOT NULL,
        p99_ms REAL NOT NULL,
        max_ms REAL NOT NULL,
        watts_avg REAL NOT NULL,
        energy_mj_avg REAL NOT NULL,
        PRIMARY KEY (device_id, minute_ms, model, version)
    );
    CREATE TABLE telemetry_dirty_minutes (
        device_id TEXT NOT NULL,
        minute_ms INTEGER NOT NULL,
        PRIMARY KEY (device_id, minute_ms)
    );
    CREATE TABLE telemetry_pruned (
        device_id TEXT PRIMARY KEY,
        max_seq INTEGER NOT NULL
    );
    """,
    """
    CREATE TABLE commands (
        command_id TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        payload BLOB NOT NULL,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        rollout_id TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL DEFAULT 'pending',
        result TEXT NOT NULL DEFAULT '',
        reason TEXT NOT NULL DEFAULT '',
        message TEXT NOT NULL DEFAULT '',
        ack BLOB NOT NULL DEFAULT x'',
        updated_at_ms INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX commands_by_device ON commands (device_id, state);
    CREATE INDEX commands_by_rollout ON commands (rollout_id);
    """,
    """
    ALTER TABLE devices ADD COLUMN model TEXT NOT NULL DEFAULT '';
    ALTER TABLE devices ADD COLUMN model_version INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE models (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        format TEXT NOT NULL,
        calib_sha256 TEXT NOT NULL DEFAULT '',
        budget REAL NOT NULL,
        created_at_ms INTEGER NOT NULL,
        PRIMARY KEY (name, version)
    );
    CREATE TABLE builds (
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        hardware_class TEXT NOT NULL,
        state TEXT NOT NULL,
        bundle_sha256 TEXT NOT NULL DEFAULT '',
        rollback_bundle_sha256 TEXT NOT NULL DEFAULT '',
        report TEXT NOT NULL DEFAULT '',
        error TEXT NOT NULL DEFAULT '',
        updated_at_ms INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (model, version, hardware_class)
    );
    CREATE TABLE rollouts (
        rollout_id TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        selector TEXT NOT NULL,
        waves TEXT NOT NULL,
        soak_s REAL NOT NULL,
        max_failures REAL NOT NULL,
        gates TEXT NOT NULL,
        device_timeout_s REAL NOT NULL,
        auto_rollback INTEGER NOT NULL,
        state TEXT NOT NULL,
        wave INTEGER NOT NULL,
        reason TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL,
        soak_until_ms INTEGER NOT NULL
    );
    CREATE TABLE rollout_devices (
        rollout_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        hardware_class TEXT NOT NULL,
        wave INTEGER NOT NULL,
        state TEXT NOT NULL,
        command_id TEXT NOT NULL,
        previous_model TEXT NOT NULL,
        previous_version INTEGER NOT NULL,
        baseline TEXT NOT NULL,
        reason TEXT NOT NULL,
        dispatched_at_ms INTEGER NOT NULL,
        finished_at_ms INTEGER NOT NULL,
        rollback_command_id TEXT NOT NULL,
        PRIMARY KEY (rollout_id, device_id)
    );
    """,
    """
    ALTER TABLE devices ADD COLUMN connected_by TEXT NOT NULL DEFAULT '';
    """,
    """
    ALTER TABLE telemetry_dirty_minutes ADD COLUMN marks INTEGER NOT NULL DEFAULT 1;
    """,
    """
    ALTER TABLE models ADD COLUMN eval_sha256 TEXT NOT NULL DEFAULT '';
    ALTER TABLE models ADD COLUMN eval_labels_sha256 TEXT NOT NULL DEFAULT '';
    ALTER TABLE models ADD COLUMN metric TEXT NOT NULL DEFAULT '';
    """,
    # Operator roles and the audit log. Tokens from before roles existed were all-powerful: they
    # become admin here, while the column's default (for any insert that forgets it) is the least role.
    """
    ALTER TABLE operator_tokens ADD COLUMN token_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE operator_tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'viewer';
    ALTER TABLE operator_tokens ADD COLUMN name TEXT NOT NULL DEFAULT '';
    ALTER TABLE operator_tokens ADD COLUMN expires_at_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE operator_tokens ADD COLUMN revoked_at_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE operator_tokens ADD COLUMN created_by TEXT NOT NULL DEFAULT '';
    UPDATE operator_tokens SET role = 'admin', token_id = 'opt-' || substr(token_hash, 1, 8),
        name = 'state-dir operator-token';
    CREATE UNIQUE INDEX operator_tokens_by_id ON operator_tokens (token_id);
    CREATE TABLE audit_log (
        audit_id INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL,
        token_id TEXT NOT NULL,
        role TEXT NOT NULL,
        method TEXT NOT NULL,
        arguments TEXT NOT NULL,
        outcome TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX audit_log_by_time ON audit_log (at_ms);
    """,
    """
    ALTER TABLE devices ADD COLUMN cert_serial TEXT NOT NULL DEFAULT '';
    ALTER TABLE devices ADD COLUMN previous_cert_serial TEXT NOT NULL DEFAULT '';
    ALTER TABLE devices ADD COLUMN cert_not_after_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE devices ADD COLUMN revoked_at_ms INTEGER NOT NULL DEFAULT 0;
    """,
    # Worker processes of one controller (issue 18): the lease that elects the one running the
    # rollout engine and the periodic jobs, and an index for the workers' sweep of pending commands.
    """
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at_ms INTEGER NOT NULL
    );
    CREATE INDEX commands_by_state ON commands (state);
    CREATE TABLE login_sessions (
        session_hash TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL,
        csrf TEXT NOT NULL,
        expires_at_ms INTEGER NOT NULL
    );
    CREATE INDEX login_sessions_by_expiry ON login_sessions (expires_at_ms);
    """,
    # The workers' sweep for revoked devices whose stream they still hold (issue 18): the few
    # revoked rows, not every device, twice a second per worker.
    """
    CREATE INDEX devices_revoked ON devices (revoked_at_ms) WHERE revoked_at_ms > 0;
    """,
]

MINUTE_MS = 60_000
MIN_SQLITE = (3, 33, 0)


class SQLiteStore(Store):
    backend_name = "sqlite"

    def __init__(self, path: Path | str) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            # UPDATE ... FROM, the bulk presence writes' form, came in 3.33 (2020).
            raise StoreError(f"SQLite {sqlite3.sqlite_version} is too old for the controller's store: it needs "
                             f"{'.'.join(map(str, MIN_SQLITE))} or newer (use a Python built against a newer "
                             "SQLite, or a postgresql:// store)")
        self.path = str(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        # Writers of other processes (the workers of `serve --workers N`) queue on this file lock
        # rather than on SQLite's busy handler, which sleeps up to 100 ms between tries: two
        # workers ingesting at once stored less than one alone. A flock waiter wakes at the release.
        self._write_lock_fd = -1 if self.path == ":memory:" else os.open(
            self.path + ".writelock", os.O_CREAT | os.O_RDWR, 0o600)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        # One read connection per thread, made on first use. A thread's connection goes when the
        # thread does (its thread-local slot is dropped); `close` closes the ones still alive.
        self._local = threading.local()
        self._readers: weakref.WeakSet[_Reader] = weakref.WeakSet()
        self._closed = False

    @contextmanager
    def _reading(self, *, snapshot: bool = False) -> Iterator[sqlite3.Connection]:
        """This thread's read connection. `snapshot`: the statements in the block see one state (a
        read transaction); a single statement is one by itself, and each extra statement releases
        and retakes the GIL, which under load costs a thread switch interval."""
        reader: _Reader | None = getattr(self._local, "reader", None)
        if reader is None:
            if self._closed:
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            reader = self._local.reader = _Reader(self.path)
            self._readers.add(reader)
        db = reader.db
        if not snapshot:
            yield db
            return
        db.execute("BEGIN DEFERRED")
        try:
            yield db
        finally:
            db.execute("COMMIT")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: writers queue instead of failing half-way."""
        with self._lock:
            if self._write_lock_fd >= 0:
                fcntl.flock(self._write_lock_fd, fcntl.LOCK_EX)
            with self._locked_tx() as db:
                yield db

    @contextmanager
    def _tx_now(self) -> Iterator[sqlite3.Connection | None]:
        """`_tx` if both write locks are free right now, else None: for callers that must not wait."""
        if not self._lock.acquire(blocking=False):
            yield None
            return
        try:
            if self._write_lock_fd >= 0:
                try:
                    fcntl.flock(self._write_lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield None
                    return
            with self._locked_tx() as db:
                yield db
        finally:
            self._lock.release()

    @contextmanager
    def _locked_tx(self) -> Iterator[sqlite3.Connection]:
        """The transaction itself, under locks the caller holds; releases the file lock."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        finally:
            if self._write_lock_fd >= 0:
                fcntl.flock(self._write_lock_fd, fcntl.LOCK_UN)

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
    def add_operator_token(self, record: OperatorTokenRecord) -> bool:
        with self._tx() as db:
            row = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
            return db.execute(
                f"INSERT OR IGNORE INTO operator_tokens ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
                tuple(row.values()),
            ).rowcount == 1

    def get_operator_token(self, token_hash: str) -> OperatorTokenRecord | None:
        with self._reading() as db:
            row = db.execute("SELECT * FROM operator_tokens WHERE token_hash = ?", (token_hash,)).fetchone()
        return OperatorTokenRecord(**dict(row)) if row else None

    def list_operator_tokens(self) -> list[OperatorTokenRecord]:
        with self._reading() as db:
            rows = db.execute("SELECT * FROM operator_tokens ORDER BY created_at_ms, token_id").fetchall()
        return [OperatorTokenRecord(**dict(r)) for r in rows]

    def revoke_operator_token(self, token_id: str, now_ms: int) -> OperatorTokenRecord | None:
        with self._tx() as db:
            db.execute("UPDATE operator_tokens SET revoked_at_ms = ? WHERE token_id = ? AND revoked_at_ms = 0",
                       (now_ms, token_id))
            row = db.execute("SELECT * FROM operator_tokens WHERE token_id = ?", (token_id,)).fetchone()
        return OperatorTokenRecord(**dict(row)) if row else None

    # -- audit log -------------------------------------------------------------------------
    def add_audit(self, record: AuditRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO audit_log (at_ms, token_id, role, method, arguments, outcome, message) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record.at_ms, record.token_id, record.role, record.method, record.arguments, record.outcome,
                 record.message),
            )

    def list_audit(self, *, since_ms: int = 0, limit: int = 100) -> list[AuditRecord]:
        with self._reading() as db:
            rows = db.execute(
                "SELECT * FROM audit_log WHERE at_ms >= ? ORDER BY at_ms DESC, audit_id DESC LIMIT ?",
                (since_ms, limit),
            ).fetchall()
        return [AuditRecord(**dict(r)) for r in reversed(rows)]

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
        with self._reading() as db:
            rows = db.execute("SELECT * FROM enrollment_tokens ORDER BY created_at_ms").fetchall()
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
            refusal = token_refusal(token, now_ms)
            if refusal is not None:
                raise EnrollmentRefused(refusal)
            db.execute(
                "UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE token_id = ?",
                (token.token_id,),
            )
            labels = {**device.labels, **token.labels}
            enrolled = dataclasses.replace(
                device, labels=labels, token_id=token.token_id, enrolled_at_ms=now_ms
            )
            row = {f.name: getattr(enrolled, f.name) for f in dataclasses.fields(enrolled)}
            row["labels"] = json.dumps(labels, sort_keys=True)
            row["connected"] = int(enrolled.connected)
            db.execute(
                f"INSERT INTO devices ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})", tuple(row.values())
            )
        return enrolled

    # -- devices ---------------------------------------------------------------------------
    def get_device(self, device_id: str) -> DeviceRecord | None:
        with self._reading() as db:
            row = db.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        return _device(row) if row else None

    def list_devices(self) -> list[DeviceRecord]:
        with self._reading() as db:
            rows = db.execute("SELECT * FROM devices ORDER BY enrolled_at_ms, device_id").fetchall()
        return [_device(r) for r in rows]

    def device_briefs(self) -> list[DeviceBrief]:
        with self._reading() as db:
            # A table scan sorted here: ORDER BY walked the key index into the table, twice as slow.
            rows = db.execute("SELECT device_id, hardware_class, connected, last_seen_ms FROM devices").fetchall()
        return sorted((DeviceBrief(r[0], r[1], bool(r[2]), r[3]) for r in rows), key=lambda d: d.device_id)

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
        owner: str = "",
    ) -> None:
        updates = session_columns(connected, last_seen_ms, owner, agent_version=agent_version,
                                  capability_version=capability_version, hardware_class=hardware_class,
                                  profile=profile, hostname=hostname)
        assignments = ", ".join(f"{column} = ?" for column in updates)
        # Closing must not undo a newer stream that another replica opened meanwhile.
        guard = "" if connected else " AND connected_by = ?"
        args = (*updates.values(), device_id) if connected else (*updates.values(), device_id, owner)
        with self._tx() as db:
            db.execute(f"UPDATE devices SET {assignments} WHERE device_id = ?{guard}", args)

    def open_device_sessions(self, opens: Sequence[SessionOpen], owner: str) -> None:
        if not opens:
            return
        keep = ", ".join(f"{f} = COALESCE(v.{f}, devices.{f})" for f in SESSION_OPEN_FIELDS)
        # One row per device, as the opens would leave it one after another: a later value wins, and
        # a None keeps what an earlier open gave.
        rows: dict[str, tuple[Any, ...]] = {}
        for o in opens:
            row = (o.device_id, o.last_seen_ms, *(getattr(o, f) for f in SESSION_OPEN_FIELDS))
            earlier = rows.get(o.device_id)
            rows[o.device_id] = row if earlier is None else tuple(
                new if new is not None else old for new, old in zip(row, earlier, strict=True))
        with self._tx() as db:
            _rows(db, f"WITH v(device_id, last_seen_ms, {', '.join(SESSION_OPEN_FIELDS)}) AS (VALUES {{rows}}) "
                  f"UPDATE devices SET connected = 1, last_seen_ms = v.last_seen_ms, connected_by = ?, {keep} "
                  "FROM v WHERE devices.device_id = v.device_id",
                  list(rows.values()), 2 + len(SESSION_OPEN_FIELDS), tail=(owner,))

    def close_device_sessions(self, closed: Iterable[tuple[str, int]], owner: str = "") -> None:
        latest: dict[str, int] = {}
        for device_id, ms in closed:
            latest[device_id] = max(ms, latest.get(device_id, ms))
        if not latest:
            return
        with self._tx() as db:
            _rows(db, "WITH v(device_id, ms) AS (VALUES {rows}) "
                  "UPDATE devices SET connected = 0, last_seen_ms = MAX(devices.last_seen_ms, v.ms) "
                  "FROM v WHERE devices.device_id = v.device_id AND devices.connected_by = ?",
                  list(latest.items()), 2, tail=(owner,))

    def touch_devices(self, last_seen: Iterable[tuple[str, int]]) -> None:
        latest: dict[str, int] = {}
        for device_id, ms in last_seen:
            latest[device_id] = max(ms, latest.get(device_id, ms))
        if not latest:
            return
        with self._tx() as db:
            _rows(db, "WITH v(device_id, ms) AS (VALUES {rows}) UPDATE devices SET last_seen_ms = v.ms "
                  "FROM v WHERE devices.device_id = v.device_id AND devices.last_seen_ms < v.ms",
                  list(latest.items()), 2)

    def reset_connections(self, owner: str = "") -> int:
        with self._tx() as db:
            return db.execute(
                "UPDATE devices SET connected = 0 WHERE connected = 1 AND (connected_by = ? OR ? = '')", (owner, owner)
            ).rowcount

    # -- leases ----------------------------------------------------------------------------
    def acquire_lease(self, name: str, holder: str, now_ms: int, ttl_ms: int) -> bool:
        with self._tx() as db:
            db.execute(
                "INSERT INTO leases (name, holder, expires_at_ms) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at_ms = excluded.expires_at_ms "
                "WHERE leases.holder = excluded.holder OR leases.expires_at_ms <= ?",
                (name, holder, now_ms + ttl_ms, now_ms),
            )
            row = db.execute("SELECT holder FROM leases WHERE name = ?", (name,)).fetchone()
        return row is not None and row[0] == holder

    def release_lease(self, name: str, holder: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    def lease_holder(self, name: str, now_ms: int) -> str:
        with self._lock:
            row = self._db.execute("SELECT holder FROM leases WHERE name = ? AND expires_at_ms > ?",
                                   (name, now_ms)).fetchone()
        return str(row[0]) if row else ""

    # -- dashboard login sessions ------------------------------------------------------------
    def add_login_session(self, record: LoginSessionRecord, now_ms: int, max_sessions: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM login_sessions WHERE expires_at_ms <= ?", (now_ms,))
            count = db.execute("SELECT COUNT(*) FROM login_sessions").fetchone()[0]
            if count >= max_sessions:
                db.execute("DELETE FROM login_sessions WHERE session_hash IN (SELECT session_hash FROM login_sessions "
                           "ORDER BY expires_at_ms LIMIT ?)", (count - max_sessions + 1,))
            db.execute("INSERT OR REPLACE INTO login_sessions VALUES (?, ?, ?, ?)",
                       (record.session_hash, record.token_hash, record.csrf, record.expires_at_ms))

    def get_login_session(self, session_hash: str) -> LoginSessionRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM login_sessions WHERE session_hash = ?", (session_hash,)).fetchone()
        return LoginSessionRecord(**dict(row)) if row else None

    def delete_login_session(self, session_hash: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM login_sessions WHERE session_hash = ?", (session_hash,))

    # -- commands --------------------------------------------------------------------------
    def devices_with_pending_commands(self, owner: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT c.device_id FROM commands c JOIN devices d ON d.device_id = c.device_id "
                "WHERE c.state = 'pending' AND d.connected = 1 AND d.connected_by = ? ORDER BY c.device_id",
                (owner,),
            ).fetchall()
        return [r[0] for r in rows]

    def revoked_streams(self, owner: str) -> list[str]:
        with self._reading() as db:
            rows = db.execute(
                "SELECT device_id FROM devices WHERE revoked_at_ms > 0 AND connected = 1 AND connected_by = ? "
                "ORDER BY device_id", (owner,),
            ).fetchall()
        return [r[0] for r in rows]

    def add_command(self, record: CommandRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO commands VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.command_id, record.device_id, record.kind, record.payload, record.created_at_ms,
                 record.expires_at_ms, record.rollout_id, record.state, record.result, record.reason,
                 record.message, record.ack, record.updated_at_ms or record.created_at_ms),
            )

    def get_command(self, command_id: str) -> CommandRecord | None:
        with self._reading() as db:
            row = db.execute("SELECT * FROM commands WHERE command_id = ?", (command_id,)).fetchone()
        return _command(row) if row else None

    def open_commands(self, device_id: str, now_ms: int) -> list[CommandRecord]:
        with self._tx() as db:
            open_states = ", ".join("?" * len(OPEN_COMMAND_STATES))
            rows = db.execute(
                f"SELECT * FROM commands WHERE device_id = ? AND state IN ({open_states}) "
                "ORDER BY created_at_ms, command_id", (device_id, *OPEN_COMMAND_STATES),
            ).fetchall()
            records = [_command(r) for r in rows]
            expired = expired_commands(records, now_ms)
            db.executemany(
                "UPDATE commands SET state = ?, result = ?, updated_at_ms = ? WHERE command_id = ?",
                [(c.state, c.result, c.updated_at_ms, c.command_id) for c in expired],
            )
        gone = {c.command_id for c in expired}
        return [c for c in records if c.command_id not in gone]

    def mark_command_sent(self, command_id: str, now_ms: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE commands SET state = 'sent', updated_at_ms = ? WHERE command_id = ? AND state = 'pending'",
                (now_ms, command_id),
            )

    def finish_command(self, command_id: str, *, state: str, result: str, reason: str, message: str,
                       ack: bytes, now_ms: int) -> CommandRecord | None:
        with self._tx() as db:
            updated = db.execute(
                "UPDATE commands SET state = ?, result = ?, reason = ?, message = ?, ack = ?, updated_at_ms = ? "
                "WHERE command_id = ? AND state IN ('pending', 'sent')",
                (state, result, reason, message, ack, now_ms, command_id),
            ).rowcount
            row = db.execute("SELECT * FROM commands WHERE command_id = ?", (command_id,)).fetchone()
        return _command(row) if row and updated else None

    def list_commands(self, *, device_id: str | None = None, rollout_id: str | None = None) -> list[CommandRecord]:
        clauses, args = [], []
        if device_id is not None:
            clauses.append("device_id = ?")
            args.append(device_id)
        if rollout_id is not None:
            clauses.append("rollout_id = ?")
            args.append(rollout_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._reading() as db:
            rows = db.execute(f"SELECT * FROM commands {where} ORDER BY created_at_ms, command_id", args)
            return [_command(r) for r in rows.fetchall()]

    # -- models, builds, rollouts ------------------------------------------------------------
    def add_model(self, record: ModelRecord) -> None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM models WHERE name = ? AND version = ?",
                             (record.name, record.version)).fetchone()
            if row is not None:
                if row["sha256"] != record.sha256:
                    raise StoreError(
                        f"model {record.name} version {record.version} already exists with other content; "
                        "register the new file under a new --version"
                    )
                return
            _insert(db, "models", record)

    def get_model(self, name: str, version: int) -> ModelRecord | None:
        with self._reading() as db:
            row = db.execute("SELECT * FROM models WHERE name = ? AND version = ?", (name, version)).fetchone()
        return ModelRecord(**dict(row)) if row else None

    def list_models(self) -> list[ModelRecord]:
        with self._reading() as db:
            rows = db.execute("SELECT * FROM models ORDER BY name, version").fetchall()
        return [ModelRecord(**dict(r)) for r in rows]

    def set_device_model(self, device_id: str, model: str, version: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE devices SET model = ?, model_version = ? WHERE device_id = ?",
                       (model, version, device_id))

    def set_device_certificate(self, device_id: str, serial: str, not_after_ms: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE devices SET previous_cert_serial = cert_serial, cert_serial = ?, cert_not_after_ms = ? "
                       "WHERE device_id = ?", (serial, not_after_ms, device_id))

    def revoke_device(self, device_id: str, now_ms: int) -> DeviceRecord | None:
        with self._tx() as db:
            db.execute("UPDATE devices SET revoked_at_ms = ? WHERE device_id = ? AND revoked_at_ms = 0",
                       (now_ms, device_id))
            row = db.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        return _device(row) if row else None

    def put_build(self, record: BuildRecord) -> None:
        with self._tx() as db:
            _insert(db, "builds", record, replace=True)

    def get_build(self, model: str, version: int, hardware_class: str) -> BuildRecord | None:
        with self._reading() as db:
            row = db.execute(
                "SELECT * FROM builds WHERE model = ? AND version = ? AND hardware_class = ?",
                (model, version, hardware_class),
            ).fetchone()
        return BuildRecord(**dict(row)) if row else None

    def put_rollout(self, record: RolloutRecord) -> None:
        with self._tx() as db:
            _insert(db, "rollouts", record, replace=True)

    def get_rollout(self, rollout_id: str) -> RolloutRecord | None:
        with self._reading() as db:
            row = db.execute("SELECT * FROM rollouts WHERE rollout_id = ?", (rollout_id,)).fetchone()
        return _rollout(row) if row else None

    def list_rollouts(self, *, active_only: bool = False) -> list[RolloutRecord]:
        active = sorted(s.value for s in ACTIVE_ROLLOUT_STATES) if active_only else []
        where = f"WHERE state IN ({', '.join('?' * len(active))})" if active_only else ""
        with self._reading() as db:
            rows = db.execute(f"SELECT * FROM rollouts {where} ORDER BY created_at_ms, rollout_id",
                                    active).fetchall()
        return [_rollout(r) for r in rows]

    def rollout_wave_counts(self) -> dict[str, int]:
        with self._reading() as db:
            rows = db.execute("SELECT rollout_id, COUNT(DISTINCT wave) FROM rollout_devices GROUP BY rollout_id")
            return {r[0]: r[1] for r in rows.fetchall()}

    def put_rollout_device(self, record: RolloutDeviceRecord) -> None:
        with self._tx() as db:
            _insert(db, "rollout_devices", record, replace=True)

    def rollout_devices(self, rollout_id: str, *, states: Collection[str] | None = None) -> list[RolloutDeviceRecord]:
        where, args = "rollout_id = ?", [rollout_id]
        if states is not None:
            where += f" AND state IN ({', '.join('?' * len(states))})" if states else " AND 0"
            args.extend(states)
        with self._reading() as db:
            rows = db.execute(
                f"SELECT * FROM rollout_devices WHERE {where} ORDER BY wave, hardware_class, device_id", args,
            ).fetchall()
        return [RolloutDeviceRecord(**dict(r)) for r in rows]

    # -- telemetry -------------------------------------------------------------------------
    def ingest_telemetry(self, points: list[TelemetryPoint]) -> list[bool]:
        with self._tx() as db:
            return _ingest(db, points)

    def ingest_telemetry_now(self, points: list[TelemetryPoint]) -> list[bool] | None:
        with self._tx_now() as db:
            return None if db is None else _ingest(db, points)

    def telemetry_window(self, device_id: str, start_ms: int, end_ms: int | None = None) -> list[TelemetryPoint]:
        end_ms = end_ms if end_ms is not None else 2**62
        with self._reading(snapshot=True) as db:
            rows = db.execute(
                "SELECT * FROM telemetry_batches WHERE device_id = ? AND end_ms >= ? AND end_ms < ? "
                "ORDER BY end_ms, seq",
                (device_id, start_ms, end_ms),
            ).fetchall()
            models = db.execute(
                "SELECT m.* FROM telemetry_models m JOIN telemetry_batches b USING (device_id, seq) "
                "WHERE b.device_id = ? AND b.end_ms >= ? AND b.end_ms < ?",
                (device_id, start_ms, end_ms),
            ).fetchall()
        return _points(rows, models)

    def latest_telemetry(self) -> dict[str, TelemetryPoint]:
        with self._reading(snapshot=True) as db:
            rows = db.execute(
                "SELECT b.* FROM telemetry_batches b JOIN (SELECT device_id, MAX(seq) AS seq "
                "FROM telemetry_batches GROUP BY device_id) latest USING (device_id, seq)"
            ).fetchall()
            models = db.execute(
                "SELECT m.* FROM telemetry_models m JOIN (SELECT device_id, MAX(seq) AS seq "
                "FROM telemetry_batches GROUP BY device_id) latest USING (device_id, seq)"
            ).fetchall()
        return {p.device_id: p for p in _points(rows, models)}

    def dirty_rollups(self, limit: int = 1000, *, max_minute_ms: int | None = None) -> list[tuple[str, int, int]]:
        with self._reading() as db:
            rows = db.execute(
                "SELECT device_id, minute_ms, marks FROM telemetry_dirty_minutes WHERE minute_ms <= ? "
                "ORDER BY minute_ms, device_id LIMIT ?", (2**62 if max_minute_ms is None else max_minute_ms, limit)
            ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def write_rollups(self, rollups: list[Rollup], done: list[tuple[str, int, int]]) -> None:
        with self._tx() as db:
            _rows(db, "WITH d(device_id, minute_ms) AS (VALUES {rows}) DELETE FROM telemetry_rollups "
                  "WHERE (device_id, minute_ms) IN (SELECT device_id, minute_ms FROM d)",
                  [(d, m) for d, m, _ in done], 2)
            _rows(db, "INSERT INTO telemetry_rollups VALUES {rows}", [
                (r.device_id, r.model, r.version, r.minute_ms, r.count, r.errors, r.latency_hdr, r.p50_ms,
                 r.p95_ms, r.p99_ms, r.max_ms, r.watts_avg, r.energy_mj_avg) for r in rollups], 13)
            _rows(db, "WITH d(device_id, minute_ms, marks) AS (VALUES {rows}) DELETE FROM telemetry_dirty_minutes "
                  "WHERE (device_id, minute_ms, marks) IN (SELECT device_id, minute_ms, marks FROM d)", done, 3)

    def rollups(self, device_id: str, since_ms: int) -> list[Rollup]:
        with self._reading() as db:
            rows = db.execute(
                "SELECT * FROM telemetry_rollups WHERE device_id = ? AND minute_ms >= ? ORDER BY minute_ms, model",
                (device_id, since_ms),
            ).fetchall()
        return [_rollup(r) for r in rows]

    def prune_telemetry(self, raw_before_ms: int, rollups_before_ms: int) -> int:
        with self._tx() as db:
            db.execute(
                "INSERT INTO telemetry_pruned SELECT device_id, MAX(seq) FROM telemetry_batches "
                "WHERE end_ms < ? GROUP BY device_id "
                "ON CONFLICT (device_id) DO UPDATE SET max_seq = MAX(max_seq, excluded.max_seq)",
                (raw_before_ms,),
            )
            db.execute(
                "DELETE FROM telemetry_models WHERE (device_id, seq) IN "
                "(SELECT device_id, seq FROM telemetry_batches WHERE end_ms < ?)",
                (raw_before_ms,),
            )
            removed = db.execute("DELETE FROM telemetry_batches WHERE end_ms < ?", (raw_before_ms,)).rowcount
            db.execute("DELETE FROM telemetry_rollups WHERE minute_ms < ?", (rollups_before_ms,))
        return int(removed)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for reader in list(self._readers):
                reader.db.close()
            self._db.close()
            if self._write_lock_fd >= 0:
                os.close(self._write_lock_fd)
                self._write_lock_fd = -1


class _Reader:
    """A thread's read connection (a holder, since sqlite3 connections take no weak references)."""

    def __init__(self, path: str) -> None:
        # check_same_thread off only so that `close` may close it from another thread.
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA query_only=ON")


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
        model=row["model"],
        model_version=row["model_version"],
        connected_by=row["connected_by"],
        cert_serial=row["cert_serial"],
        previous_cert_serial=row["previous_cert_serial"],
        cert_not_after_ms=row["cert_not_after_ms"],
        revoked_at_ms=row["revoked_at_ms"],
    )


def _ingest(db: sqlite3.Connection, points: list[TelemetryPoint]) -> list[bool]:
    """`ingest_telemetry` inside the caller's transaction."""
    # The first of each (device, seq) in the group is the candidate; a repeat is a duplicate.
    first: dict[tuple[str, int], int] = {}
    for i, p in enumerate(points):
        first.setdefault((p.device_id, p.seq), i)
    if not first:
        return []
    # Seqs already stored, or at or below the device's pruned mark, come back as one JSON
    # row per chunk: a row per point would be a GIL round trip per point (see _rows).
    known: set[tuple[str, int]] = set()
    for (marks,) in _rows(
        db, "WITH g(device_id, seq) AS (VALUES {rows}) "
        "SELECT json_group_array(json_array(g.device_id, g.seq)) FROM g "
        "WHERE EXISTS (SELECT 1 FROM telemetry_batches b WHERE b.device_id = g.device_id AND b.seq = g.seq) "
        "OR g.seq <= (SELECT max_seq FROM telemetry_pruned t WHERE t.device_id = g.device_id)",
        list(first), 2,
    ):
        known.update((device, seq) for device, seq in json.loads(marks))
    new = [points[i] for key, i in first.items() if key not in known]
    _rows(db, "INSERT INTO telemetry_batches VALUES {rows}", [
        (p.device_id, p.seq, p.start_ms, p.end_ms, p.received_ms, p.watts, p.power_source, p.cpu_system,
         p.cpu_process, p.rss_bytes, p.memory_available_bytes, p.temperature_c, p.load1, p.dropped_batches)
        for p in new], 14)
    _rows(db, "INSERT INTO telemetry_models VALUES {rows}", [
        (p.device_id, p.seq, m.model, m.version, m.count, m.errors, m.p50_ms, m.p95_ms, m.p99_ms,
         m.max_ms, m.latency_hdr, m.energy_mj, m.energy_source, m.runtime) for p in new for m in p.models], 14)
    dirty: dict[tuple[str, int], int] = {}  # (device, minute) -> points stored in it now
    for p in new:
        minute = (p.device_id, p.end_ms - p.end_ms % MINUTE_MS)
        dirty[minute] = dirty.get(minute, 0) + 1
    _rows(db, "INSERT INTO telemetry_dirty_minutes (device_id, minute_ms, marks) VALUES {rows} "
          "ON CONFLICT (device_id, minute_ms) DO UPDATE SET marks = marks + excluded.marks",
          [(device, minute, marks) for (device, minute), marks in dirty.items()], 3)
    return [first[(p.device_id, p.seq)] == i and (p.device_id, p.seq) not in known for i, p in enumerate(points)]


def _rows(
    db: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]], width: int, tail: Sequence[Any] = ()
) -> list[tuple[Any, ...]]:
    """Run `sql` with `{rows}` as a multi-row VALUES list, as few statements as the variable limit
    allows, and return what they return. Bulk writes use this, not executemany: sqlite3 releases
    the GIL around every statement step, once per row in executemany, and under a busy event loop
    each retake waits out a switch interval (5 ms). A 2,000-point telemetry group took 15-25 s that
    way in a thread beside a busy loop, holding the write lock throughout; idle it took 30 ms.
    `tail`: parameters for placeholders after the VALUES list, bound in every statement."""
    out: list[tuple[Any, ...]] = []
    per_statement = max(1, (_variable_limit(db) - len(tail)) // width)
    row_sql = "(" + ", ".join("?" * width) + ")"
    for start in range(0, len(rows), per_statement):
        chunk = rows[start:start + per_statement]
        args = [value for row in chunk for value in row] + list(tail)
        out.extend(tuple(r) for r in db.execute(sql.replace("{rows}", ", ".join([row_sql] * len(chunk))), args))
    return out


def _variable_limit(db: sqlite3.Connection) -> int:
    """Bound parameters per statement: the connection's limit where Python can read it (3.11+), else
    999, the smallest default any SQLite build has had."""
    getlimit = getattr(db, "getlimit", None)
    return min(getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER), 32_766) if getlimit else 999


def _insert(db: sqlite3.Connection, table: str, record: object, *, replace: bool = False) -> None:
    row = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}  # type: ignore[arg-type]
    row = {k: int(v) if isinstance(v, bool) else v for k, v in row.items()}
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    db.execute(f"{verb} INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})", tuple(row.values()))


def _rollout(row: sqlite3.Row) -> RolloutRecord:
    data = dict(row)
    data["auto_rollback"] = bool(data["auto_rollback"])
    return RolloutRecord(**data)


def _rollup(row: sqlite3.Row) -> Rollup:
    data: dict[str, Any] = dict(row)
    data["latency_hdr"] = bytes(data["latency_hdr"])
    return Rollup(**data)


def _command(row: sqlite3.Row) -> CommandRecord:
    data: dict[str, Any] = {k: (bytes(row[k]) if k in ("payload", "ack") else row[k]) for k in row.keys()}  # noqa: SIM118
    return CommandRecord(**data)


def _points(rows: list[sqlite3.Row], model_rows: list[sqlite3.Row]) -> list[TelemetryPoint]:
    models: dict[tuple[str, int], list[ModelPoint]] = {}
    for m in model_rows:
        models.setdefault((m["device_id"], m["seq"]), []).append(
            ModelPoint(
                model=m["model"], version=m["version"], count=m["count"], errors=m["errors"], p50_ms=m["p50_ms"],
                p95_ms=m["p95_ms"], p99_ms=m["p99_ms"], max_ms=m["max_ms"], latency_hdr=bytes(m["latency_hdr"]),
                energy_mj=m["energy_mj"], energy_source=m["energy_source"], runtime=m["runtime"],
            )
        )
    return [
        TelemetryPoint(
            device_id=r["device_id"], seq=r["seq"], start_ms=r["start_ms"], end_ms=r["end_ms"],
            received_ms=r["received_ms"], watts=r["watts"], power_source=r["power_source"],
            cpu_system=r["cpu_system"], cpu_process=r["cpu_process"], rss_bytes=r["rss_bytes"],
            memory_available_bytes=r["memory_available_bytes"], temperature_c=r["temperature_c"],
            load1=r["load1"], dropped_batches=r["dropped_batches"],
            models=tuple(sorted(models.get((r["device_id"], r["seq"]), []), key=lambda m: (m.model, m.version))),
        )
        for r in rows
    ]
