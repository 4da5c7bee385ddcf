"""Opset upgrade: real exports arrive at opset 11/12, and per-channel QDQ needs >= 13."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefleet.controller.compiler import onnx_graph
from edgefleet.controller.compiler.passes import Pass, PassContext, PassError, param


class OpsetUpgrade(Pass["OpsetUpgrade.Params"]):
    name = "opset_upgrade"

    @dataclass(frozen=True)
    class Params:
        min_opset: int = param(13, "leave models at or above this opset alone")
        target_opset: int = param(17, "opset to convert older models to (falls back to min_opset)")

    def run(self, model: Path, ctx: PassContext) -> Path:
        import onnx
        from onnx import version_converter

        m = onnx_graph.load(model)
        current = onnx_graph.opset_of(m)
        if current >= self.params.min_opset:
            return model
        errors = []
        for target in dict.fromkeys((self.params.target_opset, self.params.min_opset)):
            try:
                converted = version_converter.convert_version(m, target)
                onnx.checker.check_model(converted)
            except Exception as exc:  # the converter lacks adapters for some ops at some versions
                errors.append(f"{target}: {str(exc).splitlines()[0][:100]}")
                continue
            ctx.notes.append(f"opset {current} -> {target}")
            return onnx_graph.save(converted, ctx.new_path(f"opset{target}"))
        raise PassError(f"cannot upgrade opset {current} ({'; '.join(errors)}); re-export at opset >= 13")
