"""The states of a rollout and of each of its devices, and the one table of moves between them.

The values are the strings the store keeps and the Control API sends (``RolloutInfo.state``), so
the enums are ``str`` enums: a state read back from either backend compares equal to its member.
Read the tables top to bottom for the whole life of a rollout; a move that is not listed is a bug
when the engine makes it, and refused (FailedPrecondition) when an operator asks for it.
"""

from __future__ import annotations

from enum import Enum

from edgefleet.controller.errors import FailedPrecondition, InvalidArgument


class RolloutState(str, Enum):
    PLANNING = "planning"  # builds for each class (compiled once)
    RUNNING = "running"  # dispatching, waiting for, soaking and gating wave k
    PAUSED = "paused"  # a breach, or an operator; resumes from its current wave
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"  # no build for some class

    def __str__(self) -> str:
        return self.value


class RolloutEvent(str, Enum):
    # What the engine sees on a tick.
    BUILDS_READY = "builds_ready"
    BUILD_FAILED = "build_failed"
    BREACH = "breach"  # --max-failures or a gate
    LAST_WAVE_PASSED = "last_wave_passed"
    # What an operator asks for (the values are ChangeRollout's `action` strings).
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    ROLLBACK = "rollback"

    def __str__(self) -> str:
        return self.value


R = RolloutState
E = RolloutEvent
ROLLOUT_TRANSITIONS: dict[tuple[RolloutState, RolloutEvent], RolloutState] = {
    (R.PLANNING, E.BUILDS_READY): R.RUNNING,
    (R.PLANNING, E.BUILD_FAILED): R.FAILED,
    (R.RUNNING, E.BREACH): R.PAUSED,
    (R.RUNNING, E.LAST_WAVE_PASSED): R.COMPLETED,
    (R.PLANNING, E.PAUSE): R.PAUSED,
    (R.RUNNING, E.PAUSE): R.PAUSED,
    (R.PAUSED, E.RESUME): R.RUNNING,
    (R.PLANNING, E.ABORT): R.ABORTED,
    (R.RUNNING, E.ABORT): R.ABORTED,
    (R.PAUSED, E.ABORT): R.ABORTED,
    # Only from states in which installs may have gone out; the engine also checks that one did.
    (R.RUNNING, E.ROLLBACK): R.ROLLED_BACK,
    (R.PAUSED, E.ROLLBACK): R.ROLLED_BACK,
    (R.COMPLETED, E.ROLLBACK): R.ROLLED_BACK,
    (R.ABORTED, E.ROLLBACK): R.ROLLED_BACK,
}

OPERATOR_ACTIONS = (E.PAUSE, E.RESUME, E.ABORT, E.ROLLBACK)
# The states the engine steps on every tick; a watcher stops following a rollout outside them.
ACTIVE_ROLLOUT_STATES = frozenset({R.PLANNING, R.RUNNING})
# The states a newer rollout of the same model takes devices over from.
UNFINISHED_ROLLOUT_STATES = frozenset({R.PLANNING, R.RUNNING, R.PAUSED})


class DeviceState(str, Enum):
    """The state of one device within one rollout (a rollout_devices row)."""

    PLANNED = "planned"
    SENT = "sent"  # the install command is stored and on its way
    COMMITTED = "committed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"  # no outcome within --device-timeout; it still installs when it returns
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"
    SUPERSEDED = "superseded"  # a newer rollout of the same model took the device over

    def __str__(self) -> str:
        return self.value


D = DeviceState
DEVICE_TRANSITIONS: dict[DeviceState, frozenset[DeviceState]] = {
    D.PLANNED: frozenset({D.SENT, D.SUPERSEDED}),
    D.SENT: frozenset({D.COMMITTED, D.FAILED, D.TIMED_OUT, D.SUPERSEDED}),
    D.TIMED_OUT: frozenset({D.COMMITTED}),  # came back and installed
    D.COMMITTED: frozenset({D.ROLLING_BACK}),
    D.ROLLING_BACK: frozenset({D.ROLLED_BACK, D.ROLLBACK_FAILED, D.SUPERSEDED}),
    D.FAILED: frozenset(),
    D.ROLLED_BACK: frozenset(),
    D.ROLLBACK_FAILED: frozenset(),
    D.SUPERSEDED: frozenset(),
}

# A device in one of these has its outcome for the wave: the wave moves on once all of its devices do.
SETTLED_DEVICE_STATES = frozenset({D.COMMITTED, D.FAILED, D.TIMED_OUT, D.ROLLED_BACK, D.SUPERSEDED,
                                   D.ROLLBACK_FAILED})


_ROLLOUT_VALUES = frozenset(s.value for s in RolloutState)


def next_rollout_state(state: str, event: RolloutEvent) -> RolloutState:
    """The engine's own moves: one missing from the table is a bug, not an operator's mistake."""
    try:
        return ROLLOUT_TRANSITIONS[(RolloutState(state), event)]
    except (KeyError, ValueError):
        raise RuntimeError(f"no rollout transition from {state} on {event.value}") from None


def allowed_from(event: RolloutEvent) -> list[RolloutState]:
    return [state for state in RolloutState if (state, event) in ROLLOUT_TRANSITIONS]


def operator_transition(rollout_id: str, state: str, action: str) -> RolloutState:
    """The state an operator's action leads to, or FailedPrecondition saying why not and from where it is allowed."""
    try:
        event = RolloutEvent(action)
    except ValueError:
        event = None
    if event not in OPERATOR_ACTIONS:
        raise InvalidArgument(
            f"unknown rollout action {action!r}; use one of {', '.join(a.value for a in OPERATOR_ACTIONS)}"
        )
    assert event is not None
    target = ROLLOUT_TRANSITIONS.get((RolloutState(state), event)) if state in _ROLLOUT_VALUES else None
    if target is None:
        names = [s.value for s in allowed_from(event)]
        allowed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise FailedPrecondition(f"rollout {rollout_id} is {state}; {event.value} is allowed only when it is {allowed}")
    return target


def check_device_move(rollout_id: str, device_id: str, state: str, to: DeviceState) -> None:
    """Called on every state change of a rollout device the engine writes."""
    if to not in DEVICE_TRANSITIONS[DeviceState(state)]:
        raise RuntimeError(f"rollout {rollout_id} device {device_id}: no transition from {state} to {to.value}")
