"""Run the installed model: onnxruntime, LiteRT or OpenVINO, with the provider, delegate or device the
bundle names.

A requested execution provider that is not available here (or fails to create a session) falls
back to the CPU, and the fallback is reported (status, log, telemetry runtime string): a silent
fallback would make a rollout's latency gate compare the wrong thing.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgefleet.firmware.manifest import IOSpec, Manifest, RuntimeSpec, TensorSpec
from edgefleet.firmware.selftest import (
    LITERT_RUNTIMES,
    OPENVINO_RUNTIME,
    OpenVINOSession,
    litert_interpreter_class,
    ort_serving_options,
)

log = logging.getLogger("edgefleet.agent.runtime")


class InputMismatch(ValueError):
    """Inputs that do not fit the model's I/O spec; the message names the expected spec."""


def describe(spec: tuple[TensorSpec, ...]) -> str:
    return ", ".join(f"{t.name}: {t.dtype}[{','.join(str(d) for d in t.shape)}]" for t in spec)


def check_inputs(io: IOSpec, inputs: dict[str, np.ndarray]) -> None:
    expected = {t.name: t for t in io.inputs}
    if set(inputs) != set(expected):
        raise InputMismatch(f"inputs {sorted(inputs)} do not match the model; expected {describe(io.inputs)}")
    for name, array in inputs.items():
        spec = expected[name]
        if array.dtype != np.dtype(spec.dtype):
            raise InputMismatch(f"input '{name}' is {array.dtype}; expected {describe((spec,))}")
        if array.ndim != len(spec.shape) or any(
            isinstance(d, int) and d > 0 and d != n for d, n in zip(spec.shape, array.shape, strict=True)
        ):
            raise InputMismatch(f"input '{name}' has shape {list(array.shape)}; expected {describe((spec,))}")


def batch_axis(io: IOSpec) -> bool:
    """True when every input and output has a free first dimension, so requests can be stacked."""
    return all(t.shape and not (isinstance(t.shape[0], int) and t.shape[0] > 0) for t in (*io.inputs, *io.outputs))


class Runner(Protocol):
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass
class LoadedModel:
    name: str
    version: str
    io: IOSpec
    runtime: str           # "onnxruntime:CPUExecutionProvider"
    fallback: str          # empty when the requested provider/delegate is in use
    runner: Runner
    batchable: bool

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runner.run(inputs)


class _OrtRunner:
    def __init__(self, session: Any) -> None:
        self.session = session
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs), strict=True))


class _LiteRTRunner:
    def __init__(self, interpreter: Any) -> None:
        self.interpreter = interpreter
        self.inputs = {d["name"]: d["index"] for d in interpreter.get_input_details()}
        self.outputs = {d["name"]: d["index"] for d in interpreter.get_output_details()}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in inputs.items():
            self.interpreter.set_tensor(self.inputs[name], array)
        self.interpreter.invoke()
        return {name: self.interpreter.get_tensor(index).copy() for name, index in self.outputs.items()}


def _load_onnx(path: Path, provider: str, threads: int) -> tuple[Runner, str, str]:
    import onnxruntime as ort

    options = ort_serving_options(threads)  # what the compiler timed the build with
    fallback = ""
    available = ort.get_available_providers()
    if provider not in available:
        fallback = f"{provider} is not available here (have: {', '.join(available)}); using CPUExecutionProvider"
    else:
        try:
            session = ort.InferenceSession(str(path), options, providers=[provider])
            if session.get_providers()[0] == provider:
                return _OrtRunner(session), f"onnxruntime:{provider}", ""
            fallback = f"{provider} did not take the model; using {session.get_providers()[0]}"
        except Exception as exc:  # onnxruntime raises its own exception types per EP
            fallback = f"{provider} failed to create a session ({exc}); using CPUExecutionProvider"
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _OrtRunner(session), "onnxruntime:CPUExecutionProvider", fallback


class _OpenVINORunner:
    def __init__(self, session: OpenVINOSession) -> None:
        self.session = session

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.session.output_names, self.session.run(None, inputs), strict=True))


def _load_openvino(path: Path, device: str, precision: str | None, threads: int) -> tuple[Runner, str, str]:
    """OpenVINO on the bundle's device. A device that is missing here (an NPU build on a box without
    the NPU plugin) falls back to the CPU without the precision hint, and says so."""
    try:
        import openvino as ov
    except ImportError:
        raise ValueError(
            "this build runs on OpenVINO, which is not installed; install edgefleet[agent,openvino]"
        ) from None
    used = f"openvino:{device}" + (f"/{precision}" if precision else "")
    available = ov.Core().available_devices
    if device == "CPU" or device in available or device.split(".")[0] in available:
        try:
            return _OpenVINORunner(OpenVINOSession(path, device, precision, threads)), used, ""
        except Exception as exc:  # a plugin that is present but cannot compile this model
            fallback = f"OpenVINO {device} failed to compile the model ({str(exc).splitlines()[0][:160]}); using CPU"
    else:
        fallback = f"OpenVINO device {device} is not available here (have: {', '.join(available)}); using CPU"
    return _OpenVINORunner(OpenVINOSession(path, "CPU", None, threads)), "openvino:CPU", fallback


_DELEGATE_LIBRARIES = {"edgetpu": "libedgetpu.so.1", "gpu": "libtensorflowlite_gpu_delegate.so"}


def _load_tflite(path: Path, delegate: str | None, threads: int) -> tuple[Runner, str, str]:
    interpreter_class, load_delegate, package = litert_interpreter_class()
    fallback = ""
    delegates = []
    if delegate and delegate != "xnnpack":
        library = _DELEGATE_LIBRARIES.get(delegate, delegate)
        try:
            delegates.append(load_delegate(library))
        except (ValueError, OSError) as exc:
            fallback = f"delegate {delegate} could not load ({exc}); using the CPU (XNNPACK)"
    interpreter = interpreter_class(
        model_path=str(path), num_threads=threads if threads > 0 else None, experimental_delegates=delegates or None
    )
    interpreter.allocate_tensors()
    used = delegate if delegates else "xnnpack"
    return _LiteRTRunner(interpreter), f"{package}:{used}", fallback


def capped_threads(asked: int | None, device_threads: int) -> int:
    """The intra-op thread count a build runs on: the one it asks for (capped at the device's), else
    the device's (0: the runtime's default). Serving and on-device timing both use it."""
    if asked and asked > 0:
        return min(asked, device_threads) if device_threads > 0 else asked
    return device_threads


def serving_threads(runtime: RuntimeSpec, device_threads: int) -> int:
    """The thread count to serve a build with: the one its manifest was chosen at, if any."""
    return capped_threads(runtime.threads, device_threads)


def load_model(model_path: Path, manifest: Manifest, threads: int = 0) -> LoadedModel:
    """Load the payload model with the runtime its manifest names, on the threads it was timed with
    when the compiler found fewer threads than cores faster (never more than ``threads``)."""
    runtime = manifest.runtime
    threads = serving_threads(runtime, threads)
    if runtime.name == "onnxruntime":
        runner, used, fallback = _load_onnx(model_path, runtime.execution_provider, threads)
    elif runtime.name in LITERT_RUNTIMES:
        runner, used, fallback = _load_tflite(model_path, runtime.delegate, threads)
    elif runtime.name == OPENVINO_RUNTIME:
        runner, used, fallback = _load_openvino(model_path, runtime.device or "CPU", runtime.inference_precision,
                                                threads)
    else:
        raise ValueError(
            f"runtime {runtime.name!r} is not supported by this agent; use onnxruntime, litert or openvino"
        )
    if fallback:
        log.warning("runtime fallback", extra={"model": manifest.name, "version": manifest.version,
                                                "reason": fallback})
    return LoadedModel(
        name=manifest.name,
        version=str(manifest.version),
        io=manifest.io,
        runtime=used,
        fallback=fallback,
        runner=runner,
        batchable=batch_axis(manifest.io),
    )
