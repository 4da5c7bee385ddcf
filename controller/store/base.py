"""The storage interface every controller backend implements.

The controller's logic only sees this interface, so the embedded SQLite store and a scale-out
backend are interchangeable; tests/unit/test_store_contract.py runs one contract against each.
Times are integer milliseconds since the Unix epoch throughout.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Collection, Iterable, Sequence


class StoreError(Exception):
    """Base class of the store's domain errors."""


class EnrollmentRefused(StoreError):
    """The enrollment token is unknown, expired, revoked or used up; no device row was written."""


@dataclasses.dataclass(frozen=True)
class OperatorTokenRecord:
    """An operator's Control API credential; only the digest of its secret is stored."""

    token_id: str             # a short public id (opt-...), what lists, revocation and the audit log name
    token_hash: str
    role: str                 # viewer | operator | admin (controller/fleet/credentials.py OperatorRole)
    created_at_ms: int
    name: str = ""            # who or what holds it, free text
    expires_at_ms: int = 0    # 0 = never
    revoked_at_ms: int = 0    # 0 = not revoked
    created_by: str = ""      # the admin token that created it; "" = the state dir's bootstrap token


@dataclasses.dataclass(frozen=True)
class AuditRecord:
    """One Control call in the audit log: who, what (arguments without secrets), when, and how it ended."""

    at_ms: int
    token_id: str
    role: str
    method: str
    arguments: str            # JSON, scrubbed of secrets (controller/api/control_audit.py)
    outcome: str              # "ok" or the gRPC status code name, e.g. PERMISSION_DENIED
    message: str = ""         # the status details when not ok
    audit_id: int = 0         # assigned by the store


@dataclasses.dataclass(frozen=True)
class LoginSessionRecord:
    """A dashboard login (controller/dashboard/sessions.py), in the store so that every worker and
    replica knows it; only the digest of the session id (the cookie) is stored."""

    session_hash: str
    token_hash: str           # the operator token it logged in with, re-checked on every request
    csrf: str
    expires_at_ms: int


@dataclasses.dataclass(frozen=True)
class EnrollmentTokenRecord:
    token_id: str
    secret_hash: str
    uses_total: int
    uses_left: int
    created_at_ms: int
    expires_at_ms: int
    labels: dict[str, str]
    revoked: bool = False


@dataclasses.dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    secret_hash: str
    labels: dict[str, str]
    enrolled_at_ms: int
    hostname: str = ""
    agent_version: str = ""
    capability_version: int = 0
    hardware_class: str = ""
    profile: bytes = b""          # serialized edgefleet.v1.HardwareProfile
    model: str = ""               # what the device serves, from its installs and sessions
    model_version: int = 0
    last_seen_ms: int = 0
    connected: bool = False       # a Session stream is open on some controller
    token_id: str = ""
    connected_by: str = ""        # which controller replica holds that stream
    # Device identity (TLS): the serials of its current and previous certificate (both accepted,
    # so a renewal whose answer was lost does not lock the device out) and when it was revoked.
    cert_serial: str = ""
    previous_cert_serial: str = ""
    cert_not_after_ms: int = 0
    revoked_at_ms: int = 0        # 0: not revoked

    @property
    def revoked(self) -> bool:
        return self.revoked_at_ms > 0


@dataclasses.dataclass(frozen=True)
class DeviceBrief:
    """The few device columns a /metrics scrape needs: at 10,000 devices reading whole records
    (labels, profiles) took ~0.3 s of every scrape."""

    device_id: str
    hardware_class: str
    connected: bool
    last_seen_ms: int


@dataclasses.dataclass(frozen=True)
class ModelPoint:
    model: str
    version: str
    count: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    latency_hdr: bytes
    energy_mj: float = 0.0
    energy_source: str = ""
    runtime: str = ""


@dataclasses.dataclass(frozen=True)
class TelemetryPoint:
    """One stored telemetry batch of one device; (device_id, seq) is unique."""

    device_id: str
    seq: int
    start_ms: int
    end_ms: int
    received_ms: int
    watts: float
    power_source: str
    cpu_system: float
    cpu_process: float
    rss_bytes: int
    memory_available_bytes: int
    temperature_c: float | None
    load1: float
    dropped_batches: int
    models: tuple[ModelPoint, ...] = ()


@dataclasses.dataclass(frozen=True)
class Rollup:
    """One minute of one model version on one device (model '' = device-level only)."""

    device_id: str
    model: str
    version: str
    minute_ms: int
    count: int
    errors: int
    latency_hdr: bytes
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    watts_avg: float
    energy_mj_avg: float


@dataclasses.dataclass(frozen=True)
class CommandRecord:
    """A command for one device; `payload` is the serialized edgefleet.v1.Command."""

    command_id: str
    device_id: str
    kind: str                  # install | measure
    payload: bytes
    created_at_ms: int
    expires_at_ms: int
    rollout_id: str = ""
    state: str = "pending"     # pending -> sent -> done (or expired)
    result: str = ""
    reason: str = ""
    message: str = ""
    ack: bytes = b""           # the serialized CommandAck that finished it
    updated_at_ms: int = 0


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    name: str
    version: int
    sha256: str               # the source model in the artifact store
    format: str               # onnx | tflite
    calib_sha256: str = ""
    budget: float = 0.99
    created_at_ms: int = 0
    eval_sha256: str = ""        # held-out gate data; empty = a held-out part of calib
    eval_labels_sha256: str = ""
    metric: str = ""             # the gate's metric; empty = cosine


@dataclasses.dataclass(frozen=True)
class BuildRecord:
    """One compiled, signed build of a model version for one hardware class (compiled once)."""

    model: str
    version: int
    hardware_class: str
    state: str = "pending"    # pending -> compiling -> ready | failed
    bundle_sha256: str = ""
    rollback_bundle_sha256: str = ""   # the same build signed as an explicit rollback
    report: str = ""          # the compile report, JSON
    error: str = ""
    updated_at_ms: int = 0


@dataclasses.dataclass(frozen=True)
class RolloutRecord:
    rollout_id: str
    model: str
    version: int
    selector: str             # all | class=C | label k=v | devices a,b
    waves: str                # 1,10%,50%,100%
    soak_s: float
    max_failures: float       # a fraction of the wave
    gates: str                # JSON list of gate strings
    device_timeout_s: float
    auto_rollback: bool
    state: str = "planning"   # a RolloutState value; the moves are in controller/rollouts/states.py
    wave: int = 0
    reason: str = ""
    created_at_ms: int = 0
    updated_at_ms: int = 0
    soak_until_ms: int = 0


@dataclasses.dataclass(frozen=True)
class RolloutDeviceRecord:
    rollout_id: str
    device_id: str
    hardware_class: str
    wave: int
    state: str = "planned"    # a DeviceState value (planned -> sent -> committed | ...); see rollouts/states.py
    command_id: str = ""
    previous_model: str = ""
    previous_version: int = 0
    baseline: str = ""        # JSON: the device's own telemetry on the previous model
    reason: str = ""
    dispatched_at_ms: int = 0
    finished_at_ms: int = 0
    rollback_command_id: str = ""


@dataclasses.dataclass(frozen=True)
class SessionOpen:
    """One stream opened, as `open_device_sessions` writes it: a field left None keeps its stored
    value, so a device that reconnects as it was sends no profile to the store."""

    device_id: str
    last_seen_ms: int
    agent_version: str | None = None
    capability_version: int | None = None
    hardware_class: str | None = None
    profile: bytes | None = None
    hostname: str | None = None
    model: str | None = None
    model_version: int | None = None


SESSION_OPEN_FIELDS = ("agent_version", "capability_version", "hardware_class", "profile", "hostname", "model",
                       "model_version")


def session_columns(
    connected: bool, last_seen_ms: int, owner: str, **optional: object
) -> dict[str, object]:
    """The device columns a session change writes: every backend's update_device_session uses it.
    Opening a stream records its replica; fields given as None keep their stored value."""
    columns: dict[str, object] = {"connected": connected, "last_seen_ms": last_seen_ms}
    if connected:
        columns["connected_by"] = owner
    columns.update({k: v for k, v in optional.items() if v is not None})
    return columns


class Store(abc.ABC):
    """Durable controller state. Implementations must be safe to call from several threads."""

    backend_name: str = "abstract"

    # -- operator tokens -------------------------------------------------------------------
    @abc.abstractmethod
    def add_operator_token(self, record: OperatorTokenRecord) -> bool:
        """Store a token; False (changing nothing) when its digest or id is already stored, so
        re-registering the bootstrap token on every start is a no-op and never un-revokes it."""

    @abc.abstractmethod
    def get_operator_token(self, token_hash: str) -> OperatorTokenRecord | None:
        """The token with this digest, revoked or expired ones too (the caller says why it refuses)."""

    @abc.abstractmethod
    def list_operator_tokens(self) -> list[OperatorTokenRecord]: ...

    @abc.abstractmethod
    def revoke_operator_token(self, token_id: str, now_ms: int) -> OperatorTokenRecord | None:
        """Mark revoked (keeping the first revocation time); None when there is no such token."""

    def is_operator_token(self, token_hash: str, now_ms: int | None = None) -> bool:
        """Whether the digest belongs to a token that may call Control now (not revoked, not expired)."""
        record = self.get_operator_token(token_hash)
        if record is None or record.revoked_at_ms:
            return False
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return not record.expires_at_ms or record.expires_at_ms > now

    # -- audit log -------------------------------------------------------------------------
    @abc.abstractmethod
    def add_audit(self, record: AuditRecord) -> None:
        """Append one entry: a single insert, since it runs on every mutating Control call."""

    @abc.abstractmethod
    def list_audit(self, *, since_ms: int = 0, limit: int = 100) -> list[AuditRecord]:
        """The newest `limit` entries at or after `since_ms`, oldest first."""

    # -- enrollment tokens -----------------------------------------------------------------
    @abc.abstractmethod
    def create_enrollment_token(self, record: EnrollmentTokenRecord) -> None: ...

    @abc.abstractmethod
    def list_enrollment_tokens(self) -> list[EnrollmentTokenRecord]: ...

    @abc.abstractmethod
    def revoke_enrollment_token(self, token_id: str) -> EnrollmentTokenRecord | None: ...

    @abc.abstractmethod
    def enroll_device(self, token_hash: str, now_ms: int, device: DeviceRecord) -> DeviceRecord:
        """Spend one use of the token and create the device, atomically.

        The token's labels are merged over ``device.labels``. Raises EnrollmentRefused (and
        writes nothing) when the token is unknown, revoked, expired or has no uses left.
        """

    # -- devices ---------------------------------------------------------------------------
    @abc.abstractmethod
    def get_device(self, device_id: str) -> DeviceRecord | None: ...

    @abc.abstractmethod
    def list_devices(self) -> list[DeviceRecord]: ...

    @abc.abstractmethod
    def device_briefs(self) -> list[DeviceBrief]:
        """Every device's id, hardware class and presence columns, ordered by device id."""

    @abc.abstractmethod
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
        """Record a session opening or closing; fields left as None are kept.

        `owner` names the controller replica holding the stream: opening records it, and closing
        changes nothing when another replica has taken the device over meanwhile."""

    @abc.abstractmethod
    def open_device_sessions(self, opens: Sequence[SessionOpen], owner: str) -> None:
        """Mark these streams open, held by `owner`, in one write (a reconnect storm is batched like
        the closes); None fields keep their stored values."""

    @abc.abstractmethod
    def close_device_sessions(self, closed: Iterable[tuple[str, int]], owner: str = "") -> None:
        """Mark many devices' streams closed in one write: (device_id, last_seen_ms) pairs. As
        `update_device_session(connected=False)` per device, and like it a no-op for a device that
        another replica took over meanwhile; last_seen never moves backwards. When thousands of
        streams end together (a controller stopping) one write per device took seconds."""

    @abc.abstractmethod
    def touch_devices(self, last_seen: Iterable[tuple[str, int]]) -> None:
        """Advance last_seen for many devices in one write (heartbeats are flushed in batches)."""

    @abc.abstractmethod
    def reset_connections(self, owner: str = "") -> int:
        """Mark disconnected the devices whose stream `owner` held (all, when owner is ""); a
        controller calls this on start, so restarting one replica leaves the others' devices be."""

    # -- leases ----------------------------------------------------------------------------
    @abc.abstractmethod
    def acquire_lease(self, name: str, holder: str, now_ms: int, ttl_ms: int) -> bool:
        """Take the lease `name` for `holder` until now_ms + ttl_ms, or renew it; True when `holder`
        holds it now. It is refused while another holder's lease has not expired, so of the workers
        and replicas sharing a store exactly one runs the singletons (controller/singletons.py)."""

    @abc.abstractmethod
    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up at a clean stop, so another takes it at once rather than at expiry."""

    @abc.abstractmethod
    def lease_holder(self, name: str, now_ms: int) -> str:
        """Who holds the lease now; "" when nobody does (never taken, released or expired)."""

    # -- dashboard login sessions ------------------------------------------------------------
    @abc.abstractmethod
    def add_login_session(self, record: LoginSessionRecord, now_ms: int, max_sessions: int) -> None:
        """Store a login; expired ones are dropped, and the oldest once `max_sessions` are stored."""

    @abc.abstractmethod
    def get_login_session(self, session_hash: str) -> LoginSessionRecord | None: ...

    @abc.abstractmethod
    def delete_login_session(self, session_hash: str) -> None: ...

    # -- commands --------------------------------------------------------------------------
    @abc.abstractmethod
    def devices_with_pending_commands(self, owner: str) -> list[str]:
        """Devices whose stream `owner` holds and that have a command never sent: issued by another
        worker or replica, which could not reach the stream. Each worker sweeps for its own."""

    @abc.abstractmethod
    def revoked_streams(self, owner: str) -> list[str]:
        """Revoked devices whose stream `owner` still holds: revoked through another worker or
        replica, which could not end that stream. Each worker sweeps for its own."""

    @abc.abstractmethod
    def add_command(self, record: CommandRecord) -> None: ...

    @abc.abstractmethod
    def get_command(self, command_id: str) -> CommandRecord | None: ...

    @abc.abstractmethod
    def open_commands(self, device_id: str, now_ms: int) -> list[CommandRecord]:
        """Unfinished, unexpired commands for a device, oldest first (sent again on reconnect)."""

    @abc.abstractmethod
    def mark_command_sent(self, command_id: str, now_ms: int) -> None: ...

    @abc.abstractmethod
    def finish_command(self, command_id: str, *, state: str, result: str, reason: str, message: str,
                       ack: bytes, now_ms: int) -> CommandRecord | None:
        """Record the outcome; returns None (changing nothing) when the command was already finished."""

    @abc.abstractmethod
    def list_commands(self, *, device_id: str | None = None, rollout_id: str | None = None) -> list[CommandRecord]: ...

    # -- models, builds, rollouts ------------------------------------------------------------
    @abc.abstractmethod
    def add_model(self, record: ModelRecord) -> None:
        """Register a model version; raises StoreError if (name, version) exists with other content."""

    @abc.abstractmethod
    def get_model(self, name: str, version: int) -> ModelRecord | None: ...

    @abc.abstractmethod
    def list_models(self) -> list[ModelRecord]: ...

    @abc.abstractmethod
    def set_device_model(self, device_id: str, model: str, version: int) -> None: ...

    @abc.abstractmethod
    def set_device_certificate(self, device_id: str, serial: str, not_after_ms: int) -> None:
        """A new certificate was issued: it becomes current, the one before it previous."""

    @abc.abstractmethod
    def revoke_device(self, device_id: str, now_ms: int) -> DeviceRecord | None:
        """Mark a device revoked (kept: the first revocation time stays); None when it is unknown."""

    @abc.abstractmethod
    def put_build(self, record: BuildRecord) -> None: ...

    @abc.abstractmethod
    def get_build(self, model: str, version: int, hardware_class: str) -> BuildRecord | None: ...

    @abc.abstractmethod
    def put_rollout(self, record: RolloutRecord) -> None: ...

    @abc.abstractmethod
    def get_rollout(self, rollout_id: str) -> RolloutRecord | None: ...

    @abc.abstractmethod
    def list_rollouts(self, *, active_only: bool = False) -> list[RolloutRecord]: ...

    @abc.abstractmethod
    def rollout_wave_counts(self) -> dict[str, int]:
        """How many distinct waves each rollout's devices are in, for every rollout that has devices:
        what ListRollouts shows, in one read instead of one per rollout."""

    @abc.abstractmethod
    def put_rollout_device(self, record: RolloutDeviceRecord) -> None: ...

    @abc.abstractmethod
    def rollout_devices(self, rollout_id: str, *, states: Collection[str] | None = None) -> list[RolloutDeviceRecord]:
        """The rollout's device rows by wave, class and device; only those in `states` when given."""

    # -- telemetry -------------------------------------------------------------------------
    @abc.abstractmethod
    def ingest_telemetry(self, points: list[TelemetryPoint]) -> list[bool]:
        """Store new points in one transaction; returns, per point, False when (device, seq) was
        already stored (a duplicate: nothing written). Marks the touched minutes for rollup."""

    def ingest_telemetry_now(self, points: list[TelemetryPoint]) -> list[bool] | None:
        """`ingest_telemetry` on the calling thread if that needs no waiting for another writer, else
        None (nothing written). The ingest calls it on the event loop: a write in a worker thread
        beside a busy loop waits for the GIL at every release, often for seconds (see SQLiteStore).
        A store whose writes always wait on the network returns None."""
        return None

    @abc.abstractmethod
    def telemetry_window(
        self, device_id: str, start_ms: int, end_ms: int | None = None
    ) -> list[TelemetryPoint]:
        """Points whose batch ended in [start_ms, end_ms), oldest first, with their model rows."""

    @abc.abstractmethod
    def latest_telemetry(self) -> dict[str, TelemetryPoint]:
        """The newest point of every device that has any."""

    @abc.abstractmethod
    def dirty_rollups(self, limit: int = 1000, *, max_minute_ms: int | None = None) -> list[tuple[str, int, int]]:
        """(device_id, minute_ms, marks) for minutes whose raw points changed since their rollup was
        written, oldest first, those starting at `max_minute_ms` or before (None: all); `marks` counts
        the changes, so a write can tell whether more arrived meanwhile."""

    @abc.abstractmethod
    def write_rollups(self, rollups: list[Rollup], done: list[tuple[str, int, int]]) -> None:
        """Replace the rollups of the `done` minutes with `rollups`, and clear them from dirty unless
        new points marked them again after `dirty_rollups` was read (then they stay dirty)."""

    @abc.abstractmethod
    def rollups(self, device_id: str, since_ms: int) -> list[Rollup]: ...

    @abc.abstractmethod
    def prune_telemetry(self, raw_before_ms: int, rollups_before_ms: int) -> int:
        """Drop raw points and rollups past retention; returns the raw points removed."""

    @abc.abstractmethod
    def close(self) -> None: ...
