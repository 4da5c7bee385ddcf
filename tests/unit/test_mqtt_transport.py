"""MQTT transport pieces that need no broker: hashes, the ACL, topics, URLs, and the bridge's dispatch."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from edgefleet.common.mqtt import parse_broker_url, split_topic, topic
from edgefleet.controller.api.mqtt_bridge import MqttBridge, MqttConfigError, MqttOptions, broker_auth, public_url
from edgefleet.controller.fleet.broker_auth import BrokerAuth, device_acl, hash_password, verify_password
from edgefleet.controller.fleet.enrollment import Enrollment
from edgefleet.controller.fleet.sessions import DeviceSessions
from edgefleet.controller.store.artifacts import ArtifactStore
from edgefleet.controller.store.base import DeviceRecord, EnrollmentTokenRecord
from edgefleet.controller.store.sqlite import SQLiteStore
from edgefleet.protos.v1 import fleet_pb2, mqtt_pb2


def test_password_hash_is_mosquittos_pbkdf2_format() -> None:
    hashed = hash_password("s3cret", salt=b"0123456789ab")
    assert hashed.startswith("$7$101$MDEyMzQ1Njc4OWFi$")
    assert verify_password("s3cret", hashed)
    assert not verify_password("other", hashed)
    assert not verify_password("s3cret", "$6$garbage")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed "
                    "(apt-get install mosquitto-clients or mosquitto)")
def test_hash_verifies_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(tmp_path / "pw"), "dev-1", "pa55"], check=True)
    hashed = (tmp_path / "pw").read_text().strip().split(":", 1)[1]
    assert verify_password("pa55", hashed) and not verify_password("pa56", hashed)


def test_acl_fences_devices_by_username() -> None:
    acl = device_acl("admin")
    assert "user admin\ntopic readwrite edgefleet/v1/#" in acl
    assert "pattern write edgefleet/v1/%u/telemetry" in acl
    assert "pattern read edgefleet/v1/%u/cmd" in acl
    assert "pattern write edgefleet/v1/%u/cmd" not in acl and "readwrite edgefleet/v1/%u/cmd" not in acl
    assert "pattern readwrite edgefleet/v1/%u/#" not in acl


def test_issue_revoke_and_prepare(tmp_path: Path) -> None:
    auth = BrokerAuth(tmp_path / "auth", admin_username="admin", admin_password="pw", device_url="mqtt://b:1883")
    auth.prepare()
    first = auth.issue("dev-aa")
    second = auth.issue("dev-bb")
    lines = dict(line.split(":", 1) for line in auth.passwd_path.read_text().splitlines())
    assert set(lines) == {"admin", "dev-aa", "dev-bb"}
    assert verify_password(first.password, lines["dev-aa"]) and not verify_password(second.password, lines["dev-aa"])
    assert first.to_proto().url == "mqtt://b:1883" and first.username == "dev-aa"
    assert auth.revoke("dev-aa") and not auth.revoke("dev-aa")
    assert "dev-aa:" not in auth.passwd_path.read_text()
    auth.prepare()  # idempotent: the admin entry is kept when its password still verifies
    assert auth.passwd_path.read_text().count("admin:") == 1
    with pytest.raises(ValueError, match="MQTT username"):
        auth.issue("dev/+")


def test_topics_and_urls() -> None:
    assert topic("dev-1", "telemetry") == "edgefleet/v1/dev-1/telemetry"
    assert split_topic("edgefleet/v1/dev-1/artifact/ab/3") == ("dev-1", "artifact/ab/3")
    assert split_topic("other/v1/dev-1/cmd") is None and split_topic("edgefleet/v1//cmd") is None
    address = parse_broker_url("mqtts://ad%40min:p%3Aw@broker.local")
    assert (address.host, address.port, address.tls, address.username, address.password) == (
        "broker.local", 8883, True, "ad@min", "p:w")
    assert parse_broker_url("mqtt://h").port == 1883
    assert public_url("mqtt://u:p@h:1884") == "mqtt://h:1884"
    with pytest.raises(ValueError, match="mqtt://HOST:PORT"):
        parse_broker_url("http://h:1883")
    with pytest.raises(MqttConfigError, match="admin login in the URL"):
        broker_auth("mqtt://h:1883", MqttOptions(), Path("/nonexistent"))


class FakeIngest:
    def __init__(self) -> None:
        self.submitted: list[tuple[str, int]] = []

    def submit(self, device_id: str, batch: fleet_pb2.TelemetryBatch, ack: Any) -> None:
        self.submitted.append((device_id, batch.seq))
        ack(fleet_pb2.TelemetryAck(seqs=[batch.seq]))


class FakePresence:
    heartbeat_interval_s = 1.0

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.current: set[int] = set()
        self.revoked: set[str] = set()

    def session_opened(self, device_id: str, **_: Any) -> Any:
        session = type("S", (), {"device_id": device_id})()
        self.current.add(id(session))
        self.events.append(("online", device_id))
        return session

    def session_closed(self, session: Any, reason: str) -> None:
        self.current.discard(id(session))
        self.events.append(("offline", session.device_id))

    def is_current(self, session: Any) -> bool:
        return id(session) in self.current

    def record_model(self, device_id: str, model: str, version: int) -> None:
        """PresenceTracker writes a model update at once when no open of the device is queued."""
        assert self.store is not None, "device_sessions() gives the fake its store"
        self.store.set_device_model(device_id, model, version)

    store: Any = None


def known_store(tmp_path: Path) -> SQLiteStore:
    """A real store with one enrolled device, dev-known."""
    store = SQLiteStore(tmp_path / "store.db")
    store.create_enrollment_token(EnrollmentTokenRecord("tok", "hash", 1, 1, 0, 2**62, {}))
    store.enroll_device("hash", 1, DeviceRecord("dev-known", "secret", {}, 0, hostname="h", hardware_class="x"))
    return store


class FakeCommands:
    def __init__(self) -> None:
        self.delivered: list[str] = []
        self.acks: list[tuple[str, str]] = []

    def deliver_open(self, device_id: str) -> int:
        self.delivered.append(device_id)
        return 0

    def on_ack(self, device_id: str, ack: fleet_pb2.CommandAck) -> None:
        self.acks.append((device_id, ack.command_id))


def device_sessions(tmp_path: Path, presence: Any, ingest: Any, commands: Any | None = None) -> DeviceSessions:
    """The real session layer over a real store, with the collaborators the test watches faked."""
    store = known_store(tmp_path)
    if isinstance(presence, FakePresence):
        presence.store = store
    return DeviceSessions(store, Enrollment(store), presence, ingest, commands or FakeCommands(),
                          ArtifactStore(tmp_path / "artifacts"), heartbeat_interval_s=1.0)


def test_bridge_only_translates(tmp_path: Path) -> None:
    """Topic -> device id, payload -> handler; acks go back on that device's cmd topic."""
    ingest, presence, commands = FakeIngest(), FakePresence(), FakeCommands()
    auth = BrokerAuth(tmp_path, admin_username="a", admin_password="p", device_url="mqtt://h:1")
    sessions = device_sessions(tmp_path, presence, ingest, commands)
    bridge = MqttBridge("mqtt://a:p@127.0.0.1:1", MqttOptions(), sessions=sessions, auth=auth)
    published: list[tuple[str, fleet_pb2.ControllerMessage]] = []
    bridge.publish = lambda device_id, message, **_: published.append((device_id, message)) or True  # type: ignore[method-assign]
    batch = fleet_pb2.AgentMessage(telemetry=fleet_pb2.TelemetryBatch(seq=5))
    bridge._dispatch("edgefleet/v1/dev-known/telemetry", batch.SerializeToString())
    bridge._dispatch("edgefleet/v1/dev-known/telemetry", b"\xff\xff not protobuf")
    bridge._dispatch("edgefleet/v1/dev-known/ack", batch.SerializeToString())  # wrong kind for the topic: dropped
    assert ingest.submitted == [("dev-known", 5)]
    assert published[0][0] == "dev-known" and list(published[0][1].telemetry_ack.seqs) == [5]

    online = mqtt_pb2.DeviceState(online=True, agent_version="1").SerializeToString()
    bridge._dispatch("edgefleet/v1/dev-known/state", online)
    again = mqtt_pb2.DeviceState(online=True, agent_version="1", model="det", model_version=2).SerializeToString()
    bridge._dispatch("edgefleet/v1/dev-known/state", again)  # a repeat is no new session, but it updates the model
    bridge._dispatch("edgefleet/v1/dev-unknown/state", online)  # not enrolled: ignored
    bridge._dispatch("edgefleet/v1/dev-known/state", mqtt_pb2.DeviceState(online=False).SerializeToString())
    assert presence.events == [("online", "dev-known"), ("offline", "dev-known")]
    assert commands.delivered == ["dev-known"]  # open commands go out when the device comes online
    device = sessions.store.get_device("dev-known")
    assert device is not None and (device.model, device.model_version) == ("det", 2)


def test_bridge_batches_hops_onto_the_loop(tmp_path: Path) -> None:
    """Many paho callbacks, one call_soon_threadsafe: the loop is woken once per burst."""
    ingest = FakeIngest()
    auth = BrokerAuth(tmp_path, admin_username="a", admin_password="p", device_url="mqtt://h:1")
    sessions = device_sessions(tmp_path, FakePresence(), ingest)
    bridge = MqttBridge("mqtt://a:p@127.0.0.1:1", MqttOptions(), sessions=sessions, auth=auth)
    bridge.publish = lambda *a, **k: True  # type: ignore[method-assign]

    async def main() -> int:
        loop = asyncio.get_running_loop()
        bridge._loop = loop
        calls = 0
        real = loop.call_soon_threadsafe

        def counting(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            return real(*args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        for seq in range(1, 101):
            message = type("M", (), {"topic": "edgefleet/v1/dev-known/telemetry", "payload": fleet_pb2.AgentMessage(
                telemetry=fleet_pb2.TelemetryBatch(seq=seq)).SerializeToString()})()
            bridge._on_message(None, None, message)  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        return calls

    assert asyncio.run(main()) == 1
    assert [seq for _, seq in ingest.submitted] == list(range(1, 101))


def test_a_lost_broker_suspends_sessions_and_only_changed_devices_are_written(tmp_path: Path) -> None:
    """After a reconnect: unchanged -> restored (no write), changed -> reopened, offline or never
    re-announced -> closed once the grace (the silence limit) is over."""
    from edgefleet.controller.fleet.presence import PresenceTracker
    from edgefleet.protos.capability import CAPABILITY_VERSION
    from edgefleet.protos.v1 import profile_pb2

    store = SQLiteStore(tmp_path / "store.db")
    store.create_enrollment_token(EnrollmentTokenRecord("tok", "hash", 4, 4, 0, 2**62, {}))
    for name in ("same", "changed", "offline", "silent"):
        store.enroll_device("hash", 1, DeviceRecord(name, "secret", {}, 0, hardware_class="x"))
    presence = PresenceTracker(store, heartbeat_interval_s=0.1, owner="ctrl")
    commands = FakeCommands()
    sessions = DeviceSessions(store, Enrollment(store), presence, FakeIngest(), commands,
                              ArtifactStore(tmp_path / "artifacts"), heartbeat_interval_s=0.1)
    auth = BrokerAuth(tmp_path, admin_username="a", admin_password="p", device_url="mqtt://h:1")
    bridge = MqttBridge("mqtt://a:p@127.0.0.1:1", MqttOptions(), sessions=sessions, auth=auth)
    bridge.publish = lambda *a, **k: True  # type: ignore[method-assign]
    profile = profile_pb2.HardwareProfile(hardware_class="x")

    def state(version: int = 1, online: bool = True) -> bytes:
        return mqtt_pb2.DeviceState(online=online, agent_version="1", capability_version=CAPABILITY_VERSION,
                                    profile=profile, model="det", model_version=version).SerializeToString()

    async def main() -> None:
        bridge._loop = asyncio.get_running_loop()
        bridge._vouch = asyncio.create_task(bridge._vouch_loop())
        bridge._connected(None)
        for name in ("same", "changed", "offline", "silent"):
            bridge._dispatch(f"edgefleet/v1/{name}/state", state())
        assert presence.online_count() == 4 and len(commands.delivered) == 4
        bridge._disconnected("broker restarted")
        assert bridge.reconnect.suspended == 4 and presence.online_count() == 4  # suspended, not closed
        bridge._connected(None)
        bridge._dispatch("edgefleet/v1/same/state", state())
        bridge._dispatch("edgefleet/v1/changed/state", state(version=2))
        bridge._dispatch("edgefleet/v1/offline/state", state(online=False))
        assert commands.delivered == ["same", "changed", "offline", "silent", "changed"]  # only the reopened
        await asyncio.sleep(0.6)  # past the grace: "silent" never re-announced itself
        bridge._vouch.cancel()

    asyncio.run(main())
    assert (bridge.reconnect.restored, bridge.reconnect.reopened, bridge.reconnect.closed) == (1, 1, 2)
    assert {d.device_id for d in store.list_devices() if d.connected} == {"same", "changed"}
    changed = store.get_device("changed")
    assert changed is not None and changed.model_version == 2


def test_a_burst_of_states_is_handled_in_bounded_batches(tmp_path: Path) -> None:
    """Re-delivered retained states, REOPEN_BATCH per event-loop turn; other callbacks run between."""
    presence = FakePresence()
    sessions = device_sessions(tmp_path, presence, FakeIngest())
    auth = BrokerAuth(tmp_path, admin_username="a", admin_password="p", device_url="mqtt://h:1")
    bridge = MqttBridge("mqtt://a:p@127.0.0.1:1", MqttOptions(), sessions=sessions, auth=auth)
    bridge.publish = lambda *a, **k: True  # type: ignore[method-assign]
    bridge.reopen_batch = 10
    handled_when: list[int] = []

    async def main() -> None:
        bridge._loop = asyncio.get_running_loop()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        tick_task = asyncio.create_task(ticker())
        bridge._on_state = lambda device_id, payload: handled_when.append(ticks)  # type: ignore[method-assign]
        for i in range(35):
            message = type("M", (), {"topic": f"edgefleet/v1/d{i}/state", "payload": b""})()
            bridge._on_message(None, None, message)  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        tick_task.cancel()

    asyncio.run(main())
    assert len(handled_when) == 35
    turns = [handled_when.count(t) for t in sorted(set(handled_when))]
    assert turns == [10, 10, 10, 5] and bridge.reconnect.batches == 4
