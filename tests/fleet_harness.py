"""Real controller and agent processes on free localhost ports, for integration tests."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from edgefleet.protos.v1 import control_pb2, control_pb2_grpc, fleet_pb2, fleet_pb2_grpc

HEARTBEAT_S = 0.3


# Ports handed out come from below the kernel's ephemeral range (32768-60999 by default), so an
# outgoing connection made between picking a port and a daemon binding it cannot take it, and each
# pytest-xdist worker draws from its own slice, so two workers never pick the same port.
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_slice() -> range:
    high = min(32768, _ephemeral_low())
    low = 20000 if high - 20000 >= 4000 else min(high, max(1024, high - 8000))
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    width = (high - low) // count
    start = low + (index % count) * width
    return range(start, start + width)


def free_port() -> int:
    """A localhost port nothing listens on, not handed out before in this process."""
    ports = _port_slice()
    if len(ports) < 100:  # the kernel hands out (nearly) every port itself: let it pick one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    offset = random.randrange(len(ports))
    for i in range(len(ports)):
        port = ports[(offset + i) % len(ports)]
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free localhost port left in {ports.start}-{ports.stop - 1}")


def wait_until(predicate: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last value: {last!r})")


class Proc:
    """A child process in its own session with its output captured to a log file."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **(self.env or {})},
            )
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.popen is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def wait(self, timeout_s: float = 10.0) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.popen is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.popen.wait()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class ControllerProc(Proc):
    """TLS by default (Control and Enroll on `grpc_address`, mutual TLS for devices on
    `device_address`); `insecure=True` runs it with --insecure, plaintext with device secrets.
    One process (--workers 1) unless `workers` or EDGEFLEET_TEST_CONTROLLER_WORKERS says otherwise:
    the suite's controllers start faster so, and tests/integration/test_workers.py covers several
    (EDGEFLEET_TEST_CONTROLLER_WORKERS=2 runs every test's controller with two)."""

    def __init__(self, tmp: Path, heartbeat_s: float = HEARTBEAT_S, extra_args: list[str] | None = None,
                 insecure: bool = False, workers: int | None = None) -> None:
        if workers is None:
            workers = int(os.environ.get("EDGEFLEET_TEST_CONTROLLER_WORKERS", "1"))
        self.state_dir = tmp / "controller"
        self.insecure = insecure
        self.grpc_address = f"127.0.0.1:{free_port()}"
        self.device_address = self.grpc_address if insecure else f"127.0.0.1:{free_port()}"
        self.http_address = f"127.0.0.1:{free_port()}"
        transport = ["--insecure"] if insecure else ["--device-grpc", self.device_address]
        super().__init__(
            "controller",
            [sys.executable, "-m", "edgefleet.controller.cli", "controller", "serve",
             "--state-dir", str(self.state_dir), "--grpc", self.grpc_address, "--http", self.http_address,
             "--heartbeat-interval", f"{heartbeat_s}s", "--workers", str(workers), *transport, *(extra_args or [])],
            tmp / "controller.log",
        )
        self._channel: grpc.Channel | None = None

    @property
    def ca_path(self) -> Path:
        """What an operator copies to a device: the CAs it should trust (the bundle)."""
        return self.state_dir / "ca-bundle.pem"

    def channel(self) -> grpc.Channel:
        """A new channel to `grpc_address`: TLS verified against the controller's CA, or plaintext."""
        if self.insecure:
            return grpc.insecure_channel(self.grpc_address)
        return grpc.secure_channel(self.grpc_address, grpc.ssl_channel_credentials(self.ca_path.read_bytes()))

    def agent_args(self) -> list[str]:
        """What an agent needs to reach this controller the first time."""
        return ["--insecure"] if self.insecure else ["--ca-cert", str(self.ca_path)]

    def start(self) -> ControllerProc:
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "controller.json").unlink()
        super().start()
        wait_until(lambda: (self.state_dir / "controller.json").exists() or not self.running, 30, "controller")
        assert self.running, f"controller exited:\n{self.log()}"
        return self

    @property
    def operator_token(self) -> str:
        return (self.state_dir / "operator-token").read_text().strip()

    def call(self, method: str, request: Any, token: str | None = None) -> Any:
        if self._channel is None:
            self._channel = self.channel()
        stub = control_pb2_grpc.ControlStub(self._channel)
        metadata = (("authorization", f"Bearer {self.operator_token if token is None else token}"),)
        return getattr(stub, method)(request, timeout=10, metadata=metadata)

    def create_token(self, uses: int = 1, ttl_s: int = 3600, labels: dict[str, str] | None = None) -> str:
        request = control_pb2.CreateEnrollmentTokenRequest(uses=uses, ttl_s=ttl_s, labels=labels or {})
        return str(self.call("CreateEnrollmentToken", request).token)

    def devices(self) -> list[control_pb2.Device]:
        return list(self.call("ListDevices", control_pb2.ListDevicesRequest()).devices)

    def device(self, device_id: str) -> control_pb2.Device:
        return self.call("GetDevice", control_pb2.GetDeviceRequest(device_id=device_id))

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


class AgentProc(Proc):
    def __init__(self, tmp: Path, name: str, controller: ControllerProc, token: str = "",
                 extra_args: list[str] | None = None) -> None:
        self.state_dir = tmp / name
        args = [sys.executable, "-m", "edgefleet.agent.cli", "run", "--controller", controller.grpc_address,
                "--state-dir", str(self.state_dir), "--no-microbench", "--backoff-max", "1",
                *controller.agent_args()]
        if token:
            args += ["--token", token]
        super().__init__(name, args + (extra_args or []), tmp / f"{name}.log")

    @property
    def device_id(self) -> str | None:
        path = self.state_dir / "identity.json"
        if not path.exists():
            return None
        return str(json.loads(path.read_text())["device_id"])


def enroll_request(controller: ControllerProc, request: fleet_pb2.EnrollRequest) -> fleet_pb2.EnrollResponse:
    """One Enroll call as an agent makes it: over TLS with a CSR of a fresh key (so a simulated
    device gets its certificate, though it may use only its MQTT login), or plaintext."""
    if not controller.insecure and not request.csr_pem:
        from edgefleet.agent.certificates import csr_pem, new_key

        request.csr_pem = csr_pem(new_key())
    with controller.channel() as channel:
        reply: fleet_pb2.EnrollResponse = fleet_pb2_grpc.FleetStub(channel).Enroll(request, timeout=10)
        return reply


POSTGRES_DSN = os.environ.get("EDGEFLEET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@contextlib.contextmanager
def postgres_schema(prefix: str, dsn: str = POSTGRES_DSN) -> Any:
    """A postgresql:// URL whose connections use a fresh schema (options=-csearch_path=...), dropped
    afterwards. Raises psycopg.OperationalError when the server is not reachable."""
    import uuid

    import psycopg

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{dsn}{'&' if '?' in dsn else '?'}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
