"""Static facts about an ONNX graph: MAC counts and which nodes run in int8.

Used to estimate latency when nothing can be timed, and to check a build's structure for hardware we
cannot run here (NPUs, DPUs), where "it runs on the CPU EP" proves nothing about the target.
"""

from __future__ import annotations

from typing import Any

import numpy as np

QOPERATOR_OPS = {
    "QLinearConv",
    "QLinearMatMul",
    "QLinearAdd",
    "QLinearMul",
    "QLinearAveragePool",
    "QLinearGlobalAveragePool",
    "QLinearConcat",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearSoftmax",
    "QGemm",
    "ConvInteger",
    "MatMulInteger",
    "QAttention",
}


def _shapes(model: Any) -> dict[str, list[int]]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    shapes: dict[str, list[int]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def count_macs(model: Any) -> tuple[float, float]:
    """(float MACs, int8 MACs) over Conv/MatMul/Gemm-like nodes; int8 when fed by DequantizeLinear."""
    shapes = _shapes(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    float_macs = 0.0
    int8_macs = 0.0
    for node in model.graph.node:
        macs = 0.0
        int8 = node.op_type in QOPERATOR_OPS or node.op_type == "DynamicQuantizeMatMul"
        if node.op_type in ("Conv", "QLinearConv", "ConvInteger", "FusedConv"):
            w_name = node.input[3] if node.op_type == "QLinearConv" else node.input[1]
            out = shapes.get(node.output[0])
            w = shapes.get(w_name) or shapes.get(_dq_source(producers, w_name) or "")
            if out and w:
                macs = float(np.prod(out)) * float(np.prod(w[1:]))
        elif node.op_type in (
            "MatMul",
            "Gemm",
            "QLinearMatMul",
            "MatMulInteger",
            "QGemm",
            "DynamicQuantizeMatMul",
            "FusedMatMul",
        ):
            a = shapes.get(node.input[0])
            out = shapes.get(node.output[0])
            if a and out:
                macs = float(np.prod(out)) * float(a[-1] if node.op_type != "Gemm" else max(a))
        if not macs:
            continue
        if not int8:
            int8 = any(
                producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input[:2]
            )
        if int8:
            int8_macs += macs
        else:
            float_macs += macs
    return float_macs, int8_macs


def _dq_source(producers: dict[str, Any], name: str) -> str | None:
    node = producers.get(name)
    if node is not None and node.op_type == "DequantizeLinear":
        return str(node.input[0])
    return None


def quantized_fraction(model: Any) -> float:
    """Share of MACs that run in int8: 0.0 means nothing was quantized, whatever the recipe says."""
    f, q = count_macs(model)
    return q / (f + q) if (f + q) else 0.0


def activation_bytes_per_sample(model: Any) -> int:
    """Bytes of all float intermediate tensors for one sample (dynamic dims count as 1)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    total = 0
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        if dims:
            dims[0] = 1
        total += int(np.prod(dims)) * 4
    return total
