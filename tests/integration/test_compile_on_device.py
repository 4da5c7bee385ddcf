"""`edgefleet compile --target CLASS` times candidates on an online device of that class."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fleet_harness import wait_until
from model_factory import mlp_onnx

pytestmark = pytest.mark.integration


def compile_json(tmp_path, target: str, env: dict[str, str]) -> dict:  # type: ignore[no-untyped-def,type-arg]
    model = mlp_onnx(tmp_path / "m.onnx", hidden=512)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.controller.cli", "compile", str(model), "--target", target,
         "--calib", str(calib), "--recipes", "int8-dynamic-matmul", "--out", str(tmp_path / f"out-{target}"),
         "--no-cache", "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_candidates_are_timed_on_a_device_of_the_class(tmp_path, controller, start_agent):
    agent = start_agent("a1", controller.create_token(), ["--hardware-class", "x86_64-avx2"])
    wait_until(lambda: any(d.online for d in controller.devices()), 30, "online")
    env = {"EDGEFLEET_CONTROLLER": controller.grpc_address, "EDGEFLEET_TOKEN": controller.operator_token,
           "EDGEFLEET_CA_CERT": str(controller.ca_path),
           "EDGEFLEET_CACHE_DIR": str(tmp_path / "cache")}
    report = compile_json(tmp_path, "x86_64-avx2", env)
    assert report["latency"]["measured_on"] == f"device:{agent.device_id}"
    assert not report["latency"]["estimated"]
    assert all(c["measured_on"] == f"device:{agent.device_id}" for c in report["candidates"] if c["latency_ms"])
    # No online device of this class: estimated, and the report says so.
    other = compile_json(tmp_path, "arm64-dotprod", env)
    assert other["latency"]["estimated"] is True


def test_openvino_candidates_are_timed_on_the_device_with_their_runtime(tmp_path, controller, start_agent):
    """A profile that found OpenVINO gives OpenVINO candidates; the device times them on OpenVINO."""
    pytest.importorskip("openvino")
    from google.protobuf.json_format import MessageToJson

    agent = start_agent("a1", controller.create_token(), ["--hardware-class", "x86_64-avx2"])
    wait_until(lambda: any(d.online for d in controller.devices()), 30, "online")
    profile = controller.device(agent.device_id).profile
    assert any(r.name == "openvino" for r in profile.runtimes), "the agent's profile must report OpenVINO"
    profile_json = tmp_path / "profile.json"
    profile_json.write_text(MessageToJson(profile))
    model = mlp_onnx(tmp_path / "m.onnx", hidden=512)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    env = {"EDGEFLEET_CONTROLLER": controller.grpc_address, "EDGEFLEET_TOKEN": controller.operator_token,
           "EDGEFLEET_CA_CERT": str(controller.ca_path),
           "EDGEFLEET_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.controller.cli", "compile", str(model), "--target", str(profile_json),
         "--calib", str(calib), "--recipes", "ov-fp32", "--out", str(tmp_path / "out"), "--no-cache", "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {c["recipe"]: c for c in report["candidates"]}
    assert rows["ov-fp32"]["runtime"] == "openvino:CPU/f32"
    assert rows["ov-fp32"]["measured_on"] == f"device:{agent.device_id}", "the OpenVINO build was timed there"
    assert rows["ov-fp32"]["latency_ms"]
