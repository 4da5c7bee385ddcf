"""Reading and checking the source model before any pass touches it.

Real exports break the textbook path (opset 11/12, dims named ``p2o.DynamicDimension.0``), so the
I/O description we derive here is the single place that knows which dims are fixed and which are not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgefleet.controller.compiler.errors import CompileError

ModelFormat = Literal["onnx", "tflite"]
Dim = int | str | None


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output; a dim is an int when fixed, else its symbolic name (or None)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": [d if isinstance(d, int) else str(d or "?") for d in self.shape],
        }

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) and d > 0 for d in self.shape)


@dataclass(frozen=True)
class SourceModel:
    """The checked source: its path, bytes' sha256, format and I/O."""

    path: Path
    sha256: str
    format: ModelFormat
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int = 0


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _onnx_dtype(elem_type: int) -> str:
    import onnx

    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError):
        return f"onnx:{elem_type}"


def onnx_io(model: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Graph inputs (minus initializers, which old exporters list as inputs) and outputs."""
    inits = {init.name for init in model.graph.initializer}

    def spec(vi: Any) -> TensorSpec:
        tt = vi.type.tensor_type
        dims: list[Dim] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        return TensorSpec(vi.name, _onnx_dtype(tt.elem_type), tuple(dims))

    ins = tuple(spec(vi) for vi in model.graph.input if vi.name not in inits)
    outs = tuple(spec(vi) for vi in model.graph.output)
    return ins, outs


def load_source(path: Path) -> SourceModel:
    """Check the file really is a model we can compile; any failure is a one-line fix-it error."""
    path = Path(path)
    if not path.is_file():
        raise CompileError(f"model file {path} does not exist; pass the path of an .onnx or .tflite file")
    suffix = path.suffix.lower()
    if suffix not in (".onnx", ".tflite"):
        raise CompileError(
            f"model file {path.name} is neither .onnx nor .tflite; export the model to ONNX or TFLite first"
        )
    if path.stat().st_size == 0:
        raise CompileError(f"model file {path} is empty; re-export or re-download it")
    digest = sha256_file(path)
    if suffix == ".tflite":
        return _load_tflite(path, digest)
    return _load_onnx(path, digest)


def _load_onnx(path: Path, digest: str) -> SourceModel:
    import onnx

    fix = "re-export the model or copy it again (the file is corrupt, truncated or not ONNX)"
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, onnx raises its own; both mean "not a model"
        raise CompileError(f"cannot parse {path.name} as ONNX ({_short(exc)}); {fix}") from exc
    if not model.graph.node or not model.graph.output:
        raise CompileError(f"{path.name} parses but holds no graph (no nodes or no outputs); {fix}")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # ValidationError: dangling names, missing initializers after truncation
        raise CompileError(f"{path.name} is not a valid ONNX model ({_short(exc)}); {fix}") from exc
    ins, outs = onnx_io(model)
    if not ins:
        raise CompileError(f"{path.name} has no runtime inputs; compile a model that takes an input")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return SourceModel(path, digest, "onnx", ins, outs, opset)


def _load_tflite(path: Path, digest: str) -> SourceModel:
    fix = "re-export the model or copy it again (the file is corrupt, truncated or not TFLite)"
    head = path.read_bytes()[:8]
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise CompileError(f"{path.name} has no TFLite flatbuffer header ('TFL3'); {fix}")
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise CompileError(
            "reading .tflite models needs ai-edge-litert; install it with: pip install 'edgefleet[agent]'"
        ) from exc
    try:
        interp = Interpreter(model_path=str(path))
        ins = tuple(
            TensorSpec(d["name"], str(np.dtype(d["dtype"])), tuple(int(x) for x in d["shape"]))
            for d in interp.get_input_details()
        )
        outs = tuple(
            TensorSpec(d["name"], str(np.dtype(d["dtype"])), tuple(int(x) for x in d["shape"]))
            for d in interp.get_output_details()
        )
    except Exception as exc:
        raise CompileError(f"cannot load {path.name} as TFLite ({_short(exc)}); {fix}") from exc
    return SourceModel(path, digest, "tflite", ins, outs)


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text[:160]


def parse_input_shapes(items: list[str] | tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """``name=1,3,224,224`` flags into a mapping; errors say the expected form."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.split(","))
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise CompileError(
                f"--input-shape '{item}' is not NAME=D0,D1,... with positive integers; write it like images=1,3,224,224"
            ) from None
        shapes[name] = shape
    return shapes
