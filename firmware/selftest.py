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


# How long an idle intra-op worker spin-waits for work before it sleeps. onnxruntime's default is a
# spin count that comes to ~45 ms of a core after every run on a 2-core x86 box, whether or not
# another request comes. 1 ms keeps back-to-back runs (and the gaps between one run's operators) as
# fast as the default, measured on PP-OCR det/cls and Silero VAD, and burns ~1-2 ms of CPU per idle
# gap instead. Stopping the spin when a run returns (``session.force_spinning_stop``) costs a
# wake-up per run: 20-25% on a 0.12 ms model. onnxruntime releases without the key ignore it.
ORT_SPIN_US = 1000
# After a serving session's runs, its pool is asleep within this: what interleaved timing waits
# before the next candidate, so that the spinning is not charged to that one.
ORT_SPIN_SETTLE_S = 0.005
# The same wait after a session on onnxruntime's defaults (~45 ms of spinning): longer than that.
ORT_DEFAULT_SPIN_SETTLE_S = 0.06


def ort_serving_options(threads: int = 0, *, ort_defaults: bool = False) -> Any:
    """The onnxruntime session options every ONNX build is served and timed with (``ORT_SPIN_US``).

    ``ort_defaults=True`` keeps onnxruntime's own spinning, to time a model as a user runs it out of
    the box; its pool spins ~45 ms after the last run.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not ort_defaults:
        options.add_session_config_entry("session.intra_op.spin_duration_us", str(ORT_SPIN_US))
    return options


LITERT_RUNTIMES = ("litert", "tflite", "ai-edge-litert", "tflite-runtime")


def litert_interpreter_class() -> tuple[Any, Any, str]:
    """(Interpreter, load_delegate, package): ai-edge-litert first, tflite-runtime as the fallback."""
    try:
        from ai_edge_litert import interpreter as litert

        return litert.Interpreter, litert.load_delegate, "litert"
    except ImportError:
        from tflite_runtime import interpreter as tflite  # 2.14 breaks on NumPy 2; only where litert is missing

        return tflite.Interpreter, tflite.load_delegate, "tflite-runtime"


OPENVINO_RUNTIME = "openvino"


def openvino_config(
    device: str = "CPU", inference_precision: str | None = None, num_threads: int = 0
) -> dict[str, Any]:
    """The compile settings every OpenVINO session uses (self-test, serving, compiler timing), so a
    build is measured the way it will run. Threads and the precision hint apply to the CPU plugin only."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if device.split(".")[0] == "CPU" and num_threads > 0:
        config["INFERENCE_NUM_THREADS"] = int(num_threads)
    if inference_precision:
        config["INFERENCE_PRECISION_HINT"] = inference_precision
    return config


class OpenVINOSession:
    """An OpenVINO compiled model behind onnxruntime's ``run(names, feeds)``.

    It reads what OpenVINO reads: an IR (``.xml`` beside its ``.bin``), ONNX or TFLite. The device
    and the inference-precision hint come from the bundle; they are part of what was measured.
    """

    def __init__(
        self,
        model_path: Path,
        device: str = "CPU",
        inference_precision: str | None = None,
        num_threads: int = 0,
    ) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(model_path))
        self.compiled = core.compile_model(model, device, openvino_config(device, inference_precision, num_threads))
        self.request = self.compiled.create_infer_request()
        self.input_names = [_port_name(p, i, "input") for i, p in enumerate(self.compiled.inputs)]
        self.output_names = [_port_name(p, i, "output") for i, p in enumerate(self.compiled.outputs)]
        self.input_types = [p.get_element_type().to_dtype().name for p in self.compiled.inputs]
        self.input_shapes = [_partial_shape(p.get_partial_shape()) for p in self.compiled.inputs]
        self.output_shapes = [_partial_shape(p.get_partial_shape()) for p in self.compiled.outputs]
        self.output_types = [p.get_element_type().to_dtype().name for p in self.compiled.outputs]

    def run(self, names: list[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        # Inputs are read in place (the caller's arrays are not changed during the call) and outputs
        # are copied once, here: the request reuses its output buffers on the next call. For a model
        # that runs in a millisecond or two the default double copies are a measurable share.
        result = self.request.infer({name: feeds[name] for name in self.input_names},
                                    share_inputs=True, share_outputs=True)
        values = {name: np.array(result[port], copy=True)
                  for name, port in zip(self.output_names, self.compiled.outputs, strict=True)}
        return [values[n] for n in (names or self.output_names)]


def _port_name(port: Any, index: int, kind: str) -> str:
    try:
        return str(port.get_any_name())
    except RuntimeError:  # a port without a tensor name: OpenVINO allows it, names are ours
        return f"{kind}_{index}"


def _partial_shape(shape: Any) -> tuple[int | str, ...]:
    return tuple(int(d.get_length()) if d.is_static else "?" for d in shape)


class LiteRTSession:
    """A LiteRT interpreter behind onnxruntime's ``run(names, feeds)``, so one self-test serves both."""

    def __init__(self, model_path: Path, num_threads: int = 1) -> None:
        interpreter_class, _, _ = litert_interpreter_class()
        self.interpreter = interpreter_class(model_path=str(model_path), num_threads=num_threads)
        self.interpreter.allocate_tensors()
        self.input_details = self.interpreter.get_input_details()
        self.output_details = self.interpreter.get_output_details()

    def run(self, names: list[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        index = {d["name"]: d["index"] for d in self.input_details}
        for name, value in feeds.items():
            self.interpreter.set_tensor(index[name], value)
        self.interpreter.invoke()
        outputs = {d["name"]: d["index"] for d in self.output_details}
        return [self.interpreter.get_tensor(outputs[n]).copy() for n in (names or list(outputs))]


def load_session(
    model_path: Path,
    execution_provider: str = "CPUExecutionProvider",
    runtime: str = "onnxruntime",
    *,
    device: str | None = None,
    inference_precision: str | None = None,
) -> Any:
    """An inference session, or ``load_failed`` with the runtime's own words."""
    if runtime == OPENVINO_RUNTIME:
        try:
            # One thread, as for onnxruntime below: the old model keeps serving during the test.
            return OpenVINOSession(model_path, device or "CPU", inference_precision, num_threads=1)
        except ImportError:
            raise BundleRejected(
                RejectReason.LOAD_FAILED,
                "this build runs on OpenVINO, which is not installed here; install edgefleet[agent,openvino]",
            ) from None
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise BundleRejected(RejectReason.LOAD_FAILED, f"model {model_path.name} does not load: {exc}") from None
    if runtime in LITERT_RUNTIMES:
        try:
            return LiteRTSession(model_path)
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError for a bad flatbuffer
            raise BundleRejected(RejectReason.LOAD_FAILED, f"model {model_path.name} does not load: {exc}") from None
    if runtime != "onnxruntime":
        raise BundleRejected(RejectReason.LOAD_FAILED, f"runtime {runtime!r} is not available in this installer")
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


def load_manifest_session(model_path: Path, manifest: Manifest) -> Any:
    """The session the manifest's runtime, provider or device, and precision hint call for."""
    runtime = manifest.runtime
    return load_session(
        model_path,
        runtime.execution_provider,
        runtime.name,
        device=runtime.device,
        inference_precision=runtime.inference_precision,
    )


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
    session = load_manifest_session(slot_dir / manifest.model_file, manifest)
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
    session = load_session(Path(model_path), execution_provider)

    def spec(arg: Any) -> TensorSpec:
        return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), tuple(arg.shape))

    io = IOSpec(
        inputs=tuple(spec(a) for a in session.get_inputs()),
        outputs=tuple(spec(a) for a in session.get_outputs()),
    )
    return io, _golden_self_test(session, io, golden_inputs, rtol=rtol, atol=atol, seed=seed)


def describe_tflite_model(
    model_path: Path,
    golden_inputs: Mapping[str, np.ndarray] | None = None,
    *,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    seed: int = 0,
) -> tuple[IOSpec, SelfTestSpec]:
    """The I/O spec and golden self-test of a TFLite model, by running it once with LiteRT."""
    import numpy as np

    session = LiteRTSession(Path(model_path))

    def spec(detail: dict[str, Any]) -> TensorSpec:
        return TensorSpec(detail["name"], np.dtype(detail["dtype"]).name, tuple(int(d) for d in detail["shape"]))

    io = IOSpec(inputs=tuple(spec(d) for d in session.input_details),
                outputs=tuple(spec(d) for d in session.output_details))
    return io, _golden_self_test(session, io, golden_inputs, rtol=rtol, atol=atol, seed=seed)


def describe_openvino_model(
    model_path: Path,
    golden_inputs: Mapping[str, np.ndarray] | None = None,
    *,
    device: str = "CPU",
    inference_precision: str | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    seed: int = 0,
) -> tuple[IOSpec, SelfTestSpec]:
    """The I/O spec and golden self-test of a build OpenVINO runs, recorded with the same precision hint."""
    session = OpenVINOSession(Path(model_path), device, inference_precision)
    io = IOSpec(
        inputs=tuple(TensorSpec(n, t, s) for n, t, s in zip(session.input_names, session.input_types,
                                                             session.input_shapes, strict=True)),
        outputs=tuple(TensorSpec(n, t, s) for n, t, s in zip(session.output_names, session.output_types,
                                                              session.output_shapes, strict=True)),
    )
    return io, _golden_self_test(session, io, golden_inputs, rtol=rtol, atol=atol, seed=seed)


def _golden_self_test(
    session: Any, io: IOSpec, golden_inputs: Mapping[str, np.ndarray] | None, *, rtol: float, atol: float, seed: int
) -> SelfTestSpec:
    """Run the golden input once and record the outputs; without one, a seeded random input
    (symbolic dimensions become 1)."""
    import numpy as np

    if golden_inputs is None:
        rng = np.random.default_rng(seed)
        golden_inputs = {}
        for t in io.inputs:
            shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in t.shape)
            golden_inputs[t.name] = rng.standard_normal(shape).astype(t.dtype)
    outputs = session.run([t.name for t in io.outputs], dict(golden_inputs))
    return SelfTestSpec(
        inputs={k: GoldenTensor.from_array(np.asarray(v)) for k, v in golden_inputs.items()},
        expected_outputs={t.name: GoldenTensor.from_array(v) for t, v in zip(io.outputs, outputs, strict=True)},
        rtol=rtol,
        atol=atol,
    )
