"""The committed generated code matches the .proto files, and field numbers keep their meaning."""

from __future__ import annotations

import json

from edgefleet.protos import compat, generate
from edgefleet.protos.capability import CAPABILITY_VERSION, HISTORY, negotiate


def test_regeneration_gives_no_diff() -> None:
    wanted = generate.generate()
    committed = {p.name: p.read_text() for p in generate.OUTPUT_DIR.glob("*.py*")}
    assert sorted(wanted) == sorted(committed)
    stale = [name for name in wanted if wanted[name] != committed[name]]
    assert stale == [], f"run `make protos`: {stale}"
    assert all("from edgefleet.v1 import" not in text for text in wanted.values())


def test_field_numbers_are_never_reused() -> None:
    assert compat.problems() == []
    assert compat.updated_lock() == json.loads(compat.LOCK_PATH.read_text()), "run `make protos` to record new fields"


def test_the_check_catches_a_renamed_and_a_dropped_field() -> None:
    lock = json.loads(compat.LOCK_PATH.read_text())
    lock["edgefleet.v1.Heartbeat"]["1"] = "renamed:3:single"
    lock["edgefleet.v1.Heartbeat"]["9"] = "gone:3:single"
    found = compat.problems(lock)
    assert any("Heartbeat field 1" in p and "use a new number" in p for p in found)
    assert any("Heartbeat field 9" in p and "reserved" in p for p in found)


def test_capability_history_and_negotiation() -> None:
    assert max(HISTORY) == CAPABILITY_VERSION
    assert negotiate(0) == 1 and negotiate(CAPABILITY_VERSION + 5) == CAPABILITY_VERSION
