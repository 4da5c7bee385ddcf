"""ONNX -> PyTorch (onnx2torch) for fine-tuning, and back to ONNX for the normal candidate chain."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgefleet.controller.compiler.model_io import SourceModel
from edgefleet.controller.compiler.retrain.torch_env import load_torch

# The opset retrained models are exported at: every pass downstream (ORT quantizer, OpenVINO) reads it.
EXPORT_OPSET = 17


class ConversionError(Exception):
    """The converter cannot handle this graph: its retrained candidates are skipped, with this reason."""


def to_torch(model: Path) -> Any:
    """The ONNX graph as a trainable torch.fx GraphModule (float32, train-ready)."""
    import onnx

    _, onnx2torch, _ = load_torch()
    try:
        module = onnx2torch.convert(onnx.load(str(model)))
    except Exception as exc:  # onnx2torch raises NotImplementedError (or worse) for an op it lacks
        raise ConversionError(f"onnx2torch cannot convert {model.name}: {_first_line(exc)}") from exc
    module = module.float()
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def check_runs(module: Any, example: Sequence[Any], expected: Sequence[tuple[int, ...]], what: str) -> None:
    """A converted (or pruned) network must still run and give outputs of the source's shapes."""
    torch, _, _ = load_torch()
    try:
        with torch.no_grad():
            outs = as_tuple(module(*example))
    except Exception as exc:
        raise ConversionError(f"{what} does not run in torch: {_first_line(exc)}") from exc
    shapes = [tuple(o.shape) for o in outs]
    if shapes != [tuple(s) for s in expected]:
        raise ConversionError(f"{what} gives outputs of shape {shapes}, the source {list(expected)}")


def as_tuple(outs: Any) -> tuple[Any, ...]:
    return tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)


def export_onnx(module: Any, example: Sequence[Any], source: SourceModel, path: Path) -> Path:
    """Export with the source's input and output names and its dynamic batch dim, so the gate, the
    calibration data and the bundle's I/O spec read the retrained model exactly as the source."""
    torch, _, _ = load_torch()
    inputs = [t.name for t in source.inputs]
    outputs = [t.name for t in source.outputs]
    dynamic: dict[str, dict[int, str]] = {}
    for t in (*source.inputs, *source.outputs):
        if t.shape and not isinstance(t.shape[0], int):
            dynamic[t.name] = {0: "batch"}
    module.eval()
    tmp = path.with_name(f".{path.name}.partial")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(example),
            str(tmp),
            dynamo=False,
            opset_version=max(EXPORT_OPSET, min(source.opset or EXPORT_OPSET, 20)),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic or None,
        )
    tmp.replace(path)
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
