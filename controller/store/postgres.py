"""The scale-out store: one PostgreSQL database shared by several stateless controller replicas.

Connections come from a psycopg_pool.ConnectionPool rather than one lock-protected connection:
the controller calls the store from many threads (gRPC handlers, asyncio.to_thread jobs, the MQTT
bridge), and a single connection would serialize them all behind one round trip at a time. With a
pool, atomicity is the database's job, as it must be anyway once several replicas share it: each
method runs on its own connection, either as one statement (autocommit: atomic by itself, and a
read costs one round trip) or as one explicit transaction. Read-modify-write paths lock what they
read (enroll_device: SELECT ... FOR UPDATE) or are a single conditional statement (finish_command,
touch_devices, add_model, telemetry de-duplication by primary key with ON CONFLICT DO NOTHING).

Text keys use COLLATE "C" so listings sort byte-wise, as SQLite does, whatever the database's
locale. Floats are DOUBLE PRECISION (SQLite's REAL is 8 bytes; Postgres's REAL is only 4).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from edgefleet.controller.fleet.commands import OPEN_COMMAND_STATES, expired_commands
from edgefleet.controller.fleet.credentials import token_refusal
from edgefleet.controller.rollouts.states import ACTIVE_ROLLOUT_STATES
from edgefleet.controller.store import StoreUnavailable
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

# Schema changes are appended here, never edited: index + 1 is the schema version. The steps
# mirror controller/store/sqlite.py's MIGRATIONS one for one, so a change lands in both lists;
# test_both_backends_migrate_to_the_same_tables_and_columns compares what the two lists build.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE operator_tokens (
        token_hash TEXT COLLATE "C" PRIMARY KEY,
        created_at_ms BIGINT NOT NULL
    );
    CREATE TABLE enrollment_tokens (
        token_id TEXT COLLATE "C" PRIMARY KEY,
        secret_hash TEXT COLLATE "C" NOT NULL UNIQUE,
        uses_total BIGINT NOT NULL,
        uses_left BIGINT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        expires_at_ms BIGINT NOT NULL,
        labels JSONB NOT NULL,
        revoked BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE TABLE devices (
        device_id TEXT COLLATE "C" PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        labels JSONB NOT NULL,
        enrolled_at_ms BIGINT NOT NULL,
        hostname TEXT NOT NULL DEFAULT '',
        agent_version TEXT NOT NULL DEFAULT '',
        capability_version BIGINT NOT NULL DEFAULT 0,
        hardware_class TEXT COLLATE "C" NOT NULL DEFAULT '',
        profile BYTEA NOT NULL DEFAULT '\\x',
        last_seen_ms BIGINT NOT NULL DEFAULT 0,
        connected BOOLEAN NOT NULL DEFAULT FALSE,
        token_id TEXT COLLATE "C" NOT NULL DEFAULT ''
    );
    """,
    """
    CREATE TABLE telemetry_batches (
        device_id TEXT COLLATE "C" NOT NULL,
        seq BIGINT NOT NULL,
        start_ms BIGINT NOT NULL,
        end_ms BIGINT NOT NULL,
        received_ms BIGINT NOT NULL,
        watts DOUBLE PRECISION NOT NULL,
        power_source TEXT NOT NULL,
        cpu_system DOUBLE PRECISION NOT NULL,
        cpu_process DOUBLE PRECISION NOT NULL,
        rss_bytes BIGINT NOT NULL,
        memory_available_bytes BIGINT NOT NULL,
        temperature_c DOUBLE PRECISION,
        load1 DOUBLE PRECISION NOT NULL,
        dropped_batches BIGINT NOT NULL,
        PRIMARY KEY (device_id, seq)
    );
    CREATE INDEX telemetry_batches_by_time ON telemetry_batches (device_id, end_ms);
    CREATE INDEX telemetry_batches_by_end ON telemetry_batches (end_ms);
    CREATE TABLE telemetry_models (
        device_id TEXT COLLATE "C" NOT NULL,
        seq BIGINT NOT NULL,
        model TEXT COLLATE "C" NOT NULL,
        version TEXT COLLATE "C" NOT NULL,
        count BIGINT NOT NULL,
        errors BIGINT NOT NULL,
        p50_ms DOUBLE PRECISION NOT NULL,
        p95_ms DOUBLE PRECISION NOT NULL,
        p99_ms DOUBLE PRECISION NOT NULL,
        max_ms DOUBLE PRECISION NOT NULL,
        latency_hdr BYTEA NOT NULL,
        energy_mj DOUBLE PRECISION NOT NULL,
        energy_source TEXT NOT NULL,
        runtime TEXT NOT NULL,
        PRIMARY KEY (device_id, seq, model, version)
    );
    CREATE TABLE telemetry_rollups (
        device_id TEXT COLLATE "C" NOT NULL,
        model TEXT COLLATE "C" NOT NULL,
        version TEXT COLLATE "C" NOT NULL,
        minute_ms BIGINT NOT NULL,
        count BIGINT NOT NULL,
        errors BIGINT NOT NULL,
        latency_hdr BYTEA NOT NULL,
        p50_ms DOUBLE PRECISION NOT NULL,
        p95_ms DOUBLE PRECISION NOT NULL,
        p99_ms DOUBLE PRECISION NOT NULL,
        max_ms DOUBLE PRECISION NOT NULL,
        watts_avg DOUBLE PRECISION NOT NULL,
        energy_mj_avg DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (device_id, minute_ms, model, version)
    );
    CREATE INDEX telemetry_rollups_by_minute ON telemetry_rollups (minute_ms);
    CREATE TABLE telemetry_dirty_minutes (
        device_id TEXT COLLATE "C" NOT NULL,
        minute_ms BIGINT NOT NULL,
        PRIMARY KEY (device_id, minute_ms)
    );
    CREATE INDEX telemetry_dirty_by_minute ON telemetry_dirty_minutes (minute_ms);
    CREATE TABLE telemetry_pruned (
        device_id TEXT COLLATE "C" PRIMARY KEY,
        max_seq BIGINT NOT NULL
    );
    """,
    """
    CREATE TABLE commands (
        command_id TEXT COLLATE "C" PRIMARY KEY,
        device_id TEXT COLLATE "C" NOT NULL,
        kind TEXT NOT NULL,
        payload BYTEA NOT NULL,
        created_at_ms BIGINT NOT NULL,
        expires_at_ms BIGINT NOT NULL,
        rollout_id TEXT COLLATE "C" NOT NULL DEFAULT '',
        state TEXT NOT NULL DEFAULT 'pending',
        result TEXT NOT NULL DEFAULT '',
        reason TEXT NOT NULL DEFAULT '',
        message TEXT NOT NULL DEFAULT '',
        ack BYTEA NOT NULL DEFAULT '\\x',
        updated_at_ms BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX commands_by_device ON commands (device_id, state);
    CREATE INDEX commands_by_rollout ON commands (rollout_id);
    """,
    """
    ALTER TABLE devices ADD COLUMN model TEXT NOT NULL DEFAULT '';
    ALTER TABLE devices ADD COLUMN model_version BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE models (
        name TEXT COLLATE "C" NOT NULL,
        version BIGINT NOT NULL,
        sha256 TEXT NOT NULL,
        format TEXT NOT NULL,
        calib_sha256 TEXT NOT NULL DEFAULT '',
        budget DOUBLE PRECISION NOT NULL,
        created_at_ms BIGINT NOT NULL,
        PRIMARY KEY (name, version)
    );
    CREATE TABLE builds (
        model TEXT COLLATE "C" NOT NULL,
        version BIGINT NOT NULL,
        hardware_class TEXT COLLATE "C" NOT NULL,
        state TEXT NOT NULL,
        bundle_sha256 TEXT NOT NULL DEFAULT '',
        rollback_bundle_sha256 TEXT NOT NULL DEFAULT '',
        report TEXT NOT NULL DEFAULT '',
        error TEXT NOT NULL DEFAULT '',
        updated_at_ms BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (model, version, hardware_class)
    );
    CREATE TABLE rollouts (
        rollout_id TEXT COLLATE "C" PRIMARY KEY,
        model TEXT NOT NULL,
        version BIGINT NOT NULL,
        selector TEXT NOT NULL,
        waves TEXT NOT NULL,
        soak_s DOUBLE PRECISION NOT NULL,
        max_failures DOUBLE PRECISION NOT NULL,
        gates TEXT NOT NULL,
        device_timeout_s DOUBLE PRECISION NOT NULL,
        auto_rollback BOOLEAN NOT NULL,
        state TEXT NOT NULL,
        wave BIGINT NOT NULL,
        reason TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        updated_at_ms BIGINT NOT NULL,
        soak_until_ms BIGINT NOT NULL
    );
    CREATE INDEX rollouts_by_state ON rollouts (state);
    CREATE TABLE rollout_devices (
        rollout_id TEXT COLLATE "C" NOT NULL,
        device_id TEXT COLLATE "C" NOT NULL,
        hardware_class TEXT COLLATE "C" NOT NULL,
        wave BIGINT NOT NULL,
        state TEXT NOT NULL,
        command_id TEXT NOT NULL,
        previous_model TEXT NOT NULL,
        previous_version BIGINT NOT NULL,
        baseline TEXT NOT NULL,
        reason TEXT NOT NULL,
        dispatched_at_ms BIGINT NOT NULL,
        finished_at_ms BIGINT NOT NULL,
        rollback_command_id TEXT NOT NULL,
        PRIMARY KEY (rollout_id, device_id)
    );
    """,
    """
    ALTER TABLE devices ADD COLUMN connected_by TEXT NOT NULL DEFAULT '';
    """,
    """
    ALTER TABLE telemetry_dirty_minutes ADD COLUMN marks BIGINT NOT NULL DEFAULT 1;
    """,
    """
    ALTER TABLE models ADD COLUMN eval_sha256 TEXT NOT NULL DEFAULT '';
    ALTER TABLE models ADD COLUMN eval_labels_sha256 TEXT NOT NULL DEFAULT '';
    ALTER TABLE models ADD COLUMN metric TEXT NOT NULL DEFAULT '';
    """,
    # Operator roles and the audit log (see the SQLite twin for why old tokens become admin).
    """
    ALTER TABLE operator_tokens ADD COLUMN token_id TEXT COLLATE "C" NOT NULL DEFAULT '';
    ALTER TABLE operator_tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'viewer';
    ALTER TABLE operator_tokens ADD COLUMN name TEXT NOT NULL DEFAULT '';
    ALTER TABLE operator_tokens ADD COLUMN expires_at_ms BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE operator_tokens ADD COLUMN revoked_at_ms BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE operator_tokens ADD COLUMN created_by TEXT NOT NULL DEFAULT '';
    UPDATE operator_tokens SET role = 'admin', token_id = 'opt-' || substr(token_hash, 1, 8),
        name = 'state-dir operator-token';
    CREATE UNIQUE INDEX operator_tokens_by_id ON operator_tokens (token_id);
    CREATE TABLE audit_log (
        audit_id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        token_id TEXT COLLATE "C" NOT NULL,
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
    ALTER TABLE devices ADD COLUMN cert_not_after_ms BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE devices ADD COLUMN revoked_at_ms BIGINT NOT NULL DEFAULT 0;
    """,
    # Worker processes (issue 18): the singleton lease, and the index for the pending-command sweep.
    """
    CREATE TABLE leases (
        name TEXT COLLATE "C" PRIMARY KEY,
        holder TEXT COLLATE "C" NOT NULL,
        expires_at_ms BIGINT NOT NULL
    );
    CREATE INDEX commands_by_state ON commands (state);
    CREATE TABLE login_sessions (
        session_hash TEXT COLLATE "C" PRIMARY KEY,
        token_hash TEXT COLLATE "C" NOT NULL,
        csrf TEXT NOT NULL,
        expires_at_ms BIGINT NOT NULL
    );
    CREATE INDEX login_sessions_by_expiry ON login_sessions (expires_at_ms);
    """,
    """
    CREATE INDEX devices_revoked ON devices (revoked_at_ms) WHERE revoked_at_ms > 0;
    """,
]

MINUTE_MS = 60_000
# pg_advisory_xact_lock(MIGRATION_LOCK_CLASS, hashtext(current_schema())): one lock per schema, so
# replicas sharing a schema migrate one at a time while stores in other schemas do not wait.
MIGRATION_LOCK_CLASS = 0x45466C74  # "EFlt"
START_HINT = (
    "start PostgreSQL (e.g. `sudo systemctl start postgresql`, or "
    "`docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:15`) "
    "or point --store / EDGEFLEET_STORE at a running server"
)

LOGIN_HINT = (
    "fix the user, password or database in --store / EDGEFLEET_STORE, or create them "
    "(`createuser -h HOST -U postgres USER`, `createdb -h HOST -U postgres -O USER DB`)"
)

_DEVICE_COLUMNS = [f.name for f in dataclasses.fields(DeviceRecord)]


def describe_dsn(dsn: str) -> str:
    """host:port/dbname of a DSN, without the password, for messages and logs."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<invalid DSN>"
    host = str(parts.get("host") or parts.get("hostaddr") or "localhost")
    return f"{host}:{parts.get('port') or 5432}/{parts.get('dbname') or parts.get('user') or ''}"


def _newest_per_device(pairs: Iterable[tuple[str, int]]) -> dict[str, int]:
    """device id -> the latest of its timestamps in a batch (a device may appear more than once)."""
    newest: dict[str, int] = {}
    for device_id, ms in pairs:
        newest[device_id] = max(ms, newest.get(device_id, ms))
    return newest


class PostgresStore(Store):
    backend_name = "postgres"

    def __init__(self, dsn: str, *, min_connections: int = 1, max_connections: int = 10,
                 connect_timeout_s: float = 5.0) -> None:
        self.dsn = dsn
        self.where = describe_dsn(dsn)
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise StoreUnavailable(f"invalid PostgreSQL store URL: {_first_line(exc)}") from None
        connect_kwargs: dict[str, Any] = {}
        if "connect_timeout" not in params:
            connect_kwargs["connect_timeout"] = max(1, round(connect_timeout_s))
        if "application_name" not in params:  # how an operator finds the replicas in pg_stat_activity
            connect_kwargs["application_name"] = "edgefleet-controller"
        # Migrate on a connection of our own first: a refused or misconfigured server then fails
        # here with libpq's own reason, which the pool would only log before timing out.
        try:
            with psycopg.connect(dsn, **connect_kwargs) as conn:
                self._migrate(conn)
        except psycopg.OperationalError as exc:
            reason = _first_line(exc)
            if "FATAL:" in reason:  # the server answered: the login or database is wrong, not the server down
                raise StoreUnavailable(
                    f"the PostgreSQL server at {self.where} refused the store: {reason.split('FATAL:')[-1].strip()}; "
                    f"{LOGIN_HINT}"
                ) from None
            raise StoreUnavailable(
                f"cannot reach the PostgreSQL store at {self.where}: {reason}; {START_HINT}"
            ) from None
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            dsn, kwargs={**connect_kwargs, "autocommit": True}, min_size=min_connections, max_size=max_connections,
            open=False,
            # One cheap round trip per checkout (~0.2 ms locally) buys surviving a Postgres restart or
            # failover without handing callers dead connections.
            check=ConnectionPool.check_connection,
            name=f"edgefleet-store@{self.where}",
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s * 2)
        except PoolTimeout:
            self._pool.close()
            raise StoreUnavailable(
                f"cannot open connections to the PostgreSQL store at {self.where}; {START_HINT}"
            ) from None

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            schema = conn.execute("SELECT current_schema()").fetchone()
            if schema is None or schema[0] is None:
                raise StoreUnavailable(
                    f"the PostgreSQL store at {self.where} has no schema to create tables in "
                    "(search_path names none that exists); CREATE SCHEMA it or fix options=-csearch_path"
                )
            # Two replicas starting together: the second waits here, then finds the work done.
            conn.execute("SELECT pg_advisory_xact_lock(%s::int, hashtext(current_schema()))", (MIGRATION_LOCK_CLASS,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            current = int(row[0]) if row else 0
            if current > len(MIGRATIONS):
                raise StoreUnavailable(
                    f"store {self.where} has schema version {current}, newer than this controller "
                    f"({len(MIGRATIONS)}); upgrade edgefleet"
                )
            for script in MIGRATIONS[current:]:
                conn.execute(script.encode())  # no parameters: runs as one multi-statement query
            if row is None:
                conn.execute("INSERT INTO schema_version VALUES (%s)", (len(MIGRATIONS),))
            elif current != len(MIGRATIONS):
                conn.execute("UPDATE schema_version SET version = %s", (len(MIGRATIONS),))

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Cursor[dict[str, Any]]]:
        """One transaction on a pooled connection: committed on success, rolled back on error."""
        with self._pool.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            yield cur

    @contextmanager
    def _statement(self) -> Iterator[psycopg.Cursor[dict[str, Any]]]:
        """A cursor for ONE statement, which autocommit makes atomic on its own: no BEGIN/COMMIT round trips."""
        with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            yield cur

    def _all(self, query: Any, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._statement() as cur:
            return cur.execute(query, params).fetchall()

    def _one(self, query: Any, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        with self._statement() as cur:
            return cur.execute(query, params).fetchone()

    # -- operator tokens -------------------------------------------------------------------
    def add_operator_token(self, record: OperatorTokenRecord) -> bool:
        columns = [f.name for f in dataclasses.fields(OperatorTokenRecord)]
        with self._statement() as cur:
            cur.execute(_insert_sql("operator_tokens", columns, "ON CONFLICT DO NOTHING"),
                        [getattr(record, c) for c in columns])
            return cur.rowcount == 1

    def get_operator_token(self, token_hash: str) -> OperatorTokenRecord | None:
        row = self._one("SELECT * FROM operator_tokens WHERE token_hash = %s", (token_hash,))
        return OperatorTokenRecord(**row) if row else None

    def list_operator_tokens(self) -> list[OperatorTokenRecord]:
        return [OperatorTokenRecord(**r) for r in
                self._all("SELECT * FROM operator_tokens ORDER BY created_at_ms, token_id")]

    def revoke_operator_token(self, token_id: str, now_ms: int) -> OperatorTokenRecord | None:
        # One statement: the first revocation time wins, and the row comes back either way.
        row = self._one(
            "UPDATE operator_tokens SET revoked_at_ms = CASE WHEN revoked_at_ms = 0 THEN %s ELSE revoked_at_ms END "
            "WHERE token_id = %s RETURNING *", (now_ms, token_id))
        return OperatorTokenRecord(**row) if row else None

    # -- audit log -------------------------------------------------------------------------
    def add_audit(self, record: AuditRecord) -> None:
        with self._statement() as cur:
            cur.execute(
                "INSERT INTO audit_log (at_ms, token_id, role, method, arguments, outcome, message) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (record.at_ms, record.token_id, record.role, record.method, record.arguments, record.outcome,
                 record.message),
            )

    def list_audit(self, *, since_ms: int = 0, limit: int = 100) -> list[AuditRecord]:
        rows = self._all("SELECT * FROM audit_log WHERE at_ms >= %s ORDER BY at_ms DESC, audit_id DESC LIMIT %s",
                         (since_ms, limit))
        return [AuditRecord(**r) for r in reversed(rows)]

    # -- enrollment tokens -----------------------------------------------------------------
    def create_enrollment_token(self, record: EnrollmentTokenRecord) -> None:
        with self._statement() as cur:
            cur.execute(
                "INSERT INTO enrollment_tokens VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (record.token_id, record.secret_hash, record.uses_total, record.uses_left, record.created_at_ms,
                 record.expires_at_ms, Jsonb(record.labels), record.revoked),
            )

    def list_enrollment_tokens(self) -> list[EnrollmentTokenRecord]:
        return [_token(r) for r in self._all("SELECT * FROM enrollment_tokens ORDER BY created_at_ms, token_id")]

    def revoke_enrollment_token(self, token_id: str) -> EnrollmentTokenRecord | None:
        row = self._one("UPDATE enrollment_tokens SET revoked = TRUE WHERE token_id = %s RETURNING *", (token_id,))
        return _token(row) if row else None

    def enroll_device(self, token_hash: str, now_ms: int, device: DeviceRecord) -> DeviceRecord:
        with self._tx() as cur:
            # FOR UPDATE: concurrent enrollments on one token (on any replica) queue on its row and
            # each sees the uses_left its predecessor committed, so a token is never overspent.
            row = cur.execute(
                "SELECT * FROM enrollment_tokens WHERE secret_hash = %s FOR UPDATE", (token_hash,)
            ).fetchone()
            if row is None:
                raise EnrollmentRefused("unknown enrollment token")
            token = _token(row)
            refusal = token_refusal(token, now_ms)
            if refusal is not None:
                raise EnrollmentRefused(refusal)
            cur.execute("UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE token_id = %s",
                        (token.token_id,))
            labels = {**device.labels, **token.labels}
            enrolled = dataclasses.replace(device, labels=labels, token_id=token.token_id, enrolled_at_ms=now_ms)
            values = [getattr(enrolled, name) for name in _DEVICE_COLUMNS]
            values[_DEVICE_COLUMNS.index("labels")] = Jsonb(labels)
            cur.execute(_insert_sql("devices", _DEVICE_COLUMNS), values)
        return enrolled

    # -- devices ---------------------------------------------------------------------------
    def get_device(self, device_id: str) -> DeviceRecord | None:
        row = self._one("SELECT * FROM devices WHERE device_id = %s", (device_id,))
        return _device(row) if row else None

    def list_devices(self) -> list[DeviceRecord]:
        return [_device(r) for r in self._all("SELECT * FROM devices ORDER BY enrolled_at_ms, device_id")]

    def device_briefs(self) -> list[DeviceBrief]:
        return [DeviceBrief(**r) for r in self._all(
            "SELECT device_id, hardware_class, connected, last_seen_ms FROM devices ORDER BY device_id")]

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
        # Closing must not undo a newer stream that another replica opened meanwhile.
        guard = sql.SQL("") if connected else sql.SQL(" AND connected_by = %s")
        query = sql.SQL("UPDATE devices SET {} WHERE device_id = %s{}").format(
            sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(column)) for column in updates), guard
        )
        args = (*updates.values(), device_id) if connected else (*updates.values(), device_id, owner)
        with self._statement() as cur:
            cur.execute(query, args)

    def open_device_sessions(self, opens: Sequence[SessionOpen], owner: str) -> None:
        newest = {o.device_id: o for o in sorted(opens, key=lambda o: o.last_seen_ms)}
        if not newest:
            return
        ids = sorted(newest)  # one lock order for every replica's batch
        rows = [newest[i] for i in ids]
        types = {"agent_version": "text", "capability_version": "bigint", "hardware_class": "text",
                 "profile": "bytea", "hostname": "text", "model": "text", "model_version": "bigint"}
        keep = ", ".join(f"{f} = COALESCE(t.{f}, d.{f})" for f in SESSION_OPEN_FIELDS)
        arrays = ", ".join(f"%s::{types[f]}[]" for f in SESSION_OPEN_FIELDS)
        columns = ", ".join(SESSION_OPEN_FIELDS)
        values = [[getattr(o, f) for o in rows] for f in SESSION_OPEN_FIELDS]
        with self._statement() as cur:
            cur.execute(
                f"UPDATE devices AS d SET connected = TRUE, last_seen_ms = t.ms, connected_by = %s, {keep} "
                f"FROM unnest(%s::text[], %s::bigint[], {arrays}) AS t(device_id, ms, {columns}) "
                "WHERE d.device_id = t.device_id",
                (owner, ids, [o.last_seen_ms for o in rows], *values),
            )

    def close_device_sessions(self, closed: Iterable[tuple[str, int]], owner: str = "") -> None:
        newest = _newest_per_device(closed)
        if not newest:
            return
        ids = sorted(newest)  # one lock order for every replica's batch
        with self._statement() as cur:
            cur.execute(
                "UPDATE devices AS d SET connected = FALSE, last_seen_ms = GREATEST(d.last_seen_ms, t.ms) "
                "FROM unnest(%s::text[], %s::bigint[]) AS t(device_id, ms) "
                "WHERE d.device_id = t.device_id AND d.connected_by = %s",
                (ids, [newest[i] for i in ids], owner),
            )

    def touch_devices(self, last_seen: Iterable[tuple[str, int]]) -> None:
        newest = _newest_per_device(last_seen)
        if not newest:
            return
        ids = sorted(newest)  # one lock order for every replica's batch
        with self._statement() as cur:
            # The WHERE is re-checked against a concurrently updated row, so last_seen never goes back.
            cur.execute(
                "UPDATE devices AS d SET last_seen_ms = t.ms "
                "FROM unnest(%s::text[], %s::bigint[]) AS t(device_id, ms) "
                "WHERE d.device_id = t.device_id AND d.last_seen_ms < t.ms",
                (ids, [newest[i] for i in ids]),
            )

    def reset_connections(self, owner: str = "") -> int:
        with self._statement() as cur:
            return cur.execute(
                "UPDATE devices SET connected = FALSE WHERE connected AND (connected_by = %s OR %s = '')",
                (owner, owner),
            ).rowcount

    # -- leases ----------------------------------------------------------------------------
    def acquire_lease(self, name: str, holder: str, now_ms: int, ttl_ms: int) -> bool:
        # One statement: the row is locked by the upsert, so two workers racing get one winner.
        row = self._one(
            "INSERT INTO leases (name, holder, expires_at_ms) VALUES (%s, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at_ms = EXCLUDED.expires_at_ms "
            "WHERE leases.holder = EXCLUDED.holder OR leases.expires_at_ms <= %s RETURNING holder",
            (name, holder, now_ms + ttl_ms, now_ms),
        )
        return row is not None and row["holder"] == holder

    def release_lease(self, name: str, holder: str) -> None:
        with self._statement() as cur:
            cur.execute("DELETE FROM leases WHERE name = %s AND holder = %s", (name, holder))

    def lease_holder(self, name: str, now_ms: int) -> str:
        row = self._one("SELECT holder FROM leases WHERE name = %s AND expires_at_ms > %s", (name, now_ms))
        return str(row["holder"]) if row else ""

    # -- dashboard login sessions ------------------------------------------------------------
    def add_login_session(self, record: LoginSessionRecord, now_ms: int, max_sessions: int) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM login_sessions WHERE expires_at_ms <= %s", (now_ms,))
            row = cur.execute("SELECT COUNT(*) AS n FROM login_sessions").fetchone()
            count = int(row["n"]) if row else 0
            if count >= max_sessions:
                cur.execute("DELETE FROM login_sessions WHERE session_hash IN (SELECT session_hash FROM "
                            "login_sessions ORDER BY expires_at_ms LIMIT %s)", (count - max_sessions + 1,))
            cur.execute(
                "INSERT INTO login_sessions VALUES (%s, %s, %s, %s) ON CONFLICT (session_hash) DO UPDATE SET "
                "token_hash = EXCLUDED.token_hash, csrf = EXCLUDED.csrf, expires_at_ms = EXCLUDED.expires_at_ms",
                (record.session_hash, record.token_hash, record.csrf, record.expires_at_ms))

    def get_login_session(self, session_hash: str) -> LoginSessionRecord | None:
        row = self._one("SELECT * FROM login_sessions WHERE session_hash = %s", (session_hash,))
        return LoginSessionRecord(**row) if row else None

    def delete_login_session(self, session_hash: str) -> None:
        with self._statement() as cur:
            cur.execute("DELETE FROM login_sessions WHERE session_hash = %s", (session_hash,))

    # -- commands --------------------------------------------------------------------------
    def devices_with_pending_commands(self, owner: str) -> list[str]:
        rows = self._all(
            "SELECT DISTINCT c.device_id FROM commands c JOIN devices d ON d.device_id = c.device_id "
            "WHERE c.state = 'pending' AND d.connected AND d.connected_by = %s ORDER BY c.device_id",
            (owner,),
        )
        return [r["device_id"] for r in rows]

    def revoked_streams(self, owner: str) -> list[str]:
        rows = self._all(
            "SELECT device_id FROM devices WHERE revoked_at_ms > 0 AND connected AND connected_by = %s "
            "ORDER BY device_id", (owner,),
        )
        return [r["device_id"] for r in rows]

    def add_command(self, record: CommandRecord) -> None:
        values = dataclasses.asdict(record)
        values["updated_at_ms"] = record.updated_at_ms or record.created_at_ms
        with self._statement() as cur:
            cur.execute(_insert_sql("commands", list(values)), list(values.values()))

    def get_command(self, command_id: str) -> CommandRecord | None:
        row = self._one("SELECT * FROM commands WHERE command_id = %s", (command_id,))
        return _command(row) if row else None

    def open_commands(self, device_id: str, now_ms: int) -> list[CommandRecord]:
        with self._tx() as cur:
            # FOR UPDATE: a replica finishing one of these meanwhile waits, then sees it expired (or the
            # other way round), so an expired command is never also finished.
            rows = cur.execute(
                "SELECT * FROM commands WHERE device_id = %s AND state = ANY(%s) "
                "ORDER BY created_at_ms, command_id FOR UPDATE", (device_id, list(OPEN_COMMAND_STATES)),
            ).fetchall()
            records = [_command(r) for r in rows]
            expired = expired_commands(records, now_ms)
            if expired:
                cur.executemany(
                    "UPDATE commands SET state = %s, result = %s, updated_at_ms = %s WHERE command_id = %s",
                    [(c.state, c.result, c.updated_at_ms, c.command_id) for c in expired],
                )
        gone = {c.command_id for c in expired}
        return [c for c in records if c.command_id not in gone]

    def mark_command_sent(self, command_id: str, now_ms: int) -> None:
        with self._statement() as cur:
            cur.execute(
                "UPDATE commands SET state = 'sent', updated_at_ms = %s WHERE command_id = %s AND state = 'pending'",
                (now_ms, command_id),
            )

    def finish_command(self, command_id: str, *, state: str, result: str, reason: str, message: str,
                       ack: bytes, now_ms: int) -> CommandRecord | None:
        # One conditional UPDATE: of two replicas receiving the same ack, exactly one gets the row.
        row = self._one(
            "UPDATE commands SET state = %s, result = %s, reason = %s, message = %s, ack = %s, updated_at_ms = %s "
            "WHERE command_id = %s AND state IN ('pending', 'sent') RETURNING *",
            (state, result, reason, message, ack, now_ms, command_id),
        )
        return _command(row) if row else None

    def list_commands(self, *, device_id: str | None = None, rollout_id: str | None = None) -> list[CommandRecord]:
        clauses: list[sql.Composable] = []
        args: list[str] = []
        if device_id is not None:
            clauses.append(sql.SQL("device_id = %s"))
            args.append(device_id)
        if rollout_id is not None:
            clauses.append(sql.SQL("rollout_id = %s"))
            args.append(rollout_id)
        where = sql.SQL("WHERE ") + sql.SQL(" AND ").join(clauses) if clauses else sql.SQL("")
        query = sql.SQL("SELECT * FROM commands {} ORDER BY created_at_ms, command_id").format(where)
        return [_command(r) for r in self._all(query, args)]

    # -- models, builds, rollouts ------------------------------------------------------------
    def add_model(self, record: ModelRecord) -> None:
        values = dataclasses.asdict(record)
        with self._tx() as cur:
            inserted = cur.execute(
                _insert_sql("models", list(values), suffix="ON CONFLICT (name, version) DO NOTHING"),
                list(values.values()),
            ).rowcount
            if inserted:
                return
            row = cur.execute("SELECT sha256 FROM models WHERE name = %s AND version = %s",
                              (record.name, record.version)).fetchone()
            if row is not None and row["sha256"] != record.sha256:
                raise StoreError(
                    f"model {record.name} version {record.version} already exists with other content; "
                    "register the new file under a new --version"
                )

    def get_model(self, name: str, version: int) -> ModelRecord | None:
        row = self._one("SELECT * FROM models WHERE name = %s AND version = %s", (name, version))
        return ModelRecord(**row) if row else None

    def list_models(self) -> list[ModelRecord]:
        return [ModelRecord(**r) for r in self._all("SELECT * FROM models ORDER BY name, version")]

    def set_device_model(self, device_id: str, model: str, version: int) -> None:
        with self._statement() as cur:
            cur.execute("UPDATE devices SET model = %s, model_version = %s WHERE device_id = %s",
                        (model, version, device_id))

    def set_device_certificate(self, device_id: str, serial: str, not_after_ms: int) -> None:
        with self._statement() as cur:
            cur.execute("UPDATE devices SET previous_cert_serial = cert_serial, cert_serial = %s, "
                        "cert_not_after_ms = %s WHERE device_id = %s", (serial, not_after_ms, device_id))

    def revoke_device(self, device_id: str, now_ms: int) -> DeviceRecord | None:
        with self._statement() as cur:
            cur.execute("UPDATE devices SET revoked_at_ms = %s WHERE device_id = %s AND revoked_at_ms = 0",
                        (now_ms, device_id))
        return self.get_device(device_id)

    def put_build(self, record: BuildRecord) -> None:
        self._upsert("builds", record, ("model", "version", "hardware_class"))

    def get_build(self, model: str, version: int, hardware_class: str) -> BuildRecord | None:
        row = self._one("SELECT * FROM builds WHERE model = %s AND version = %s AND hardware_class = %s",
                        (model, version, hardware_class))
        return BuildRecord(**row) if row else None

    def put_rollout(self, record: RolloutRecord) -> None:
        self._upsert("rollouts", record, ("rollout_id",))

    def get_rollout(self, rollout_id: str) -> RolloutRecord | None:
        row = self._one("SELECT * FROM rollouts WHERE rollout_id = %s", (rollout_id,))
        return RolloutRecord(**row) if row else None

    def list_rollouts(self, *, active_only: bool = False) -> list[RolloutRecord]:
        if active_only:
            rows = self._all("SELECT * FROM rollouts WHERE state = ANY(%s) ORDER BY created_at_ms, rollout_id",
                             (sorted(s.value for s in ACTIVE_ROLLOUT_STATES),))
        else:
            rows = self._all("SELECT * FROM rollouts ORDER BY created_at_ms, rollout_id")
        return [RolloutRecord(**r) for r in rows]

    def put_rollout_device(self, record: RolloutDeviceRecord) -> None:
        self._upsert("rollout_devices", record, ("rollout_id", "device_id"))

    def rollout_wave_counts(self) -> dict[str, int]:
        rows = self._all("SELECT rollout_id, COUNT(DISTINCT wave) AS waves FROM rollout_devices GROUP BY rollout_id")
        return {r["rollout_id"]: int(r["waves"]) for r in rows}

    def rollout_devices(self, rollout_id: str, *, states: Collection[str] | None = None) -> list[RolloutDeviceRecord]:
        where = "rollout_id = %s"
        args: tuple[Any, ...] = (rollout_id,)
        if states is not None:
            where += " AND state = ANY(%s)"
            args += (list(states),)
        rows = self._all(f"SELECT * FROM rollout_devices WHERE {where} ORDER BY wave, hardware_class, device_id", args)
        return [RolloutDeviceRecord(**r) for r in rows]

    def _upsert(self, table: str, record: Any, key: tuple[str, ...]) -> None:
        """INSERT OR REPLACE, the SQLite store's semantics: the record overwrites every column."""
        values = dataclasses.asdict(record)
        update = sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in values if c not in key
        )
        suffix = sql.SQL("ON CONFLICT ({}) DO UPDATE SET {}").format(
            sql.SQL(", ").join(map(sql.Identifier, key)), update
        )
        with self._statement() as cur:
            cur.execute(_insert_sql(table, list(values), suffix=suffix), list(values.values()))

    # -- telemetry -------------------------------------------------------------------------
    def ingest_telemetry(self, points: list[TelemetryPoint]) -> list[bool]:
        if not points:
            return []
        with self._tx() as cur:
            pruned = {
                r["device_id"]: r["max_seq"]
                for r in cur.execute(
                    "SELECT device_id, max_seq FROM telemetry_pruned WHERE device_id = ANY(%s::text[])",
                    (sorted({p.device_id for p in points}),),
                )
            }
            # The first copy of a (device, seq) in the batch is the candidate; the rest are duplicates.
            candidates: dict[tuple[str, int], TelemetryPoint] = {}
            for p in points:
                if p.seq > pruned.get(p.device_id, -(2**63)):
                    candidates.setdefault((p.device_id, p.seq), p)
            new = [candidates[k] for k in sorted(candidates)]  # sorted: one lock order across replicas
            stored: set[tuple[str, int]] = set()
            if new:
                # ON CONFLICT DO NOTHING on the primary key: a batch retried to two replicas at once
                # is stored by exactly one of them; RETURNING says which rows were new.
                cur.execute(
                    f"INSERT INTO telemetry_batches {_unnest(_BATCH_COLUMNS)} "
                    "ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq",
                    _columns(new, _BATCH_COLUMNS),
                )
                stored = {(r["device_id"], r["seq"]) for r in cur.fetchall()}
            kept = [p for p in new if (p.device_id, p.seq) in stored]
            models = [_ModelRow(p.device_id, p.seq, m) for p in kept for m in p.models]
            if models:
                cur.execute(
                    f"INSERT INTO telemetry_models {_unnest(_MODEL_COLUMNS)}", _columns(models, _MODEL_COLUMNS)
                )
            minutes = sorted({(p.device_id, p.end_ms - p.end_ms % MINUTE_MS) for p in kept})
            if minutes:
                cur.execute(
                    "INSERT INTO telemetry_dirty_minutes (device_id, minute_ms) "
                    "SELECT * FROM unnest(%s::text[], %s::bigint[]) "
                    "ON CONFLICT (device_id, minute_ms) DO UPDATE SET marks = telemetry_dirty_minutes.marks + 1",
                    ([d for d, _ in minutes], [m for _, m in minutes]),
                )
        return [(p.device_id, p.seq) in stored and candidates[(p.device_id, p.seq)] is p for p in points]

    def telemetry_window(self, device_id: str, start_ms: int, end_ms: int | None = None) -> list[TelemetryPoint]:
        end_ms = end_ms if end_ms is not None else 2**62
        with self._tx() as cur:
            rows = cur.execute(
                "SELECT * FROM telemetry_batches WHERE device_id = %s AND end_ms >= %s AND end_ms < %s "
                "ORDER BY end_ms, seq",
                (device_id, start_ms, end_ms),
            ).fetchall()
            models = cur.execute(
                "SELECT m.* FROM telemetry_models m JOIN telemetry_batches b USING (device_id, seq) "
                "WHERE b.device_id = %s AND b.end_ms >= %s AND b.end_ms < %s",
                (device_id, start_ms, end_ms),
            ).fetchall()
        return _points(rows, models)

    def latest_telemetry(self) -> dict[str, TelemetryPoint]:
        with self._tx() as cur:
            rows = cur.execute(
                "SELECT DISTINCT ON (device_id) * FROM telemetry_batches ORDER BY device_id, seq DESC"
            ).fetchall()
            models = cur.execute(
                "SELECT * FROM telemetry_models WHERE (device_id, seq) IN "
                "(SELECT * FROM unnest(%s::text[], %s::bigint[]))",
                ([r["device_id"] for r in rows], [r["seq"] for r in rows]),
            ).fetchall() if rows else []
        return {p.device_id: p for p in _points(rows, models)}

    def dirty_rollups(self, limit: int = 1000, *, max_minute_ms: int | None = None) -> list[tuple[str, int, int]]:
        rows = self._all(
            "SELECT device_id, minute_ms, marks FROM telemetry_dirty_minutes WHERE minute_ms <= %s "
            "ORDER BY minute_ms, device_id LIMIT %s",
            (2**62 if max_minute_ms is None else max_minute_ms, limit),
        )
        return [(r["device_id"], r["minute_ms"], r["marks"]) for r in rows]

    def write_rollups(self, rollups: list[Rollup], done: list[tuple[str, int, int]]) -> None:
        done_columns = ([d for d, _, _ in done], [m for _, m, _ in done])
        with self._tx() as cur:
            cur.execute(
                "DELETE FROM telemetry_rollups r USING unnest(%s::text[], %s::bigint[]) AS t(device_id, minute_ms) "
                "WHERE r.device_id = t.device_id AND r.minute_ms = t.minute_ms",
                done_columns,
            )
            if rollups:
                cur.execute(
                    f"INSERT INTO telemetry_rollups {_unnest(_ROLLUP_COLUMNS)} "
                    # Replicas may race on one minute: both built it from the same raw points.
                    "ON CONFLICT (device_id, minute_ms, model, version) DO UPDATE SET "
                    "count = EXCLUDED.count, errors = EXCLUDED.errors, latency_hdr = EXCLUDED.latency_hdr, "
                    "p50_ms = EXCLUDED.p50_ms, p95_ms = EXCLUDED.p95_ms, p99_ms = EXCLUDED.p99_ms, "
                    "max_ms = EXCLUDED.max_ms, watts_avg = EXCLUDED.watts_avg, energy_mj_avg = EXCLUDED.energy_mj_avg",
                    _columns(rollups, _ROLLUP_COLUMNS),
                )
            cur.execute(
                "DELETE FROM telemetry_dirty_minutes d "
                "USING unnest(%s::text[], %s::bigint[], %s::bigint[]) AS t(device_id, minute_ms, marks) "
                "WHERE d.device_id = t.device_id AND d.minute_ms = t.minute_ms AND d.marks = t.marks",
                (*done_columns, [k for _, _, k in done]),
            )

    def rollups(self, device_id: str, since_ms: int) -> list[Rollup]:
        rows = self._all(
            "SELECT * FROM telemetry_rollups WHERE device_id = %s AND minute_ms >= %s "
            "ORDER BY minute_ms, model, version",
            (device_id, since_ms),
        )
        return [Rollup(**r) for r in rows]

    def prune_telemetry(self, raw_before_ms: int, rollups_before_ms: int) -> int:
        with self._tx() as cur:
            # The watermark keeps a late retransmit of a pruned batch from being stored again.
            cur.execute(
                "INSERT INTO telemetry_pruned SELECT device_id, MAX(seq) FROM telemetry_batches "
                "WHERE end_ms < %s GROUP BY device_id "
                "ON CONFLICT (device_id) DO UPDATE SET max_seq = GREATEST(telemetry_pruned.max_seq, EXCLUDED.max_seq)",
                (raw_before_ms,),
            )
            cur.execute(
                "DELETE FROM telemetry_models m USING telemetry_batches b "
                "WHERE m.device_id = b.device_id AND m.seq = b.seq AND b.end_ms < %s",
                (raw_before_ms,),
            )
            removed = cur.execute("DELETE FROM telemetry_batches WHERE end_ms < %s", (raw_before_ms,)).rowcount
            cur.execute("DELETE FROM telemetry_rollups WHERE minute_ms < %s", (rollups_before_ms,))
        return int(removed)

    def close(self) -> None:
        self._pool.close()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _insert_sql(table: str, columns: list[str], suffix: sql.Composable | str = "") -> sql.Composed:
    return sql.SQL("INSERT INTO {} ({}) VALUES ({}) {}").format(
        sql.Identifier(table),
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        sql.SQL(suffix) if isinstance(suffix, str) else suffix,
    )


# Column name and SQL type, in table order, of the tables written a batch at a time through unnest().
_BATCH_COLUMNS = (
    ("device_id", "text"), ("seq", "bigint"), ("start_ms", "bigint"), ("end_ms", "bigint"),
    ("received_ms", "bigint"), ("watts", "float8"), ("power_source", "text"), ("cpu_system", "float8"),
    ("cpu_process", "float8"), ("rss_bytes", "bigint"), ("memory_available_bytes", "bigint"),
    ("temperature_c", "float8"), ("load1", "float8"), ("dropped_batches", "bigint"),
)
_MODEL_COLUMNS = (
    ("device_id", "text"), ("seq", "bigint"), ("model", "text"), ("version", "text"), ("count", "bigint"),
    ("errors", "bigint"), ("p50_ms", "float8"), ("p95_ms", "float8"), ("p99_ms", "float8"), ("max_ms", "float8"),
    ("latency_hdr", "bytea"), ("energy_mj", "float8"), ("energy_source", "text"), ("runtime", "text"),
)
_ROLLUP_COLUMNS = (
    ("device_id", "text"), ("model", "text"), ("version", "text"), ("minute_ms", "bigint"), ("count", "bigint"),
    ("errors", "bigint"), ("latency_hdr", "bytea"), ("p50_ms", "float8"), ("p95_ms", "float8"),
    ("p99_ms", "float8"), ("max_ms", "float8"), ("watts_avg", "float8"), ("energy_mj_avg", "float8"),
)
# One Python type per SQL type: psycopg dumps a list as one array type and refuses mixed int/float lists.
_COERCE: dict[str, Callable[[Any], Any]] = {"text": str, "bigint": int, "float8": float, "bytea": bytes}


@dataclasses.dataclass(frozen=True)
class _ModelRow:
    """A ModelPoint with the key of its batch, as telemetry_models stores it."""

    device_id: str
    seq: int
    point: ModelPoint

    def __getattr__(self, name: str) -> Any:
        return getattr(self.point, name)


def _unnest(spec: Sequence[tuple[str, str]]) -> str:
    return "SELECT * FROM unnest(" + ", ".join(f"%s::{sql_type}[]" for _, sql_type in spec) + ")"


def _columns(records: Sequence[Any], spec: Sequence[tuple[str, str]]) -> list[list[Any]]:
    """Records as one typed list per column, for INSERT ... SELECT FROM unnest(...): one statement per batch."""
    columns = []
    for name, sql_type in spec:
        coerce = _COERCE[sql_type]
        columns.append([None if (v := getattr(r, name)) is None else coerce(v) for r in records])
    return columns


def _token(row: dict[str, Any]) -> EnrollmentTokenRecord:
    return EnrollmentTokenRecord(**row)


def _device(row: dict[str, Any]) -> DeviceRecord:
    return DeviceRecord(**row)


def _command(row: dict[str, Any]) -> CommandRecord:
    return CommandRecord(**row)


def _points(rows: list[dict[str, Any]], model_rows: list[dict[str, Any]]) -> list[TelemetryPoint]:
    models: dict[tuple[str, int], list[ModelPoint]] = {}
    for m in model_rows:
        key = (m.pop("device_id"), m.pop("seq"))
        models.setdefault(key, []).append(ModelPoint(**m))
    return [
        TelemetryPoint(
            **r, models=tuple(sorted(models.get((r["device_id"], r["seq"]), []), key=lambda m: (m.model, m.version)))
        )
        for r in rows
    ]
