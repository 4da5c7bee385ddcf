"""The dashboard without a browser: sessions and CSRF, the redirects, stream endings, 10,000 devices.

The browser tests (tests/integration/test_dashboard.py) cover the pages with a real fleet.
"""

from __future__ import annotations

import dataclasses
import io
import time
from typing import Any
from wsgiref.util import setup_testing_defaults

from edgefleet.controller.dashboard.app import Dashboard
from edgefleet.controller.dashboard.sessions import LoginSessions, csrf_matches
from edgefleet.controller.dashboard.views import PAGE_SIZE, DashboardData
from edgefleet.controller.fleet import credentials as auth
from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.store.base import DeviceRecord, LoginSessionRecord, OperatorTokenRecord
from edgefleet.controller.telemetry.ingest import LiveTelemetry

ADMIN, VIEWER = "efo_admin-secret", "efo_viewer-secret"


class FleetStore:
    """Just what the dashboard's fleet and device list read, at any size."""

    def __init__(self, devices: int = 3) -> None:
        classes = ("x86_64-avx2", "arm64-dotprod", "cuda-sm87")
        self.devices = [DeviceRecord(f"dev-{i:05d}", "", {"site": f"s{i % 7}"}, 0, hardware_class=classes[i % 3],
                                     model="det", model_version=1 + i % 2) for i in range(devices)]
        self.logins: dict[str, LoginSessionRecord] = {}
        self.tokens = {auth.digest(ADMIN): OperatorTokenRecord("opt-a", auth.digest(ADMIN), "admin", 0),
                       auth.digest(VIEWER): OperatorTokenRecord("opt-v", auth.digest(VIEWER), "viewer", 0)}

    def list_devices(self) -> list[DeviceRecord]:
        return list(self.devices)

    def latest_telemetry(self) -> dict[str, Any]:
        return {}

    def list_rollouts(self, active_only: bool = False) -> list[Any]:
        return []

    def list_commands(self, **_: str) -> list[Any]:
        return []

    def get_operator_token(self, token_hash: str) -> OperatorTokenRecord | None:
        return self.tokens.get(token_hash)

    def add_login_session(self, record: LoginSessionRecord, now_ms: int, max_sessions: int) -> None:
        self.logins[record.session_hash] = record

    def get_login_session(self, session_hash: str) -> LoginSessionRecord | None:
        return self.logins.get(session_hash)

    def delete_login_session(self, session_hash: str) -> None:
        self.logins.pop(session_hash, None)


def dashboard(devices: int = 3) -> tuple[Dashboard, FleetStore]:
    store = FleetStore(devices)
    data = DashboardData(store, PresenceTracker(store, 5.0), LiveTelemetry())  # type: ignore[arg-type]
    return Dashboard(data, LoginSessions(store)), store  # type: ignore[arg-type]


def call(app: Dashboard, path: str, method: str = "GET", body: str = "", cookie: str = "") -> tuple[str, dict, bytes]:
    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": method, "HTTP_COOKIE": cookie,
                               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body.encode())}
    setup_testing_defaults(environ)
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, dict(headers)

    chunks = app(environ, start_response)
    first = next(iter(chunks), b"")
    return seen["status"], seen["headers"], first


def test_pages_redirect_to_login_and_a_wrong_token_is_refused_with_a_message() -> None:
    app, _ = dashboard()
    status, headers, _ = call(app, "/devices")
    assert status.startswith("303") and headers["Location"] == "/login"
    status, _, body = call(app, "/events")
    assert status.startswith("401") and b"event: gone" in body
    status, _, body = call(app, "/login", "POST", "token=efo_wrong")
    assert status.startswith("401") and b"not valid" in body


def test_login_sets_a_session_cookie_not_the_token_and_posts_need_the_csrf_token() -> None:
    app, store = dashboard()
    status, headers, _ = call(app, "/login", "POST", f"token={VIEWER}")
    cookie = headers["Set-Cookie"]
    assert status.startswith("303") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert VIEWER not in cookie
    session_cookie = cookie.split(";")[0]
    status, _, body = call(app, "/", cookie=session_cookie)
    assert status.startswith("200") and b"of 3 online" in body
    status, _, _ = call(app, "/rollouts/ro-1/action", "POST", "action=pause", cookie=session_cookie)
    assert status.startswith("403")  # no CSRF token
    session = next(iter(store.logins.values()))
    assert csrf_matches(session, session.csrf) and not csrf_matches(session, "")
    status, _, body = call(app, "/rollouts/ro-1/action", "POST", f"action=pause&csrf={session.csrf}",
                           cookie=session_cookie)
    assert status.startswith("403") and b"role viewer" in body  # a viewer may not, even with the token
    # Revoking the token ends its dashboard sessions at once.
    token = store.tokens[auth.digest(VIEWER)]
    store.tokens[auth.digest(VIEWER)] = dataclasses.replace(token, revoked_at_ms=1)
    status, headers, _ = call(app, "/", cookie=session_cookie)
    assert status.startswith("303") and headers["Location"] == "/login"


def test_an_open_stream_ends_within_an_interval_of_stop() -> None:
    app, _ = dashboard()
    session = app.sessions.login(ADMIN)
    stream = app._stream(session, "/", {})
    assert next(stream).startswith(b"data: ")
    app.stop()
    started = time.monotonic()
    assert list(stream) == []
    assert time.monotonic() - started < 0.5


def test_the_device_list_pages_10000_devices_fast() -> None:
    app, _ = dashboard(10_000)
    started = time.monotonic()
    page = app.data.devices({"class": "arm64-dotprod", "label": "site=s3", "page": "2"})
    took = time.monotonic() - started
    assert page.live.count('<a href="/devices/dev-') == PAGE_SIZE
    assert "476 devices, page 2 of 10" in page.live, page.live[:200]
    assert took < 1.0, f"{took:.2f}s for one page of 10,000 devices"
    started = time.monotonic()
    app.data.devices({"q": "dev-0999"})
    assert time.monotonic() - started < 0.2  # the joined list is cached for the next second


def test_a_closed_tab_ends_its_stream_thread_within_a_few_seconds() -> None:
    import http.client
    import threading
    from wsgiref.simple_server import make_server

    from edgefleet.controller.api.http_server import _QuietHandler, _ThreadingWSGIServer

    app, _ = dashboard()
    session = app.sessions.login(ADMIN)
    server = make_server("127.0.0.1", 0, app, _ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        before = threading.active_count()
        conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=5)
        conn.request("GET", "/events?path=/", headers={"Cookie": f"edgefleet_session={session.session_id}"})
        reply = conn.getresponse()
        assert reply.status == 200 and reply.readline().startswith(b"data: ")
        assert threading.active_count() == before + 1  # the stream's request thread
        reply.close()
        conn.close()  # the tab goes away
        deadline = time.monotonic() + 5
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() == before, "the stream's thread outlived its closed connection"
    finally:
        app.stop()
        server.shutdown()
        server.server_close()
