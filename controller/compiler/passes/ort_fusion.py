"""onnxruntime offline fusion at the level the target's execution provider supports.

``extended`` fusions (GELU, LayerNorm, attention, FusedConv) produce com.microsoft ops assigned to the
CPU EP, so they are safe only for CPU classes; other EPs get ``basic``. ``all`` adds layout changes
tied to this very CPU and is never saved into a portable artifact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefleet.controller.compiler.passes import Pass, PassContext, PassError, param


class OrtFusion(Pass["OrtFusion.Params"]):
    name = "ort_fusion"

    @dataclass(frozen=True)
    class Params:
        level: str = param("auto", "basic | extended | auto (extended on CPU EP, basic elsewhere)")

    def run(self, model: Path, ctx: PassContext) -> Path:
        import onnxruntime as ort

        level = self.params.level
        if level == "auto":
            level = "extended" if ctx.target.execution_provider == "CPUExecutionProvider" else "basic"
        levels = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        }
        if level not in levels:
            raise PassError(f"ort_fusion level '{level}' is not basic, extended or auto")
        out = ctx.new_path(f"fused-{level}")
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[level]
        so.optimized_model_filepath = str(out)
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise PassError(f"onnxruntime fusion failed ({str(exc).splitlines()[0][:160]})") from exc
        ctx.notes.append(f"ort fusion {level}")
        return out
