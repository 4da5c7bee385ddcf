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
           "EDGEFLEET_CACHE_DIR": str(tmp_path / "cache")}
    report = compile_json(tmp_path, "x86_64-avx2", env)
    assert report["latency"]["measured_on"] == f"device:{agent.device_id}"
    assert not report["latency"]["estimated"]
    assert all(c["measured_on"] == f"device:{agent.device_id}" for c in report["candidates"] if c["latency_ms"])
    # No online device of this class: estimated, and the report says so.
    other = compile_json(tmp_path, "arm64-dotprod", env)
    assert other["latency"]["estimated"] is True
