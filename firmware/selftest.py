"""The golden self-test: a model must reproduce its recorded output on this device before it serves.

A bundle can verify perfectly and still be useless here: an execution provider that is missing, a
runtime that mis-executes an operator, a payload that the compiler got wrong. Loading the model and
comparing one inference against the output recorded at build time catches all three cheaply.
onnxruntime and numpy are imported lazily so that verifying and listing bundles stays fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.firmware.manifest import GoldenTensor, IOSpec, Manifest, SelfTestSpec, TensorSpec
from edgefleet.firmware.rejections import BundleRejected, RejectReason

if TYPE_CHECKING:
    import numpy as np

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def _providers(execution_provider: str) -> list[str]:
    """The bundle's provider where this device has it, and CPU behind it."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = [p for p in (execution_provider, "CPUExecutionProvider") if p in available]
    return list(dict.fromkeys(chosen))


def load_session(model_path: Path, execution_provider: str = "CPUExecutionProvider") -> Any:
    """An inference session, or ``load_failed`` with the runtime's own words."""
    import onnxruntime as ort

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # The old model keeps serving while the new one is tested: one thread, no spin-waiting, so
        # the self-test does not steal the cores live inference runs on.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(model_path), options, providers=_providers(execution_provider))
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise BundleRejected(RejectReason.LOAD_FAILED, f"model {model_path.name} does not load: {exc}") from None


def compare_outputs(
    actual: Mapping[str, np.ndarray], spec: SelfTestSpec, *, reason: RejectReason = RejectReason.SELF_TEST_FAILED
) -> None:
    import numpy as np

    for name, golden in spec.expected_outputs.items():
        expected = golden.to_array()
        got = actual.get(name)
        if got is None:
            raise BundleRejected(reason, f"model produced no output {name!r}")
        if got.shape != expected.shape:
            raise BundleRejected(reason, f"output {name!r} has shape {got.shape}, expected {expected.shape}")
        if not np.allclose(got, expected, rtol=spec.rtol, atol=spec.atol):
            worst = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
            raise BundleRejected(
                reason,
                f"output {name!r} differs from the golden output by up to {worst:.3g} "
                f"(rtol={spec.rtol}, atol={spec.atol})",
            )


def run_golden(session: Any, spec: SelfTestSpec) -> dict[str, np.ndarray]:
    feeds = {name: tensor.to_array() for name, tensor in spec.inputs.items()}
    names = list(spec.expected_outputs)
    try:
        values = session.run(names, feeds)
    except Exception as exc:
        raise BundleRejected(RejectReason.SELF_TEST_FAILED, f"inference on the golden input failed: {exc}") from None
    return dict(zip(names, values, strict=True))


def run_self_test(slot_dir: Path, manifest: Manifest, *, repeat: int = 1) -> None:
    """Load the slot's model and check ``repeat`` golden inferences; raises ``BundleRejected``."""
    if manifest.runtime.name != "onnxruntime":
        raise BundleRejected(
            RejectReason.LOAD_FAILED, f"runtime {manifest.runtime.name!r} is not available in this installer"
        )
    session = load_session(slot_dir / manifest.model_file, manifest.runtime.execution_provider)
    for _ in range(max(1, repeat)):
        compare_outputs(run_golden(session, manifest.self_test), manifest.self_test)


def describe_onnx_model(
    model_path: Path,
    golden_inputs: Mapping[str, np.ndarray] | None = None,
    *,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    seed: int = 0,
    execution_provider: str = "CPUExecutionProvider",
) -> tuple[IOSpec, SelfTestSpec]:
    """The I/O spec and a golden self-test for a model, by running it once (build side).

    Without ``golden_inputs`` a seeded random input is made; symbolic dimensions become 1.
    """
    import numpy as np

    session = load_session(Path(model_path), execution_provider)

    def spec(arg: Any) -> TensorSpec:
        return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), tuple(arg.shape))

    io = IOSpec(
        inputs=tuple(spec(a) for a in session.get_inputs()),
        outputs=tuple(spec(a) for a in session.get_outputs()),
    )
    if golden_inputs is None:
        rng = np.random.default_rng(seed)
        golden_inputs = {}
        for t in io.inputs:
            shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in t.shape)
            golden_inputs[t.name] = (rng.standard_normal(shape)).astype(t.dtype)
    outputs = session.run([t.name for t in io.outputs], dict(golden_inputs))
    self_test = SelfTestSpec(
        inputs={k: GoldenTensor.from_array(np.asarray(v)) for k, v in golden_inputs.items()},
        expected_outputs={t.name: GoldenTensor.from_array(v) for t, v in zip(io.outputs, outputs, strict=True)},
        rtol=rtol,
        atol=atol,
    )
    return io, self_test
