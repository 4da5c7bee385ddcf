"""One device conversation, spoken over gRPC and over MQTT to one real controller and a real broker,
leaves the same store state: both transports call the same session layer (controller/fleet/sessions.py).

The devices are simulated at the wire (a gRPC Session stream; a paho client with the device's own
broker login), so the test controls every message: hello with a profile whose hardware class
differs from the one enrolled, a heartbeat, a telemetry batch sent twice (a resend), an install
command acked, and the bundle fetched (FetchArtifact; artifact acks and numbered chunks).
"""

from __future__ import annotations

import queue
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import grpc
import pytest

from edgefleet.controller.store.sqlite import SQLiteStore
from edgefleet.firmware.keys import load_signing_key
from edgefleet.protos.capability import CAPABILITY_VERSION
from edgefleet.protos.v1 import control_pb2, fleet_pb2, fleet_pb2_grpc, mqtt_pb2, profile_pb2
from fleet_harness import ControllerProc, Proc, wait_until
from model_factory import mlp_onnx, signed_bundle
from mqtt_harness import Broker, TestClient, enroll, mqtt_controller, stored_seqs, telemetry_batch

pytestmark = pytest.mark.integration

AGENT_VERSION = "contract-1.0"
NEW_CLASS = "x86_64-avx512vnni"  # enrollment said x86_64-sim: the session must record this one
TIMEOUT_S = 20


def session_profile(hostname: str) -> profile_pb2.HardwareProfile:
    profile = profile_pb2.HardwareProfile(hardware_class=NEW_CLASS, os=profile_pb2.OsInfo(hostname=hostname))
    profile.cpu.arch = "x86_64"
    profile.cpu.physical_cores = 8
    return profile


class DeviceWire(Protocol):
    """What the conversation needs from a transport; one implementation each."""

    def open(self, agent_version: str, profile: profile_pb2.HardwareProfile) -> None: ...
    def heartbeat(self) -> None: ...
    def telemetry(self, seq: int) -> list[int]: ...
    def next_command(self) -> fleet_pb2.Command: ...
    def command_ack(self, ack: fleet_pb2.CommandAck) -> None: ...
    def fetch(self, sha256: str, size: int) -> bytes: ...
    def close(self) -> None: ...


class GrpcDevice:
    def __init__(self, controller: ControllerProc, device_id: str, secret: str) -> None:
        self.channel = grpc.insecure_channel(controller.grpc_address)
        self.stub = fleet_pb2_grpc.FleetStub(self.channel)
        self.metadata = (("edgefleet-device-id", device_id), ("edgefleet-device-secret", secret))
        self.outgoing: queue.Queue[fleet_pb2.AgentMessage | None] = queue.Queue()
        self.incoming: queue.Queue[fleet_pb2.ControllerMessage] = queue.Queue()
        self.call: Any = None

    def _requests(self) -> Iterator[fleet_pb2.AgentMessage]:
        while (message := self.outgoing.get()) is not None:
            yield message

    def _read(self) -> None:
        try:
            for message in self.call:
                self.incoming.put(message)
        except grpc.RpcError:
            pass

    def _expect(self, kind: str) -> fleet_pb2.ControllerMessage:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                message = self.incoming.get(timeout=0.2)
            except queue.Empty:
                if self.call is not None and self.call.done():
                    break  # the controller ended the stream
                continue
            if message.WhichOneof("body") == kind:
                return message
        raise AssertionError(f"no {kind} from the controller")

    def open(self, agent_version: str, profile: profile_pb2.HardwareProfile) -> None:
        self.outgoing.put(fleet_pb2.AgentMessage(hello=fleet_pb2.Hello(
            capability_version=CAPABILITY_VERSION, agent_version=agent_version, profile=profile)))
        self.call = self.stub.Session(self._requests(), metadata=self.metadata)
        threading.Thread(target=self._read, daemon=True).start()
        self._expect("accepted")

    def heartbeat(self) -> None:
        sent = int(time.time() * 1000)
        self.outgoing.put(fleet_pb2.AgentMessage(heartbeat=fleet_pb2.Heartbeat(sent_at_unix_ms=sent)))
        assert self._expect("heartbeat_ack").heartbeat_ack.sent_at_unix_ms == sent

    def telemetry(self, seq: int) -> list[int]:
        self.outgoing.put(telemetry_batch(seq))
        return list(self._expect("telemetry_ack").telemetry_ack.seqs)

    def next_command(self) -> fleet_pb2.Command:
        return self._expect("command").command

    def command_ack(self, ack: fleet_pb2.CommandAck) -> None:
        self.outgoing.put(fleet_pb2.AgentMessage(command_ack=ack))

    def fetch(self, sha256: str, size: int) -> bytes:
        chunks = self.stub.FetchArtifact(fleet_pb2.FetchArtifactRequest(sha256=sha256, chunk_size=4096),
                                         metadata=self.metadata, timeout=TIMEOUT_S)
        return b"".join(chunk.data for chunk in chunks)

    def close(self) -> None:
        self.outgoing.put(None)
        self.channel.close()


class MqttDevice:
    def __init__(self, broker: Broker, device_id: str, login: fleet_pb2.MqttCredentials) -> None:
        self.device_id = device_id
        self.client = TestClient(broker.device_url, login.username, login.password, client_id=device_id)
        self.client.connect()
        self.client.subscribe(f"edgefleet/v1/{device_id}/cmd")
        self.client.subscribe(f"edgefleet/v1/{device_id}/artifact/#")
        self.seen = 0

    def _topic(self, leaf: str) -> str:
        return f"edgefleet/v1/{self.device_id}/{leaf}"

    def _next(self, kind: str) -> fleet_pb2.ControllerMessage:
        def found() -> fleet_pb2.ControllerMessage | None:
            with self.client.lock:
                messages = self.client.messages[self.seen:]
            for index, raw in enumerate(messages):
                if raw.topic == self._topic("cmd"):
                    message = fleet_pb2.ControllerMessage.FromString(raw.payload)
                    if message.WhichOneof("body") == kind:
                        self.seen += index + 1
                        return message
            return None

        return wait_until(found, TIMEOUT_S, f"{kind} on cmd")  # type: ignore[no-any-return]

    def open(self, agent_version: str, profile: profile_pb2.HardwareProfile) -> None:
        state = mqtt_pb2.DeviceState(online=True, changed_at_unix_ms=int(time.time() * 1000),
                                     agent_version=agent_version, capability_version=CAPABILITY_VERSION,
                                     profile=profile)
        self.client.publish(self._topic("state"), state.SerializeToString(), retain=True)

    def heartbeat(self) -> None:
        """MQTT has no heartbeat message: the broker's keepalive and the Last Will stand for it."""

    def telemetry(self, seq: int) -> list[int]:
        self.client.publish(self._topic("telemetry"), telemetry_batch(seq).SerializeToString())
        return list(self._next("telemetry_ack").telemetry_ack.seqs)

    def next_command(self) -> fleet_pb2.Command:
        return self._next("command").command

    def command_ack(self, ack: fleet_pb2.CommandAck) -> None:
        self.client.publish(self._topic("ack"), fleet_pb2.AgentMessage(command_ack=ack).SerializeToString())

    def fetch(self, sha256: str, size: int) -> bytes:
        chunk_size, window = 4096, 8
        chunks: dict[int, bytes] = {}
        total = -(-size // chunk_size)
        prefix = self._topic(f"artifact/{sha256}/")
        while len(chunks) < total:
            ask = fleet_pb2.ArtifactAck(sha256=sha256, next_chunk=len(chunks), window=window, chunk_size=chunk_size)
            self.client.publish(self._topic("ack"), fleet_pb2.AgentMessage(artifact_ack=ask).SerializeToString())
            want = min(total, len(chunks) + window)

            def arrived(want: int = want) -> bool:
                with self.client.lock:
                    for raw in self.client.messages:
                        if raw.topic.startswith(prefix):
                            n = int(raw.topic.rsplit("/", 1)[1])
                            chunk = fleet_pb2.ArtifactChunk.FromString(raw.payload)
                            assert chunk.offset == n * chunk_size
                            chunks[n] = chunk.data
                return len(chunks) >= want

            wait_until(arrived, TIMEOUT_S, f"chunks up to {want} of {total}")
        return b"".join(chunks[n] for n in range(total))

    def close(self) -> None:
        self.client.close()


def converse(device: DeviceWire, controller: ControllerProc, device_id: str, bundle: Path,
             bundle_sha: str, hostname: str) -> None:
    """The same conversation, whichever transport `device` speaks."""
    device.open(AGENT_VERSION, session_profile(hostname))
    wait_until(lambda: controller.device(device_id).online, TIMEOUT_S, f"{device_id} online")
    device.heartbeat()
    assert device.telemetry(1) == [1]
    assert device.telemetry(1) == [1]  # a resend (the first ack was lost): acked again, stored once
    info = controller.call("InstallOnDevice", control_pb2.InstallOnDeviceRequest(device_id=device_id,
                                                                                bundle_sha256=bundle_sha))
    command = device.next_command()
    assert command.command_id == info.command_id and command.install.sha256 == bundle_sha
    assert device.fetch(bundle_sha, command.install.size) == bundle.read_bytes()
    device.command_ack(fleet_pb2.CommandAck(command_id=command.command_id, final=True,
                                            result="committed", model=command.install.name,
                                            version=command.install.version))
    wait_until(lambda: controller.call("GetCommand", control_pb2.GetCommandRequest(
        command_id=command.command_id)).state == "done", TIMEOUT_S, "the command to be done")


def store_state(controller: ControllerProc, device_id: str) -> dict[str, Any]:
    """What the conversation left in the store for one device, with its id and host left out."""
    store = SQLiteStore(controller.state_dir / "controller.db")
    try:
        record = store.get_device(device_id)
        commands = store.list_commands(device_id=device_id)
    finally:
        store.close()
    assert record is not None
    profile = profile_pb2.HardwareProfile.FromString(record.profile)
    profile.os.hostname = ""
    return {
        "agent_version": record.agent_version,
        "capability_version": record.capability_version,
        "hardware_class": record.hardware_class,
        "profile": profile.SerializeToString(deterministic=True),
        "model": (record.model, record.model_version),
        "telemetry_seqs": [seq for _, seq in stored_seqs(controller.state_dir, device_id)],
        "commands": [(c.kind, c.state, c.result) for c in commands],
    }


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path).start()
    yield broker
    broker.stop(signal.SIGKILL)


@pytest.fixture
def ctl(tmp_path: Path, broker: Broker, procs: list[Proc]) -> ControllerProc:
    # --insecure: the simulated gRPC device authenticates with its secret, so the conversation is
    # the same bytes as before certificates; mutual TLS is tests/integration/test_device_identity.py's.
    proc = mqtt_controller(tmp_path, broker, heartbeat_s=1.0, insecure=True)
    procs.append(proc)
    return proc.start()


def upload(controller: ControllerProc, path: Path) -> str:
    import hashlib

    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    stub_call = controller.call("UploadArtifact", iter([control_pb2.ArtifactUpload(sha256=sha, size=len(data)),
                                                        control_pb2.ArtifactUpload(data=data)]))
    assert stub_call.sha256 == sha
    return sha


def test_the_same_conversation_leaves_the_same_store_state_on_both_transports(
    tmp_path: Path, broker: Broker, ctl: ControllerProc
) -> None:
    key = load_signing_key(ctl.state_dir / "signing-key.pem")
    bundle, _ = signed_bundle(tmp_path, mlp_onnx(tmp_path / "m.onnx", hidden=2048), version=3, key=key)
    assert bundle.stat().st_size > 8 * 4096, "the bundle must span more than one MQTT window"
    sha = upload(ctl, bundle)

    over_grpc = enroll(ctl, ctl.create_token(), hostname="dev-grpc")
    over_mqtt = enroll(ctl, ctl.create_token(), hostname="dev-mqtt")
    devices: list[tuple[str, DeviceWire]] = [
        (over_grpc.device_id, GrpcDevice(ctl, over_grpc.device_id, over_grpc.device_secret)),
        (over_mqtt.device_id, MqttDevice(broker, over_mqtt.device_id, over_mqtt.mqtt)),
    ]
    try:
        for device_id, device in devices:
            converse(device, ctl, device_id, bundle, sha, hostname=device_id)
        states = [store_state(ctl, device_id) for device_id, _ in devices]
    finally:
        for _, device in devices:
            device.close()

    expected_profile = session_profile("")
    assert states[0] == states[1], "the transports left different store states"
    assert states[0] == {
        "agent_version": AGENT_VERSION,
        "capability_version": CAPABILITY_VERSION,
        "hardware_class": NEW_CLASS,  # the session's class, not the enrollment-time one
        "profile": expected_profile.SerializeToString(deterministic=True),
        "model": ("mlp", 3),
        "telemetry_seqs": [1],
        "commands": [("install", "done", "committed")],
    }
    for device_id, _ in devices:  # the session's hostname too
        store = sqlite3.connect(f"file:{ctl.state_dir / 'controller.db'}?mode=ro", uri=True)
        try:
            (hostname,) = store.execute("SELECT hostname FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        finally:
            store.close()
        assert hostname == device_id


def test_an_over_long_agent_version_is_refused_on_both_transports_not_truncated(
    tmp_path: Path, broker: Broker, ctl: ControllerProc
) -> None:
    too_long = "v" * 65
    over_grpc = enroll(ctl, ctl.create_token())
    grpc_device = GrpcDevice(ctl, over_grpc.device_id, over_grpc.device_secret)
    with pytest.raises(AssertionError):  # no SessionAccepted
        grpc_device.open(too_long, session_profile("h"))
    assert grpc_device.call.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello.agent_version" in grpc_device.call.details() and "at most 64" in grpc_device.call.details()
    grpc_device.close()

    over_mqtt = enroll(ctl, ctl.create_token())
    mqtt_device = MqttDevice(broker, over_mqtt.device_id, over_mqtt.mqtt)
    try:
        mqtt_device.open(too_long, session_profile("h"))
        wait_until(lambda: "device state refused" in ctl.log(), TIMEOUT_S, "the controller to refuse the state")
        assert "hello.agent_version" in ctl.log()
        mqtt_device.open(AGENT_VERSION, session_profile("h"))  # a valid state is then taken
        wait_until(lambda: ctl.device(over_mqtt.device_id).online, TIMEOUT_S, "the device online")
    finally:
        mqtt_device.close()
    for device_id in (over_grpc.device_id, over_mqtt.device_id):
        assert len(ctl.device(device_id).agent_version) <= 64
    assert ctl.device(over_grpc.device_id).agent_version == "sim"  # the enrollment's, never a cut one
