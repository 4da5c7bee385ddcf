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
