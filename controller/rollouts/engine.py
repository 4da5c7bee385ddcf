"""Rollouts: compile once per hardware class, canary first, then waves gated on live telemetry.

Every decision is made from the store and written back before it is acted on, so a controller
killed at any point resumes where it was: install commands have deterministic ids (a rollout
never installs a device twice), and the engine re-derives what to do next on every tick.

Life of a rollout:
    planning  -> builds for each class (compiled once, measured on an online device of the class)
    running   -> wave k: dispatch installs, wait until every device committed, failed or timed out,
                 check --max-failures, soak, check every gate against each device's own telemetry
                 on its previous model, then wave k+1
    completed | paused (a breach, or the operator) | aborted | rolled_back | failed (no build)

A breach pauses the rollout with the gate, the devices and the numbers, and (unless
--auto-rollback off) rolls the wave's devices back to their previous model with a signed
rollback bundle of that model's build.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.controller.errors import FailedPrecondition, InvalidArgument, NotFound
from edgefleet.controller.fleet.commands import CommandDispatcher
from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.store.artifacts import ArtifactStore
from edgefleet.controller.store.base import (
    BuildRecord,
    CommandRecord,
    DeviceRecord,
    RolloutDeviceRecord,
    RolloutRecord,
    Store,
)
from edgefleet.controller.telemetry import histograms
from edgefleet.protos.v1 import fleet_pb2

log = logging.getLogger("edgefleet.controller.rollouts.engine")

ACTIVE = ("planning", "running")
FINAL_DEVICE_STATES = ("committed", "failed", "timed_out", "rolled_back", "superseded", "rollback_failed")
GATE_METRICS = ("p50_ms", "p95_ms", "p99_ms", "error_rate", "watts", "energy_mj")
BASELINE_WINDOW_MS = 5 * 60_000
INSTALL_TTL_S = 24 * 3600
MAX_FINISHED_HINTS = 100_000
_GATE_RE = re.compile(r"^\s*([a-z0-9_]+)\s*<=\s*([0-9.]+)\s*(x?)\s*$")


# -- parsing the operator's spec ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WaveSize:
    count: int | None = None      # an absolute number of devices per class (the canary)
    fraction: float | None = None  # a cumulative share of each class


def parse_waves(text: str) -> list[WaveSize]:
    waves = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if part.endswith("%"):
                value = float(part[:-1]) / 100
                if not 0 < value <= 1:
                    raise ValueError
                waves.append(WaveSize(fraction=value))
            else:
                count = int(part)
                if count < 1:
                    raise ValueError
                waves.append(WaveSize(count=count))
        except ValueError:
            raise InvalidArgument(
                f"--waves part {part!r} is not a device count or a percentage; e.g. --waves 1,10%,50%,100%"
            ) from None
    if not waves or waves[-1].fraction != 1.0:
        raise InvalidArgument("--waves must end at 100%, e.g. --waves 1,10%,100%")
    return waves


@dataclasses.dataclass(frozen=True)
class Gate:
    metric: str
    limit: float
    relative: bool  # a multiple of the device's own baseline on its previous model

    def __str__(self) -> str:
        return f"{self.metric}<={self.limit:g}{'x' if self.relative else ''}"


def parse_gate(text: str) -> Gate:
    match = _GATE_RE.match(text)
    if not match or match.group(1) not in GATE_METRICS:
        raise InvalidArgument(
            f"--gate {text!r} is not understood; write METRIC<=LIMIT or METRIC<=FACTORx with METRIC one of "
            f"{', '.join(GATE_METRICS)}, e.g. --gate p95_ms<=1.2x --gate error_rate<=0.01"
        )
    return Gate(match.group(1), float(match.group(2)), match.group(3) == "x")


def selector_matches(selector: str, device: DeviceRecord) -> bool:
    kind, _, rest = selector.partition(" ") if " " in selector else (selector, "", "")
    if selector == "all":
        return True
    if selector.startswith("class="):
        return device.hardware_class == selector[len("class="):]
    if kind == "label":
        key, _, value = rest.partition("=")
        return device.labels.get(key.strip()) == value.strip()
    if kind == "devices":
        return device.device_id in {d.strip() for d in rest.split(",")}
    raise InvalidArgument(f"--to {selector!r} is not understood; use all, class=C, 'label k=v' or 'devices a,b'")


def assign_waves(device_ids: list[str], waves: list[WaveSize]) -> dict[str, int]:
    """Wave index per device of one class: a count is absolute, a fraction cumulative."""
    n = len(device_ids)
    targets: list[int] = []
    for wave in waves:
        target = min(n, wave.count) if wave.count is not None else math.ceil((wave.fraction or 0) * n)
        targets.append(max(target, targets[-1] if targets else 0))
    out: dict[str, int] = {}
    for position, device_id in enumerate(device_ids):
        out[device_id] = next(i for i, t in enumerate(targets) if position < t)
    return out


# -- the engine --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RolloutRequest:
    model: str
    version: int
    selector: str = "all"
    waves: str = "1,10%,50%,100%"
    soak_s: float = 60.0
    max_failures: float = 0.1
    gates: tuple[str, ...] = ("p95_ms<=1.2x", "error_rate<=0.01")
    device_timeout_s: float = 600.0
    auto_rollback: bool = True


class RolloutEngine:
    def __init__(
        self,
        store: Store,
        presence: PresenceTracker,
        commands: CommandDispatcher,
        artifacts: ArtifactStore,
        signing_key: Ed25519PrivateKey,
        compile_cache: Path,
        *,
        device_measurers: Callable[[], Any] | None = None,
        clock: Callable[[], float] = time.time,
        tick_s: float = 0.5,
    ) -> None:
        self.store = store
        self.presence = presence
        self.commands = commands
        self.artifacts = artifacts
        self.signing_key = signing_key
        self.compile_cache = compile_cache
        self.device_measurers = device_measurers
        self.clock = clock
        self.tick_s = tick_s
        self.compiles = 0  # compiles run by this process (cache hits included), for tests and status
        self._building: dict[tuple[str, int, str], asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        # Commands of rollouts finished since the last step: a step looks up only these, and leaves
        # the rest of the wave to the sweep once per tick (which also finds outcomes recorded
        # before a restart, and timeouts). It is a hint for promptness, never the record.
        self._finished: set[str] = set()
        self._swept_at: dict[str, float] = {}  # rollout -> time.monotonic() of its last sweep
        self._late_checked_at = float("-inf")
        commands.listeners.append(self._on_command_done)

    def _on_command_done(self, record: CommandRecord, ack: fleet_pb2.CommandAck) -> None:
        """An install outcome moves a rollout on at once rather than at the next tick."""
        if record.rollout_id:
            if len(self._finished) > MAX_FINISHED_HINTS:
                self._finished.clear()  # the sweeps find them anyway
            self._finished.add(record.command_id)
            self._wake.set()

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- operator actions ------------------------------------------------------------------
    def create(self, request: RolloutRequest) -> RolloutRecord:
        if self.store.get_model(request.model, request.version) is None:
            raise NotFound(f"no model {request.model}:{request.version}; register it with `edgefleet models add`")
        waves = parse_waves(request.waves)
        gates = [parse_gate(g) for g in request.gates]
        if not 0 <= request.max_failures <= 1:
            raise InvalidArgument("--max-failures must be between 0% and 100%")
        devices = [d for d in self.store.list_devices() if selector_matches(request.selector, d)]
        if not devices:
            raise FailedPrecondition(
                f"no enrolled device matches --to {request.selector!r}; see `edgefleet devices list`"
            )
        now = self._now_ms()
        record = RolloutRecord(
            rollout_id="ro-" + secrets.token_hex(4), model=request.model, version=request.version,
            selector=request.selector, waves=request.waves, soak_s=request.soak_s,
            max_failures=request.max_failures, gates=json.dumps([str(g) for g in gates]),
            device_timeout_s=request.device_timeout_s, auto_rollback=request.auto_rollback,
            created_at_ms=now, updated_at_ms=now,
        )
        self._supersede(record, {d.device_id for d in devices})
        self.store.put_rollout(record)
        self._add_devices(record, devices, waves, first_wave=0)
        log.info("rollout created", extra={"rollout": record.rollout_id, "model": record.model,
                                           "version": record.version, "devices": len(devices)})
        self._wake.set()  # plan now: with every class build cached, the canary goes out at once
        return record

    def _supersede(self, newer: RolloutRecord, device_ids: set[str]) -> None:
        """A newer rollout of the same model takes over the devices the two share."""
        for older in self.store.list_rollouts():
            if older.model != newer.model or older.state not in (*ACTIVE, "paused"):
                continue
            taken = 0
            for row in self.store.rollout_devices(older.rollout_id):
                if row.device_id in device_ids and row.state not in FINAL_DEVICE_STATES:
                    self.store.put_rollout_device(dataclasses.replace(
                        row, state="superseded", reason=f"superseded by {newer.rollout_id}",
                        finished_at_ms=self._now_ms()))
                    taken += 1
            if taken:
                note = f"{taken} device(s) superseded by {newer.rollout_id}"
                self._update(older, reason=f"{older.reason}; {note}".strip("; "))
                log.info("rollout superseded", extra={"rollout": older.rollout_id, "by": newer.rollout_id,
                                                      "devices": taken})

    def _add_devices(self, rollout: RolloutRecord, devices: list[DeviceRecord], waves: list[WaveSize],
                     first_wave: int) -> None:
        by_class: dict[str, list[DeviceRecord]] = {}
        for device in devices:
            by_class.setdefault(device.hardware_class, []).append(device)
        for hardware_class, members in by_class.items():
            # The canary should be a device that is online now.
            members.sort(key=lambda d: (not self.presence.presence(d).online, d.device_id))
            plan = assign_waves([d.device_id for d in members], waves)
            for device in members:
                self.store.put_rollout_device(RolloutDeviceRecord(
                    rollout_id=rollout.rollout_id, device_id=device.device_id, hardware_class=hardware_class,
                    wave=max(first_wave, plan[device.device_id]),
                ))

    def set_state(self, rollout_id: str, action: str) -> RolloutRecord:
        rollout = self.store.get_rollout(rollout_id)
        if rollout is None:
            raise NotFound(f"no rollout {rollout_id!r}; see `edgefleet rollout list`")
        if action == "pause":
            if rollout.state not in ACTIVE:
                raise FailedPrecondition(f"rollout {rollout_id} is {rollout.state}; only a running one can pause")
            return self._update(rollout, state="paused", reason="paused by an operator")
        if action == "resume":
            if rollout.state != "paused":
                raise FailedPrecondition(f"rollout {rollout_id} is {rollout.state}, not paused")
            self._wake.set()
            return self._update(rollout, state="running", reason="", soak_until_ms=0)
        if action == "abort":
            if rollout.state in ("completed", "aborted", "rolled_back"):
                raise FailedPrecondition(f"rollout {rollout_id} is already {rollout.state}")
            return self._update(rollout, state="aborted", reason="aborted by an operator")
        if action == "rollback":
            self._roll_back(rollout, [r for r in self.store.rollout_devices(rollout_id) if r.state == "committed"])
            return self._update(rollout, state="rolled_back", reason="rolled back by an operator")
        raise InvalidArgument(f"unknown rollout action {action!r}")

    def _update(self, rollout: RolloutRecord, **changes: Any) -> RolloutRecord:
        updated = dataclasses.replace(rollout, updated_at_ms=self._now_ms(), **changes)
        self.store.put_rollout(updated)
        if "state" in changes and changes["state"] != rollout.state:
            log.info("rollout state", extra={"rollout": rollout.rollout_id, "state": updated.state,
                                             "wave": updated.wave, "reason": updated.reason})
        return updated

    # -- the loop ----------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            advanced = False
            rollouts = self.store.list_rollouts()
            # Late results (timed-out devices that came back, rollbacks) are looked for once per
            # tick, not on every ack of a running wave.
            late_due = time.monotonic() - self._late_checked_at >= self.tick_s * 0.8
            if late_due:
                self._late_checked_at = time.monotonic()
            for rollout in rollouts:
                try:
                    if rollout.state in ACTIVE:
                        advanced = await self.step(rollout) or advanced
                    if late_due:
                        self._collect_late_results(rollout)
                except Exception:
                    log.exception("rollout step failed", extra={"rollout": rollout.rollout_id})
            if not any(r.state in ACTIVE for r in rollouts):
                self._finished.clear()  # hints for late results and rollbacks, which the passes read anyway
            if advanced:  # a rollout started running or moved to its next wave: dispatch that now
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_s)
            self._wake.clear()

    async def step(self, rollout: RolloutRecord) -> bool:
        """One pass over a rollout; True when it started running or moved on to its next wave.

        The device rows are read once. A full sweep (late joiners, every sent device's command,
        timeouts) runs at most once per tick; the passes woken by acks in between only look at
        the commands that finished."""
        rows = self.store.rollout_devices(rollout.rollout_id)
        classes = sorted({r.hardware_class for r in rows if r.state != "superseded"})
        builds = {c: self._build(rollout.model, rollout.version, c) for c in classes}
        if rollout.state == "planning":
            broken = {c: b for c, b in builds.items() if b and b.state == "failed"}
            if broken:
                detail = "; ".join(f"{c}: {b.error}" for c, b in broken.items())
                self._update(rollout, state="failed", reason=f"no build: {detail}")
                return False
            if all(b and b.state == "ready" for b in builds.values()):
                self._update(rollout, state="running", wave=0)
                return True
            return False
        now = self._now_ms()
        # On the monotonic clock, so a wall-clock step back cannot hold sweeps off; a little under
        # a tick, so the pass the tick itself wakes is always a sweep.
        ticked = time.monotonic()
        last = self._swept_at.get(rollout.rollout_id)
        sweep = last is None or ticked - last >= self.tick_s * 0.8
        if sweep:
            self._swept_at[rollout.rollout_id] = ticked
            if self._join_late_devices(rollout, rows):
                rows = self.store.rollout_devices(rollout.rollout_id)
        wave_rows = []
        for row in rows:
            if row.wave != rollout.wave or row.state == "superseded":
                continue
            build = builds.get(row.hardware_class) or self._build(rollout.model, rollout.version, row.hardware_class)
            if row.state == "planned" and build is not None and build.state == "ready":
                row = self._dispatch(rollout, row, build)
            elif row.state == "sent":
                row = self._track(rollout, row, now, sweep)
            wave_rows.append(row)
        if any(r.state not in FINAL_DEVICE_STATES for r in wave_rows):
            return False
        failed = [r for r in wave_rows if r.state == "failed"]
        if wave_rows and len(failed) / len(wave_rows) > rollout.max_failures:
            reasons = ", ".join(f"{r.device_id}: {r.reason}" for r in failed)
            self._breach(rollout, wave_rows, f"wave {rollout.wave + 1}: {len(failed)} of {len(wave_rows)} "
                         f"installs failed (max {rollout.max_failures:.0%}): {reasons}")
            return False
        committed = [r for r in wave_rows if r.state == "committed"]
        if rollout.soak_until_ms == 0:
            last = max((r.finished_at_ms for r in committed), default=now)
            rollout = self._update(rollout, soak_until_ms=max(last + int(rollout.soak_s * 1000), now))
        if now < rollout.soak_until_ms:
            return False
        breaches = self._check_gates(rollout, committed)
        if breaches:
            self._breach(rollout, wave_rows, f"wave {rollout.wave + 1} gate breach: " + "; ".join(breaches))
            return False
        later = sorted({r.wave for r in rows if r.wave > rollout.wave})
        if later:
            self._update(rollout, wave=later[0], soak_until_ms=0)
            return True
        self._update(rollout, state="completed", soak_until_ms=0)
        return False

    def _join_late_devices(self, rollout: RolloutRecord, rows: list[RolloutDeviceRecord]) -> bool:
        """Add devices that enrolled or matched after the rollout started; True when any did."""
        known = {r.device_id for r in rows}
        late = [d for d in self.store.list_devices()
                if d.device_id not in known and selector_matches(rollout.selector, d)]
        if late:
            self._add_devices(rollout, late, [WaveSize(fraction=1.0)], first_wave=rollout.wave)
            log.info("late devices joined", extra={"rollout": rollout.rollout_id, "devices": len(late)})
        return bool(late)

    def _dispatch(self, rollout: RolloutRecord, row: RolloutDeviceRecord, build: BuildRecord) -> RolloutDeviceRecord:
        """Send the install; returns the row as stored now."""
        device = self.store.get_device(row.device_id)
        if device is None:
            return row
        now = self._now_ms()
        baseline = self.device_metrics(row.device_id, device.model, device.model_version,
                                       now - BASELINE_WINDOW_MS, now) if device.model else {}
        # The row is written first: after a crash the deterministic command id finds the command.
        command_id = f"{rollout.rollout_id}-{row.device_id}-install"
        sent = dataclasses.replace(
            row, state="sent", command_id=command_id, previous_model=device.model,
            previous_version=device.model_version, baseline=json.dumps(baseline), dispatched_at_ms=now)
        self.store.put_rollout_device(sent)
        install = self._install_action(build.bundle_sha256)
        self.commands.issue(row.device_id, install=install, ttl_s=INSTALL_TTL_S, rollout_id=rollout.rollout_id,
                            command_id=command_id)
        return sent

    def _install_action(self, bundle_sha: str) -> fleet_pb2.InstallBundle:
        from edgefleet.controller.rollouts.builds import bundle_install_action

        return bundle_install_action(self.artifacts, bundle_sha)

    def _track(self, rollout: RolloutRecord, row: RolloutDeviceRecord, now: int, sweep: bool) -> RolloutDeviceRecord:
        """The row with its install's outcome, or timed out; returns the row as stored now."""
        if not sweep and row.command_id not in self._finished:
            return row
        self._finished.discard(row.command_id)
        command = self.store.get_command(row.command_id)
        if command is not None and command.state == "done":
            ok = command.result in ("committed", "already_installed")
            row = dataclasses.replace(
                row, state="committed" if ok else "failed", finished_at_ms=now,
                reason="" if ok else f"{command.result}: {command.reason} {command.message}".strip())
            self.store.put_rollout_device(row)
        elif sweep and now - row.dispatched_at_ms > rollout.device_timeout_s * 1000:
            row = dataclasses.replace(
                row, state="timed_out", finished_at_ms=now,
                reason=f"no outcome within {rollout.device_timeout_s:g}s; it installs when it returns")
            self.store.put_rollout_device(row)
            log.warning("device timed out", extra={"rollout": rollout.rollout_id, "device": row.device_id})
        return row

    def _collect_late_results(self, rollout: RolloutRecord) -> None:
        """A timed-out device that comes back still installs; record that when it happens."""
        for row in self.store.rollout_devices(rollout.rollout_id, states=("timed_out", "rolling_back")):
            if row.state == "timed_out":
                command = self.store.get_command(row.command_id)
                if command is not None and command.state == "done" and command.result in (
                        "committed", "already_installed"):
                    self.store.put_rollout_device(dataclasses.replace(
                        row, state="committed", reason="committed after timing out", finished_at_ms=self._now_ms()))
            elif row.state == "rolling_back":
                command = self.store.get_command(row.rollback_command_id)
                if command is not None and command.state == "done":
                    ok = command.result in ("committed", "already_installed")
                    self.store.put_rollout_device(dataclasses.replace(
                        row, state="rolled_back" if ok else "rollback_failed",
                        reason=row.reason if ok else f"rollback {command.result}: {command.reason}"))

    # -- gates and breaches ------------------------------------------------------------------
    def device_metrics(self, device_id: str, model: str, version: int, since_ms: int,
                       until_ms: int | None = None) -> dict[str, float]:
        points = self.store.telemetry_window(device_id, since_ms, until_ms)
        rows = [m for p in points for m in p.models if m.model == model and m.version == str(version)]
        if not rows:
            return {}
        summary = histograms.to_proto(histograms.merge(m.latency_hdr for m in rows))
        count = sum(m.count for m in rows)
        errors = sum(m.errors for m in rows)
        metrics = {"p50_ms": summary.p50_ms, "p95_ms": summary.p95_ms, "p99_ms": summary.p99_ms,
                   "error_rate": errors / (count + errors) if count + errors else 0.0,
                   "watts": sum(p.watts for p in points) / len(points), "samples": float(count)}
        if count:
            metrics["energy_mj"] = sum(m.energy_mj * m.count for m in rows) / count
        return metrics

    def _check_gates(self, rollout: RolloutRecord, committed: list[RolloutDeviceRecord]) -> list[str]:
        gates = [parse_gate(g) for g in json.loads(rollout.gates)]
        breaches = []
        for row in committed:
            live = self.device_metrics(row.device_id, rollout.model, rollout.version, row.finished_at_ms)
            baseline = json.loads(row.baseline or "{}")
            for gate in gates:
                value = live.get(gate.metric)
                if value is None:
                    continue  # no telemetry for this metric yet: nothing to judge (status shows it)
                if gate.relative:
                    base = baseline.get(gate.metric)
                    if not base:
                        continue
                    limit = gate.limit * base
                    detail = f"{value:.3g} vs {base:.3g} on v{row.previous_version} (limit {limit:.3g})"
                else:
                    limit = gate.limit
                    detail = f"{value:.3g} (limit {limit:g})"
                if value > limit:
                    breaches.append(f"{gate} on {row.device_id}: {detail}")
        return breaches

    def _breach(self, rollout: RolloutRecord, wave_rows: list[RolloutDeviceRecord], reason: str) -> None:
        log.warning("rollout breach", extra={"rollout": rollout.rollout_id, "wave": rollout.wave, "reason": reason})
        if rollout.auto_rollback:
            self._roll_back(rollout, [r for r in wave_rows if r.state == "committed"])
            reason += "; the wave's devices are rolling back to their previous model"
        self._update(rollout, state="paused", reason=reason)

    def _roll_back(self, rollout: RolloutRecord, rows: list[RolloutDeviceRecord]) -> None:
        for row in rows:
            previous = self.store.get_build(row.previous_model, row.previous_version, row.hardware_class)
            if not row.previous_model or previous is None or not previous.rollback_bundle_sha256:
                # Nothing to return to (a first install, or a model installed outside rollouts): the
                # device keeps the new model, and says why.
                self.store.put_rollout_device(dataclasses.replace(
                    row, reason=f"kept: no build of a previous model ({row.previous_model or 'none'}) to roll back to"))
                continue
            command_id = f"{rollout.rollout_id}-{row.device_id}-rollback"
            self.store.put_rollout_device(dataclasses.replace(
                row, state="rolling_back", rollback_command_id=command_id))
            self.commands.issue(row.device_id, install=self._install_action(previous.rollback_bundle_sha256),
                                ttl_s=INSTALL_TTL_S, rollout_id=rollout.rollout_id, command_id=command_id)

    # -- builds: compiled once per (model, version, class) -----------------------------------
    def _build(self, model: str, version: int, hardware_class: str) -> BuildRecord | None:
        record = self.store.get_build(model, version, hardware_class)
        if record is not None and record.state in ("ready", "failed"):
            return record
        key = (model, version, hardware_class)
        if key not in self._building or self._building[key].done():
            self.store.put_build(BuildRecord(model, version, hardware_class, state="compiling",
                                             updated_at_ms=self._now_ms()))
            self._building[key] = asyncio.create_task(self._compile(model, version, hardware_class))
        return self.store.get_build(model, version, hardware_class)

    async def _compile(self, model: str, version: int, hardware_class: str) -> None:
        try:
            record = await asyncio.to_thread(self._compile_sync, model, version, hardware_class)
        except Exception as exc:
            log.exception("build failed", extra={"model": model, "version": version, "class": hardware_class})
            record = BuildRecord(model, version, hardware_class, state="failed", error=str(exc).splitlines()[0][:300],
                                 updated_at_ms=self._now_ms())
        self.store.put_build(record)
        self._wake.set()

    def _compile_sync(self, model: str, version: int, hardware_class: str) -> BuildRecord:
        from edgefleet.controller.compiler.api import CompileSpec, compile_model
        from edgefleet.controller.compiler.runner import build_files
        from edgefleet.controller.compiler.target import TargetSpec
        from edgefleet.firmware.bundle import BundleSpec, build_bundle
        from edgefleet.firmware.manifest import RuntimeSpec
        from edgefleet.firmware.selftest import describe_onnx_model, describe_openvino_model, describe_tflite_model

        registered = self.store.get_model(model, version)
        assert registered is not None
        self.compiles += 1
        source = self.artifacts.path(registered.sha256)
        calib = self.artifacts.path(registered.calib_sha256) if registered.calib_sha256 else None
        target: Any = self._target_for(hardware_class) or TargetSpec.from_class(hardware_class)
        with tempfile.TemporaryDirectory(prefix="edgefleet-build-") as tmp:
            work = Path(tmp)
            model_file = work / f"source.{registered.format}"
            model_file.symlink_to(source)
            calib_file = None
            if calib is not None:
                calib_file = work / "calib.npz"
                calib_file.symlink_to(calib)
            measurers = self.device_measurers() if self.device_measurers else None
            report = compile_model(
                CompileSpec(model=model_file, target=target, calib=calib_file, budget=registered.budget,
                            out=work / "out", cache_dir=self.compile_cache),
                device_measurers=measurers,
            )
            artifact = Path(report.artifact)
            golden = None
            if calib_file is not None and registered.format != "tflite":
                from edgefleet.controller.compiler.data import load_npz
                from edgefleet.controller.compiler.model_io import load_source

                # The first calibration sample, in the model's own shapes whatever layout it was stored in.
                golden = load_npz(calib_file, load_source(model_file).inputs, flag="--calib").model_sample(0)
            provider = str(report.target.get("execution_provider") or "CPUExecutionProvider")
            chosen_runtime = report.runtime or {}
            if chosen_runtime.get("name") == "openvino":
                device = str(chosen_runtime.get("device") or "CPU")
                precision = chosen_runtime.get("inference_precision")
                io, self_test = describe_openvino_model(artifact, golden, device=device, inference_precision=precision,
                                                        rtol=1e-2, atol=1e-3)
                runtime = RuntimeSpec(name="openvino", execution_provider="", device=device,
                                      inference_precision=precision, version=chosen_runtime.get("version"))
            elif artifact.suffix == ".tflite":
                # TFLite names its tensors itself, so the golden input is generated from its own spec.
                io, self_test = describe_tflite_model(artifact, rtol=1e-2, atol=1e-3)
                runtime = RuntimeSpec(name="litert")
            else:
                io, self_test = describe_onnx_model(artifact, golden, rtol=1e-2, atol=1e-3)
                runtime = RuntimeSpec(name="onnxruntime", execution_provider=provider)
            provenance = {"compile": {k: report.to_dict()[k] for k in (
                "chosen", "speedup", "cache_key", "toolchain", "baseline", "result")},
                "source_sha256": registered.sha256}
            shas = []
            for rollback in (False, True):
                bundle = work / f"bundle-{int(rollback)}.efb"
                build_bundle(BundleSpec(
                    name=model, version=version, hardware_class=hardware_class, model_file=artifact.name,
                    payload={f.name: f for f in build_files(artifact)}, io=io, self_test=self_test,
                    runtime=runtime,
                    provenance=provenance, rollback=rollback,
                ), self.signing_key, bundle)
                shas.append(self.artifacts.put_file(bundle))
        log.info("build ready", extra={"model": model, "version": version, "class": hardware_class,
                                       "chosen": report.chosen, "speedup": report.speedup,
                                       "measured_on": report.latency.get("measured_on", ""),
                                       "cached": report.cached})
        return BuildRecord(model, version, hardware_class, state="ready", bundle_sha256=shas[0],
                           rollback_bundle_sha256=shas[1], report=json.dumps(report.to_dict()),
                           updated_at_ms=self._now_ms())

    def _target_for(self, hardware_class: str) -> Any:
        """The profile of an enrolled device of the class makes a better target than the class name."""
        from dataclasses import replace

        from edgefleet.controller.compiler.target import TargetSpec, openvino_from_profile
        from edgefleet.protos.capability import OPENVINO_RUNTIME, lacks
        from edgefleet.protos.v1 import profile_pb2

        target = None
        # A build of the class must run on every device of it: OpenVINO devices (and their precisions)
        # are offered only where every profiled device of the class has them, and its agent speaks
        # capability OPENVINO_RUNTIME (an older one would be sent a build it cannot load).
        shared_ov: dict[str, set[str]] | None = None
        for device in self.store.list_devices():
            if device.hardware_class == hardware_class and device.profile:
                profile = profile_pb2.HardwareProfile.FromString(device.profile)
                if target is None:
                    try:
                        target = TargetSpec.from_profile(profile)
                    except Exception as exc:  # a profile the compiler cannot use: fall back to the class name
                        log.warning("compiling for the class name: the profile of %s is not usable as a target (%s)",
                                    device.device_id, exc, extra={"class": hardware_class})
                        return None
                devices = dict(openvino_from_profile(profile)[0])
                why = lacks(device.capability_version, OPENVINO_RUNTIME, "an OpenVINO build")
                if why:  # its agent predates OpenVINO builds: none for the class
                    log.info("no OpenVINO candidates for the class", extra={"class": hardware_class,
                                                                          "device": device.device_id, "reason": why})
                    devices = {}
                mine = {name: set(caps) for name, caps in devices.items()}
                shared_ov = mine if shared_ov is None else {
                    name: caps & mine[name] for name, caps in shared_ov.items() if name in mine
                }
        if target is not None and shared_ov is not None:
            kept = tuple((name, tuple(c for c in caps if c in shared_ov[name]))
                         for name, caps in target.openvino_devices if name in shared_ov)
            if kept != target.openvino_devices:
                log.info("OpenVINO candidates limited to what every device of the class runs",
                         extra={"class": hardware_class, "openvino": str(kept)})
            target = replace(target, openvino_devices=kept)
        return target
