"""The controller's HTTP side: /healthz for load balancers, Prometheus /metrics and the dashboard.

Served by the standard library's WSGI server on a thread, so the gRPC event loop never waits on it.
"""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from edgefleet.controller.dashboard.app import Dashboard
from edgefleet.controller.dashboard.sessions import LoginSessions
from edgefleet.controller.dashboard.views import DashboardData
from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.store.base import Store
from edgefleet.controller.telemetry.ingest import LiveTelemetry
from edgefleet.controller.telemetry.metrics import DEFAULT_PER_DEVICE_CAP, FleetCollector, TelemetryCollector


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _SharedPortWSGIServer(_ThreadingWSGIServer):
    """For the worker processes of one controller: each binds the HTTP port with SO_REUSEPORT and the
    kernel spreads connections among them (every worker answers for the whole fleet)."""

    allow_reuse_port = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # access logs would drown the key=value log
        pass


class HttpApi:
    def __init__(self, store: Store, presence: PresenceTracker, live: LiveTelemetry,
                 registry: CollectorRegistry, *, metrics_per_device: int | None = DEFAULT_PER_DEVICE_CAP,
                 fleet_sessions: Callable[[], int] | None = None) -> None:
        """`metrics_per_device`: how many devices /metrics gives per-device series (None: all, 0: none).
        `fleet_sessions`: the streams of every worker of this controller (/healthz); None: this process's."""
        self.registry = registry
        fleet = FleetCollector(store, presence)
        self.registry.register(fleet)  # first: its read of the devices gives the telemetry their classes
        self.registry.register(TelemetryCollector(live, metrics_per_device, fleet.classes))
        self._metrics = make_wsgi_app(self.registry)
        self.presence = presence
        self.fleet_sessions = fleet_sessions or presence.online_count
        # Everything but /metrics and /healthz: those stay open to scrapers and load balancers.
        self.dashboard = Dashboard(DashboardData(store, presence, live), LoginSessions(store))
        self._server: WSGIServer | None = None

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return self._metrics(environ, start_response)
        if path == "/healthz":
            # `sessions`: the whole controller's (every worker's); `process_sessions`: this process's.
            body = json.dumps({"status": "ok", "sessions": self.fleet_sessions(),
                               "process_sessions": self.presence.online_count()}).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        return self.dashboard(environ, start_response)

    def start(self, host: str, port: int, *, share_port: bool = False) -> int:
        """Bind and serve on a daemon thread; returns the bound port (0 picks a free one).
        `share_port`: SO_REUSEPORT, for worker processes that serve one port together."""
        server_class = _SharedPortWSGIServer if share_port else _ThreadingWSGIServer
        self._server = make_server(host, port, self.app, server_class, handler_class=_QuietHandler)
        # A short poll: `stop` waits for the serving loop to notice, and the controller's stop is timed.
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name="http", daemon=True).start()
        return self._server.server_port

    def stop(self) -> None:
        self.dashboard.stop()  # open /events streams end now instead of holding their threads
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
