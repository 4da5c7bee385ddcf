"""Credentials: operator tokens, enrollment tokens and device secrets.

Only sha256 digests are stored. The secrets are 192+ bits of randomness, so a plain digest
(not a slow password hash) is the right tool, and lookups stay O(1) on the hot Session path.
Prefixes make a leaked value recognisable: efo_ operator, efe_ enrollment, efd_ device.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from enum import Enum
from pathlib import Path

from edgefleet.common.durable_files import atomic_write_bytes
from edgefleet.controller.store.base import EnrollmentTokenRecord, OperatorTokenRecord, Store

OPERATOR_TOKEN_FILE = "operator-token"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def same_digest(secret: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(secret), stored_digest)


def new_operator_token() -> str:
    return "efo_" + secrets.token_urlsafe(32)


def new_enrollment_token() -> str:
    return "efe_" + secrets.token_urlsafe(24)


def new_device_secret() -> str:
    return "efd_" + secrets.token_urlsafe(32)


def new_device_id() -> str:
    return "dev-" + secrets.token_hex(5)


def new_token_id() -> str:
    return "tok-" + secrets.token_hex(4)


def new_operator_token_id() -> str:
    return "opt-" + secrets.token_hex(4)


class OperatorRole(str, Enum):
    """What an operator token may do on the Control API; each role includes the ones below it.

    viewer reads the fleet; operator also changes it (models, rollouts, installs, device
    measurement, enrollment tokens); admin also manages operator tokens. The method -> role
    table is controller/api/control_roles.py.
    """

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    def __str__(self) -> str:
        return self.value

    @property
    def rank(self) -> int:
        return _ROLE_ORDER.index(self)

    def includes(self, needed: OperatorRole) -> bool:
        return self.rank >= needed.rank

    @classmethod
    def parse(cls, value: str) -> OperatorRole:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown role {value!r}; use one of: {', '.join(r.value for r in _ROLE_ORDER)}") from None


_ROLE_ORDER = (OperatorRole.VIEWER, OperatorRole.OPERATOR, OperatorRole.ADMIN)


def operator_token_refusal(token: OperatorTokenRecord | None, now_ms: int) -> str | None:
    """Why `token` may not call Control at `now_ms` (the UNAUTHENTICATED message), or None when it may."""
    if token is None:
        return ("missing or invalid operator token; set EDGEFLEET_TOKEN or use the controller's "
                "state-dir/operator-token")
    if token.revoked_at_ms:
        return f"operator token {token.token_id} was revoked; ask an admin for a new one"
    if token.expires_at_ms and token.expires_at_ms <= now_ms:
        return f"operator token {token.token_id} has expired; ask an admin for a new one"
    if token.role not in {r.value for r in OperatorRole}:  # an edited row: refuse rather than guess a role
        return f"operator token {token.token_id} has unknown role {token.role!r}; revoke it and create a new one"
    return None


class TokenState(str, Enum):
    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"
    USED_UP = "used up"

    def __str__(self) -> str:
        return self.value


def token_state(*, revoked: bool, expires_at_ms: float, uses_left: int, now_ms: float) -> TokenState:
    """Whether an enrollment token can enroll a device now. The one rule: both store backends refuse
    enrollment by it and `edgefleet token list` shows it. Revoked wins over expired over used up."""
    if revoked:
        return TokenState.REVOKED
    if expires_at_ms <= now_ms:
        return TokenState.EXPIRED
    if uses_left <= 0:
        return TokenState.USED_UP
    return TokenState.ACTIVE


def token_refusal(token: EnrollmentTokenRecord, now_ms: int) -> str | None:
    """Why `token` cannot enroll a device at `now_ms` (the EnrollmentRefused message), or None when it can."""
    state = token_state(revoked=token.revoked, expires_at_ms=token.expires_at_ms, uses_left=token.uses_left,
                        now_ms=now_ms)
    if state is TokenState.REVOKED:
        return f"enrollment token {token.token_id} was revoked"
    if state is TokenState.EXPIRED:
        return f"enrollment token {token.token_id} has expired"
    if state is TokenState.USED_UP:
        return f"enrollment token {token.token_id} is used up ({token.uses_total} of {token.uses_total})"
    return None


def ensure_operator_token(store: Store, state_dir: Path) -> Path:
    """On first start write an admin operator token (0600) to the state dir and register its digest.

    Later starts re-register the digest of whatever the file holds, so an operator can rotate
    the token by replacing the file's contents and restarting. Re-registering an existing digest
    changes nothing: a token an admin revoked stays revoked.
    """
    path = state_dir / OPERATOR_TOKEN_FILE
    if not path.exists():
        atomic_write_bytes(path, (new_operator_token() + "\n").encode(), mode=0o600)
    os.chmod(path, 0o600)
    token_hash = digest(path.read_text().strip())
    if store.get_operator_token(token_hash) is None:
        for _ in range(3):  # a token id collision (32 random bits) is retried, never silently dropped
            record = OperatorTokenRecord(token_id=new_operator_token_id(), token_hash=token_hash,
                                         role=OperatorRole.ADMIN.value, created_at_ms=int(time.time() * 1000),
                                         name="state-dir operator-token")
            if store.add_operator_token(record) or store.get_operator_token(token_hash) is not None:
                break
    return path
