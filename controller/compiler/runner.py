"""Running a candidate over a data set, the same way for the gate and for measurement.

Sessions use the serving settings an agent uses (all graph optimizations, one intra-op thread per
physical core) so the numbers the gate sees are the numbers a device will produce.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.controller.compiler.data import Dataset, InputLayout, layouts_of, model_sample, sample_count
from edgefleet.controller.compiler.errors import CompileError

RunFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime a candidate runs on, as the bundle manifest will name it: part of the candidate."""

    name: str = "onnxruntime"  # onnxruntime | litert | openvino
    device: str = "CPU"  # OpenVINO device
    inference_precision: str | None = None  # OpenVINO INFERENCE_PRECISION_HINT: f32, bf16, f16
    # Intra-op threads the build was timed with; 0: one per physical core of the device. A small model
    # can run faster on fewer threads than cores (no hand-off between threads on every op).
    threads: int = 0

    def describe(self) -> str:
        name = self.name
        if self.name == "openvino":
            name = f"openvino:{self.device}" + (f"/{self.inference_precision}" if self.inference_precision else "")
        return name + (f" x{self.threads} thread{'s' if self.threads > 1 else ''}" if self.threads else "")

    @classmethod
    def from_manifest(cls, runtime: Mapping[str, Any]) -> RuntimeChoice:
        """From a compile manifest's (or report's) ``runtime`` object."""
        return cls(str(runtime.get("name") or "onnxruntime"), str(runtime.get("device") or "CPU"),
                   runtime.get("inference_precision"), int(runtime.get("threads") or 0))

    @classmethod
    def for_file(cls, path: Path) -> RuntimeChoice:
        """The runtime a file's format implies when the recipe names none."""
        suffix = Path(path).suffix
        return cls("openvino") if suffix == ".xml" else cls("litert") if suffix == ".tflite" else cls()


def _openvino_device_here(choice: RuntimeChoice) -> tuple[str, str | None]:
    """The device to run an OpenVINO build on here: its own, or the CPU for numerics when this machine
    lacks it (a GPU or NPU build), with the precision hint where the CPU computes in it."""
    import openvino as ov

    core = ov.Core()
    available = core.available_devices
    if choice.device in available or choice.device.split(".")[0] in available:
        return choice.device, choice.inference_precision
    caps = set(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    hint = choice.inference_precision
    cpu_hint = hint if hint is None or {"f16": "FP16", "bf16": "BF16"}.get(hint, "FP32") in caps else "f32"
    return "CPU", cpu_hint


def build_files(path: Path) -> list[Path]:
    """Every file a build is made of: an OpenVINO IR is its .xml and the .bin of weights beside it."""
    path = Path(path)
    weights = path.with_suffix(".bin")
    return [path, weights] if path.suffix == ".xml" and weights.is_file() else [path]


def build_size(path: Path) -> int:
    return sum(p.stat().st_size for p in build_files(path))


def move_build(path: Path, dest: Path, *, copy: bool = False) -> Path:
    """Move (or copy) a build to ``dest`` (its main file's new path), companions included."""
    import shutil

    for item in build_files(path):
        target = dest.with_suffix(item.suffix)
        if copy:
            shutil.copy2(item, target)
        else:
            item.rename(target)
    return dest


def default_threads() -> int:
    """Physical cores where psutil knows them, else logical CPUs: what the agent serves with."""
    try:
        import psutil

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return int(os.cpu_count() or 1)


def ort_session(
    path: Path, threads: int = 0, providers: list[str] | None = None, *, ort_defaults: bool = False
) -> Any:
    """An onnxruntime session with the agent's serving settings (``ort_serving_options``): its pool
    spin-waits ~1 ms after a run, not onnxruntime's ~45 ms. ``ort_defaults=True`` keeps the latter,
    for timing an original model as onnxruntime runs it out of the box."""
    import onnxruntime as ort

    from edgefleet.firmware.selftest import ort_serving_options

    so = ort_serving_options(threads or default_threads(), ort_defaults=ort_defaults)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])


class ModelRunner:
    """One loaded candidate: ``run`` feeds one batch, ``run_dataset`` feeds many samples in batches."""

    def __init__(
        self,
        path: Path,
        threads: int = 0,
        *,
        ort_defaults: bool = False,
        runtime: RuntimeChoice | None = None,
    ) -> None:
        self.path = Path(path)
        self.ort_defaults = ort_defaults
        self.runtime = runtime or RuntimeChoice.for_file(self.path)
        threads = self.runtime.threads or threads  # a build timed on fewer threads runs on those
        self.kind = (
            "openvino" if self.runtime.name == "openvino" else "tflite" if self.path.suffix == ".tflite" else "onnx"
        )
        self._tfl: Any = None
        self._ov: Any = None
        if self.kind == "openvino":
            from edgefleet.firmware.selftest import OpenVINOSession

            try:
                device, precision = _openvino_device_here(self.runtime)
                self.numerics_on = device  # a GPU or NPU build is gated on this machine's CPU
                self._ov = OpenVINOSession(self.path, device, precision, threads or default_threads())
            except ImportError as exc:
                raise CompileError(
                    "OpenVINO candidates need the openvino package; "
                    "install it with: pip install 'edgefleet[controller]'"
                ) from exc
            self.input_names = list(self._ov.input_names)
            self.output_names = list(self._ov.output_names)
            dims = [s[0] if s else None for s in self._ov.input_shapes]
            self.input_dtypes = {n: np.dtype(t) for n, t in zip(self.input_names, self._ov.input_types, strict=True)}
        elif self.kind == "onnx":
            self._sess = ort_session(self.path, threads, ort_defaults=ort_defaults)
            self.input_names = [i.name for i in self._sess.get_inputs()]
            self.output_names = [o.name for o in self._sess.get_outputs()]
            dims = [i.shape[0] if i.shape else None for i in self._sess.get_inputs()]
            self.input_dtypes = {i.name: _ort_type_to_np(i.type) for i in self._sess.get_inputs()}
        else:
            from ai_edge_litert.interpreter import Interpreter

            self._tfl = Interpreter(model_path=str(self.path), num_threads=threads or default_threads())
            self._tfl.allocate_tensors()
            ins = self._tfl.get_input_details()
            self.input_names = [d["name"] for d in ins]
            self.output_names = [d["name"] for d in self._tfl.get_output_details()]
            dims = [int(d["shape"][0]) if len(d["shape"]) else None for d in ins]
            # Quantized inputs take float data: _run_tflite applies the input's scale and zero point.
            self.input_dtypes = {
                d["name"]: np.dtype(np.float32) if d.get("quantization", (0.0, 0))[0] else np.dtype(d["dtype"])
                for d in ins
            }
        fixed = [d for d in dims if isinstance(d, int) and d > 0]
        self.fixed_batch: int | None = fixed[0] if fixed else None

    def settle_s(self) -> float:
        """How long this runner's thread pool may go on spin-waiting after its last run: what an
        interleaved timing waits before timing another runner (0 where no pool spins)."""
        from edgefleet.firmware.selftest import ORT_DEFAULT_SPIN_SETTLE_S, ORT_SPIN_SETTLE_S

        if self.kind != "onnx":
            return 0.0
        return ORT_DEFAULT_SPIN_SETTLE_S if self.ort_defaults else ORT_SPIN_SETTLE_S

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.kind == "openvino":
            outs = self._ov.run(None, {k: feed[k] for k in self.input_names})
            return dict(zip(self.output_names, outs, strict=True))
        if self.kind == "onnx":
            outs = self._sess.run(self.output_names, {k: feed[k] for k in self.input_names})
            return dict(zip(self.output_names, outs, strict=True))
        return self._run_tflite(feed)

    def _run_tflite(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        interp = self._tfl
        for detail in interp.get_input_details():
            arr = feed[detail["name"]]
            scale, zero = detail.get("quantization", (0.0, 0))
            if np.dtype(detail["dtype"]).kind in "iu" and scale:
                arr = np.clip(
                    np.round(arr / scale + zero), np.iinfo(detail["dtype"]).min, np.iinfo(detail["dtype"]).max
                )
            interp.set_tensor(detail["index"], arr.astype(detail["dtype"]))
        interp.invoke()
        out: dict[str, np.ndarray] = {}
        for detail in interp.get_output_details():
            val = interp.get_tensor(detail["index"])
            scale, zero = detail.get("quantization", (0.0, 0))
            if np.dtype(detail["dtype"]).kind in "iu" and scale:
                val = (val.astype(np.float32) - zero) * scale
            out[detail["name"]] = val
        return out

    def sample_feed(
        self,
        data: Mapping[str, np.ndarray] | Dataset,
        start: int = 0,
        *,
        layouts: Mapping[str, InputLayout] | None = None,
    ) -> dict[str, np.ndarray]:
        """One batch as the model takes it: its fixed batch size, or one sample.

        ``data`` is a Dataset, its ``inputs``, or plain arrays with samples on axis 0; ``layouts``
        (default: the Dataset's) say how a sample goes back into the model's shape.
        """
        arrays, found = layouts_of(data, layouts)
        if found:  # an input stored stacked or on a later batch axis: one sample in the model's shape
            one = model_sample({k: arrays[k] for k in self.input_names}, found, start % sample_count(arrays))
            return {k: v.astype(self.input_dtypes.get(k, v.dtype), copy=False) for k, v in one.items()}
        b = self.fixed_batch or 1
        feed = {}
        for name in self.input_names:
            arr = arrays[name][start : start + b]
            if arr.shape[0] < b:
                arr = np.concatenate([arr] * (b // max(1, arr.shape[0]) + 1))[:b]
            feed[name] = arr.astype(self.input_dtypes.get(name, arr.dtype), copy=False)
        return feed

    def run_dataset(
        self,
        data: Mapping[str, np.ndarray] | Dataset,
        max_batch: int = 32,
        *,
        layouts: Mapping[str, InputLayout] | None = None,
    ) -> dict[str, np.ndarray]:
        """All samples; outputs with samples on axis 0.

        Inputs in the usual layout run batched and outputs are concatenated on axis 0 (assumed to
        be the sample axis). When any input is stacked or batched on a later axis, each sample runs
        alone in the model's own shapes and each output is stacked on a new axis 0.
        """
        arrays, found = layouts_of(data, layouts)
        n = sample_count(arrays)

        def run_checked(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            try:
                return self.run(feed)
            except Exception as exc:
                raise CompileError(
                    f"running {self.path.name} failed ({str(exc).splitlines()[0][:160]}); "
                    "check the data matches the model inputs"
                ) from exc

        chunks: dict[str, list[np.ndarray]] = {k: [] for k in self.output_names}
        if found:
            for index in range(n):
                for k, v in run_checked(self.sample_feed(arrays, index, layouts=found)).items():
                    chunks[k].append(np.asarray(v))
            return {k: np.stack(v) for k, v in chunks.items()}
        b = self.fixed_batch or max(1, min(max_batch, n))
        for start in range(0, n, b):
            take = min(b, n - start)
            feed = (
                self.sample_feed(arrays, start, layouts={})
                if self.fixed_batch
                else {
                    k: arrays[k][start : start + take].astype(self.input_dtypes.get(k, arrays[k].dtype), copy=False)
                    for k in self.input_names
                }
            )
            for k, v in run_checked(feed).items():
                v = np.asarray(v)
                chunks[k].append(v[:take] if self.fixed_batch and v.ndim and v.shape[0] == b else v)
        return {k: np.concatenate(v) if v and v[0].ndim else np.stack(v) for k, v in chunks.items()}


def _ort_type_to_np(ort_type: str) -> np.dtype:
    table = {
        "tensor(float)": np.float32,
        "tensor(float16)": np.float16,
        "tensor(double)": np.float64,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
        "tensor(int8)": np.int8,
        "tensor(uint8)": np.uint8,
        "tensor(bool)": np.bool_,
    }
    return np.dtype(table.get(ort_type, np.float32))
