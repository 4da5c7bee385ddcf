"""`controller serve --workers N`: one controller as N worker processes sharing its ports.

One asyncio process stores about 1,700 batches/s before its event loop, bound by the GIL, runs
out of its one core (tests/bench/bench_ingest.py). Workers multiply that on a many-core host:

  - The supervisor (this module, the process `controller.json` names) prepares the state dir
    once, then *holds* every port: it binds each with SO_REUSEPORT but never listens. Workers bind
    the same ports with SO_REUSEPORT and listen, and the kernel spreads new connections among them;
    a device's Session stream lives in the worker its connection landed on. Before holding a port
    the supervisor binds it once without SO_REUSEPORT, so a port another process holds (another
    controller, single or with workers) fails as before, with the same one-line error.
  - With TLS, --grpc (Control, Enroll, renewal) is served by one more worker of its own, the
    Control process, and the N device workers serve only --device-grpc, HTTP and MQTT. In one
    process the Control thread still waited for the interpreter the ingest keeps busy (ListRollouts
    p95 over 100 ms under load, bench_store_reads); a process of its own has its own interpreter.
    It holds no device session: commands, rollouts and revocations reach the device workers through
    the store. Under --insecure devices and Control share --grpc, so every worker serves both.
  - Workers share the store (SQLite in WAL mode, or PostgreSQL) and the MQTT broker (each its
    own client id under the shared subscription). One of them, elected by a lease in the store,
    runs the rollout engine and the rollups (controller/singletons.py).
  - /metrics and the dashboard are answered by any worker for the whole fleet: counters and
    histograms through prometheus_client's multiprocess mode, the live view from the workers'
    snapshot files (controller/telemetry/live_share.py); `telemetry watch` reads the store.
  - A worker that dies is restarted in its place (logged). Its devices' streams broke with it:
    the agents reconnect, the kernel gives them to a live worker, and the batches it had not acked
    are resent and stored once, by (device, seq).
  - SIGTERM (or SIGINT) is passed to every worker; a worker not gone by WORKER_STOP_S is killed,
    so the whole controller is gone within the 2 s a supervisor is promised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from edgefleet.common.durable_files import atomic_write_json
from edgefleet.controller.server import (
    ENDPOINT_FILE,
    MAX_WORKERS,
    ROLE_ALL,
    ROLE_CONTROL,
    ROLE_DEVICES,
    WORKERS_DIR,
    BindError,
    ControllerConfig,
    prepare_state_dir,
    read_endpoint,
    split_address,
)

log = logging.getLogger("edgefleet.controller.supervisor")

DEFAULT_MAX_WORKERS = 4      # the default --workers: the host's cores, at most this many
WORKER_START_S = 60.0        # a worker that is not serving by then failed to start
WORKER_STOP_S = 1.6          # SIGTERM to SIGKILL: each worker stops in about 1 s (server.py)
RESTART_WINDOW_S = 60.0      # more than MAX_RESTARTS deaths in this window: give up
MAX_RESTARTS = 10


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, DEFAULT_MAX_WORKERS))


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def hold_port(address: str, what: str, hint: str) -> tuple[list[socket.socket], int]:
    """Bind `address` (port 0: a free one) for the workers to share; the sockets and the port.

    Refused, with `hint`, when anything holds the port already: the probe binds without
    SO_REUSEPORT, which fails against any bound socket, shared or not."""
    host, port = split_address(address)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise BindError(f"cannot listen for {what} on {address}: {exc.strerror}; {hint}") from None
    held: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in infos:
            if port == 0 and held:
                sockaddr = (sockaddr[0], held[0].getsockname()[1], *sockaddr[2:])
            probe = socket.socket(family, kind, proto)
            try:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, never a listener
                probe.bind(sockaddr)
                sockaddr = (sockaddr[0], probe.getsockname()[1], *sockaddr[2:])
            except OSError as exc:
                raise BindError(f"cannot listen for {what} on {address}: {exc.strerror}; {hint}") from None
            finally:
                probe.close()
            guard = socket.socket(family, kind, proto)
            guard.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            guard.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            guard.bind(sockaddr)  # bound, never listening: no connection is ever queued here
            held.append(guard)
    except BaseException:
        for s in held:
            s.close()
        raise
    return held, held[0].getsockname()[1]


@dataclasses.dataclass
class Worker:
    index: int
    process: BaseProcess
    ready: Connection
    started_at: float
    role: str = ROLE_ALL
    serving: bool = False


def _worker_main(config: ControllerConfig, log_level: str, ready: Connection) -> None:
    """A worker process: one controller on the shared ports, reporting to its supervisor."""
    from edgefleet.common.logs import setup_logging
    from edgefleet.common.shutdown import run_until_stopped
    from edgefleet.controller.api.mqtt_bridge import MqttConfigError
    from edgefleet.controller.server import serve
    from edgefleet.controller.store import StoreUnavailable

    setup_logging(log_level)
    index = config.worker_index
    make_record = logging.getLogRecordFactory()

    def with_worker(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        record.worker = index
        return record

    logging.setLogRecordFactory(with_worker)
    try:
        run_until_stopped(serve(config, ready=ready.send))
    except (BindError, MqttConfigError, StoreUnavailable) as exc:
        with contextlib.suppress(OSError):
            ready.send({"error": str(exc)})
        sys.exit(2)
    # Stopped, with everything flushed and the store closed. The interpreter's own teardown (gRPC's
    # included) took over a second on a loaded machine, out of the 2 s the whole controller has.
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Supervisor:
    def __init__(self, config: ControllerConfig, workers: int, log_level: str = "info") -> None:
        self.config = config
        self.count = workers
        self.log_level = log_level
        self.workers: dict[int, Worker] = {}
        self.held: list[socket.socket] = []
        self.deaths: list[float] = []
        self._context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self._worker_config: Callable[[int], ControllerConfig] | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._stopped = False

    # -- start ---------------------------------------------------------------------------------
    def _hold_ports(self) -> ControllerConfig:
        """Hold every port; the config the workers get, with each port resolved."""
        config = self.config
        held, grpc_port = hold_port(config.grpc_address, "gRPC", "pick another with --grpc HOST:PORT")
        self.held += held
        grpc_host, _ = split_address(config.grpc_address)
        changes: dict[str, Any] = {"grpc_address": join_address(grpc_host, grpc_port)}
        if not config.insecure:
            device_host, _ = split_address(config.device_address())
            # The port after --grpc's, or --device-grpc's; a free one where --grpc's was 0.
            held, port = hold_port(config.device_address(), "gRPC", "pick another with --device-grpc HOST:PORT")
            self.held += held
            changes["device_grpc_address"] = join_address(device_host, port)
        if config.http_address:
            http_host, _ = split_address(config.http_address)
            held, port = hold_port(config.http_address, "HTTP",
                                   "pick another with --http HOST:PORT or turn it off with --http off")
            self.held += held
            changes["http_address"] = join_address(http_host, port)
        return dataclasses.replace(config, **changes)

    def _roles(self) -> dict[int, str]:
        """Each worker's index and role: with TLS, N device workers and the Control process after them."""
        if self.config.insecure:  # devices and Control share --grpc: every worker serves both
            return {index: ROLE_ALL for index in range(self.count)}
        return {**{index: ROLE_DEVICES for index in range(self.count)}, self.count: ROLE_CONTROL}

    def _spawn(self, index: int, shared: ControllerConfig, role: str) -> Worker:
        changes: dict[str, Any] = {"worker_index": index, "supervisor_pid": os.getpid(), "role": role}
        if role == ROLE_CONTROL:
            changes["http_address"] = None  # /metrics, /healthz and the dashboard stay with the device workers
        config = dataclasses.replace(shared, **changes)
        parent, child = self._context.Pipe(duplex=False)
        process = self._context.Process(target=_worker_main, args=(config, self.log_level, child),
                                        name=f"edgefleet-controller-worker-{index}")
        process.start()
        child.close()
        worker = Worker(index, process, parent, time.monotonic(), role)
        self.workers[index] = worker
        return worker

    def start(self) -> dict[str, object]:
        """Prepare, hold the ports, start every worker and wait until all serve; the endpoint."""
        prepare_state_dir(self.config)
        shared = self._hold_ports()
        workers_dir = self.config.state_dir / WORKERS_DIR
        shutil.rmtree(workers_dir, ignore_errors=True)  # a fresh controller's counters start at 0
        (workers_dir / "metrics").mkdir(parents=True, mode=0o700)
        # Read by prometheus_client when the worker imports it: its metrics go to these files.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(workers_dir / "metrics")
        self._shared = shared
        for index, role in self._roles().items():
            self._spawn(index, shared, role)
        deadline = time.monotonic() + WORKER_START_S
        endpoint: dict[str, object] = {}
        for worker in list(self.workers.values()):
            message = self._await_ready(worker, deadline)
            if "error" in message:
                self.stop()
                raise BindError(str(message["error"]))
            if worker.role != ROLE_CONTROL:
                endpoint = message
        control = [w.process.pid for w in self.workers.values() if w.role == ROLE_CONTROL]
        endpoint = {**{k: v for k, v in endpoint.items() if k != "role"}, "pid": os.getpid(), "workers": self.count,
                    "worker_pids": [w.process.pid for w in self.workers.values() if w.role != ROLE_CONTROL],
                    **({"control_pid": control[0]} if control else {})}
        atomic_write_json(self.config.state_dir / ENDPOINT_FILE, endpoint)
        log.info("controller listening", extra={k: v for k, v in endpoint.items() if k != "worker_pids"})
        return endpoint

    def _await_ready(self, worker: Worker, deadline: float) -> dict[str, object]:
        while time.monotonic() < deadline and not self._stopping:
            if worker.ready.poll(0.1):
                try:
                    message: dict[str, object] = worker.ready.recv()
                except EOFError:
                    break
                worker.serving = "error" not in message
                return message
            if not worker.process.is_alive():
                break
        if self._stopping:
            return {"error": "stopped while starting"}
        code = worker.process.exitcode
        return {"error": f"controller worker {worker.index} did not start (exit code {code}); see its log above"}

    # -- run -----------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def handle_signals(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def run(self) -> None:
        """Until SIGTERM/SIGINT: restart workers that die."""
        while not self._stopping:
            waitables: list[Any] = [self._wake_r]
            for worker in self.workers.values():
                waitables.append(worker.process.sentinel)
                if not worker.serving:
                    waitables.append(worker.ready)
            multiprocessing.connection.wait(waitables, timeout=1.0)
            if self._stopping:
                break
            for worker in list(self.workers.values()):
                if not worker.serving and worker.ready.poll():
                    with contextlib.suppress(EOFError):
                        message = worker.ready.recv()
                        worker.serving = "error" not in message
                        log.info("worker restarted and serving" if worker.serving else "worker failed to start",
                                 extra={"worker": worker.index, "pid": worker.process.pid,
                                        **({"error": message["error"]} if not worker.serving else {})})
                if not worker.process.is_alive():
                    self._restart(worker)
        self.stop()

    def _restart(self, worker: Worker) -> None:
        code = worker.process.exitcode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW_S] + [now]
        worker.ready.close()
        if len(self.deaths) > MAX_RESTARTS:
            log.error("workers keep dying; stopping the controller",
                      extra={"worker": worker.index, "deaths": len(self.deaths), "window_s": RESTART_WINDOW_S})
            self._stopping = True
            return
        log.warning("worker died; restarting it (its devices reconnect to the other workers meanwhile)",
                    extra={"worker": worker.index, "pid": worker.process.pid, "how": how})
        new = self._spawn(worker.index, self._shared, worker.role)
        log.info("worker started", extra={"worker": new.index, "pid": new.process.pid, "role": new.role})

    # -- stop ----------------------------------------------------------------------------------
    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        started = time.monotonic()
        alive = [w for w in self.workers.values() if w.process.is_alive()]
        for worker in alive:
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(worker.process.pid or 0, signal.SIGTERM)
        deadline = started + WORKER_STOP_S
        for worker in alive:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in alive:
            if worker.process.is_alive():
                log.warning("worker did not stop in time; killed", extra={"worker": worker.index,
                                                                          "timeout_s": WORKER_STOP_S})
                worker.process.kill()
                worker.process.join(1.0)
        for s in self.held:
            s.close()
        self.held = []
        endpoint = read_endpoint(self.config.state_dir)
        if endpoint is not None and endpoint.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                (self.config.state_dir / ENDPOINT_FILE).unlink()
        log.info("controller stopped", extra={"took_s": round(time.monotonic() - started, 3),
                                              "workers": len(self.workers)})


def supervise(config: ControllerConfig, workers: int, log_level: str = "info") -> None:
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be between 1 and {MAX_WORKERS}")
    supervisor = Supervisor(config, workers, log_level)
    supervisor.handle_signals()
    try:
        supervisor.start()
    except BaseException:
        supervisor.stop()
        raise
    if supervisor._stopping:  # a signal while starting
        supervisor.stop()
        return
    supervisor.run()
