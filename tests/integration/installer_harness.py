"""Drive the real install CLI as a subprocess: pause it at a named point, SIGKILL it, restart it.

The installer announces a pause point on stderr (``EDGEFLEET_FAULT_PAUSED <point>``, see
``edgefleet.firmware.faults``) and sleeps, so every kill lands exactly where the test wants it.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet.firmware.bundle import BundleSpec, build_bundle
from edgefleet.firmware.keys import generate_signing_key, save_public_key
from edgefleet.firmware.manifest import GoldenTensor, IOSpec, SelfTestSpec, TensorSpec
from edgefleet.firmware.slots import active_model

HARDWARE_CLASS = "x86_64-avx2"
GOLDEN_X = np.array([[1.0, -2.0, 0.5, 3.0]], dtype=np.float32)
HAPPY = ["DOWNLOADING", "VERIFYING", "STAGED", "ACTIVATING", "PROBATION", "COMMITTED", "IDLE"]
SELF_TEST_ROLLBACK = ["DOWNLOADING", "VERIFYING", "STAGED", "ACTIVATING", "ROLLING_BACK", "IDLE"]
PAUSE_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Fixture:
    public_key: Path
    old: Path  # v1, y = 2x + 1
    new: Path  # v2, y = 3x + 1, with a 192 KiB weights file so downloads and unpacking take many chunks
    bad: Path  # v2 whose golden output is wrong: loads, then fails its self-test
    new_payload_size: int


def _affine(path: Path, scale: float) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["t"]), helper.make_node("Add", ["t", "bias"], ["y"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [
            numpy_helper.from_array(np.full([4], scale, np.float32), "scale"),
            numpy_helper.from_array(np.ones([4], np.float32), "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def build_fixture(workdir: Path) -> Fixture:
    workdir.mkdir(parents=True, exist_ok=True)
    key = generate_signing_key()
    public = workdir / "controller.pub.pem"
    save_public_key(key.public_key(), public)
    weights = workdir / "weights.bin"
    weights.write_bytes(np.random.default_rng(0).bytes(192 * 1024))

    def bundle(name: str, version: int, scale: float, expected_scale: float, extra: bool) -> Path:
        model = _affine(workdir / f"{name}.onnx", scale)
        payload = {"model.onnx": model, **({"weights.bin": weights} if extra else {})}
        spec = BundleSpec(
            name="affine",
            version=version,
            hardware_class=HARDWARE_CLASS,
            model_file="model.onnx",
            payload=payload,
            io=IOSpec((TensorSpec("x", "float32", (1, 4)),), (TensorSpec("y", "float32", (1, 4)),)),
            self_test=SelfTestSpec(
                {"x": GoldenTensor.from_array(GOLDEN_X)},
                {"y": GoldenTensor.from_array(GOLDEN_X * expected_scale + 1)},
                1e-5,
                1e-5,
            ),
            provenance={"recipe": "fp32"},
            expires_at=time.time() + 3600,
        )
        return build_bundle(spec, key, workdir / f"{name}.efb")

    new = bundle("new", 2, 3.0, 3.0, True)
    return Fixture(
        public_key=public,
        old=bundle("old", 1, 2.0, 2.0, False),
        new=new,
        bad=bundle("bad", 2, 3.0, 7.0, True),
        new_payload_size=(workdir / "new.onnx").stat().st_size + weights.stat().st_size,
    )


def install_cmd(fixture: Fixture, state_dir: Path, bundle: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "edgefleet.firmware.cli", "install", str(bundle),
        "--state-dir", str(state_dir),
        "--trusted-key", str(fixture.public_key),
        "--hardware-class", HARDWARE_CLASS,
        "--probation-inferences", "1",
        *extra,
    ]  # fmt: skip


def _env(faults: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_FAULT_")}
    env.update(faults or {})
    return env


def run(cmd: list[str], faults: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=_env(faults), capture_output=True, text=True, timeout=60)


def kill_at(cmd: list[str], point: str) -> str:
    """Start the installer, wait until it pauses at ``point``, SIGKILL it; returns its stderr."""
    proc = subprocess.Popen(
        cmd, env=_env({"EDGEFLEET_FAULT_PAUSE": point}), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + PAUSE_TIMEOUT_S
    try:
        while b"EDGEFLEET_FAULT_PAUSED" not in seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (proc.poll() is not None and not select.select([proc.stderr], [], [], 0)[0]):
                raise AssertionError(f"installer never paused at {point} (rc={proc.poll()}): {seen.decode()}")
            if select.select([proc.stderr], [], [], min(remaining, 0.5))[0]:
                chunk = os.read(proc.stderr.fileno(), 65536)
                if not chunk and proc.poll() is not None:
                    raise AssertionError(f"installer exited before pausing at {point}: {seen.decode()}")
                seen += chunk
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    return seen.decode()


def settle(cmd: list[str], faults: dict[str, str] | None = None, max_runs: int = 8) -> list[int]:
    """Restart until the installer exits by itself (not by a signal); returns every return code."""
    codes: list[int] = []
    for _ in range(max_runs):
        result = run(cmd, faults)
        codes.append(result.returncode)
        if result.returncode >= 0 and result.returncode != 75:
            return codes
    raise AssertionError(f"installer did not settle after {max_runs} runs: {codes}")


def state_log(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / "install.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def states(state_dir: Path) -> list[str]:
    return [
        e["state"] if "state" in e else f"rejected:{e['rejected']}"
        for e in state_log(state_dir)
        if "state" in e or "rejected" in e
    ]


def served(state_dir: Path) -> tuple[int, float] | None:
    """(version, y[0,0]) of what the device serves, after checking every byte against the manifest."""
    import onnxruntime as ort

    model = active_model(state_dir)
    if model is None:
        return None
    for f in model.manifest.files:
        data = (model.slot_dir / "payload" / f.path).read_bytes()
        assert len(data) == f.size and hashlib.sha256(data).hexdigest() == f.sha256, f"{f.path} differs"
    session = ort.InferenceSession(str(model.model_path), providers=["CPUExecutionProvider"])
    (y,) = session.run(["y"], {"x": GOLDEN_X})
    return model.manifest.version, float(y[0, 0])


OLD_SERVED = (1, 3.0)  # 2 * 1 + 1
NEW_SERVED = (2, 4.0)  # 3 * 1 + 1
