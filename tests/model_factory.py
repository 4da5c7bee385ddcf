"""Small real models and signed bundles for tests: built here, never downloaded."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.profiler import collect_profile
from edgefleet.firmware.bundle import BundleSpec, build_bundle
from edgefleet.firmware.installer import Installer
from edgefleet.firmware.keys import generate_signing_key
from edgefleet.firmware.manifest import RuntimeSpec
from edgefleet.firmware.selftest import describe_onnx_model
from edgefleet.firmware.sources import FileSource


def mlp_onnx(
    path: Path,
    *,
    inputs: int = 64,
    hidden: int = 256,
    outputs: int = 10,
    seed: int = 0,
    extra_matmuls: int = 0,
    tanh_chain: int = 0,
) -> Path:
    """A float32 MLP with a free batch axis.

    `extra_matmuls` adds hidden layers (more weights, which quantization speeds up); `tanh_chain`
    adds elementwise Tanh nodes on the hidden activation, work no compiler pass removes or
    quantizes: a model that is slower whatever the compiler does.
    """
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", inputs])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", outputs])
    inits = [
        numpy_helper.from_array(rng.standard_normal((inputs, hidden)).astype(np.float32) * 0.1, "w0"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "b0"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"]),
        helper.make_node("Add", ["h0", "b0"], ["a0"]),
        helper.make_node("Relu", ["a0"], ["r0"]),
    ]
    last = "r0"
    for i in range(1, extra_matmuls + 1):
        inits.append(numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32) * 0.05, f"w{i}"))
        nodes += [
            helper.make_node("MatMul", [last, f"w{i}"], [f"h{i}"]),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
        ]
        last = f"r{i}"
    for i in range(tanh_chain):
        nodes.append(helper.make_node("Tanh", [last], [f"t{i}"]))
        last = f"t{i}"
    inits.append(numpy_helper.from_array(rng.standard_normal((hidden, outputs)).astype(np.float32) * 0.1, "wout"))
    nodes.append(helper.make_node("MatMul", [last, "wout"], ["logits"]))
    graph = helper.make_graph(nodes, "mlp", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@functools.cache
def local_hardware_class() -> str:
    """The hardware class the profiler derives for this machine (no micro-benchmark needed)."""
    return str(collect_profile(microbench=False).hardware_class)


def signed_bundle(
    tmp: Path,
    model_path: Path,
    *,
    name: str = "mlp",
    version: int = 1,
    hardware_class: str | None = None,
    key=None,
    provider: str = "CPUExecutionProvider",
):  # type: ignore[no-untyped-def]
    """(bundle path, signing key) for an ONNX model, with a golden self-test computed here.

    The class defaults to this machine's, which is what an agent started here reports."""
    key = key or generate_signing_key()
    io, self_test = describe_onnx_model(model_path)
    spec = BundleSpec(
        name=name,
        version=version,
        hardware_class=hardware_class or local_hardware_class(),
        model_file="model.onnx",
        payload={"model.onnx": model_path},
        io=io,
        self_test=self_test,
        runtime=RuntimeSpec(name="onnxruntime", execution_provider=provider),
    )
    out = tmp / f"{name}-{version}.efb"
    build_bundle(spec, key, out)
    return out, key


def install_offline(agent_state_dir: Path, bundle: Path, key) -> None:  # type: ignore[no-untyped-def]
    installer = Installer(agent_state_dir, [key.public_key()])
    outcome = installer.install(FileSource(bundle))
    assert outcome.ok, outcome
