"""Dashboard logins: a server-side session id in an HttpOnly cookie, never the operator token itself.

The session keeps the token's digest, so every request re-reads the token: revoking or expiring it
ends its dashboard sessions at once. Sessions are kept in the store (the session id's digest), so
every worker of a controller (`serve --workers N`) and every replica knows a login made in another,
and a logout in one ends it in all. Each session has its own CSRF token, sent back in every form and
checked on every POST (the SameSite=Strict cookie already keeps other sites' posts out; this also
covers same-site pages we do not control).
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets
import time
from collections.abc import Callable

from edgefleet.controller.fleet import credentials as auth
from edgefleet.controller.store.base import LoginSessionRecord, OperatorTokenRecord, Store

COOKIE_NAME = "edgefleet_session"
SESSION_TTL_S = 12 * 3600
MAX_SESSIONS = 10_000  # a login flood evicts the oldest sessions instead of growing without bound


@dataclasses.dataclass(frozen=True)
class LoginSession:
    session_id: str
    token_hash: str
    csrf: str
    expires_at: float


class LoginRefused(Exception):
    """The token cannot log in; the message is shown on the login form."""


class LoginSessions:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def login(self, token: str) -> LoginSession:
        token = token.strip()
        record = self.store.get_operator_token(auth.digest(token)) if token else None
        refusal = auth.operator_token_refusal(record, int(self.clock() * 1000))
        if refusal is not None or record is None:
            raise LoginRefused("that operator token is not valid" if record is None else refusal or "")
        session = LoginSession(secrets.token_urlsafe(32), record.token_hash, secrets.token_urlsafe(24),
                               self.clock() + SESSION_TTL_S)
        self.store.add_login_session(
            LoginSessionRecord(auth.digest(session.session_id), session.token_hash, session.csrf,
                               int(session.expires_at * 1000)), int(self.clock() * 1000), MAX_SESSIONS)
        return session

    def lookup(self, session_id: str) -> tuple[LoginSession, OperatorTokenRecord] | None:
        """The live session and its token, or None when either is gone, expired or revoked."""
        stored = self.store.get_login_session(auth.digest(session_id))
        if stored is None:
            return None
        session = LoginSession(session_id, stored.token_hash, stored.csrf, stored.expires_at_ms / 1000)
        if session.expires_at <= self.clock():
            self.logout(session_id)
            return None
        record = self.store.get_operator_token(session.token_hash)
        if auth.operator_token_refusal(record, int(self.clock() * 1000)) is not None or record is None:
            self.logout(session_id)
            return None
        return session, record

    def logout(self, session_id: str) -> None:
        self.store.delete_login_session(auth.digest(session_id))


def csrf_matches(session: LoginSession, offered: str) -> bool:
    return bool(offered) and hmac.compare_digest(session.csrf, offered)
