"""Assemble and run one controller: store, handlers, the gRPC server and the HTTP endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from edgefleet.common.durable_files import atomic_write_json
from edgefleet.controller import __version__
from edgefleet.controller.api.control_grpc import ControlServicer, OperatorAuthInterceptor
from edgefleet.controller.api.control_server import ControlServer
from edgefleet.controller.api.fleet_grpc import FleetServicer, add_fleet_servicer
from edgefleet.controller.api.http_server import HttpApi
from edgefleet.controller.api.mqtt_bridge import MqttBridge, MqttOptions, broker_auth, replica_client_id  # issue 7
from edgefleet.controller.fleet import credentials as auth
from edgefleet.controller.fleet.certificates import DEFAULT_CERT_LIFETIME_S, DEFAULT_TLS_SANS, DeviceCA, fingerprint
from edgefleet.controller.fleet.commands import CommandDispatcher
from edgefleet.controller.fleet.device_identity import DeviceIdentities
from edgefleet.controller.fleet.device_measure import DeviceMeasure
from edgefleet.controller.fleet.enrollment import Enrollment
from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.fleet.sessions import DeviceSessions
from edgefleet.controller.rollouts.engine import RolloutEngine
from edgefleet.controller.rollouts.signing import ensure_signing_key, trusted_public_pems
from edgefleet.controller.singletons import SingletonLease
from edgefleet.controller.store import open_store
from edgefleet.controller.store.artifacts import ArtifactStore
from edgefleet.controller.store.base import Store
from edgefleet.controller.telemetry.ingest import LiveTelemetry, TelemetryIngest, TelemetryMetrics, compute_rollups
from edgefleet.controller.telemetry.live_share import SNAPSHOT_INTERVAL_S, SharedLiveTelemetry, SharedSessionCounts
from edgefleet.controller.telemetry.metrics import DEFAULT_PER_DEVICE_CAP
from edgefleet.protos.capability import CAPABILITY_VERSION
from edgefleet.protos.v1 import control_pb2, control_pb2_grpc

log = logging.getLogger("edgefleet.controller")

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
ENDPOINT_FILE = "controller.json"
# Stopping: open RPCs get RPC_GRACE_S to finish, a periodic job in a store write JOB_STOP_S, the
# MQTT bridge MQTT_STOP_S to disconnect. Together well inside the 2 s a supervisor is promised.
RPC_GRACE_S = 0.5
JOB_STOP_S = 0.5
MQTT_STOP_S = 0.5
# How often each process looks in the store for commands another one issued to a stream it holds,
# and for devices another one revoked whose stream it holds.
PENDING_COMMANDS_S = 0.5
# A minute is rolled up once it has been over this long (batches cut in it are still arriving).
ROLLUP_GRACE_S = 10.0
# Worker ids a start clears stale sessions of (`--workers` is at most this).
MAX_WORKERS = 32
WORKERS_DIR = "workers"  # STATE_DIR/workers: the workers' shared metrics and live telemetry
# What one process serves. A lone controller serves everything. With TLS and --workers N, the
# supervisor runs N device workers (the device port, HTTP, MQTT, ingest, the lease) and one Control
# process (--grpc alone), so that no operator call shares an interpreter with the ingest (issue 18).
ROLE_ALL = "all"
ROLE_DEVICES = "devices"
ROLE_CONTROL = "control"


class BindError(Exception):
    """A listen address could not be bound; the message says which and how to fix it."""


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    state_dir: Path
    grpc_address: str = "127.0.0.1:50051"
    http_address: str | None = "127.0.0.1:8480"
    heartbeat_interval_s: float = 5.0
    telemetry_retention_s: float = 24 * 3600
    rollup_retention_s: float = 30 * 24 * 3600
    rollup_interval_s: float = 10.0
    mqtt_url: str | None = None  # MQTT transport (issue 7): mqtt[s]://ADMIN:PASSWORD@HOST:PORT
    mqtt: MqttOptions = dataclasses.field(default_factory=MqttOptions)
    store_url: str | None = None  # postgresql://... for shared-state replicas; None: STATE_DIR/controller.db
    # Device identity. TLS unless `insecure`: `grpc_address` is server-authenticated TLS (Control,
    # Enroll, the move of secret-only devices), `device_grpc_address` mutual TLS (Session,
    # FetchArtifact, renewal); None: the port after --grpc's.
    insecure: bool = False
    device_grpc_address: str | None = None
    tls_sans: tuple[str, ...] = DEFAULT_TLS_SANS
    cert_lifetime_s: float = DEFAULT_CERT_LIFETIME_S
    metrics_per_device: int | None = DEFAULT_PER_DEVICE_CAP  # devices with per-device /metrics series; None: all
    # Set by the supervisor (controller/supervisor.py) in each of its worker processes: the index,
    # and the supervisor's pid (the worker stops when it is gone). Workers share the ports.
    worker_index: int | None = None
    supervisor_pid: int = 0
    role: str = ROLE_ALL  # ROLE_DEVICES or ROLE_CONTROL in a supervisor's workers with TLS

    def device_address(self) -> str:
        if self.device_grpc_address:
            return self.device_grpc_address
        host, port = split_address(self.grpc_address)
        return f"{host}:{port + 1 if port else 0}"


def worker_replica_id(grpc_address: str, index: int | None) -> str:
    """A process's replica id: what its device rows' connected_by, its MQTT client id and its lease name."""
    base = replica_client_id(grpc_address)
    return base if index is None else f"{base}-w{index}"


def prepare_state_dir(config: ControllerConfig) -> None:
    """What the first start creates (schema, operator token, signing key, CA, broker logins), done
    once before worker processes start, so they never race to create it; and every session a
    previous run of this controller (any worker count) left marked open is closed."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(config.store_url or config.state_dir / "controller.db")
    try:
        auth.ensure_operator_token(store, config.state_dir)
        ensure_signing_key(config.state_dir)
        if not config.insecure:
            DeviceCA(config.state_dir, cert_lifetime_s=config.cert_lifetime_s, tls_sans=config.tls_sans)
        if config.mqtt_url:
            broker_auth(config.mqtt_url, config.mqtt, config.state_dir)
        reset_previous_sessions(store, config.grpc_address)
    finally:
        store.close()


def reset_previous_sessions(store: Store, grpc_address: str) -> int:
    """Close the sessions this controller's processes (single or workers) held before a restart."""
    owners = [worker_replica_id(grpc_address, None)] + [worker_replica_id(grpc_address, i) for i in range(MAX_WORKERS)]
    return sum(store.reset_connections(owner) for owner in owners)


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{address!r} is not HOST:PORT, e.g. 127.0.0.1:50051")
    return host.strip("[]"), int(port)


class Controller:
    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = open_store(config.store_url or config.state_dir / "controller.db")
        # Streams this replica held before a restart are gone; other replicas' are not. A worker
        # clears only its own: its peers' streams are alive (the supervisor cleared the rest).
        self.worker = config.worker_index
        self.replica = worker_replica_id(config.grpc_address, self.worker)
        if self.worker is None:
            stale = reset_previous_sessions(self.store, config.grpc_address)
        else:
            stale = self.store.reset_connections(self.replica)
        if stale:
            log.info("cleared stale sessions from a previous run", extra={"devices": stale})
        self.operator_token_path = auth.ensure_operator_token(self.store, config.state_dir)
        logins = broker_auth(config.mqtt_url, config.mqtt, config.state_dir) if config.mqtt_url else None  # issue 7
        self.enrollment = Enrollment(self.store, mqtt_logins=logins)
        self.presence = PresenceTracker(self.store, config.heartbeat_interval_s, owner=self.replica)
        self.presence.revoked.update(d.device_id for d in self.store.list_devices() if d.revoked)
        self.artifacts = ArtifactStore(config.state_dir / "artifacts")
        self.signing_key = ensure_signing_key(config.state_dir)
        self.ca: DeviceCA | None = None
        self.identities: DeviceIdentities | None = None
        if not config.insecure:
            self.ca = DeviceCA(config.state_dir, cert_lifetime_s=config.cert_lifetime_s, tls_sans=config.tls_sans)
            self.identities = DeviceIdentities(self.store, self.ca)
            # What an operator checks a device's copy of ca.pem against (also `edgefleet ca show`).
            log.info("device CA", extra={"ca": str(config.state_dir / "ca.pem"), "sha256": fingerprint(self.ca.active),
                                         "tls_san": ",".join(config.tls_sans)})
        self.device_port = 0
        self.commands = CommandDispatcher(self.store, self.presence)
        self.rollouts: RolloutEngine | None = None
        registry = CollectorRegistry()
        self.live: LiveTelemetry = LiveTelemetry()
        self.shared_live: SharedLiveTelemetry | None = None
        self.session_counts: SharedSessionCounts | None = None
        exposed = registry
        self.serves_devices = config.role in (ROLE_ALL, ROLE_DEVICES)
        if self.worker is not None and self.serves_devices:
            # Counters and histograms go to prometheus_client's multiprocess files (the supervisor
            # set PROMETHEUS_MULTIPROC_DIR), and /metrics in any worker sums every worker's; the
            # live view is merged from the workers' snapshot files (telemetry/live_share.py).
            from prometheus_client import multiprocess

            exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(exposed)
            self.shared_live = SharedLiveTelemetry(config.state_dir / WORKERS_DIR / "live", self.worker)
            if self.shared_live.restore():
                log.info("live telemetry restored from the previous worker")  # `worker=` is on every line
            self.live = self.shared_live
            self.session_counts = SharedSessionCounts(config.state_dir / WORKERS_DIR / "live", self.worker)
        self.ingest = TelemetryIngest(self.store, TelemetryMetrics(registry))
        self.ingest.listeners.append(self.live)
        # The one device-session layer both transports translate to and from.
        self.sessions = DeviceSessions(self.store, self.enrollment, self.presence, self.ingest, self.commands,
                                       self.artifacts, config.heartbeat_interval_s)
        self.mqtt: MqttBridge | None = None  # MQTT transport (issue 7)
        # The Control process holds no device session, MQTT's included: a command it issues to an
        # MQTT device is sent by the worker holding that device, from the store (within 0.5 s).
        if config.mqtt_url and logins is not None and self.serves_devices:
            self.mqtt = MqttBridge(config.mqtt_url, config.mqtt, sessions=self.sessions, auth=logins,
                                   default_client_id=self.replica)
            self.commands.issue_listeners.append(self.mqtt.publish_desired)
        counts = self.session_counts
        self.http = HttpApi(self.store, self.presence, self.live, exposed,
                            metrics_per_device=config.metrics_per_device,
                            fleet_sessions=(lambda: counts.total(self.presence.online_count())) if counts else None)
        self.started_at_ms = int(time.time() * 1000)
        self.grpc_port = 0
        self.http_port = 0
        self._server: grpc.aio.Server | None = None
        self._control: ControlServer | None = None  # with TLS: Control's own server, thread and loop
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._ingest_task: asyncio.Task[None] | None = None
        self.lease = SingletonLease(self.store, self.replica, self._singletons)

    async def start(self) -> None:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # A second controller on the same port must fail, not share; the workers of one
            # controller share it (its supervisor holds the port so that no other can).
            ("grpc.so_reuseport", 0 if self.worker is None else 1),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        server = grpc.aio.server(interceptors=[OperatorAuthInterceptor(self.store)], options=options)
        info = control_pb2.ControllerInfo(
            version=__version__,
            capability_version=CAPABILITY_VERSION,
            store_backend=self.store.backend_name,
            heartbeat_interval_ms=int(self.config.heartbeat_interval_s * 1000),
            started_at_unix_ms=self.started_at_ms,
        )
        host, _ = split_address(self.config.grpc_address)
        rollouts = self._rollout_engine()  # on this loop, the fleet's
        fleet_loop = asyncio.get_running_loop()
        def control_servicer(loop: asyncio.AbstractEventLoop | None) -> ControlServicer:
            return ControlServicer(self.store, self.enrollment, self.presence, info, self.artifacts, self.commands,
                                   rollouts, self.device_measure, identities=self.identities, fleet_loop=loop)

        if self.config.role == ROLE_CONTROL:
            # The Control process: --grpc alone, on this loop, where no device stream runs. It holds
            # no session, so what a handler changes reaches the devices through the store: commands
            # are sent by the worker holding the stream, rollouts moved by the lease holder, a
            # revocation ended by each worker's sweep (all within about half a second).
            self.grpc_port = self._bind(server, self.config.grpc_address, "--grpc", client_auth=False)
            self.device_port = split_address(self.config.device_address())[1]  # the device workers', told at Enroll
            add_fleet_servicer(self._fleet_servicer(), server)  # Enroll and renewal; no Session without a client cert
            control_pb2_grpc.add_ControlServicer_to_server(control_servicer(None), server)
        elif self.ca is not None:
            # TLS: devices stream on the device port, and --grpc (Control, Enroll, the move of
            # secret-only devices) is served apart: by the supervisor's Control process (ROLE_CONTROL)
            # when there are workers, else on a server, thread and loop of its own in this process,
            # so that an operator's call never waits for the turns of a loop busy with ingest
            # (control_server.py). No client certificate is asked for on it, so no Session stream
            # can run there.
            self.device_port = self._bind(server, self.config.device_address(), "--device-grpc", client_auth=True)
            fleet = self._fleet_servicer()
            add_fleet_servicer(fleet, server)
            if self.config.role == ROLE_DEVICES:
                self.grpc_port = split_address(self.config.grpc_address)[1]  # the Control process's
            else:
                def setup_control(control_server: grpc.aio.Server) -> int:
                    add_fleet_servicer(fleet, control_server)
                    control_pb2_grpc.add_ControlServicer_to_server(control_servicer(fleet_loop), control_server)
                    return self._bind(control_server, self.config.grpc_address, "--grpc", client_auth=False)

                self._control = ControlServer([OperatorAuthInterceptor(self.store)], options, setup_control)
                try:
                    self.grpc_port = await asyncio.to_thread(self._control.start)
                except BindError:
                    await server.stop(None)
                    raise
        else:  # --insecure: devices and operators share --grpc, so one server on this loop serves both
            self.grpc_port = self._bind(server, self.config.grpc_address, "--grpc", client_auth=False)
            self.device_port = self.grpc_port
            add_fleet_servicer(self._fleet_servicer(), server)
            control_pb2_grpc.add_ControlServicer_to_server(control_servicer(None), server)
        assert self.rollouts is not None  # made with the servicers, on this loop
        self.http.dashboard.bind_rollouts(self.rollouts.set_state, asyncio.get_running_loop(),
                                          self.rollouts.device_metrics)
        if self.config.http_address:
            http_host, http_port = split_address(self.config.http_address)
            try:
                self.http_port = self.http.start(http_host, http_port, share_port=self.worker is not None)
            except OSError as exc:
                await server.stop(None)
                if self._control is not None:
                    await self._control.stop(0)
                raise BindError(
                    f"cannot listen for HTTP on {self.config.http_address}: {exc.strerror}; "
                    "pick another with --http HOST:PORT or turn it off with --http off"
                ) from None
        if self.mqtt is not None:  # issue 7
            await self.mqtt.start()
        await server.start()
        self._server = server
        assert self.rollouts is not None  # made with the servicers, on this loop
        if self.serves_devices:
            self._ingest_task = asyncio.create_task(self.ingest.run())
            await self.lease.step()  # a lone controller (or the first worker) runs its rollouts at once
            self._tasks = [
                self._ingest_task,
                asyncio.create_task(self.lease.run(self._stopping)),
                asyncio.create_task(self._flush_presence()),
                asyncio.create_task(self._expire_silent_sessions()),
                asyncio.create_task(self._deliver_pending_commands()),
            ]
        # else the Control process: no stream, no telemetry, never the lease holder (the rollout
        # engine and the rollups belong with the device workers' CPU, not beside operator calls).
        if self.shared_live is not None:
            self._tasks.append(asyncio.create_task(self._share_live_telemetry()))
        endpoint = {
            "grpc": f"{host}:{self.grpc_port}",
            "device_grpc": f"{split_address(self.config.device_address())[0]}:{self.device_port}",
            "tls": self.ca is not None,
            "http": f"{split_address(self.config.http_address)[0]}:{self.http_port}"
            if self.config.http_address and self.http_port else "",
            "pid": os.getpid(),
            "role": self.config.role,
        }
        self.endpoint = endpoint
        if self.worker is None:  # a worker's supervisor writes the one file for all of them
            atomic_write_json(self.config.state_dir / ENDPOINT_FILE, endpoint)
            log.info("controller listening", extra=endpoint)
        else:
            log.info("worker listening", extra=endpoint)

    def _bind(self, server: grpc.aio.Server, address: str, option: str, *, client_auth: bool) -> int:
        """Listen on `address`: plaintext under --insecure, else TLS with the CA's server certificate,
        asking for a client certificate of the CA where `client_auth` (the device port)."""
        try:
            if self.ca is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, self.ca.server_credentials(require_client_auth=client_auth))
        except RuntimeError:
            port = 0
        if not port:
            raise BindError(f"cannot listen for gRPC on {address}: address in use or not local; "
                            f"pick another with {option} HOST:PORT")
        return port

    def _fleet_servicer(self) -> FleetServicer:
        keys = trusted_public_pems(self.config.state_dir, self.signing_key)
        return FleetServicer(self.enrollment, self.sessions, keys, identities=self.identities,
                             device_port=self.device_port)

    def _rollout_engine(self) -> RolloutEngine:
        self.device_measure = DeviceMeasure(self.store, self.presence, self.artifacts, self.commands,
                                            asyncio.get_running_loop())
        self.rollouts = RolloutEngine(
            self.store, self.presence, self.commands, self.artifacts, self.signing_key,
            self.config.state_dir / "compile-cache", device_measurers=self.device_measure.measurer_factory,
        )
        return self.rollouts

    def _singletons(self, stopping: asyncio.Event) -> list[Coroutine[Any, Any, None]]:
        """What only the lease holder runs (controller/singletons.py): the rollout engine, and the
        rollups and retention, which touch every device's telemetry."""
        assert self.rollouts is not None
        return [
            _until(stopping, self.rollouts.run()),  # it has no stop of its own; it stops at an await
            self._every(self.config.rollup_interval_s, self._maintain_telemetry, "rollups", stopping),
        ]

    async def _running_after(self, seconds: float, stopping: asyncio.Event | None = None) -> bool:
        """Wait `seconds`; False at once when the controller is stopping, so a periodic job ends
        between two runs rather than being cancelled inside one (its thread would go on alone)."""
        stopping = stopping or self._stopping
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)
        return not stopping.is_set() and not self._stopping.is_set()

    async def _deliver_pending_commands(self) -> None:
        """Send the commands that another worker or replica issued to a stream held here, and end
        the streams held here of devices another one revoked (it could end only its own)."""
        while await self._running_after(PENDING_COMMANDS_S):
            try:
                devices = await asyncio.to_thread(self.store.devices_with_pending_commands, self.replica)
                for device_id in devices:
                    if self.presence.sender(device_id) is not None:
                        self.commands.deliver_open(device_id)
            except Exception:
                log.exception("periodic job failed", extra={"job": "pending commands"})
            try:
                for device_id in await asyncio.to_thread(self.store.revoked_streams, self.replica):
                    if self.presence.end_revoked(device_id):
                        log.warning("stream of a device revoked elsewhere ended", extra={"device": device_id})
            except Exception:
                log.exception("periodic job failed", extra={"job": "revoked streams"})

    async def _share_live_telemetry(self) -> None:
        """A worker's live view, written for its peers' /metrics and dashboard (telemetry/live_share.py)."""
        assert self.shared_live is not None and self.session_counts is not None
        while await self._running_after(SNAPSHOT_INTERVAL_S):
            try:
                await asyncio.to_thread(self.shared_live.write)
                self.session_counts.write(self.presence.online_count())  # a few bytes, when it changed
            except Exception:
                log.exception("periodic job failed", extra={"job": "live telemetry snapshot"})

    async def _flush_presence(self) -> None:
        """last_seen to the store in one batch per interval: taken on the loop, written off it."""
        while await self._running_after(self.presence.flush_interval_s):
            try:
                await asyncio.to_thread(self.store.touch_devices, self.presence.take_dirty())
            except Exception:
                log.exception("periodic job failed", extra={"job": "presence flush"})

    async def _expire_silent_sessions(self) -> None:
        """On the event loop (the sessions live there), a few times per heartbeat interval."""
        interval = min(1.0, max(0.05, self.config.heartbeat_interval_s / 4))
        while await self._running_after(interval):
            expired = self.presence.expire_silent()
            if expired:
                log.info("ended silent sessions", extra={"sessions": expired})

    async def _every(self, interval_s: float, job: Callable[[], object], name: str,
                     stopping: asyncio.Event | None = None) -> None:
        """Run `job` at once, then every `interval_s`: after a restart the first run catches up."""
        while True:
            try:
                await asyncio.to_thread(job)
            except Exception:
                log.exception("periodic job failed", extra={"job": name})
            if not await self._running_after(interval_s, stopping):
                return

    def _maintain_telemetry(self) -> None:
        now_ms = int(time.time() * 1000)
        compute_rollups(self.store, closed_before_ms=now_ms - int(ROLLUP_GRACE_S * 1000))
        self.store.prune_telemetry(
            now_ms - int(self.config.telemetry_retention_s * 1000), now_ms - int(self.config.rollup_retention_s * 1000)
        )

    async def stop(self, grace_s: float = RPC_GRACE_S) -> None:
        """Stop within about a second, with what was acked durable and presence written.

        The gRPC server refuses new calls at once and gives open ones `grace_s`: a Session stream
        never ends by itself, so that grace is always spent, and the queued telemetry is stored
        meanwhile, its acks going out on the streams still open. Periodic jobs end between runs;
        one stuck in a store write is waited for JOB_STOP_S, then left (nothing of it was acked).
        The closing streams' offline marks are queued by presence and written in batches (the
        last one by `presence.flush` below), not one store write per stream (~2.5 s at 10,000)."""
        started = time.monotonic()
        self._stopping.set()
        rpcs = asyncio.create_task(self._server.stop(grace_s)) if self._server else None
        control = asyncio.create_task(self._control.stop(grace_s)) if self._control else None
        singletons = asyncio.create_task(self.lease.stop_singletons(JOB_STOP_S))
        jobs = [t for t in self._tasks if t is not self._ingest_task] + [singletons]
        _, stuck = await asyncio.wait(jobs, timeout=JOB_STOP_S) if jobs else (set(), set())
        for task in stuck:  # a job still in a store write: nothing of it was acked
            task.cancel()
        if stuck:
            await asyncio.wait(stuck, timeout=JOB_STOP_S)
        if rpcs is not None:
            await rpcs  # the sessions' handlers have run their `finally`: presence marked offline
        if control is not None:
            await control
        self.ingest.close()
        if self._ingest_task is not None and not (await asyncio.wait([self._ingest_task], timeout=JOB_STOP_S))[0]:
            log.warning("telemetry write still running at stop; its batches were not acked and will be resent")
        await self.ingest.flush()  # what MQTT delivered meanwhile; its acks still go out on the bridge
        if self.mqtt is not None:  # issue 7: after the flush, so its telemetry acks still go out
            try:
                await asyncio.wait_for(self.mqtt.stop(), MQTT_STOP_S)
            except asyncio.TimeoutError:
                log.warning("MQTT bridge did not stop in time; its connection is dropped",
                            extra={"timeout_s": MQTT_STOP_S})
        self.presence.flush()
        await self.lease.release(JOB_STOP_S)
        if self.shared_live is not None:
            with contextlib.suppress(Exception):
                self.shared_live.write()  # what a worker restarted in this one's place starts from
        # No rollups here: the minutes that need one are marked in the store with the raw points,
        # and the maintenance job's first run after the restart builds them. At 1,000 devices
        # building them here took half a second of the stop.
        self.http.stop()
        if self.worker is None:
            with contextlib.suppress(FileNotFoundError):
                (self.config.state_dir / ENDPOINT_FILE).unlink()
        self.store.close()
        log.info("controller stopped", extra={"took_s": round(time.monotonic() - started, 3)})


async def _until(stopping: asyncio.Event, job: Coroutine[Any, Any, None]) -> None:
    """Run `job` until it returns or `stopping` is set; then cancel it."""
    task = asyncio.create_task(job)
    waiter = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, waiter):
            t.cancel()
        await asyncio.wait([task, waiter])


async def _watch_supervisor(pid: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor is gone (SIGKILLed) stops too, rather than serving on alone."""
    while not stop.is_set():
        if os.getppid() != pid:
            log.warning("supervisor gone; worker stopping", extra={"supervisor_pid": pid})
            stop.set()
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def serve(config: ControllerConfig, ready: Callable[[dict[str, object]], None] | None = None) -> None:
    """Run one controller process until SIGINT/SIGTERM; `ready` is called with its endpoint once it serves."""
    controller = Controller(config)
    try:
        await controller.start()
    except BindError:
        controller.store.close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watch = asyncio.create_task(_watch_supervisor(config.supervisor_pid, stop)) if config.supervisor_pid else None
    if ready is not None:
        ready(controller.endpoint)
    await stop.wait()
    if watch is not None:
        await watch
    log.info("stopping", extra={"grace_s": RPC_GRACE_S})
    await controller.stop()


def read_endpoint(state_dir: Path) -> dict[str, object] | None:
    try:
        data = json.loads((state_dir / ENDPOINT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
