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
    _, onnx2torch, _ = load_torch()
    try:
        module = onnx2torch.convert(_prepared(model))
    except Exception as exc:  # onnx2torch raises NotImplementedError (or worse) for an op it lacks
        raise ConversionError(f"onnx2torch cannot convert {model.name}: {_first_line(exc)}") from exc
    module = module.float()
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def _prepared(model: Path) -> Any:
    """The graph as the converter and the pruner need it: onnxruntime's basic (portable) rewrites
    first, which fold a conv's bias Add and a BatchNorm into the conv itself (Paddle exports add the
    bias after the conv, and a per-channel constant beside a conv is a tensor the pruner cannot see
    and would leave at the old channel count), then weights as initializers."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgefleet-retrain-") as tmp:
        out = Path(tmp) / "basic.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(out)
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
            proto = onnx.load(str(out))
        except Exception:  # keep the graph as given; the converter says what it cannot handle
            proto = onnx.load(str(model))
    return _flatten_reshapes(_matmuls_as_gemm(_bias_adds_into_convs(_weights_as_initializers(proto))))


def _bias_adds_into_convs(proto: Any) -> Any:
    """``Add(Conv(x), b)`` with a per-channel constant ``b`` becomes the conv's own bias (onnxruntime
    folds this for Conv but not for ConvTranspose, which PP-OCR's detection head uses)."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            consumers[name] = consumers.get(name, 0) + 1
    for node in list(graph.node):
        if node.op_type != "Add":
            continue
        for here, other in ((0, 1), (1, 0)):
            conv = producers.get(node.input[here])
            const = inits.get(node.input[other])
            if conv is None or const is None or conv.op_type not in ("Conv", "ConvTranspose") or len(conv.input) > 2:
                continue
            if consumers.get(node.input[here], 0) != 1 or conv.input[1] not in inits:
                continue
            weight = inits[conv.input[1]]
            group = next((a.i for a in conv.attribute if a.name == "group"), 1) or 1
            channels = weight.dims[1] * group if conv.op_type == "ConvTranspose" else weight.dims[0]
            value = numpy_helper.to_array(const)
            spatial = len(weight.dims) - 2
            shape = list(value.shape)
            if len(shape) == spatial + 2 and shape[0] == 1:
                shape = shape[1:]
            if shape != [channels] + [1] * spatial:  # [C, 1, 1] or [1, C, 1, 1]: one value per channel
                continue
            bias = numpy_helper.from_array(value.reshape(-1).astype(value.dtype), f"{const.name}__bias")
            graph.initializer.append(bias)
            conv.input.append(bias.name)
            conv.output[0] = node.output[0]
            graph.node.remove(node)
            break
    return proto


def _flatten_reshapes(proto: Any) -> Any:
    """``Reshape(x, [-1, C])`` of an [N, C, 1, 1] tensor is a Flatten: as such it follows the pruned
    channel count, where the constant C would not."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(proto).graph
    except Exception:
        return proto
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in (*inferred.value_info, *inferred.input) if v.type.HasField("tensor_type")}
    inits = {i.name: i for i in graph.initializer}
    for index, node in enumerate(list(graph.node)):
        if node.op_type != "Reshape" or node.input[1] not in inits:
            continue
        shape = numpy_helper.to_array(inits[node.input[1]]).tolist()
        source = dims.get(node.input[0])
        if len(shape) != 2 or not source or len(source) < 2 or any(d is None for d in source[1:]):
            continue
        if shape[0] in (0, -1, source[0]) and shape[1] == int(np.prod([d or 0 for d in source[1:]])):
            flat = helper.make_node("Flatten", [node.input[0]], list(node.output), axis=1,
                                    name=node.name or f"flatten_{index}")
            graph.node.remove(node)
            graph.node.insert(index, flat)
    return proto


def _matmuls_as_gemm(proto: Any) -> Any:
    """A MatMul of a 2-D activation by a constant matrix is a fully connected layer: as Gemm it becomes
    an nn.Linear, whose channels the pruner sees (a bare MatMul keeps its constant at the old width)."""
    import onnx
    from onnx import helper

    graph = proto.graph
    try:
        ranks = {v.name: len(v.type.tensor_type.shape.dim)
                 for v in (*onnx.shape_inference.infer_shapes(proto).graph.value_info, *graph.input)
                 if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    except Exception:  # shape inference is best effort here
        return proto
    matrices = {i.name for i in graph.initializer if len(i.dims) == 2}
    for index, node in enumerate(list(graph.node)):
        if node.op_type == "MatMul" and node.input[1] in matrices and ranks.get(node.input[0]) == 2:
            gemm = helper.make_node("Gemm", list(node.input), list(node.output), name=node.name or f"gemm_{index}")
            graph.node.remove(node)
            graph.node.insert(index, gemm)
    return proto


def _weights_as_initializers(proto: Any) -> Any:
    """onnx2torch reads a conv's or matmul's weights from initializers only; Paddle exports (PP-OCR)
    keep them in Constant nodes, and older exports list initializers among the graph inputs too."""
    graph = proto.graph
    constants = [n for n in graph.node
                 if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"]
    for node in constants:
        tensor = node.attribute[0].t
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        graph.node.remove(node)
    names = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in names]
    del graph.input[:]
    graph.input.extend(inputs)
    return proto


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


def check_agrees(module: Any, example: Sequence[Any], reference: Sequence[Any], what: str) -> None:
    """The converted network computes what onnxruntime computes from the source (to float rounding)."""
    import numpy as np

    torch, _, _ = load_torch()
    with torch.no_grad():
        outs = as_tuple(module(*example))
    for got, want in zip(outs, reference, strict=True):
        got_np, want_np = got.numpy().astype(np.float64), np.asarray(want, np.float64)
        err = float(np.max(np.abs(got_np - want_np)) / (np.max(np.abs(want_np)) + 1e-12))
        if not np.isfinite(err) or err > 1e-3:
            raise ConversionError(f"{what} disagrees with onnxruntime (max relative error {err:.2g})")


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
