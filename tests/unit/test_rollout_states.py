"""The rollout state tables, and the engine held to them.

The engine runs here in-process against a real SQLite store, with ready builds already stored (no
compile) and acks fed straight into the command dispatcher; a spy on the store records every state
change the engine writes, and each must be a move the tables list.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.controller.errors import FailedPrecondition, InvalidArgument
from edgefleet.controller.fleet.commands import CommandDispatcher
from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.rollouts.engine import RolloutEngine, RolloutRequest
from edgefleet.controller.rollouts.states import (
    ACTIVE_ROLLOUT_STATES,
    DEVICE_TRANSITIONS,
    OPERATOR_ACTIONS,
    ROLLOUT_TRANSITIONS,
    DeviceState,
    RolloutEvent,
    RolloutState,
    next_rollout_state,
    operator_transition,
)
from edgefleet.controller.store.artifacts import ArtifactStore
from edgefleet.controller.store.base import (
    BuildRecord,
    DeviceRecord,
    EnrollmentTokenRecord,
    ModelRecord,
    RolloutDeviceRecord,
    RolloutRecord,
)
from edgefleet.controller.store.sqlite import SQLiteStore
from edgefleet.protos.v1 import fleet_pb2

CLASS = "x86_64-avx2"
ROLLOUT_MOVES = {(state, target) for (state, _), target in ROLLOUT_TRANSITIONS.items()}


# -- the tables ---------------------------------------------------------------------------------
def test_every_state_is_in_the_tables_and_every_move_leads_to_a_state() -> None:
    assert set(DEVICE_TRANSITIONS) == set(DeviceState)
    assert all(isinstance(t, DeviceState) for targets in DEVICE_TRANSITIONS.values() for t in targets)
    reached = {RolloutState.PLANNING} | set(ROLLOUT_TRANSITIONS.values())
    assert reached == set(RolloutState)  # every state is reachable from a new rollout


def test_the_enums_keep_the_stored_strings() -> None:
    assert [s.value for s in RolloutState] == [
        "planning", "running", "paused", "completed", "aborted", "rolled_back", "failed"]
    assert DeviceState("timed_out") is DeviceState.TIMED_OUT and DeviceState.SENT == "sent"
    assert "planning" in ACTIVE_ROLLOUT_STATES and f"{RolloutState.PAUSED}" == "paused"


@pytest.mark.parametrize("state", list(RolloutState))
@pytest.mark.parametrize("action", [a.value for a in OPERATOR_ACTIONS])
def test_operator_actions_follow_the_table_or_say_why_not(state: RolloutState, action: str) -> None:
    target = ROLLOUT_TRANSITIONS.get((state, RolloutEvent(action)))
    if target is not None:
        assert operator_transition("ro-1", state.value, action) is target
        return
    with pytest.raises(FailedPrecondition) as refused:
        operator_transition("ro-1", state.value, action)
    message = str(refused.value)
    allowed = [s.value for s in RolloutState if (s, RolloutEvent(action)) in ROLLOUT_TRANSITIONS]
    assert f"rollout ro-1 is {state.value}; {action} is allowed only when it is" in message
    assert all(s in message for s in allowed) and "\n" not in message


def test_the_refusals_the_issue_names() -> None:
    with pytest.raises(FailedPrecondition, match="is completed; resume is allowed only when it is paused"):
        operator_transition("ro-1", "completed", "resume")
    with pytest.raises(FailedPrecondition, match="is failed; rollback is allowed only when it is running"):
        operator_transition("ro-1", "failed", "rollback")
    with pytest.raises(InvalidArgument, match="unknown rollout action 'explode'; use one of pause, resume"):
        operator_transition("ro-1", "running", "explode")
    with pytest.raises(InvalidArgument):  # an engine event is not an operator action
        operator_transition("ro-1", "planning", "builds_ready")


def test_an_engine_move_missing_from_the_table_is_a_bug() -> None:
    assert next_rollout_state("planning", RolloutEvent.BUILDS_READY) is RolloutState.RUNNING
    with pytest.raises(RuntimeError, match="no rollout transition from completed on breach"):
        next_rollout_state("completed", RolloutEvent.BREACH)


# -- the engine, held to the tables ------------------------------------------------------------
class SpyStore(SQLiteStore):
    """Records every state change written to a rollout or one of its devices."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.rollout_moves: list[tuple[str, str]] = []
        self.device_moves: list[tuple[str, str, str]] = []

    def put_rollout(self, record: RolloutRecord) -> None:
        old = self.get_rollout(record.rollout_id)
        if old is None:
            assert record.state == RolloutState.PLANNING
        elif old.state != record.state:
            self.rollout_moves.append((old.state, record.state))
        super().put_rollout(record)

    def put_rollout_device(self, record: RolloutDeviceRecord) -> None:
        old = {r.device_id: r for r in self.rollout_devices(record.rollout_id)}.get(record.device_id)
        if old is None:
            assert record.state == DeviceState.PLANNED
        elif old.state != record.state:
            self.device_moves.append((record.device_id, old.state, record.state))
        super().put_rollout_device(record)


@dataclasses.dataclass
class Fleet:
    store: SpyStore
    engine: RolloutEngine
    commands: CommandDispatcher
    now: list[float]

    def tick(self) -> None:
        """What RolloutEngine.run does until it would wait for the next tick, without its loop."""
        advanced = True
        while advanced:
            advanced = False
            for rollout in self.store.list_rollouts():
                if rollout.state in ACTIVE_ROLLOUT_STATES:
                    advanced = asyncio.run(self.engine.step(rollout)) or advanced
                self.engine._collect_late_results(rollout)

    def ack(self, command_id: str, result: str = "committed", version: int = 2) -> None:
        command = self.store.get_command(command_id)
        assert command is not None
        self.commands.on_ack(command.device_id, fleet_pb2.CommandAck(
            command_id=command_id, result=result, model="det", version=version, final=True))

    def devices(self, rollout_id: str) -> dict[str, str]:
        return {r.device_id: r.state for r in self.store.rollout_devices(rollout_id)}

    def state(self, rollout_id: str) -> str:
        rollout = self.store.get_rollout(rollout_id)
        assert rollout is not None
        return rollout.state


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    store = SpyStore(tmp_path / "store.db")
    now = [1_800_000_000.0]
    clock = lambda: now[0]  # noqa: E731
    presence = PresenceTracker(store, heartbeat_interval_s=10, clock=clock)
    commands = CommandDispatcher(store, presence, clock=clock)
    engine = RolloutEngine(store, presence, commands, ArtifactStore(tmp_path / "artifacts"),
                           Ed25519PrivateKey.generate(), tmp_path / "cache", clock=clock, tick_s=0)
    engine._install_action = lambda sha: fleet_pb2.InstallBundle(sha256=sha, name="det")  # type: ignore[method-assign]
    store.create_enrollment_token(EnrollmentTokenRecord("tok", "hash", 10, 10, 0, 2**50, {}))
    for device_id in ("dev-a", "dev-b", "dev-c"):
        store.enroll_device("hash", 1, DeviceRecord(device_id, "s", {}, 0, hardware_class=CLASS))
        store.set_device_model(device_id, "det", 1)
    for version in (1, 2):
        store.add_model(ModelRecord("det", version, f"{version}" * 64, "onnx"))
        store.put_build(BuildRecord("det", version, CLASS, state="ready", bundle_sha256=f"{version}a" * 32,
                                    rollback_bundle_sha256=f"{version}b" * 32))
    yield Fleet(store, engine, commands, now)
    for device_id, old, new in store.device_moves:
        assert DeviceState(new) in DEVICE_TRANSITIONS[DeviceState(old)], (device_id, old, new)
    for move in store.rollout_moves:
        assert move in ROLLOUT_MOVES, move
    store.close()


def create(fleet: Fleet, **overrides: object) -> str:
    fields: dict[str, object] = dict(model="det", version=2, waves="1,100%", soak_s=0, gates=(),
                                     max_failures=0.0, device_timeout_s=60)
    fields.update(overrides)
    return fleet.engine.create(RolloutRequest(**fields)).rollout_id  # type: ignore[arg-type]


def test_a_rollout_through_its_waves_to_completed_then_rolled_back(fleet: Fleet) -> None:
    rid = create(fleet)
    fleet.tick()  # planning -> running, the canary is sent
    canary = [d for d, s in fleet.devices(rid).items() if s == "sent"]
    assert fleet.state(rid) == "running" and len(canary) == 1
    fleet.ack(f"{rid}-{canary[0]}-install")
    fleet.tick()  # the canary passes: the next wave goes out
    assert sorted(fleet.devices(rid).values()) == ["committed", "sent", "sent"]
    for device_id, state in fleet.devices(rid).items():
        if state == "sent":
            fleet.ack(f"{rid}-{device_id}-install")
    fleet.tick()
    assert fleet.state(rid) == "completed"
    with pytest.raises(FailedPrecondition, match="is completed; resume is allowed only when it is paused"):
        fleet.engine.set_state(rid, "resume")
    assert fleet.engine.set_state(rid, "rollback").state == "rolled_back"
    assert set(fleet.devices(rid).values()) == {"rolling_back"}
    for device_id in fleet.devices(rid):
        fleet.ack(f"{rid}-{device_id}-rollback", version=1)
    fleet.tick()
    assert set(fleet.devices(rid).values()) == {"rolled_back"}
    assert fleet.store.rollout_moves == [("planning", "running"), ("running", "completed"),
                                         ("completed", "rolled_back")]


def test_a_failed_canary_breaches_and_operator_actions_follow_the_table(fleet: Fleet) -> None:
    rid = create(fleet)
    fleet.tick()
    canary = next(d for d, s in fleet.devices(rid).items() if s == "sent")
    fleet.ack(f"{rid}-{canary}-install", result="rejected")
    fleet.tick()
    assert fleet.state(rid) == "paused" and fleet.devices(rid)[canary] == "failed"
    with pytest.raises(FailedPrecondition, match="is paused; pause is allowed only when it is planning or running"):
        fleet.engine.set_state(rid, "pause")
    assert fleet.engine.set_state(rid, "resume").state == "running"
    assert fleet.engine.set_state(rid, "abort").state == "aborted"
    with pytest.raises(FailedPrecondition, match="is aborted; abort is allowed only when it is planning, running or"):
        fleet.engine.set_state(rid, "abort")


def test_a_timed_out_device_commits_late_and_a_newer_rollout_supersedes(fleet: Fleet) -> None:
    rid = create(fleet, waves="100%")
    fleet.tick()
    fleet.now[0] += 120  # past --device-timeout
    fleet.tick()
    assert set(fleet.devices(rid).values()) == {"timed_out"}
    fleet.ack(f"{rid}-dev-a-install")
    fleet.tick()
    assert fleet.devices(rid)["dev-a"] == "committed"

    older = create(fleet, waves="1,100%")
    fleet.tick()  # sends the canary of `older`; its other devices stay planned
    newer = create(fleet, waves="1,100%")
    assert set(fleet.devices(older).values()) == {"superseded"}
    assert fleet.state(newer) == "planning"


def test_rollback_of_a_rollout_that_never_sent_an_install_is_refused(fleet: Fleet) -> None:
    rid = create(fleet)
    with pytest.raises(FailedPrecondition, match="is planning; rollback is allowed only when it is running"):
        fleet.engine.set_state(rid, "rollback")
    assert fleet.engine.set_state(rid, "pause").state == "paused"
    with pytest.raises(FailedPrecondition, match="never sent an install, so there is nothing to roll back; abort"):
        fleet.engine.set_state(rid, "rollback")
    assert fleet.state(rid) == "paused" and set(fleet.devices(rid).values()) == {"planned"}
