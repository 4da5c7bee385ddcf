"""The installer's persisted state machine: states, events, the transition table and the record.

Mender-style: the record for a state is written (temp file, fsync, rename, fsync dir) *before*
that state's work starts, so after a crash the agent knows exactly which step was in flight and
re-runs it; every step is written to be safe to run twice. The record carries a loop counter
(``attempt``) so a step that keeps killing the process is noticed instead of retried forever.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from edgefleet.common.durable_files import atomic_write_json, read_json


class InstallState(str, Enum):
    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    STAGED = "STAGED"
    ACTIVATING = "ACTIVATING"  # load + golden self-test, then the pointer swap
    PROBATION = "PROBATION"  # serving, N inferences or T seconds healthy
    COMMITTED = "COMMITTED"
    ROLLING_BACK = "ROLLING_BACK"


class Event(str, Enum):
    START = "start"
    DONE = "done"
    FAILED = "failed"


S = InstallState
# Read top to bottom: the whole life of an install. Anything not listed is a bug.
TRANSITIONS: dict[tuple[InstallState, Event], InstallState] = {
    (S.IDLE, Event.START): S.DOWNLOADING,
    (S.DOWNLOADING, Event.DONE): S.VERIFYING,
    (S.VERIFYING, Event.DONE): S.STAGED,
    (S.STAGED, Event.DONE): S.ACTIVATING,
    (S.ACTIVATING, Event.DONE): S.PROBATION,
    (S.PROBATION, Event.DONE): S.COMMITTED,
    (S.COMMITTED, Event.DONE): S.IDLE,
    (S.DOWNLOADING, Event.FAILED): S.ROLLING_BACK,
    (S.VERIFYING, Event.FAILED): S.ROLLING_BACK,
    (S.STAGED, Event.FAILED): S.ROLLING_BACK,
    (S.ACTIVATING, Event.FAILED): S.ROLLING_BACK,
    (S.PROBATION, Event.FAILED): S.ROLLING_BACK,
    (S.ROLLING_BACK, Event.DONE): S.IDLE,
}

# States in which the new model runs inside this process: a crash loop there is the bundle's fault.
MODEL_RUNNING_STATES = frozenset({S.ACTIVATING, S.PROBATION})
# States that must always finish: there is nothing left to undo them to.
MUST_FINISH_STATES = frozenset({S.COMMITTED, S.ROLLING_BACK, S.IDLE})
# States whose work can be abandoned for a newer install (nothing of the new bundle is live yet).
SUPERSEDABLE_STATES = frozenset({S.DOWNLOADING, S.VERIFYING, S.STAGED})


def next_state(state: InstallState, event: Event) -> InstallState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise RuntimeError(f"no transition from {state.value} on {event.value}") from None


RECORD_FORMAT = 1


@dataclass(frozen=True)
class InstallRecord:
    """Everything needed to finish or undo the install in flight after a restart."""

    state: InstallState = S.IDLE
    seq: int = 0  # bumps on every write: the persisted "version" of the state
    attempt: int = 0  # entries into ``state`` for this install without finishing it
    suspended: bool = False  # the download stopped cleanly; the next entry is not a crash
    install_id: str = ""
    source_ref: str = ""
    total_size: int = 0
    payload_size: int = 0
    staging_slot: str = ""
    manifest_sha256: str = ""
    name: str = ""
    version: int | None = None
    nonce: str = ""
    rollout_id: str = ""
    probation_started_at: float | None = None
    failure_reason: str = ""
    failure_message: str = ""
    mark_bad: bool = False
    last_result: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["state"] = self.state.value
        document["format"] = RECORD_FORMAT
        return document

    def evolve(self, **changes: Any) -> InstallRecord:
        return replace(self, **changes)


def _read_v1(document: dict[str, Any]) -> InstallRecord:
    known = set(InstallRecord.__dataclass_fields__)
    fields = {k: v for k, v in document.items() if k in known}
    fields["state"] = InstallState(fields.get("state", "IDLE"))
    return InstallRecord(**fields)


# One reader per format this agent has ever written. When format 2 arrives, keep _read_v1 so a
# device that crashed mid-install under the old agent still finishes that install after upgrading.
_READERS = {1: _read_v1}


class StateStore:
    """``install_state.json`` (the record) plus ``install.log`` (one JSON line per entered state)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "install_state.json"
        self.log_path = state_dir / "install.log"

    def load(self) -> InstallRecord:
        document = read_json(self.path)
        if document is None:
            return InstallRecord()
        reader = _READERS.get(int(document.get("format", 0)))
        if reader is None:
            raise ValueError(
                f"{self.path} has format {document.get('format')}; this agent reads {sorted(_READERS)}. "
                "Upgrade the agent, do not delete the file: it records an install in flight"
            )
        return reader(document)

    def write(self, record: InstallRecord) -> None:
        atomic_write_json(self.path, record.to_dict())

    def append_log(self, entry: dict[str, Any]) -> None:
        """Append one line and fsync: the log is what operators (and the crash tests) read."""
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_log(self) -> list[dict[str, Any]]:
        try:
            lines = self.log_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]
