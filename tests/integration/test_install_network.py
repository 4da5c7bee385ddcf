"""Bundles over the network: upload, install command, FetchArtifact, acks, offline devices, resume."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from edgefleet.agent.client import LocalClient
from edgefleet.controller.cli.main import cli
from edgefleet.firmware.keys import generate_signing_key, load_signing_key
from edgefleet.protos.v1 import control_pb2
from fleet_harness import wait_until
from model_factory import mlp_onnx, signed_bundle

pytestmark = pytest.mark.integration


@pytest.fixture
def run_cli(controller, monkeypatch):  # type: ignore[no-untyped-def]
    for var in ("EDGEFLEET_CONTROLLER", "EDGEFLEET_TOKEN", "EDGEFLEET_STATE_DIR"):
        monkeypatch.delenv(var, raising=False)

    def invoke(*args: str):  # type: ignore[no-untyped-def]
        return CliRunner().invoke(cli, [*args, "--state-dir", str(controller.state_dir)], catch_exceptions=False)

    return invoke


def controller_key(controller):  # type: ignore[no-untyped-def]
    return load_signing_key(controller.state_dir / "signing-key.pem")


def test_install_over_the_network_then_rejections_reach_the_controller(tmp_path, controller, start_agent, run_cli):
    agent = start_agent("a1", controller.create_token(), ["--telemetry-interval", "0.5s"])
    device = wait_until(lambda: agent.device_id, 30, "enrolled")
    assert list((agent.state_dir / "trusted_keys").glob("*.pem")), "the controller's key is pinned at enrollment"
    key = controller_key(controller)
    v1, _ = signed_bundle(tmp_path, mlp_onnx(tmp_path / "v1.onnx"), version=1, key=key)
    result = run_cli("devices", "install", device, str(v1), "--json", "--timeout", "60s")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["result"] == "committed" and info["ack"]["model"] == "mlp" and info["ack"]["version"] == "1"
    with LocalClient(f"unix://{agent.state_dir / 'agent.sock'}") as client:
        wait_until(lambda: client.status().version == "1", 10, "agent serving v1")

    # Signed by a key the device does not trust: refused before any byte of payload is written.
    (tmp_path / "rogue").mkdir()
    rogue, _ = signed_bundle(tmp_path / "rogue", mlp_onnx(tmp_path / "r.onnx"), version=2, key=generate_signing_key())
    refused = json.loads(run_cli("devices", "install", device, str(rogue), "--json", "--timeout", "60s").output)
    assert refused["result"] == "rejected" and refused["reason"] == "untrusted_key"

    # Same version again: the device already runs it.
    again = json.loads(run_cli("devices", "install", device, str(v1), "--json", "--timeout", "60s").output)
    assert again["result"] == "already_installed"

    listed = json.loads(run_cli("commands", "list", "--device", device, "--json").output)["commands"]
    assert [c["result"] for c in listed] == ["committed", "rejected", "already_installed"]
    with LocalClient(f"unix://{agent.state_dir / 'agent.sock'}") as client:
        assert client.status().version == "1"  # still serving the committed model


def test_offline_device_gets_the_command_when_it_returns(tmp_path, controller, start_agent):
    agent = start_agent("a1", controller.create_token())
    device = wait_until(lambda: agent.device_id, 30, "enrolled")
    agent.kill()
    bundle, _ = signed_bundle(tmp_path, mlp_onnx(tmp_path / "m.onnx"), version=3, key=controller_key(controller))
    from edgefleet.controller.client import Connection, upload_artifact

    client = Connection.resolve(controller.grpc_address, controller.state_dir).control()
    sha = upload_artifact(client, bundle)
    info = controller.call("InstallOnDevice", control_pb2.InstallOnDeviceRequest(device_id=device, bundle_sha256=sha))
    assert info.state == "pending"
    agent.start()
    done = wait_until(lambda: controller.call("GetCommand", control_pb2.GetCommandRequest(
        command_id=info.command_id)).state == "done", 60, "command done")
    assert done
    final = controller.call("GetCommand", control_pb2.GetCommandRequest(command_id=info.command_id))
    assert final.result == "committed" and final.ack.version == 3


def test_download_resumes_across_a_controller_restart(tmp_path, controller, start_agent):
    agent = start_agent("a1", controller.create_token())
    device = wait_until(lambda: agent.device_id, 30, "enrolled")
    model = mlp_onnx(tmp_path / "big.onnx", hidden=2048, extra_matmuls=6)  # about 100 MB of weights
    assert os.path.getsize(model) > 90_000_000
    bundle, _ = signed_bundle(tmp_path, model, version=5, key=controller_key(controller))
    from edgefleet.controller.client import Connection, upload_artifact

    sha = upload_artifact(Connection.resolve(controller.grpc_address, controller.state_dir).control(), bundle)
    info = controller.call("InstallOnDevice", control_pb2.InstallOnDeviceRequest(device_id=device, bundle_sha256=sha))

    def partial() -> int:
        parts = list((agent.state_dir / "slots").glob("*/bundle-*.part"))
        return parts[0].stat().st_size if parts else 0

    wait_until(lambda: partial() > 1_000_000, 60, "download under way")
    controller.kill()  # the link dies mid-transfer
    cut_at = partial()
    controller.close_channel()
    controller.start()
    wait_until(lambda: controller.call("GetCommand", control_pb2.GetCommandRequest(
        command_id=info.command_id)).state == "done", 120, "install finished after the restart")
    final = controller.call("GetCommand", control_pb2.GetCommandRequest(command_id=info.command_id))
    assert final.result == "committed", final
    log = [json.loads(line) for line in (agent.state_dir / "install.log").read_text().splitlines()]
    resumed = [e for e in log if e.get("state") == "DOWNLOADING" and e.get("have", 0) > 0]
    assert resumed and resumed[0]["have"] >= min(cut_at, 1_000_000), "the download resumed instead of restarting"
