"""``edgefleet bundle build|inspect|verify`` and ``edgefleet-agent install``: one-line errors, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from bundle_fixtures import GOLDEN_X, HARDWARE_CLASS, write_affine_model
from click.testing import CliRunner

from edgefleet.firmware.cli import bundle_group, install_command
from edgefleet.firmware.slots import active_model


def invoke(command, args):
    return CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)


def keygen(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key, pub = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub.pem"
    result = invoke(bundle_group, ["keygen", "--out", key, "--public", pub])
    assert result.exit_code == 0 and result.output.startswith("ed25519:")
    return key, pub


def build(tmp_path: Path, key: Path, version: int, *extra) -> Path:
    model = write_affine_model(tmp_path / f"m{version}.onnx", 2.0, 1.0)
    out = tmp_path / f"v{version}.efb"
    result = invoke(
        bundle_group,
        ["build", model, "--name", "affine", "--version", version, "--hardware-class", HARDWARE_CLASS,
         "--key", key, "--out", out, "--expires-in-days", "1", *extra],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_build_inspect_verify(tmp_path):
    key, pub = keygen(tmp_path, "controller")
    np.savez(tmp_path / "golden.npz", x=GOLDEN_X)
    (tmp_path / "report.json").write_text(json.dumps({"recipe": "int8-qdq", "p95_ms": 1.5}))
    bundle = build(tmp_path, key, 4, "--golden", tmp_path / "golden.npz", "--provenance", tmp_path / "report.json")
    shown = invoke(bundle_group, ["inspect", bundle])
    assert shown.exit_code == 0 and "version:        4" in shown.output and "(model)" in shown.output
    as_json = json.loads(invoke(bundle_group, ["inspect", bundle, "--json"]).output)
    assert as_json["manifest"]["provenance"]["recipe"] == "int8-qdq"
    assert as_json["manifest"]["self_test"]["inputs"]["x"]["shape"] == [1, 4]
    ok = invoke(bundle_group, ["verify", bundle, "--trusted-key", pub, "--hardware-class", HARDWARE_CLASS])
    assert ok.exit_code == 0 and ok.output.startswith("ok: affine v4")


def test_verify_failures_are_one_line_with_exit_2(tmp_path):
    key, pub = keygen(tmp_path, "controller")
    _, stranger = keygen(tmp_path, "stranger")
    bundle = build(tmp_path, key, 1)
    cases = {
        "untrusted_key": ["--trusted-key", stranger],
        "wrong_class": ["--trusted-key", pub, "--hardware-class", "arm64-dotprod"],
        "downgrade": ["--trusted-key", pub, "--min-version", "2"],
    }
    for reason, args in cases.items():
        result = invoke(bundle_group, ["verify", bundle, *args])
        assert result.exit_code == 2
        assert result.output.count("\n") == 1 and f"rejected: {reason}:" in result.output
    truncated = tmp_path / "short.efb"
    truncated.write_bytes(bundle.read_bytes()[:-700])
    result = invoke(bundle_group, ["verify", truncated, "--trusted-key", pub])
    assert result.exit_code == 2 and "rejected: truncated" in result.output


def test_keygen_never_overwrites(tmp_path):
    key, _ = keygen(tmp_path, "controller")
    result = invoke(bundle_group, ["keygen", "--out", key])
    assert result.exit_code == 2 and result.output.startswith("error:")


def test_offline_install(tmp_path):
    key, pub = keygen(tmp_path, "controller")
    state_dir = tmp_path / "device"
    bundle = build(tmp_path, key, 1)
    args = ["--state-dir", state_dir, "--trusted-key", pub, "--hardware-class", HARDWARE_CLASS]
    result = invoke(install_command, [bundle, *args, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["result"] == "committed"
    assert active_model(state_dir).manifest.version == 1
    again = invoke(install_command, [bundle, *args])
    assert again.exit_code == 0 and again.output.startswith("already_installed")
    wrong = invoke(install_command, [bundle, "--state-dir", state_dir, "--trusted-key", pub, "--hardware-class", "x"])
    assert wrong.exit_code == 2 and "wrong_class" in wrong.output


def test_install_uses_keys_pinned_in_the_state_dir(tmp_path):
    key, pub = keygen(tmp_path, "controller")
    state_dir = tmp_path / "device"
    (state_dir / "trusted_keys").mkdir(parents=True)
    (state_dir / "trusted_keys" / "controller.pem").write_bytes(pub.read_bytes())
    result = invoke(install_command, [build(tmp_path, key, 1), "--state-dir", state_dir])
    assert result.exit_code == 0, result.output
    none = invoke(install_command, [build(tmp_path, key, 2), "--state-dir", tmp_path / "empty"])
    assert none.exit_code == 2 and "no trusted keys" in none.output
