"""Simplification and constant folding, in portable ONNX ops only.

onnxslim is used when installed; otherwise onnxruntime's basic level (constant folding, identity
and dropout removal, Conv+BN/Mul/Add folding), whose output still runs on every execution provider.
This runs before quantization so the quantizer sees folded BatchNorms, not extra tensors to calibrate.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from edgefleet.controller.compiler import onnx_graph
from edgefleet.controller.compiler.passes import Pass, PassContext, PassError, param


class Simplify(Pass["Simplify.Params"]):
    name = "simplify"

    @dataclass(frozen=True)
    class Params:
        use_onnxslim: bool = param(True, "use onnxslim when it is installed (it folds more shape arithmetic)")

    def run(self, model: Path, ctx: PassContext) -> Path:
        import onnx
        import onnxruntime as ort

        src = model
        if self.params.use_onnxslim and importlib.util.find_spec("onnxslim") is not None:
            import onnxslim

            try:
                slimmed = onnxslim.slim(str(model))
                src = onnx_graph.save(slimmed, ctx.new_path("slim"))
                ctx.notes.append("onnxslim")
            except Exception as exc:  # onnxslim is best effort; ORT basic still runs below
                ctx.notes.append(f"onnxslim skipped ({str(exc).splitlines()[0][:80]})")
        out = ctx.new_path("simplified")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(out)
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise PassError(f"onnxruntime cannot load the model ({str(exc).splitlines()[0][:160]})") from exc
        m = onnx_graph.load(out)
        # Shape info only helps the quantizer; a model without it is still valid.
        with contextlib.suppress(Exception):
            m = onnx.shape_inference.infer_shapes(m)
        onnx_graph.ensure_node_names(m)
        return onnx_graph.save(m, out)
