"""The dashboard's WSGI side: login, the pages, their /events streams and the rollout buttons.

Runs on the controller's HTTP thread pool (one thread per request). Rollout actions go to the
RolloutEngine on the controller's event loop, through the same checked operator transition the
Control API's ChangeRollout uses, with the same role table and the same audit log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from html import escape
from http.cookies import SimpleCookie
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from edgefleet.controller.api.control_roles import CONTROL_METHOD_ACCESS
from edgefleet.controller.dashboard.sessions import (
    COOKIE_NAME,
    SESSION_TTL_S,
    LoginRefused,
    LoginSession,
    LoginSessions,
    csrf_matches,
)
from edgefleet.controller.dashboard.views import DashboardData, Page, PageNotFound, Viewer
from edgefleet.controller.errors import FleetError
from edgefleet.controller.fleet.credentials import OperatorRole
from edgefleet.controller.store.base import AuditRecord, OperatorTokenRecord, RolloutRecord

log = logging.getLogger("edgefleet.controller.dashboard")

STREAM_INTERVAL_S = 1.0    # a stream re-renders its page this often, and writes at least a keep-alive
STREAM_MAX_S = 15 * 60     # then ends; the browser's EventSource reconnects by itself
ACTION_TIMEOUT_S = 10.0
MAX_FORM_BYTES = 64 * 1024
SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
]
NAV = [("/", "Fleet"), ("/devices", "Devices"), ("/models", "Models")]
StartResponse = Callable[..., Any]


class Dashboard:
    def __init__(self, data: DashboardData, sessions: LoginSessions) -> None:
        self.data = data
        self.sessions = sessions
        self.change_rollout: Callable[[str, str], RolloutRecord] | None = None
        self.stopping = threading.Event()

    def bind_rollouts(self, set_state: Callable[[str, str], RolloutRecord], loop: asyncio.AbstractEventLoop,
                      device_metrics: Callable[[str, str, int, int], dict[str, float]]) -> None:
        """Wire the engine in once the controller's loop runs: its state changes happen on that loop."""

        def change(rollout_id: str, action: str) -> RolloutRecord:
            async def on_loop() -> RolloutRecord:
                return set_state(rollout_id, action)

            return asyncio.run_coroutine_threadsafe(on_loop(), loop).result(ACTION_TIMEOUT_S)

        self.change_rollout = change
        self.data.device_metrics = device_metrics

    def stop(self) -> None:
        """Ends every open /events stream within one interval, so shutdown never waits on a tab."""
        self.stopping.set()

    # -- WSGI ---------------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):], start_response)
        if path == "/login":
            return self._login(environ, start_response) if method == "POST" else self._login_form(start_response)
        current = self._current(environ)
        if current is None:
            if path == "/events":  # EventSource cannot follow a redirect to a form: say so, the script reloads
                return self._send(start_response, "401 Unauthorized", b"event: gone\ndata: login\n\n",
                                  "text/event-stream")
            return self._redirect(start_response, "/login")
        session, token = current
        if method == "POST":
            form = _read_form(environ)
            if not csrf_matches(session, form.get("csrf", "")):
                return self._send(start_response, "403 Forbidden", b"missing or stale CSRF token; reload the page\n")
            if path == "/logout":
                self.sessions.logout(session.session_id)
                return self._redirect(start_response, "/login", cookie=_cookie("", 0))
            parts = path.strip("/").split("/")
            if len(parts) == 3 and parts[0] == "rollouts" and parts[2] == "action":
                return self._rollout_action(parts[1], form.get("action", ""), token, start_response)
            return self._send(start_response, "404 Not Found", b"not found\n")
        viewer = _viewer(session, token)
        if path == "/events":
            page_path = parse_qs(environ.get("QUERY_STRING", "")).get("path", ["/"])[0]
            return self._events(session, page_path, start_response)
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        try:
            page = self.render(path, query, viewer)
        except PageNotFound as exc:
            return self._html(start_response, "404 Not Found", self._layout(Page("Not found", escape(str(exc))),
                                                                          viewer, "", query))
        if page is None:
            return self._html(start_response, "404 Not Found",
                              self._layout(Page("Not found", "no such page; try the fleet page"), viewer, "", query))
        return self._html(start_response, "200 OK", self._layout(page, viewer, path, query))

    def render(self, path: str, query: dict[str, str], viewer: Viewer) -> Page | None:
        parts = [p for p in path.split("/") if p]
        if not parts:
            return self.data.fleet()
        if parts == ["devices"]:
            return self.data.devices(query)
        if len(parts) == 2 and parts[0] == "devices":
            return self.data.device(parts[1])
        if parts == ["models"]:
            return self.data.models()
        if len(parts) == 2 and parts[0] == "rollouts":
            return self.data.rollout(parts[1], viewer)
        return None

    # -- pieces -------------------------------------------------------------------------------
    def _current(self, environ: dict[str, Any]) -> tuple[LoginSession, OperatorTokenRecord] | None:
        cookie = SimpleCookie()
        try:
            cookie.load(environ.get("HTTP_COOKIE", ""))
        except Exception:
            return None
        morsel = cookie.get(COOKIE_NAME)
        return self.sessions.lookup(morsel.value) if morsel is not None and morsel.value else None

    def _login_form(self, start_response: StartResponse, error: str = "", status: str = "200 OK") -> Iterable[bytes]:
        message = f'<p class="error" id="login-error">{escape(error)}</p>' if error else ""
        body = (f'<!doctype html><html><head><meta charset="utf-8"><title>EdgeFleet login</title>'
                f'<link rel="stylesheet" href="/static/dashboard.css"></head><body class="login"><main>'
                f"<h1>EdgeFleet</h1>{message}"
                '<form method="post" action="/login"><label>Operator token '
                '<input type="password" name="token" autocomplete="off" autofocus required></label>'
                '<button type="submit" id="login">Log in</button></form>'
                "<p class=\"note\">The controller's own admin token is in STATE_DIR/operator-token; "
                "<code>edgefleet operator-token create --role viewer</code> makes a read-only one.</p>"
                "</main></body></html>")
        return self._html(start_response, status, body)

    def _login(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        form = _read_form(environ)
        try:
            session = self.sessions.login(form.get("token", ""))
        except LoginRefused as exc:
            log.warning("dashboard login refused", extra={"reason": str(exc)})
            return self._login_form(start_response, str(exc), "401 Unauthorized")
        return self._redirect(start_response, "/", cookie=_cookie(session.session_id, SESSION_TTL_S))

    def _rollout_action(self, rollout_id: str, action: str, token: OperatorTokenRecord,
                        start_response: StartResponse) -> Iterable[bytes]:
        needed = CONTROL_METHOD_ACCESS["ChangeRollout"].role
        arguments = json.dumps({"rollout_id": rollout_id, "action": action, "via": "dashboard"})
        if not OperatorRole.parse(token.role).includes(needed):
            message = (f"changing a rollout needs role {needed} or higher; "
                       f"this token ({token.token_id}) has role {token.role}")
            self._audit(token, arguments, "PERMISSION_DENIED", message)
            return self._send(start_response, "403 Forbidden", (message + "\n").encode())
        if self.change_rollout is None:
            return self._send(start_response, "503 Service Unavailable", b"the rollout engine is not running yet\n")
        try:
            record = self.change_rollout(rollout_id, action)
        except FleetError as exc:
            self._audit(token, arguments, type(exc).__name__, str(exc))
            return self._redirect(start_response, f"/rollouts/{quote(rollout_id)}?{urlencode({'error': str(exc)})}")
        self._audit(token, arguments, "ok", "")
        log.info("rollout changed from the dashboard",
                 extra={"rollout": rollout_id, "action": action, "token_id": token.token_id, "state": record.state})
        return self._redirect(start_response, f"/rollouts/{quote(rollout_id)}?{urlencode({'done': action})}")

    def _audit(self, token: OperatorTokenRecord, arguments: str, outcome: str, message: str) -> None:
        try:
            self.data.store.add_audit(AuditRecord(at_ms=int(time.time() * 1000), token_id=token.token_id,
                                                  role=token.role, method="ChangeRollout", arguments=arguments,
                                                  outcome=outcome, message=message))
        except Exception:
            log.exception("dashboard audit write failed", extra={"token_id": token.token_id})

    def _events(self, session: LoginSession, page_path: str, start_response: StartResponse) -> Iterable[bytes]:
        split = urlsplit(page_path)
        query = {k: v[0] for k, v in parse_qs(split.query).items()}
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                                  *SECURITY_HEADERS])
        return self._stream(session, split.path or "/", query)

    def _stream(self, session: LoginSession, path: str, query: dict[str, str]) -> Iterator[bytes]:
        """Re-render the page's live part each interval and send it when it changed; a keep-alive
        otherwise, so a closed tab shows up as a failed write within an interval or two."""
        ends = time.monotonic() + STREAM_MAX_S
        last = ""
        while not self.stopping.is_set() and time.monotonic() < ends:
            current = self.sessions.lookup(session.session_id)
            if current is None:
                yield b"event: gone\ndata: login\n\n"
                return
            try:
                page = self.render(path, query, _viewer(*current))
            except PageNotFound:
                page = None
            except Exception:  # a store read failing mid-shutdown, say: end the stream, the browser retries
                log.exception("dashboard stream render failed", extra={"path": path})
                return
            live = page.live if page is not None else ""
            if live and live != last:
                last = live
                yield ("".join(f"data: {line}\n" for line in live.splitlines()) + "\n").encode()
            else:
                yield b": keep-alive\n\n"
            if self.stopping.wait(STREAM_INTERVAL_S):
                return

    def _layout(self, page: Page, viewer: Viewer, path: str, query: dict[str, str]) -> str:
        nav = "".join(f'<a href="{href}"{" class=current" if href == path else ""}>{name}</a>' for href, name in NAV)
        flash = ""
        if query.get("error"):
            flash = f'<p class="error" id="flash">{escape(query["error"])}</p>'
        elif query.get("done"):
            flash = f'<p class="ok" id="flash">{escape(query["done"])}: done</p>'
        events = ""
        if page.live and path:
            page_path = path + ("?" + urlencode(query) if query else "")
            events = f' data-events="/events?{escape(urlencode({"path": page_path}))}"'
        return (f'<!doctype html><html><head><meta charset="utf-8"><title>{escape(page.title)} · EdgeFleet</title>'
                '<link rel="stylesheet" href="/static/dashboard.css"><script src="/static/dashboard.js" defer>'
                f'</script></head><body><header><b>EdgeFleet</b> {nav}<span class="who">role '
                f'<b id="role">{escape(viewer.role)}</b><form method="post" action="/logout">'
                f'<input type="hidden" name="csrf" value="{escape(viewer.csrf)}"><button type="submit" id="logout">'
                f"log out</button></form></span></header><main><h1>{escape(page.title)}</h1>{flash}{page.static}"
                f'<div id="live"{events}>{page.live}</div></main></body></html>')

    def _static(self, name: str, start_response: StartResponse) -> Iterable[bytes]:
        if "/" in name or name.startswith("."):
            return self._send(start_response, "404 Not Found", b"not found\n")
        try:
            body = resources.files("edgefleet.controller.dashboard").joinpath("static", name).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return self._send(start_response, "404 Not Found", b"not found\n")
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return self._send(start_response, "200 OK", body, kind, [("Cache-Control", "max-age=300")])

    def _html(self, start_response: StartResponse, status: str, body: str) -> Iterable[bytes]:
        return self._send(start_response, status, body.encode(), "text/html; charset=utf-8",
                          [("Cache-Control", "no-store")])

    @staticmethod
    def _send(start_response: StartResponse, status: str, body: bytes, kind: str = "text/plain; charset=utf-8",
              extra: list[tuple[str, str]] | None = None) -> Iterable[bytes]:
        start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body))), *SECURITY_HEADERS,
                                *(extra or [])])
        return [body]

    @staticmethod
    def _redirect(start_response: StartResponse, location: str, cookie: str = "") -> Iterable[bytes]:
        headers = [("Location", location), ("Content-Length", "0"), *SECURITY_HEADERS]
        if cookie:
            headers.append(("Set-Cookie", cookie))
        start_response("303 See Other", headers)
        return [b""]


def _viewer(session: LoginSession, token: OperatorTokenRecord) -> Viewer:
    can_act = OperatorRole.parse(token.role).includes(CONTROL_METHOD_ACCESS["ChangeRollout"].role)
    return Viewer(can_act=can_act, csrf=session.csrf, role=token.role)


def _cookie(value: str, max_age_s: int) -> str:
    return f"{COOKIE_NAME}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}"


def _read_form(environ: dict[str, Any]) -> dict[str, str]:
    try:
        length = min(int(environ.get("CONTENT_LENGTH") or 0), MAX_FORM_BYTES)
    except ValueError:
        length = 0
    body = environ["wsgi.input"].read(length).decode("utf-8", "replace") if length else ""
    return {k: v[0] for k, v in parse_qs(body).items()}
