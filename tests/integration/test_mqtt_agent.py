"""A real agent with --transport mqtt against a real controller and Mosquitto (over TLS).

Enrollment is one gRPC call (the reply carries the device's broker login); after that the
agent only speaks MQTT: telemetry up with acks down on `cmd`, presence through a retained
state and a Last Will, and a persistent session that holds `cmd` messages while it is away.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgefleet.controller.cli.main import cli
from edgefleet.firmware.keys import load_signing_key
from edgefleet.protos.v1 import fleet_pb2
from fleet_harness import AgentProc, ControllerProc, Proc, wait_until
from model_factory import mlp_onnx, signed_bundle
from mqtt_harness import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    Broker,
    TestClient,
    mqtt_controller,
    outbox_state,
    stored_seqs,
)

pytestmark = pytest.mark.integration

AGENT_ARGS = ["--transport", "mqtt", "--telemetry-interval", "0.1s"]


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path, tls=True).start()
    yield broker
    broker.stop(signal.SIGKILL)


@pytest.fixture
def mqtt_ctl(tmp_path: Path, tls_broker: Broker, procs: list[Proc]) -> ControllerProc:
    proc = mqtt_controller(tmp_path, tls_broker)
    procs.append(proc)
    return proc.start()


def _agent(tmp_path: Path, procs: list[Proc], controller: ControllerProc, token: str = "") -> AgentProc:
    agent = AgentProc(tmp_path, "agent", controller, token, AGENT_ARGS)
    procs.append(agent)
    return agent


def _devices_list(controller: ControllerProc) -> dict[str, str]:
    """`edgefleet devices list` as an operator runs it: device id -> STATE column."""
    result = CliRunner().invoke(cli, ["devices", "list", "--state-dir", str(controller.state_dir)],
                                env={"EDGEFLEET_CONTROLLER": "", "EDGEFLEET_TOKEN": ""}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {line.split()[0]: line.split()[1] for line in result.output.splitlines()[1:] if line.strip()}


def test_mqtt_only_agent_reports_and_shows_presence(
    tmp_path: Path, tls_broker: Broker, mqtt_ctl: ControllerProc, procs: list[Proc]
) -> None:
    agent = _agent(tmp_path, procs, mqtt_ctl, mqtt_ctl.create_token()).start()
    device_id = wait_until(lambda: agent.device_id, 30, "enrollment")
    login = (agent.state_dir / "mqtt.json")
    assert login.stat().st_mode & 0o777 == 0o600
    assert f"mqtts://127.0.0.1:{tls_broker.tls_port}" in login.read_text()

    wait_until(lambda: mqtt_ctl.device(device_id).online, 20, "the device to show online")
    assert _devices_list(mqtt_ctl)[device_id] == "online"  # what `edgefleet devices list` prints
    wait_until(lambda: len(stored_seqs(mqtt_ctl.state_dir, device_id)) >= 10, 20, "telemetry over MQTT")
    # Acks come back on cmd and the outbox is emptied: at most the last few batches are in flight.
    wait_until(lambda: len(outbox_state(agent.state_dir)[0]) <= 3, 10, "acked batches to leave the outbox")
    assert "mqtt connected" in agent.log() and "session open" not in agent.log()  # no gRPC session

    agent.kill()  # the TCP link drops without a DISCONNECT: the broker publishes the Last Will
    wait_until(lambda: not mqtt_ctl.device(device_id).online, 10, "the Last Will to mark it offline")
    assert _devices_list(mqtt_ctl)[device_id] == "offline"

    agent.start()  # same identity, no token: sequence numbers carry on
    wait_until(lambda: mqtt_ctl.device(device_id).online, 20, "the device to come back")
    before = len(stored_seqs(mqtt_ctl.state_dir, device_id))
    wait_until(lambda: len(stored_seqs(mqtt_ctl.state_dir, device_id)) > before + 3, 20, "telemetry after restart")
    agent.stop()  # a clean exit publishes offline itself
    wait_until(lambda: not mqtt_ctl.device(device_id).online, 10, "a clean exit to show offline")
    pending, next_seq = outbox_state(agent.state_dir)
    seqs = [seq for _, seq in stored_seqs(mqtt_ctl.state_dir, device_id)]
    assert sorted(set(seqs) | set(pending)) == list(range(1, next_seq)), "a sequence number went missing"


def test_cmd_published_while_offline_arrives_once_on_return(
    tmp_path: Path, tls_broker: Broker, mqtt_ctl: ControllerProc, procs: list[Proc]
) -> None:
    agent = _agent(tmp_path, procs, mqtt_ctl, mqtt_ctl.create_token()).start()
    device_id = wait_until(lambda: agent.device_id, 30, "enrollment")
    wait_until(lambda: mqtt_ctl.device(device_id).online, 20, "the device to show online")
    agent.stop()
    wait_until(lambda: not mqtt_ctl.device(device_id).online, 10, "the device to go offline")

    ca = tls_broker.tls.ca_cert.read_text() if tls_broker.tls else ""
    admin = TestClient(tls_broker.device_url, ADMIN_USER, ADMIN_PASSWORD, ca_pem=ca)
    admin.connect()
    admin.subscribe(f"edgefleet/v1/{device_id}/ack")
    command = fleet_pb2.Command(command_id="cmd-offline-1", nonce="n-1",
                                expires_at_unix_ms=int(time.time() * 1000) + 120_000)
    admin.publish(f"edgefleet/v1/{device_id}/cmd", fleet_pb2.ControllerMessage(command=command).SerializeToString())

    agent.start()  # the broker kept its session (clean_start false + expiry) and delivers the command now

    def acks() -> list[fleet_pb2.CommandAck]:
        with admin.lock:
            messages = list(admin.messages)
        return [fleet_pb2.AgentMessage.FromString(m.payload).command_ack for m in messages]

    first = wait_until(acks, 20, "the command's ack")[0]
    assert first.command_id == "cmd-offline-1" and first.final
    # A replay of the same command is answered from the journal, not run again.
    admin.publish(f"edgefleet/v1/{device_id}/cmd", fleet_pb2.ControllerMessage(command=command).SerializeToString())
    wait_until(lambda: "command already done" in agent.log(), 10, "the replay to be recognised")
    assert agent.log().count("command already done") == 1
    admin.close()


def test_install_over_mqtt_only_survives_a_broker_restart_mid_transfer(
    tmp_path: Path, tls_broker: Broker, mqtt_ctl: ControllerProc, procs: list[Proc]
) -> None:
    """`edgefleet devices install` to an MQTT-only device: the command goes down `cmd`, the bundle
    comes in numbered chunks on `artifact/<sha>/<n>` acked in windows, the broker restarts in the
    middle, the transfer resumes from the chunks already on disk, and the ack comes up `ack`."""
    agent = _agent(tmp_path, procs, mqtt_ctl, mqtt_ctl.create_token()).start()
    device_id = wait_until(lambda: agent.device_id, 30, "enrollment")
    wait_until(lambda: mqtt_ctl.device(device_id).online, 20, "the device to show online")
    key = load_signing_key(mqtt_ctl.state_dir / "signing-key.pem")
    model = mlp_onnx(tmp_path / "v1.onnx", hidden=131072)  # ~38 MB: about 150 chunks of 256 KiB
    bundle, _ = signed_bundle(tmp_path, model, version=1, key=key)
    install = subprocess.Popen(
        [sys.executable, "-m", "edgefleet.controller.cli", "devices", "install", device_id, str(bundle), "--json",
         "--timeout", "120s", "--state-dir", str(mqtt_ctl.state_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EDGEFLEET_CONTROLLER": "", "EDGEFLEET_TOKEN": ""},
    )

    def partial() -> int:
        parts = list((agent.state_dir / "slots").glob("*/bundle-*.part"))
        return parts[0].stat().st_size if parts else 0

    wait_until(lambda: partial() > 0, 60, "chunks arriving over MQTT")
    tls_broker.restart(signal.SIGKILL, down_s=1.0)
    cut_at = partial()
    assert 0 < cut_at < bundle.stat().st_size, "the broker restart came too late to interrupt the transfer"
    out, err = install.communicate(timeout=150)
    assert install.returncode == 0, err
    info = json.loads(out)
    assert info["result"] == "committed", info
    log = agent.log()
    assert "fetching artifact over mqtt" in log and "session open" not in log  # no gRPC on the device
    entries = [json.loads(line) for line in (agent.state_dir / "install.log").read_text().splitlines()]
    # Either the reader timed out and the installer resumed from the bytes on disk, or paho re-sent
    # the pending window ack after reconnecting and the same read went on; never from byte 0 again.
    downloads = [e for e in entries if e.get("state") == "DOWNLOADING"]
    assert all(e["have"] >= cut_at for e in downloads[1:]), downloads


def test_a_device_converges_on_the_retained_desired_model_without_a_command(
    tmp_path: Path, tls_broker: Broker, mqtt_ctl: ControllerProc, procs: list[Proc]
) -> None:
    """Its queued commands were lost (say the broker session expired while it was away): the
    retained `desired` model still brings the device to the right model when it returns."""
    from edgefleet.agent.client import LocalClient
    from edgefleet.controller.client import Connection, upload_artifact
    from edgefleet.protos.v1 import mqtt_pb2

    agent = _agent(tmp_path, procs, mqtt_ctl, mqtt_ctl.create_token()).start()
    device_id = wait_until(lambda: agent.device_id, 30, "enrollment")
    wait_until(lambda: mqtt_ctl.device(device_id).online, 20, "online")
    agent.stop()
    key = load_signing_key(mqtt_ctl.state_dir / "signing-key.pem")
    bundle, _ = signed_bundle(tmp_path, mlp_onnx(tmp_path / "v3.onnx"), version=3, key=key)
    sha = upload_artifact(Connection.resolve(mqtt_ctl.grpc_address, mqtt_ctl.state_dir).control(), bundle)
    ca = tls_broker.tls.ca_cert.read_text() if tls_broker.tls else ""
    admin = TestClient(tls_broker.device_url, ADMIN_USER, ADMIN_PASSWORD, ca_pem=ca)
    admin.connect()
    desired = mqtt_pb2.DesiredModel(model="mlp", version=3, bundle_sha256=sha, bundle_size=bundle.stat().st_size)
    admin.publish(f"edgefleet/v1/{device_id}/desired", desired.SerializeToString(), retain=True)  # waits for PUBACK
    admin.close()

    agent.start()
    socket = agent.state_dir / "agent.sock"

    def version() -> str:
        if not socket.exists():
            return ""
        with LocalClient(f"unix://{socket}") as client:
            return client.status().version

    wait_until(lambda: version() == "3", 60, "the device to install the desired model by itself")
    assert "installing the desired model" in agent.log()


def test_agent_logs_in_to_the_broker_with_its_device_certificate(tmp_path: Path, procs: list[Proc]) -> None:
    """--mqtt-client-certs: a listener with require_certificate and use_identity_as_username takes
    the device certificate (CN = device id = the ACL's %u); no password is issued at all."""
    from edgefleet.controller.fleet.certificates import DeviceCA

    state_dir = tmp_path / "controller" / "controller"
    DeviceCA(state_dir)  # the broker trusts the controller's CA, so it must exist before the broker starts
    broker = Broker(tmp_path, client_ca=state_dir / "ca-bundle.pem").start()
    try:
        ctl = mqtt_controller(tmp_path, broker)
        ctl.args += ["--cert-lifetime", "6s"]  # renewed every few seconds, over the device port
        procs.append(ctl)
        ctl.start()
        agent = _agent(tmp_path, procs, ctl, ctl.create_token()).start()
        device_id = wait_until(lambda: agent.device_id, 30, "enrollment")
        login = json.loads((agent.state_dir / "mqtt.json").read_text())
        assert login["password"] == "" and login["url"] == f"mqtts://127.0.0.1:{broker.cert_port}"
        assert device_id not in (broker.auth_dir / "passwd").read_text()
        wait_until(lambda: ctl.device(device_id).online, 20, "the device online over MQTT with its certificate")
        wait_until(lambda: len(stored_seqs(ctl.state_dir, device_id)) >= 3, 20, "telemetry over MQTT")

        # The same ACL fences a certificate login: with this device's certificate, another device's
        # topics are refused (PUBACK 0x87), whatever the client says its name is.
        import ssl

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        context = ssl.create_default_context(cafile=str(broker.tls.ca_cert))
        context.load_cert_chain(str(agent.state_dir / "device.pem"), str(agent.state_dir / "device.key"))
        intruder = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-someone-else", protocol=mqtt.MQTTv5)
        intruder.tls_set_context(context)
        acks: dict[int, Any] = {}
        intruder.on_publish = lambda c, u, mid, reason, props: acks.__setitem__(mid, reason)
        intruder.connect("127.0.0.1", broker.cert_port)
        intruder.loop_start()
        try:
            info = intruder.publish("edgefleet/v1/dev-someone-else/telemetry", b"forged", qos=1)
            wait_until(lambda: info.mid in acks, 10, "the broker's PUBACK")
            assert acks[info.mid].value == 0x87, f"another device's topic was not refused: {acks[info.mid]}"
        finally:
            intruder.loop_stop()
            intruder.disconnect()

        # Renewed and reloaded: after the first certificate expired, a reconnect presents a newer one.
        wait_until(lambda: "mqtt client certificate reloaded" in agent.log(), 15, "a renewal the link reloads")
        time.sleep(7)
        broker.restart()
        before = len(stored_seqs(ctl.state_dir, device_id))
        wait_until(lambda: len(stored_seqs(ctl.state_dir, device_id)) > before + 3, 30,
                   "telemetry after reconnecting with the renewed certificate")
    finally:
        broker.stop(signal.SIGKILL)
