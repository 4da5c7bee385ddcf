"""Unstructured magnitude pruning, reported honestly: zeros compress, so the bundle shrinks, but
dense CPU kernels do the same work, so latency does not move. The report shows both sizes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.controller.compiler import onnx_graph
from edgefleet.controller.compiler.passes import Pass, PassContext, PassError, param


class MagnitudePrune(Pass["MagnitudePrune.Params"]):
    name = "prune"

    @dataclass(frozen=True)
    class Params:
        sparsity: float = param(0.5, "share of weights set to zero in each pruned tensor")
        op_types: tuple[str, ...] = param(("Conv", "MatMul", "Gemm"), "ops whose weight initializers are pruned")
        min_elements: int = param(256, "leave small tensors (biases, tiny convs) dense")

    def run(self, model: Path, ctx: PassContext) -> Path:
        from onnx import numpy_helper

        if not 0.0 < self.params.sparsity < 1.0:
            raise PassError(f"sparsity {self.params.sparsity} is outside (0, 1)")
        m = onnx_graph.load(model)
        inits = {i.name: i for i in m.graph.initializer}
        weight_names = {n.input[1] for n in m.graph.node if n.op_type in self.params.op_types and len(n.input) > 1}
        pruned = total = 0
        for name in sorted(weight_names):
            init = inits.get(name)
            if init is None:
                continue
            w = numpy_helper.to_array(init)
            if w.dtype.kind != "f" or w.size < self.params.min_elements:
                continue
            k = int(w.size * self.params.sparsity)
            threshold = np.partition(np.abs(w).ravel(), k)[k]
            mask = np.abs(w) < threshold
            init.CopyFrom(numpy_helper.from_array(np.where(mask, 0, w).astype(w.dtype), name))
            pruned += int(mask.sum())
            total += int(w.size)
        if total == 0:
            raise PassError("nothing to prune: no float weight tensor large enough")
        ctx.notes.append(
            f"pruned {pruned}/{total} weights ({pruned / total:.0%}); unstructured sparsity shrinks "
            "the compressed bundle, not CPU latency"
        )
        return onnx_graph.save(m, ctx.new_path("pruned"))
