"""The store rules that live once, in the fleet domain: token validity and command expiry.

Both store backends and `edgefleet token list` call these; tests/unit/test_store_contract.py checks
that each backend applies them (refused enrollments, expired commands), this file the rules.
"""

from __future__ import annotations

import pytest

from edgefleet.controller.fleet.commands import command_expired, expired_commands
from edgefleet.controller.fleet.credentials import TokenState, token_refusal, token_state
from edgefleet.controller.store.base import CommandRecord, EnrollmentTokenRecord

NOW = 1_800_000_000_000


@pytest.mark.parametrize(("revoked", "expires", "uses_left", "expected"), [
    (False, NOW + 1, 1, TokenState.ACTIVE),
    (False, NOW, 1, TokenState.EXPIRED),  # expiry is inclusive: at its instant the token is gone
    (False, NOW + 1, 0, TokenState.USED_UP),
    (False, NOW - 1, 0, TokenState.EXPIRED),  # expired wins over used up
    (True, NOW - 1, 0, TokenState.REVOKED),  # revoked wins over both
])
def test_token_state(revoked: bool, expires: int, uses_left: int, expected: TokenState) -> None:
    assert token_state(revoked=revoked, expires_at_ms=expires, uses_left=uses_left, now_ms=NOW) is expected


def test_token_refusal_names_the_token_and_the_reason() -> None:
    token = EnrollmentTokenRecord("tok-1", "h", 3, 3, NOW - 10, NOW + 10, {})
    assert token_refusal(token, NOW) is None
    assert token_refusal(token, NOW + 10) == "enrollment token tok-1 has expired"
    assert token_refusal(EnrollmentTokenRecord("tok-1", "h", 3, 0, 0, NOW + 10, {}), NOW) == (
        "enrollment token tok-1 is used up (3 of 3)")
    assert token_refusal(EnrollmentTokenRecord("tok-1", "h", 3, 3, 0, NOW + 10, {}, revoked=True), NOW) == (
        "enrollment token tok-1 was revoked")


def command(command_id: str, expires: int, state: str = "pending") -> CommandRecord:
    return CommandRecord(command_id, "dev-1", "install", b"", NOW - 1000, expires, state=state)


def test_open_commands_expire_at_their_instant_and_finished_ones_never() -> None:
    assert not command_expired(command("c", NOW + 1), NOW)
    assert command_expired(command("c", NOW), NOW) and command_expired(command("c", NOW, "sent"), NOW)
    assert not command_expired(command("c", NOW - 1, "done"), NOW)
    records = [command("old", NOW - 1), command("new", NOW + 1), command("done", NOW - 1, "done")]
    expired = expired_commands(records, NOW)
    assert [(c.command_id, c.state, c.result, c.updated_at_ms) for c in expired] == [
        ("old", "expired", "expired", NOW)]
