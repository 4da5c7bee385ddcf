"""Mixed precision: when full int8 fails the gate, keep the most sensitive nodes in float.

Sensitivity is measured, not guessed: the fp32 and the int8 model run side by side on calibration
samples with every quantizable node's output exposed, and each node is charged with the error it adds
(1 - cosine of its output against fp32, minus the worst error already on its inputs). Nodes are put
back to float most-sensitive first, doubling the count, until the gate passes or too much of the
graph is float for int8 to pay (``max_float_fraction``); the measurement then decides if it is faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.controller.compiler import onnx_graph
from edgefleet.controller.compiler.passes import Pass, PassContext, PassError, param
from edgefleet.controller.compiler.passes.static_int8 import StaticInt8, calibration_batches

QUANTIZABLE = (
    "Conv",
    "MatMul",
    "Gemm",
    "ConvTranspose",
    "Attention",
    "LSTM",
    "GRU",
    "Add",
    "Mul",
    "Concat",
    "AveragePool",
    "GlobalAveragePool",
    "MaxPool",
    "Relu",
    "Clip",
    "Sigmoid",
    "Softmax",
    "Transpose",
    "Reshape",
    "Resize",
    "Split",
    "Gather",
    "LayerNormalization",
)


def _cos_err(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if a64.shape != b64.shape:
        return 1.0
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    if na == 0 and nb == 0:
        return 0.0
    if na == 0 or nb == 0 or not np.all(np.isfinite(b64)):
        return 1.0
    return float(1.0 - np.dot(a64, b64) / (na * nb))


def _expose(model: Any, names: list[str], path: Path) -> Path:
    """A copy of the model whose graph outputs include the given float tensors."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in names:
        if name not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    onnx.save(m, str(path))
    return path


def _run_all(path: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    # No fusion: the QDQ graph then computes float ops on dequantized inputs, exposing each node's error.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for n, v in zip(names, sess.run(names, feed), strict=True):
            got[n].append(np.asarray(v))
    return got


def keep_float_edges(model: Any, excluded: set[str]) -> int:
    """Feed excluded nodes float tensors: onnxruntime still puts Q/DQ on their inputs (the producer is
    quantized) and on graph outputs they write, which keeps the very error we meant to remove.
    Returns how many Q/DQ pairs were bypassed."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name for i in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    bypassed = 0
    for node in graph.node:
        if node.name not in excluded:
            continue
        for idx, name in enumerate(node.input):
            dq = producers.get(name)
            q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in inits:
                node.input[idx] = q.input[0]
                bypassed += 1
        for idx, name in enumerate(node.output):
            users = consumers.get(name, [])
            if len(users) != 1 or users[0].op_type != "QuantizeLinear":
                continue
            dqs = consumers.get(users[0].output[0], [])
            if len(dqs) == 1 and dqs[0].op_type == "DequantizeLinear" and dqs[0].output[0] in graph_outputs:
                node.output[idx] = dqs[0].output[0]
                dqs[0].output[0] = dqs[0].output[0] + "_unused"
                bypassed += 1
    # Drop Q/DQ nodes nobody reads any more (repeat: removing a DQ can orphan its Q).
    changed = True
    while changed:
        used = {i for n in graph.node for i in n.input} | graph_outputs
        keep = [
            n
            for n in graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or any(o in used for o in n.output)
        ]
        changed = len(keep) != len(graph.node)
        if changed:
            del graph.node[:]
            graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    dead = [i for i in graph.initializer if i.name not in used]
    for init in dead:
        graph.initializer.remove(init)
    return bypassed


class MixedPrecision(Pass["MixedPrecision.Params"]):
    name = "mixed_precision"

    @dataclass(frozen=True)
    class Params:
        base: tuple[tuple[str, object], ...] = param((), "static_int8 parameters of the full-int8 recipe")
        max_float_fraction: float = param(0.5, "give up when more than this share of nodes is float")
        sensitivity_samples: int = param(16, "calibration samples used to rank node sensitivity")

    def sensitivity(self, model: Path, quantized: Path, ctx: PassContext) -> list[tuple[str, float]]:
        """Node name -> error it adds, most sensitive first."""
        fp = onnx_graph.load(model)
        nodes = [n for n in fp.graph.node if n.op_type in QUANTIZABLE]
        tensors = [n.output[0] for n in nodes]
        feeds = calibration_batches(model, ctx, self.params.sensitivity_samples)
        ref = _run_all(_expose(fp, tensors, ctx.new_path("fp32-exposed")), feeds)
        qm = onnx_graph.load(quantized)
        q_tensors = {o for n in qm.graph.node for o in n.output}
        # Graph outputs that got a Q/DQ pair are renamed "<name>_QuantizeLinear_Input" by onnxruntime.
        alias = {t: t if t in q_tensors else f"{t}_QuantizeLinear_Input" for t in tensors}
        present = [t for t in tensors if alias[t] in q_tensors]
        got = _run_all(_expose(qm, [alias[t] for t in present], ctx.new_path("int8-exposed")), feeds)
        err: dict[str, float] = {}
        for t in present:
            err[t] = float(np.mean([_cos_err(a, b) for a, b in zip(ref[t], got[alias[t]], strict=True)]))
        ranked = []
        for node in nodes:
            out = node.output[0]
            if out not in err:
                continue
            upstream = max((err.get(i, 0.0) for i in node.input), default=0.0)
            ranked.append((node.name, err[out] - upstream))
        ranked.sort(key=lambda item: item[1], reverse=True)
        return ranked

    def run(self, model: Path, ctx: PassContext) -> Path:
        if ctx.evaluate is None:
            raise PassError("mixed precision needs the gate (ctx.evaluate)")
        base = dict(self.params.base)
        full = StaticInt8(**base).run(model, ctx)
        first = ctx.evaluate(full)
        if first.passed:
            ctx.notes.append("full int8 passes the gate; no node kept in float")
            return full
        ranked = self.sensitivity(model, full, ctx)
        limit = int(len(ranked) * self.params.max_float_fraction)
        k = 1
        tried = []
        while k <= max(1, limit):
            keep = tuple(name for name, _ in ranked[:k])
            quantized = StaticInt8(**{**base, "nodes_to_exclude": keep}).quantize(model, ctx, tag=f"mixed-{k}")
            mixed = onnx_graph.load(quantized)
            keep_float_edges(mixed, set(keep))
            candidate = onnx_graph.save(onnx_graph.topological_sort(mixed), ctx.new_path(f"mixed-{k}-float"))
            result = ctx.evaluate(candidate)
            tried.append(f"{k}:{result.fidelity:.4f}")
            ctx.say(f"mixed precision: {k} node(s) in float -> fidelity {result.fidelity:.4f}")
            if result.passed:
                ctx.notes.append(
                    f"kept {k} of {len(ranked)} quantizable nodes in float: {', '.join(keep[:8])}"
                    + (" ..." if k > 8 else "")
                )
                return candidate
            k *= 2
        raise PassError(
            f"no mix with at most {self.params.max_float_fraction:.0%} of nodes in float passes the "
            f"gate (float nodes:fidelity {', '.join(tried)}); int8 does not pay for this model"
        )
