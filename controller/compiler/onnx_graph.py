"""Small ONNX file helpers shared by the passes (load, save, name nodes, opset)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path))


def save(model: Any, path: Path) -> Path:
    """Save and re-check: a pass that writes an invalid graph fails here, not on a device."""
    import onnx

    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return path


def all_nodes(graph: Any) -> list[Any]:
    """Every node of a graph and of the subgraphs inside it (If branches, Loop and Scan bodies):
    exporters wrap whole networks in control flow (Silero VAD's LSTM sits two Ifs deep)."""
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            if attr.HasField("g"):
                out.extend(all_nodes(attr.g))
            for sub in attr.graphs:
                out.extend(all_nodes(sub))
    return out


def opset_of(model: Any) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def ensure_node_names(model: Any) -> Any:
    """Quantizer exclusions address nodes by name, and exporters leave many unnamed."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return model


def flatten_gemm_bias(model: Any) -> int:
    """Give each Gemm a 1-D bias where its C is a constant of shape (1, N), which onnxruntime's
    MatMul+Add fusion writes. The result is the same (C broadcasts along M either way), but
    onnxruntime's per-channel quantizer indexes the bias per output channel and fails on a 2-D one.
    Returns how many biases were reshaped; an initializer shared with another node is copied."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    changed = 0
    for node in graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        bias = inits[node.input[2]]
        if len(bias.dims) != 2 or bias.dims[0] != 1:
            continue
        flat = numpy_helper.from_array(numpy_helper.to_array(bias).reshape(-1), bias.name)
        if readers[bias.name] > 1:
            flat.name = f"{bias.name}_1d_{changed}"
            graph.initializer.append(flat)
            node.input[2] = flat.name
        else:
            bias.CopyFrom(flat)
        changed += 1
    return changed


def topological_sort(model: Any) -> Any:
    """Reorder nodes so producers come first; some converters append Cast nodes at the end."""
    graph = model.graph
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        progressed = []
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                progressed.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if not progressed:  # a cycle or an input from a subgraph scope: leave the remainder as it was
            ordered.extend(rest)
            break
        ordered.extend(progressed)
        pending = rest
    copies = [type(n)() for n in ordered]
    for dst, src in zip(copies, ordered, strict=True):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(copies)
    return model
