"""Tiny ONNX models and signed bundles for the firmware unit tests (built in milliseconds).

A plain module, not conftest, so tests can import its helpers by a name no other conftest shadows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from edgefleet.firmware.bundle import BundleSpec, build_bundle
from edgefleet.firmware.keys import generate_signing_key
from edgefleet.firmware.manifest import GoldenTensor, IOSpec, SelfTestSpec, TensorSpec

HARDWARE_CLASS = "x86_64-avx2"
GOLDEN_X = np.array([[1.0, -2.0, 0.5, 3.0]], dtype=np.float32)


def write_affine_model(path: Path, scale: float, bias: float) -> Path:
    """y = x * scale + bias on a [1, 4] float input: different numbers per version, trivial to check."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["t"]), helper.make_node("Add", ["t", "bias"], ["y"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [
            numpy_helper.from_array(np.full([4], scale, np.float32), "scale"),
            numpy_helper.from_array(np.full([4], bias, np.float32), "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def affine_spec(
    workdir: Path,
    *,
    version: int,
    scale: float = 2.0,
    bias: float = 1.0,
    expected_scale: float | None = None,
    extra_bytes: int = 0,
    **overrides: Any,
) -> BundleSpec:
    """A bundle spec whose golden output is right unless ``expected_scale`` says otherwise."""
    workdir.mkdir(parents=True, exist_ok=True)
    model = write_affine_model(workdir / f"model-v{version}.onnx", scale, bias)
    payload = {"model.onnx": model}
    if extra_bytes:
        blob = workdir / f"weights-v{version}.bin"
        blob.write_bytes(np.random.default_rng(version).bytes(extra_bytes))
        payload["weights.bin"] = blob
    expected = GOLDEN_X * (scale if expected_scale is None else expected_scale) + bias
    fields: dict[str, Any] = {
        "name": "affine",
        "version": version,
        "hardware_class": HARDWARE_CLASS,
        "model_file": "model.onnx",
        "payload": payload,
        "io": IOSpec((TensorSpec("x", "float32", (1, 4)),), (TensorSpec("y", "float32", (1, 4)),)),
        "self_test": SelfTestSpec(
            {"x": GoldenTensor.from_array(GOLDEN_X)}, {"y": GoldenTensor.from_array(expected)}, 1e-5, 1e-5
        ),
        "provenance": {"recipe": "fp32", "source_sha256": "0" * 64},
        "created_at": time.time(),
        "expires_at": time.time() + 3600,
    }
    fields.update(overrides)
    return BundleSpec(**fields)


@pytest.fixture(scope="session")
def signing_key() -> Ed25519PrivateKey:
    return generate_signing_key()


@pytest.fixture(scope="session")
def other_key() -> Ed25519PrivateKey:
    return generate_signing_key()


@pytest.fixture
def make_bundle(tmp_path: Path, signing_key: Ed25519PrivateKey) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(version: int = 1, *, key: Ed25519PrivateKey | None = None, **kwargs: Any) -> Path:
        n = next(counter)
        spec = affine_spec(tmp_path / f"src{n}", version=version, **kwargs)
        return build_bundle(spec, key or signing_key, tmp_path / f"bundle{n}-v{version}.efb")

    return make
