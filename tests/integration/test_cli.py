"""The operator CLI through click's CliRunner, against a real controller process."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgefleet.controller.cli.main import cli
from fleet_harness import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def run(controller, monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    for var in ("EDGEFLEET_CONTROLLER", "EDGEFLEET_TOKEN", "EDGEFLEET_STATE_DIR", "EDGEFLEET_CA_CERT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EDGEFLEET_CONFIG", str(tmp_path / "no-config.toml"))

    def invoke(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)

    return invoke


def test_token_and_devices_commands(run, controller, start_agent):
    sd = ["--state-dir", str(controller.state_dir)]
    created = run("token", "create", "--uses", "2", "--ttl", "2h", "--labels", "site=berlin,line=3", "--json", *sd)
    assert created.exit_code == 0, created.output
    info = json.loads(created.output)
    assert info["token"].startswith("efe_") and info["uses_left"] == 2 and info["labels"] == {
        "site": "berlin", "line": "3"}

    listed = json.loads(run("token", "list", "--json", *sd).output)
    assert [t["token_id"] for t in listed["tokens"]] == [info["token_id"]]
    assert "token" not in listed["tokens"][0]  # the secret is never listed

    agent = start_agent("a1", info["token"])
    wait_until(lambda: agent.device_id, 30, "enrolled")
    wait_until(lambda: json.loads(run("devices", "list", "--json", *sd).output)["devices"][0]["online"], 30,
               "online")
    devices = json.loads(run("devices", "list", "--json", *sd).output)["devices"]
    assert devices[0]["device_id"] == agent.device_id and devices[0]["labels"]["site"] == "berlin"
    assert devices[0]["profile"]["cpu"]["logical_cores"] >= 1

    table = run("devices", "list", *sd)
    assert table.exit_code == 0 and agent.device_id in table.output and "online" in table.output
    shown = run("devices", "show", agent.device_id, *sd)
    assert shown.exit_code == 0 and "class" in shown.output and "cpu" in shown.output
    shown_json = json.loads(run("devices", "show", agent.device_id, "--json", *sd).output)
    assert shown_json["device_id"] == agent.device_id

    missing = run("devices", "show", "dev-missing", *sd)
    assert missing.exit_code == 2 and "no device 'dev-missing'" in missing.output

    revoked = run("token", "revoke", info["token_id"], *sd)
    assert revoked.exit_code == 0
    assert json.loads(run("token", "list", "--json", *sd).output)["tokens"][0]["revoked"] is True


def test_address_and_token_resolution(run, controller, tmp_path):
    # --controller plus EDGEFLEET_TOKEN, without the state dir: the CA is needed too (TLS).
    plain = run("devices", "list", "--controller", controller.grpc_address,
                env={"EDGEFLEET_TOKEN": controller.operator_token})
    assert plain.exit_code == 2 and "EDGEFLEET_CA_CERT" in plain.output
    env = {"EDGEFLEET_TOKEN": controller.operator_token, "EDGEFLEET_CA_CERT": str(controller.ca_path)}
    ok = run("devices", "list", "--json", "--controller", controller.grpc_address, env=env)
    assert ok.exit_code == 0 and json.loads(ok.output) == {"devices": []}
    # A config file.
    config = tmp_path / "config.toml"
    config.write_text(f'controller = "{controller.grpc_address}"\ntoken = "{controller.operator_token}"\n'
                      f'ca_cert = "{controller.ca_path}"\n')
    ok = run("token", "list", "--json", env={"EDGEFLEET_CONFIG": str(config)})
    assert ok.exit_code == 0, ok.output
    # Wrong token: one line, exit 2.
    bad = run("devices", "list", "--controller", controller.grpc_address,
              env={**env, "EDGEFLEET_TOKEN": "efo_nope"})
    assert bad.exit_code == 2 and "refused the operator token" in bad.output
    # Nothing listening there.
    down = run("devices", "list", "--controller", "127.0.0.1:1", env=env)
    assert down.exit_code == 2 and "cannot reach the controller" in down.output


def test_bad_arguments_are_one_line_errors(run, controller):
    sd = ["--state-dir", str(controller.state_dir)]
    for args, needle in [
        (["token", "create", "--ttl", "forever", *sd], "not a duration"),
        (["token", "create", "--labels", "novalue", *sd], "has no '='"),
        (["token", "create", "--uses", "0", *sd], "--uses"),
    ]:
        result = run(*args)
        assert result.exit_code == 2, result.output
        assert needle in result.output


def test_models_add_checks_calibration_data_before_upload(run, controller, tmp_path):
    import numpy as np

    from edgefleet.controller.client import Connection, upload_artifact
    from edgefleet.protos.v1 import control_pb2
    from models.layout_models import silero_like, silero_samples

    sd = ["--state-dir", str(controller.state_dir)]
    model = silero_like(tmp_path / "vad.onnx")
    samples = silero_samples(8)
    artifacts = controller.state_dir / "artifacts"
    before = sorted(p.name for p in artifacts.rglob("*") if p.is_file()) if artifacts.exists() else []
    for arrays, needle in [
        ({"input": samples["input"], "state": samples["state"]}, "no array for input 'sr'"),
        ({**samples, "sr": np.full(8, 0.5)}, "non-integral values but the input is int64"),
        ({**samples, "state": np.zeros((2, 2, 128), np.float32)}, "different sample counts"),
        ({**samples, "input": np.full((8, 512), np.nan, np.float32)}, "NaN/Inf"),
    ]:
        bad = tmp_path / "bad.npz"
        np.savez(bad, **arrays)
        result = run("models", "add", str(model), "--name", "vad", "--version", "1", "--calib", str(bad), *sd)
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], result.output
    after = sorted(p.name for p in artifacts.rglob("*") if p.is_file()) if artifacts.exists() else []
    assert after == before  # refused before anything was uploaded
    assert json.loads(run("models", "list", "--json", *sd).output)["models"] == []

    # A client that skips the CLI's check is refused by the controller too.
    client = Connection.resolve(None, controller.state_dir).control()
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{**samples, "state": np.zeros((8, 3, 1, 128), np.float32)})
    request = control_pb2.AddModelRequest(name="vad", version=1, sha256=upload_artifact(client, model),
                                          format="onnx", calib_sha256=upload_artifact(client, bad), budget=0.99)
    with pytest.raises(Exception, match=r"'state' has shape \(8, 3, 1, 128\).*\(invalid_argument\)"):
        client.call("AddModel", request)

    # Silero-shaped data (state with its batch on axis 1, sr one value per sample) is accepted.
    good = tmp_path / "good.npz"
    np.savez(good, input=samples["input"][:, 0], state=np.concatenate(list(samples["state"]), axis=1),
             sr=samples["sr"])
    ok = run("models", "add", str(model), "--name", "vad", "--version", "1", "--calib", str(good), "--json", *sd)
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["calib_sha256"]


def test_models_add_keeps_the_gate_a_rollout_compiles_under(run, controller, tmp_path):
    """Evaluation data, labels and the metric are checked like calibration data, then stored."""
    import numpy as np

    from models.layout_models import silero_like, silero_samples

    sd = ["--state-dir", str(controller.state_dir)]
    model = silero_like(tmp_path / "vad.onnx")
    samples = silero_samples(8)
    good = tmp_path / "good.npz"
    np.savez(good, input=samples["input"][:, 0], state=np.concatenate(list(samples["state"]), axis=1),
             sr=samples["sr"])
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=samples["input"][:, 0])
    labels = tmp_path / "labels.npz"
    np.savez(labels, labels=np.zeros(5, np.int64))  # 5 labels for 8 samples
    base = ["models", "add", str(model), "--name", "vad", "--version", "1", "--calib", str(good)]
    for extra, needle in [
        (["--eval-data", str(bad)], "--eval-data"),
        (["--metric", "f1"], "--metric 'f1' is unknown"),
        (["--metric", "accuracy"], "pass --eval-labels"),
        (["--eval-data", str(good), "--eval-labels", str(labels), "--metric", "accuracy"], "8 samples"),
        (["--metric", "accuracy", "--eval-labels", str(labels), "--budget", "0.99"], "largest accuracy drop"),
    ]:
        result = run(*base, *extra, *sd)
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], (extra, result.output)
    assert json.loads(run("models", "list", "--json", *sd).output)["models"] == []
    ok = run(*base, "--eval-data", str(good), "--metric", "mask-iou@0.3", "--budget", "0.95", "--json", *sd)
    assert ok.exit_code == 0, ok.output
    info = json.loads(ok.output)
    assert info["eval_sha256"] and info["metric"] == "mask-iou@0.3" and info["budget"] == 0.95
    listed = run("models", "list", *sd).output
    assert "mask-iou@0.3" in listed
