"""The crash-consistent A/B installer: a bundle goes live whole, self-tested, or not at all.

Each state is a small method; :data:`~edgefleet.firmware.install_state.TRANSITIONS` says what follows
it. ``_enter`` persists a state before its method runs, so a SIGKILL or a power cut anywhere
leaves a record of the step in flight, and :meth:`Installer.resume` re-runs that step (every step
is idempotent) or, when a step keeps killing us, rolls back. Nothing is written to the serving
slot; the new model becomes live by one atomic pointer swap after its golden self-test.
"""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.common.durable_files import atomic_write_bytes, atomic_write_json, fsync_dir, read_json
from edgefleet.firmware.bundle import (
    BundleHead,
    bundle_size,
    check_policy,
    check_signature,
    payload_layout,
    read_head,
    verify_file,
)
from edgefleet.firmware.faults import NO_FAULTS, FaultPlan
from edgefleet.firmware.install_state import (
    MODEL_RUNNING_STATES,
    MUST_FINISH_STATES,
    SUPERSEDABLE_STATES,
    Event,
    InstallRecord,
    InstallState,
    StateStore,
    next_state,
)
from edgefleet.firmware.keys import TrustedKeys, trusted_keys
from edgefleet.firmware.manifest import Manifest
from edgefleet.firmware.rejections import BundleRejected, RejectReason
from edgefleet.firmware.replay import InstallCommand, NonceStore
from edgefleet.firmware.selftest import compare_outputs, load_manifest_session, run_golden, run_self_test
from edgefleet.firmware.slots import PAYLOAD_DIR, STAGED_MARKER, SlotStore, active_model, manifest_digest
from edgefleet.firmware.sources import ArtifactSource, FileSource, SourceInterrupted

log = logging.getLogger("edgefleet.firmware.installer")

S = InstallState
TRANSIENT_SOURCE_ERRORS = (SourceInterrupted, ConnectionError, TimeoutError)
# A model that fails these is broken, not unlucky: never try it again on this device.
MARK_BAD_REASONS = frozenset({RejectReason.LOAD_FAILED, RejectReason.SELF_TEST_FAILED, RejectReason.PROBATION_FAILED})
COPY_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class InstallPolicy:
    """Knobs a device (or a test) tunes; the defaults suit a small Linux board."""

    probation_inferences: int = 3
    probation_seconds: float = 0.0
    max_model_attempts: int = 3  # entries into ACTIVATING/PROBATION before we call it a crash loop
    max_step_attempts: int = 10  # the same for the other steps (a flaky disk, an OOM kill)
    slot_capacity_bytes: int | None = None  # None: the file system's free space is the limit
    reserve_bytes: int = 1024 * 1024  # left free on the disk for logs and state files


@dataclass(frozen=True)
class InstallOutcome:
    """What the agent acks to the controller: a result and, on failure, the reason code."""

    result: str  # committed | already_installed | rolled_back | rejected | suspended | idle
    reason: str = ""
    message: str = ""
    name: str = ""
    version: int | None = None
    install_id: str = ""

    @property
    def ok(self) -> bool:
        return self.result in ("committed", "already_installed", "idle")

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "reason": self.reason,
            "message": self.message,
            "name": self.name,
            "version": self.version,
            "install_id": self.install_id,
        }


@contextmanager
def _disk_full_is_a_rejection(what: str) -> Iterator[None]:
    """ENOSPC is not a crash to retry but a verdict: roll back and tell the controller."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise BundleRejected(
            RejectReason.INSUFFICIENT_SPACE, f"the disk filled up while {what}; free space and retry"
        ) from None


class _Suspended(Exception):
    """The download cannot go on now (link down, source gone); keep what we have and stop."""


class _ChunkReader(io.RawIOBase):
    """A read-only file over a chunk iterator, so the bundle reader can parse a stream's head."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._buffer = bytes(chunk)
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


class Installer:
    """Installs bundles into the A/B slots under ``state_dir``; one instance per device."""

    def __init__(
        self,
        state_dir: Path,
        trusted_public_keys: Iterable[Ed25519PublicKey] | TrustedKeys,
        *,
        hardware_class: str | None = None,
        policy: InstallPolicy | None = None,
        clock: Callable[[], float] = time.time,
        faults: FaultPlan = NO_FAULTS,
        open_source: Callable[[str], ArtifactSource | None] = FileSource.from_ref,
        device_id: str = "",
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.trusted = trusted_keys(trusted_public_keys)
        self.hardware_class = hardware_class
        self.policy = policy or InstallPolicy()
        self.clock = clock
        self.faults = faults
        self.open_source = open_source
        self.device_id = device_id
        self.store = StateStore(self.state_dir)
        self.slots = SlotStore(self.state_dir)
        self.nonces = NonceStore(self.state_dir / "seen_nonces.json")
        self.slots.ensure_layout()
        if hardware_class is None:
            log.warning("install.no_hardware_class detail='bundles for any hardware class will be accepted'")
        self._steps: dict[InstallState, Callable[[InstallRecord, ArtifactSource | None], InstallRecord]] = {
            S.DOWNLOADING: self._download,
            S.VERIFYING: self._verify,
            S.STAGED: self._stage,
            S.ACTIVATING: self._activate,
            S.PROBATION: self._probation,
            S.COMMITTED: self._commit,
            S.ROLLING_BACK: self._roll_back,
        }

    # -- public entry points ---------------------------------------------------------------------

    def install(self, source: ArtifactSource, command: InstallCommand | None = None) -> InstallOutcome:
        """Install the bundle ``source`` serves, resuming if it is the install already in flight.

        ``command`` is the controller's install command (nonce + expiry); an offline install from a
        file passes none.
        """
        try:
            with self._locked():
                return self._install(source, command)
        except BundleRejected as exc:
            return self._rejected(exc, source.ref, command)

    def resume(self, source: ArtifactSource | None = None) -> InstallOutcome:
        """Finish or undo whatever was in flight when the process died; the agent calls it at start.

        Without ``source`` an interrupted download is re-opened from its persisted ref when it can
        be (a local file); otherwise it stays suspended until :meth:`install` is called again.
        """
        try:
            with self._locked():
                record = self.store.load()
                if record.state == S.IDLE:
                    return self._outcome(record, idle=True)
                return self._run(self._enter(record.state, record), source)
        except BundleRejected as exc:
            return InstallOutcome("rejected", exc.reason.value, exc.message)

    def status(self) -> dict[str, Any]:
        """Machine-readable installer status for the agent's local API and the controller."""
        return installer_status(self.state_dir)

    # -- starting an install ---------------------------------------------------------------------

    def _install(self, source: ArtifactSource, command: InstallCommand | None) -> InstallOutcome:
        record = self.store.load()
        if record.state != S.IDLE:
            if record.source_ref == source.ref:
                if command is not None and command.nonce != record.nonce:
                    self.nonces.accept(command, self.clock())
                return self._run(self._enter(record.state, record), source)
            if record.state in SUPERSEDABLE_STATES:
                record = record.evolve(
                    failure_reason=RejectReason.SUPERSEDED.value,
                    failure_message=f"superseded by {source.ref}",
                    mark_bad=False,
                )
                self._run(self._enter(S.ROLLING_BACK, record), None)
            else:  # the new model is already live on probation: finish that decision first
                self._run(self._enter(record.state, record), None)
            record = self.store.load()

        if command is not None:
            self.nonces.accept(command, self.clock())
        head, manifest = self._peek(source)
        digest = manifest_digest(head.manifest_bytes)
        committed = self.slots.committed()
        if committed and committed.get("manifest_sha256") == digest:
            self._log_event({"already_installed": source.ref, "version": manifest.version})
            return InstallOutcome(
                "already_installed",
                name=manifest.name,
                version=manifest.version,
                message=f"{manifest.name} v{manifest.version} is already the committed model",
            )
        if digest in self.slots.bad_bundles():
            raise BundleRejected(
                RejectReason.MARKED_BAD,
                f"{manifest.name} v{manifest.version} failed on this device before and is marked bad; "
                "build a new version",
            )
        staging = self.slots.other(committed["slot"] if committed else None)
        self._check_space(source.total_size, manifest.payload_size, staging)

        record = InstallRecord(
            seq=record.seq,
            install_id=uuid.uuid4().hex[:12],
            source_ref=source.ref,
            total_size=source.total_size,
            payload_size=manifest.payload_size,
            staging_slot=staging,
            manifest_sha256=digest,
            name=manifest.name,
            version=manifest.version,
            nonce=command.nonce if command else "",
            rollout_id=command.rollout_id if command else "",
        )
        return self._run(self._enter(next_state(S.IDLE, Event.START), record), source)

    def _peek(self, source: ArtifactSource) -> tuple[BundleHead, Manifest]:
        """Judge a bundle by its first kilobytes before spending bandwidth and disk on the payload."""
        chunks = source.read(0)
        try:
            head = read_head(io.BufferedReader(_ChunkReader(chunks), buffer_size=64 * 1024))
        except BundleRejected:
            raise
        except Exception as exc:  # a transport's own error type: report it, do not crash the agent
            raise BundleRejected(RejectReason.SOURCE_FAILED, f"could not read the bundle head: {exc}") from None
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        check_signature(head, self.trusted)
        manifest = head.manifest
        committed = self.slots.committed()
        check_policy(
            manifest,
            hardware_class=self.hardware_class,
            min_version=committed["version"] if committed else None,
            now=self.clock(),
        )
        assert head.signature is not None
        expected = bundle_size(len(head.manifest_bytes), len(head.signature), manifest.files)
        if source.total_size != expected:
            reason = RejectReason.TRUNCATED if source.total_size < expected else RejectReason.CORRUPT
            raise BundleRejected(
                reason, f"bundle is {source.total_size} bytes, its manifest describes {expected} bytes"
            )
        return head, manifest

    def _check_space(self, total_size: int, payload_size: int, staging: str) -> None:
        """The staging slot holds the bundle and its unpacked payload at once; refuse up front."""
        need = total_size + payload_size
        capacity = self.policy.slot_capacity_bytes
        if capacity is None:
            # What the slot holds now is reclaimable: it is cleared (or resumed) before we download.
            capacity = self.slots.free_bytes() + self.slots.slot_usage(staging) - self.policy.reserve_bytes
        if need > capacity:
            raise BundleRejected(
                RejectReason.INSUFFICIENT_SPACE,
                f"bundle needs {need} bytes in the staging slot (bundle + unpacked payload), only "
                f"{max(capacity, 0)} are available; free disk space or ship a smaller build",
            )

    # -- the machine -----------------------------------------------------------------------------

    def _enter(self, state: InstallState, record: InstallRecord) -> InstallRecord:
        """Persist ``state`` before its work starts; counts re-entries to catch crash loops."""
        reentry = record.state == state
        attempt = record.attempt + 1 if reentry and not record.suspended else 1
        limit = self.policy.max_model_attempts if state in MODEL_RUNNING_STATES else self.policy.max_step_attempts
        if state not in MUST_FINISH_STATES and attempt > limit:
            log.error(
                "install.crash_loop state=%s attempts=%d install=%s version=%s%s",
                state.value,
                attempt - 1,
                record.install_id,
                record.version,
                self._kv_device(),
            )
            record = record.evolve(
                failure_reason=RejectReason.CRASH_LOOP.value,
                failure_message=f"{state.value} was started {attempt - 1} times without finishing",
                mark_bad=state in MODEL_RUNNING_STATES,
            )
            return self._enter(S.ROLLING_BACK, record)
        changes: dict[str, Any] = {"state": state, "attempt": attempt, "seq": record.seq + 1, "suspended": False}
        if state == S.PROBATION and (not reentry or record.probation_started_at is None):
            changes["probation_started_at"] = self.clock()
        record = record.evolve(**changes)
        self.store.write(record)
        entry: dict[str, Any] = {
            "seq": record.seq,
            "state": state.value,
            "attempt": attempt,
            "install": record.install_id,
            "version": record.version,
        }
        if state == S.DOWNLOADING:
            entry["have"] = self._partial_size(record)
        if state in (S.ROLLING_BACK, S.IDLE) and record.failure_reason:
            entry["reason"] = record.failure_reason
        self.store.append_log(entry)
        log.info(
            "install.state state=%s attempt=%d install=%s name=%s version=%s rollout=%s%s",
            state.value,
            attempt,
            record.install_id,
            record.name,
            record.version,
            record.rollout_id,
            self._kv_device(),
        )
        self.faults.point(state.value)
        return record

    def _run(self, record: InstallRecord, source: ArtifactSource | None) -> InstallOutcome:
        while record.state != S.IDLE:
            try:
                record = self._steps[record.state](record, source)
                event = Event.DONE
            except _Suspended as exc:
                record = record.evolve(suspended=True, seq=record.seq + 1)
                self.store.write(record)
                log.warning(
                    "install.suspended state=%s install=%s detail=%r%s",
                    record.state.value,
                    record.install_id,
                    str(exc),
                    self._kv_device(),
                )
                return InstallOutcome("suspended", "", str(exc), record.name, record.version, record.install_id)
            except BundleRejected as exc:
                if record.state in MUST_FINISH_STATES:
                    raise
                log.warning(
                    "install.failed state=%s reason=%s install=%s version=%s detail=%r%s",
                    record.state.value,
                    exc.reason.value,
                    record.install_id,
                    record.version,
                    exc.message,
                    self._kv_device(),
                )
                record = record.evolve(
                    failure_reason=exc.reason.value,
                    failure_message=exc.message,
                    mark_bad=exc.reason in MARK_BAD_REASONS,
                )
                event = Event.FAILED
            record = self._enter(next_state(record.state, event), record)
        return self._outcome(record)

    def _outcome(self, record: InstallRecord, *, idle: bool = False) -> InstallOutcome:
        last = record.last_result
        return InstallOutcome(
            "idle" if idle else str(last.get("result", "idle")),
            str(last.get("reason", "")),
            str(last.get("message", "")),
            str(last.get("name", record.name)),
            last.get("version", record.version),
            record.install_id,
        )

    # -- the steps, one per state (each safe to run again after a crash) ---------------------------

    def _part_path(self, record: InstallRecord) -> Path:
        return self.slots.slot_dir(record.staging_slot) / f"bundle-{record.install_id}.part"

    def _partial_size(self, record: InstallRecord) -> int:
        try:
            return self._part_path(record).stat().st_size
        except FileNotFoundError:
            return 0

    def _download(self, record: InstallRecord, source: ArtifactSource | None) -> InstallRecord:
        if source is None:
            source = self.open_source(record.source_ref)
            if source is None:
                raise _Suspended(f"{record.source_ref} is not reachable now; run the install again to resume")
        if source.total_size != record.total_size:
            raise BundleRejected(
                RejectReason.MANIFEST_MISMATCH,
                f"{record.source_ref} is now {source.total_size} bytes, it was {record.total_size}",
            )
        part = self._part_path(record)
        self.slots.clear_slot(record.staging_slot, keep=part.name)
        have = self._partial_size(record)
        if have > record.total_size:
            part.unlink()
            have = 0
        self._check_space(record.total_size, record.payload_size, record.staging_slot)
        total = record.total_size
        pause_at = self.faults.byte_limit("download")
        netcut_at = self.faults.netcut_at
        if have:
            log.info("install.download_resume install=%s from=%d total=%d", record.install_id, have, total)
        with _disk_full_is_a_rejection("downloading"), open(part, "ab", buffering=0) as out:
            chunks = source.read(have)
            try:
                while have < total:
                    try:
                        chunk = next(chunks, None)
                    except TRANSIENT_SOURCE_ERRORS as exc:
                        raise _Suspended(f"download interrupted at byte {have} of {total}: {exc}") from None
                    except Exception as exc:
                        raise BundleRejected(RejectReason.SOURCE_FAILED, f"{record.source_ref}: {exc}") from None
                    if chunk is None:
                        break
                    chunk = bytes(chunk[: total - have])
                    if netcut_at is not None and have < netcut_at <= have + len(chunk):
                        self._write(out, chunk[: netcut_at - have])
                        os.fsync(out.fileno())
                        raise _Suspended(f"download interrupted at byte {netcut_at} of {total}: link cut")
                    if pause_at is not None and have < pause_at <= have + len(chunk):
                        self._write(out, chunk[: pause_at - have])
                        self.faults.pause_now(f"download@{pause_at}")
                    self._write(out, chunk)
                    have += len(chunk)
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
                os.fsync(out.fileno())
        if have < total:
            raise _Suspended(f"{record.source_ref} ended at byte {have} of {total}; will resume from there")
        return record

    @staticmethod
    def _write(out: BinaryIO, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = out.write(view)
            view = view[n or 0 :]

    def _verify(self, record: InstallRecord, source: ArtifactSource | None) -> InstallRecord:
        committed = self.slots.committed()
        verified = verify_file(
            self._part_path(record),
            self.trusted,
            hardware_class=self.hardware_class,
            min_version=committed["version"] if committed else None,
            now=self.clock(),
        )
        if manifest_digest(verified.manifest_bytes) != record.manifest_sha256:
            raise BundleRejected(
                RejectReason.MANIFEST_MISMATCH,
                "the downloaded bundle is not the one whose head was checked; the source changed",
            )
        return record

    def _stage(self, record: InstallRecord, source: ArtifactSource | None) -> InstallRecord:
        slot = self.slots.slot_dir(record.staging_slot)
        part = self._part_path(record)
        marker = read_json(slot / STAGED_MARKER)
        if marker is not None and marker.get("install_id") == record.install_id:
            part.unlink(missing_ok=True)  # a crash hit after unpacking, before the state moved on
            return record
        self.slots.clear_slot(record.staging_slot, keep=part.name)
        with _disk_full_is_a_rejection("unpacking"), open(part, "rb") as src:
            head = read_head(src)
            manifest = head.manifest
            offsets = payload_layout(head, manifest)
            limit = self.faults.byte_limit("stage")
            written = 0
            for entry in manifest.files:
                dest = slot / PAYLOAD_DIR / entry.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "wb") as out:
                    written = self._copy_range(src, out, offsets[entry.path], entry.size, written, limit)
                    os.fsync(out.fileno())
                for parent in reversed(dest.relative_to(slot).parents):
                    fsync_dir(slot / parent)
        assert head.signature is not None
        atomic_write_bytes(slot / "manifest.json", head.manifest_bytes)
        atomic_write_bytes(slot / "manifest.sig", head.signature)
        atomic_write_json(
            slot / STAGED_MARKER, {"install_id": record.install_id, "manifest_sha256": record.manifest_sha256}
        )
        part.unlink()
        fsync_dir(slot)
        return record

    def _copy_range(self, src: BinaryIO, out: BinaryIO, offset: int, size: int, written: int, limit: int | None) -> int:
        """Copy ``size`` bytes at ``offset``; in-kernel where the OS can, pausing at a fault offset."""
        done = 0
        while done < size:
            count = min(COPY_CHUNK, size - done)
            if limit is not None and written < limit < written + count:
                count = limit - written
            try:
                n = os.copy_file_range(src.fileno(), out.fileno(), count, offset + done)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise
                data = os.pread(src.fileno(), count, offset + done)
                self._write(out, data)
                n = len(data)
            if n <= 0:
                raise BundleRejected(RejectReason.TRUNCATED, "staged bundle ended while unpacking")
            done += n
            written += n
            if limit is not None and written == limit:
                self.faults.pause_now(f"stage@{limit}")
        return written

    def _activate(self, record: InstallRecord, source: ArtifactSource | None) -> InstallRecord:
        slot_dir = self.slots.slot_dir(record.staging_slot)
        manifest = self.slots.read_slot_manifest(record.staging_slot)
        run_self_test(slot_dir / PAYLOAD_DIR, manifest)
        self.faults.point("activate:tested")
        self.slots.point_active(record.staging_slot)
        self.faults.point("activate:swapped")
        return record

    def _probation(self, record: InstallRecord, source: ArtifactSource | None) -> InstallRecord:
        self.slots.point_active(record.staging_slot)
        model = active_model(self.state_dir)
        assert model is not None
        session = load_manifest_session(model.model_path, model.manifest)
        spec = model.manifest.self_test

        def healthy() -> None:
            compare_outputs(run_golden(session, spec), spec, reason=RejectReason.PROBATION_FAILED)

        for _ in range(self.policy.probation_inferences):
            healthy()
        started = record.probation_started_at or self.clock()
        while (remaining := started + self.policy.probation_seconds - self.clock()) > 0:
            time.sleep(min(1.0, remaining))
            healthy()
        return record

    def _commit(self, record: InstallRecord, source: ArtifactSource | None) -> InstallRecord:
        self.slots.point_active(record.staging_slot)
        previous = self.slots.committed()
        if not (previous and previous.get("install_id") == record.install_id):
            self.slots.write_committed(
                {
                    "slot": record.staging_slot,
                    "name": record.name,
                    "version": record.version,
                    "manifest_sha256": record.manifest_sha256,
                    "install_id": record.install_id,
                    "committed_at": self.clock(),
                    "previous": None
                    if previous is None
                    else {k: previous.get(k) for k in ("slot", "name", "version", "manifest_sha256")},
                }
            )
        self.faults.point("commit:recorded")
        return record.evolve(last_result={"result": "committed", "name": record.name, "version": record.version})

    def _roll_back(self, record: InstallRecord, source: ArtifactSource | None) -> InstallRecord:
        committed = self.slots.committed()
        target = committed["slot"] if committed else None
        self.slots.point_active(target)
        self.faults.point("rollback:swapped")
        if record.mark_bad and record.manifest_sha256:
            self.slots.mark_bad(
                record.manifest_sha256,
                {"name": record.name, "version": record.version, "reason": record.failure_reason, "at": self.clock()},
            )
        if record.staging_slot and record.staging_slot != target:
            self.slots.clear_slot(record.staging_slot)
        return record.evolve(
            last_result={
                "result": "rolled_back",
                "reason": record.failure_reason,
                "message": record.failure_message,
                "name": record.name,
                "version": record.version,
            }
        )

    # -- helpers ---------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One installer per state directory: the agent daemon and a local CLI must not interleave."""
        fd = os.open(self.state_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BundleRejected(
                    RejectReason.BUSY, f"another installer is working in {self.state_dir}; try again later"
                ) from None
            yield
        finally:
            os.close(fd)

    def _rejected(self, exc: BundleRejected, ref: str, command: InstallCommand | None) -> InstallOutcome:
        log.warning(
            "install.rejected reason=%s source=%s rollout=%s detail=%r%s",
            exc.reason.value,
            ref,
            command.rollout_id if command else "",
            exc.message,
            self._kv_device(),
        )
        if exc.reason != RejectReason.BUSY:
            self._log_event({"rejected": exc.reason.value, "source": ref})
        return InstallOutcome("rejected", exc.reason.value, exc.message)

    def _log_event(self, entry: dict[str, Any]) -> None:
        self.store.append_log(entry)

    def _kv_device(self) -> str:
        return f" device={self.device_id}" if self.device_id else ""


def installer_status(state_dir: Path) -> dict[str, Any]:
    """The install in flight (if any), the served model and the last result; needs no keys."""
    record = StateStore(Path(state_dir)).load()
    model = active_model(Path(state_dir))
    return {
        "state": record.state.value,
        "attempt": record.attempt,
        "install_id": record.install_id,
        "installing": {"name": record.name, "version": record.version} if record.state != S.IDLE else None,
        "active": None
        if model is None
        else {
            "slot": model.slot,
            "name": model.manifest.name,
            "version": model.manifest.version,
            "committed": model.committed,
        },
        "last_result": record.last_result,
    }
