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
Every move of a rollout and of each of its devices is in the tables of states.py; the operator's
pause, resume, abort and rollback are refused from a state the table does not allow them from.

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
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.controller.errors import FailedPrecondition, InvalidArgument, NotFound
from edgefleet.controller.fleet.commands import INSTALLED_RESULTS, CommandDispatcher
from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.rollouts.builds import build_for_class, bundle_install_action
from edgefleet.controller.rollouts.plan import WaveSize, assign_waves, parse_gate, parse_waves, selector_matches
from edgefleet.controller.rollouts.states import (
    ACTIVE_ROLLOUT_STATES,
    SETTLED_DEVICE_STATES,
    UNFINISHED_ROLLOUT_STATES,
    DeviceState,
    RolloutEvent,
    RolloutState,
    check_device_move,
    next_rollout_state,
    operator_transition,
)
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

BASELINE_WINDOW_MS = 5 * 60_000
INSTALL_TTL_S = 24 * 3600
MAX_FINISHED_HINTS = 100_000


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
            if older.model != newer.model or older.state not in UNFINISHED_ROLLOUT_STATES:
                continue
            taken = 0
            for row in self.store.rollout_devices(older.rollout_id):
                if row.device_id in device_ids and row.state not in SETTLED_DEVICE_STATES:
                    self._put_device(row, DeviceState.SUPERSEDED, reason=f"superseded by {newer.rollout_id}",
                                     finished_at_ms=self._now_ms())
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
        # Refuses what the table does not allow from the current state, with the states it is allowed from.
        target = operator_transition(rollout_id, rollout.state, action)
        if action == RolloutEvent.PAUSE:
            return self._update(rollout, state=target.value, reason="paused by an operator")
        if action == RolloutEvent.RESUME:
            self._wake.set()
            return self._update(rollout, state=target.value, reason="", soak_until_ms=0)
        if action == RolloutEvent.ABORT:
            return self._update(rollout, state=target.value, reason="aborted by an operator")
        rows = self.store.rollout_devices(rollout_id)
        if not any(r.command_id for r in rows):
            raise FailedPrecondition(
                f"rollout {rollout_id} is {rollout.state} but never sent an install, so there is nothing to roll "
                "back; abort it instead"
            )
        self._roll_back(rollout, [r for r in rows if r.state == DeviceState.COMMITTED])
        return self._update(rollout, state=target.value, reason="rolled back by an operator")

    def _move(self, rollout: RolloutRecord, event: RolloutEvent, **changes: Any) -> RolloutRecord:
        """The engine's own state changes, each one looked up in the transition table."""
        return self._update(rollout, state=next_rollout_state(rollout.state, event).value, **changes)

    def _put_device(self, row: RolloutDeviceRecord, state: DeviceState | None = None,
                    **changes: Any) -> RolloutDeviceRecord:
        """Write a device row; a change of its state must be one the device table allows."""
        if state is not None and state != row.state:
            check_device_move(row.rollout_id, row.device_id, row.state, state)
            changes["state"] = state.value
        updated = dataclasses.replace(row, **changes)
        self.store.put_rollout_device(updated)
        return updated

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
                    if rollout.state in ACTIVE_ROLLOUT_STATES:
                        advanced = await self.step(rollout) or advanced
                    if late_due:
                        self._collect_late_results(rollout)
                except Exception:
                    log.exception("rollout step failed", extra={"rollout": rollout.rollout_id})
            if not any(r.state in ACTIVE_ROLLOUT_STATES for r in rollouts):
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
        classes = sorted({r.hardware_class for r in rows if r.state != DeviceState.SUPERSEDED})
        builds = {c: self._build(rollout.model, rollout.version, c) for c in classes}
        if rollout.state == RolloutState.PLANNING:
            broken = {c: b for c, b in builds.items() if b and b.state == "failed"}
            if broken:
                detail = "; ".join(f"{c}: {b.error}" for c, b in broken.items())
                self._move(rollout, RolloutEvent.BUILD_FAILED, reason=f"no build: {detail}")
                return False
            if all(b and b.state == "ready" for b in builds.values()):
                self._move(rollout, RolloutEvent.BUILDS_READY, wave=0)
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
            if row.wave != rollout.wave or row.state == DeviceState.SUPERSEDED:
                continue
            build = builds.get(row.hardware_class) or self._build(rollout.model, rollout.version, row.hardware_class)
            if row.state == DeviceState.PLANNED and build is not None and build.state == "ready":
                row = self._dispatch(rollout, row, build)
            elif row.state == DeviceState.SENT:
                row = self._track(rollout, row, now, sweep)
            wave_rows.append(row)
        if any(r.state not in SETTLED_DEVICE_STATES for r in wave_rows):
            return False
        failed = [r for r in wave_rows if r.state == DeviceState.FAILED]
        if wave_rows and len(failed) / len(wave_rows) > rollout.max_failures:
            reasons = ", ".join(f"{r.device_id}: {r.reason}" for r in failed)
            self._breach(rollout, wave_rows, f"wave {rollout.wave + 1}: {len(failed)} of {len(wave_rows)} "
                         f"installs failed (max {rollout.max_failures:.0%}): {reasons}")
            return False
        committed = [r for r in wave_rows if r.state == DeviceState.COMMITTED]
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
        self._move(rollout, RolloutEvent.LAST_WAVE_PASSED, soak_until_ms=0)
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
        sent = self._put_device(row, DeviceState.SENT, command_id=command_id, previous_model=device.model,
                                previous_version=device.model_version, baseline=json.dumps(baseline),
                                dispatched_at_ms=now)
        install = self._install_action(build.bundle_sha256)
        self.commands.issue(row.device_id, install=install, ttl_s=INSTALL_TTL_S, rollout_id=rollout.rollout_id,
                            command_id=command_id)
        return sent

    def _install_action(self, bundle_sha: str) -> fleet_pb2.InstallBundle:
        return bundle_install_action(self.artifacts, bundle_sha)

    def _track(self, rollout: RolloutRecord, row: RolloutDeviceRecord, now: int, sweep: bool) -> RolloutDeviceRecord:
        """The row with its install's outcome, or timed out; returns the row as stored now."""
        if not sweep and row.command_id not in self._finished:
            return row
        self._finished.discard(row.command_id)
        command = self.store.get_command(row.command_id)
        if command is not None and command.state == "done":
            ok = command.result in INSTALLED_RESULTS
            row = self._put_device(
                row, DeviceState.COMMITTED if ok else DeviceState.FAILED, finished_at_ms=now,
                reason="" if ok else f"{command.result}: {command.reason} {command.message}".strip())
        elif sweep and now - row.dispatched_at_ms > rollout.device_timeout_s * 1000:
            row = self._put_device(
                row, DeviceState.TIMED_OUT, finished_at_ms=now,
                reason=f"no outcome within {rollout.device_timeout_s:g}s; it installs when it returns")
            log.warning("device timed out", extra={"rollout": rollout.rollout_id, "device": row.device_id})
        return row

    def _collect_late_results(self, rollout: RolloutRecord) -> None:
        """A timed-out device that comes back still installs; record that when it happens."""
        late = (DeviceState.TIMED_OUT.value, DeviceState.ROLLING_BACK.value)
        for row in self.store.rollout_devices(rollout.rollout_id, states=late):
            if row.state == DeviceState.TIMED_OUT:
                command = self.store.get_command(row.command_id)
                if command is not None and command.state == "done" and command.result in INSTALLED_RESULTS:
                    self._put_device(row, DeviceState.COMMITTED, reason="committed after timing out",
                                     finished_at_ms=self._now_ms())
            elif row.state == DeviceState.ROLLING_BACK:
                command = self.store.get_command(row.rollback_command_id)
                if command is not None and command.state == "done":
                    ok = command.result in INSTALLED_RESULTS
                    self._put_device(row, DeviceState.ROLLED_BACK if ok else DeviceState.ROLLBACK_FAILED,
                                     reason=row.reason if ok else f"rollback {command.result}: {command.reason}")

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
            self._roll_back(rollout, [r for r in wave_rows if r.state == DeviceState.COMMITTED])
            reason += "; the wave's devices are rolling back to their previous model"
        self._move(rollout, RolloutEvent.BREACH, reason=reason)

    def _roll_back(self, rollout: RolloutRecord, rows: list[RolloutDeviceRecord]) -> None:
        for row in rows:
            previous = self.store.get_build(row.previous_model, row.previous_version, row.hardware_class)
            if not row.previous_model or previous is None or not previous.rollback_bundle_sha256:
                # Nothing to return to (a first install, or a model installed outside rollouts): the
                # device keeps the new model, and says why.
                self._put_device(
                    row, reason=f"kept: no build of a previous model ({row.previous_model or 'none'}) to roll back to")
                continue
            command_id = f"{rollout.rollout_id}-{row.device_id}-rollback"
            self._put_device(row, DeviceState.ROLLING_BACK, rollback_command_id=command_id)
            self.commands.issue(row.device_id, install=self._install_action(previous.rollback_bundle_sha256),
                                ttl_s=INSTALL_TTL_S, rollout_id=rollout.rollout_id, command_id=command_id)

    # -- builds: compiled once per (model, version, class), in builds.py --------------------
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
        self.compiles += 1
        return build_for_class(self.store, self.artifacts, self.signing_key, self.compile_cache, model, version,
                               hardware_class, device_measurers=self.device_measurers, now_ms=self._now_ms)
