"""Per-device broker logins and the ACL: a device reaches its own topics and nothing else."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_harness import ControllerProc, Proc, wait_until
from mqtt_harness import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    Broker,
    TestClient,
    enroll,
    mqtt_controller,
    stored_seqs,
    telemetry_batch,
)

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 0x87


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path).start()
    yield broker
    broker.stop()


@pytest.fixture
def mqtt_ctl(tmp_path: Path, broker: Broker, procs: list[Proc]) -> ControllerProc:
    proc = mqtt_controller(tmp_path, broker)
    procs.append(proc)
    return proc.start()


def test_device_is_fenced_into_its_own_topics(broker: Broker, mqtt_ctl: ControllerProc) -> None:
    token = mqtt_ctl.create_token(uses=2)
    a, b = enroll(mqtt_ctl, token, "a"), enroll(mqtt_ctl, token, "b")
    assert a.mqtt.username == a.device_id and a.mqtt.password and a.mqtt.url == broker.device_url
    assert a.mqtt.password != b.mqtt.password

    wrong = TestClient(broker.device_url, a.device_id, b.mqtt.password)
    assert wrong.connect().is_failure, "another device's password must not log in"
    wrong.close()

    victim = TestClient(broker.device_url, b.device_id, b.mqtt.password)
    assert not victim.connect().is_failure
    victim.subscribe(f"edgefleet/v1/{b.device_id}/cmd")

    device = TestClient(broker.device_url, a.device_id, a.mqtt.password)
    assert not device.connect().is_failure
    # Mosquitto's acl_file checks `read` on every message it would deliver (its SUBACK grants the
    # filter): subscribing to B's cmd, to `#` or to every device's telemetry yields nothing of B's.
    for topic_filter in (f"edgefleet/v1/{b.device_id}/cmd", "#", "edgefleet/v1/+/telemetry", "edgefleet/v1/+/state"):
        device.subscribe(topic_filter)
    admin = TestClient(broker.device_url, ADMIN_USER, ADMIN_PASSWORD)
    admin.connect()
    admin.publish(f"edgefleet/v1/{b.device_id}/cmd", b"for B only")
    assert not victim.publish(f"edgefleet/v1/{b.device_id}/telemetry", telemetry_batch(1).SerializeToString()).value
    wait_until(lambda: [m for m in victim.messages if m.payload == b"for B only"], 10, "B to get its own command")
    wait_until(lambda: stored_seqs(mqtt_ctl.state_dir, b.device_id), 10, "B's own batch to be stored")

    # Its own telemetry is accepted and stored: the positive control for the refusals below.
    assert not device.publish(f"edgefleet/v1/{a.device_id}/telemetry", telemetry_batch(1).SerializeToString()).value
    wait_until(lambda: stored_seqs(mqtt_ctl.state_dir, a.device_id), 10, "A's own batch to be stored")
    assert not [m for m in device.messages if b.device_id in m.topic], "A received B's traffic"

    # Publishing as B is refused outright (PUBACK 0x87); so is forging a command on any cmd topic.
    forged = device.publish(f"edgefleet/v1/{b.device_id}/telemetry", telemetry_batch(77).SerializeToString())
    assert forged.value == NOT_AUTHORIZED
    wait_until(lambda: device.client.is_connected(), 10, "A to reconnect")
    assert device.publish(f"edgefleet/v1/{b.device_id}/cmd", b"x").value == NOT_AUTHORIZED
    wait_until(lambda: device.client.is_connected(), 10, "A to reconnect")
    assert device.publish(f"edgefleet/v1/{a.device_id}/cmd", b"x").value == NOT_AUTHORIZED

    time.sleep(0.5)  # give a forged batch every chance to arrive
    assert stored_seqs(mqtt_ctl.state_dir, b.device_id) == [(b.device_id, 1)]
    assert not [m for m in victim.messages if m.payload == b"x"]
    for client in (device, victim, admin):
        client.close()


def test_controller_refuses_to_start_with_a_bad_admin_login(tmp_path: Path, broker: Broker) -> None:
    # Its own auth dir (the broker does not read it), so the wrong password stays wrong.
    args = [*mqtt_controller(tmp_path, broker).args[:-4], "--mqtt-auth-dir", str(tmp_path / "other")]
    proc = Proc("controller", args, tmp_path / "bad.log")
    proc.args[proc.args.index("--mqtt") + 1] = broker.admin_url.replace("admin-secret-for-tests", "wrong")
    proc.start()
    try:
        assert proc.wait(30) != 0
    finally:
        proc.stop()
    lines = [line for line in proc.log().splitlines() if "refused the controller's login" in line]
    assert lines and "check the user:password in --mqtt" in lines[-1], proc.log()


def test_revoked_device_loses_its_broker_login_and_its_messages_are_dropped(
        broker: Broker, mqtt_ctl: ControllerProc) -> None:
    from edgefleet.protos.v1 import control_pb2

    a = enroll(mqtt_ctl, mqtt_ctl.create_token())
    device = TestClient(broker.device_url, a.device_id, a.mqtt.password)
    assert not device.connect().is_failure
    assert not device.publish(f"edgefleet/v1/{a.device_id}/telemetry", telemetry_batch(1).SerializeToString()).value
    wait_until(lambda: stored_seqs(mqtt_ctl.state_dir, a.device_id), 10, "the device's batch to be stored")

    revoked = mqtt_ctl.call("RevokeDevice", control_pb2.RevokeDeviceRequest(device_id=a.device_id))
    assert revoked.revoked and revoked.presence == "revoked"
    # Mosquitto keeps a connection it already accepted; the controller drops what it still sends.
    device.publish(f"edgefleet/v1/{a.device_id}/telemetry", telemetry_batch(2).SerializeToString())
    time.sleep(1.0)
    assert [seq for _, seq in stored_seqs(mqtt_ctl.state_dir, a.device_id)] == [1]
    device.close()
    # Its login is gone from the password file and the broker was told to reload it.
    wait_until(lambda: TestClient(broker.device_url, a.device_id, a.mqtt.password).connect().is_failure, 10,
               "the revoked login to be refused")
