"""A real Mosquitto broker on free localhost ports, TLS made by the test, and MQTT test clients.

The broker runs with a generated config in a temp dir, with the same password_file and
acl_file the controller manages (controller/fleet/broker_auth.py), so tests exercise the real ACL.
Without the `mosquitto` binary the MQTT tests are skipped with the install command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgefleet.common.mqtt import new_client, parse_broker_url, session_properties
from edgefleet.controller.fleet.broker_auth import BrokerAuth
from edgefleet.protos.capability import CAPABILITY_VERSION
from edgefleet.protos.v1 import fleet_pb2, profile_pb2
from fleet_harness import ControllerProc, enroll_request, free_port, wait_until

ADMIN_USER = "edgefleet-controller"
ADMIN_PASSWORD = "admin-secret-for-tests"


def mosquitto_binary() -> str:
    """The broker binary, or skip the test with the command that installs it."""
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.skip("mosquitto is not installed; install it with `apt-get install mosquitto` to run the MQTT tests")
    return found


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls(directory: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A throwaway CA and a server certificate for `host`, signed by it (cryptography, no openssl CLI)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EdgeFleet test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    files.server_key.chmod(0o600)
    return files


class Broker:
    """One mosquitto process with file auth (the controller's files) and optional TLS; restartable."""

    def __init__(self, tmp: Path, *, tls: bool = False, client_ca: Path | None = None) -> None:
        """`client_ca`: also a listener (TLS) where devices log in with a certificate of that CA
        (the controller's ca-bundle.pem), its CN being the username; devices are given that one."""
        self.client_ca = client_ca
        tls = tls or client_ca is not None
        self.cert_port = free_port() if client_ca is not None else 0
        self.binary = mosquitto_binary()
        self.dir = tmp / "broker"
        self.auth_dir = self.dir / "auth"
        self.pid_file = self.dir / "mosquitto.pid"
        self.log_path = self.dir / "mosquitto.log"
        self.port = free_port()
        self.tls = make_tls(self.dir / "tls") if tls else None
        self.tls_port = free_port() if tls else 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "data").mkdir(exist_ok=True)
        # The broker needs its auth files before the controller first starts; write them the same way.
        self.auth().prepare()
        self.config_path = self.dir / "mosquitto.conf"
        self.config_path.write_text(self._config())

    def auth(self) -> BrokerAuth:
        return BrokerAuth(self.auth_dir, admin_username=ADMIN_USER, admin_password=ADMIN_PASSWORD,
                          device_url=self.device_url, broker_pid_file=None)

    def _config(self) -> str:
        lines = [
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {self.auth_dir / 'passwd'}",
            f"acl_file {self.auth_dir / 'acl'}",
            f"pid_file {self.pid_file}",
            "persistence true",
            f"persistence_location {self.dir / 'data'}/",
            "autosave_interval 1",
            "max_queued_messages 0",
            "max_inflight_messages 100",
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "user root" if os.geteuid() == 0 else "",
            f"listener {self.port} 127.0.0.1",
        ]
        if self.tls is not None:
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {self.tls.ca_cert}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                "tls_version tlsv1.2",
            ]
        if self.client_ca is not None and self.tls is not None:
            lines += [
                f"listener {self.cert_port} 127.0.0.1",
                f"cafile {self.client_ca}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                "tls_version tlsv1.2",
                "require_certificate true",
                "use_identity_as_username true",
            ]
        return "\n".join(lines) + "\n"

    @property
    def device_url(self) -> str:
        if self.client_ca is not None:
            return f"mqtts://127.0.0.1:{self.cert_port}"
        return f"mqtts://127.0.0.1:{self.tls_port}" if self.tls is not None else f"mqtt://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        scheme, port = ("mqtts", self.tls_port) if self.tls is not None else ("mqtt", self.port)
        return f"{scheme}://{ADMIN_USER}:{ADMIN_PASSWORD}@127.0.0.1:{port}"

    def controller_args(self) -> list[str]:
        args = ["--mqtt", self.admin_url, "--mqtt-auth-dir", str(self.auth_dir),
                "--mqtt-broker-pid", str(self.pid_file)]
        if self.tls is not None:
            args += ["--mqtt-ca", str(self.tls.ca_cert)]
        if self.client_ca is not None:
            args += ["--mqtt-client-certs", "--mqtt-device-url", self.device_url]
        return args

    def start(self) -> Broker:
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        with open(self.dir / "stdout.log", "ab") as out:
            self.popen = subprocess.Popen([self.binary, "-c", str(self.config_path)], stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self._accepting() or self.popen.poll() is not None, 10, "mosquitto to listen")  # type: ignore[union-attr]
        assert self.popen.poll() is None, f"mosquitto exited:\n{self.log()}"
        wait_until(self.pid_file.exists, 5, "mosquitto pid file")
        return self

    def _accepting(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(sig)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def restart(self, sig: int = signal.SIGTERM, down_s: float = 0.3) -> None:
        self.stop(sig)
        time.sleep(down_s)
        self.start()
        self.restarts += 1

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def mqtt_controller(tmp: Path, broker: Broker, *, state_dir: Path | None = None, name: str = "controller",
                    heartbeat_s: float = 0.3, insecure: bool = False) -> ControllerProc:
    """A controller process serving `broker` too (its own state dir unless one is shared)."""
    args = broker.controller_args()
    (tmp / name).mkdir(parents=True, exist_ok=True)
    proc = ControllerProc(tmp / name, heartbeat_s=heartbeat_s, extra_args=args, insecure=insecure)
    if state_dir is not None:
        proc.args += ["--state-dir", str(state_dir)]  # the last --state-dir wins
        proc.state_dir = state_dir
    return proc


def enroll(controller: ControllerProc, token: str, hostname: str = "sim") -> fleet_pb2.EnrollResponse:
    """One Enroll call, as an agent makes it, returning the reply with its MQTT login."""
    request = fleet_pb2.EnrollRequest(
        token=token, capability_version=CAPABILITY_VERSION, agent_version="sim",
        profile=profile_pb2.HardwareProfile(hardware_class="x86_64-sim", os=profile_pb2.OsInfo(hostname=hostname)),
    )
    return enroll_request(controller, request)


def telemetry_batch(seq: int, pad: int = 0) -> fleet_pb2.AgentMessage:
    now = int(time.time() * 1000)
    batch = fleet_pb2.TelemetryBatch(
        seq=seq, start_unix_ms=now - 1000, end_unix_ms=now,
        device=fleet_pb2.DeviceStats(cpu_percent_system=12.5, rss_bytes=50_000_000,
                                     memory_available_bytes=2_000_000_000, load1=0.5),
        power=fleet_pb2.PowerReading(watts=3.5, source="estimated:model" + "x" * pad),
    )
    return fleet_pb2.AgentMessage(telemetry=batch)


class TestClient:
    """A synchronous paho client for tests: a device (its own login) or the admin."""

    __test__ = False

    def __init__(self, url: str, username: str, password: str, *, client_id: str | None = None,
                 ca_pem: str = "", clean_start: bool = True) -> None:
        self.address = parse_broker_url(url)
        self.client = new_client(client_id or f"test-{username}-{os.urandom(3).hex()}", self.address,
                                 username=username, password=password, ca_pem=ca_pem, backoff_max_s=2)
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()
        self.connack: Any = None
        self.acks: dict[int, Any] = {}
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.clean_start = clean_start

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connack = reason_code

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(message)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        self.acks[mid] = list(reason_codes)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self.acks[mid] = reason_code

    def connect(self, timeout_s: float = 10.0) -> Any:
        self.client.connect(self.address.host, self.address.port, keepalive=30, clean_start=self.clean_start,
                            properties=session_properties(0 if self.clean_start else 3600))
        self.client.loop_start()
        wait_until(lambda: self.connack is not None, timeout_s, "CONNACK")
        return self.connack

    def subscribe(self, topic_filter: str, qos: int = 1) -> list[Any]:
        _, mid = self.client.subscribe(topic_filter, qos=qos)
        return wait_until(lambda: self.acks.get(mid), 10, f"SUBACK for {topic_filter}")  # type: ignore[no-any-return]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Any:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return wait_until(lambda: self.acks.get(info.mid), 10, f"PUBACK for {topic}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def stored_seqs(state_dir: Path, device_id: str | None = None) -> list[tuple[str, int]]:
    """(device, seq) rows in the controller's store, read straight from the SQLite file."""
    db = sqlite3.connect(f"file:{state_dir / 'controller.db'}?mode=ro", uri=True, timeout=10)
    try:
        if device_id is None:
            rows = db.execute("SELECT device_id, seq FROM telemetry_batches ORDER BY device_id, seq").fetchall()
        else:
            rows = db.execute("SELECT device_id, seq FROM telemetry_batches WHERE device_id = ? ORDER BY seq",
                              (device_id,)).fetchall()
    finally:
        db.close()
    return [(str(d), int(s)) for d, s in rows]


def outbox_state(agent_state_dir: Path) -> tuple[list[int], int]:
    """(seqs still queued on the device, the next seq it will assign)."""
    db = sqlite3.connect(f"file:{agent_state_dir / 'telemetry.db'}?mode=ro", uri=True, timeout=10)
    try:
        pending = [int(r[0]) for r in db.execute("SELECT seq FROM batches ORDER BY seq")]
        next_seq = int(db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
    finally:
        db.close()
    return pending, next_seq


def metric(http_address: str, name: str, labels: str = "") -> float:
    """One sample from a controller's /metrics (0 when absent)."""
    import urllib.request

    body = urllib.request.urlopen(f"http://{http_address}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(name + ("{" + labels + "}" if labels else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@contextlib.contextmanager
def running(broker: Broker) -> Iterator[Broker]:
    broker.start()
    try:
        yield broker
    finally:
        broker.stop(signal.SIGKILL)
