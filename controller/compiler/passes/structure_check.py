"""Structure checks for hardware we cannot run here: a build that runs on the CPU EP proves nothing
about an NPU or DPU, so the constraints their compilers impose are asserted on the graph itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.controller.compiler import onnx_graph
from edgefleet.controller.compiler.passes import Pass, PassContext, PassError, param


class StructureCheck(Pass["StructureCheck.Params"]):
    name = "structure_check"

    @dataclass(frozen=True)
    class Params:
        static_shapes: bool = param(True, "every input and output dim is a positive integer")
        forbid_ops: tuple[str, ...] = param(
            ("DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"),
            "ops the target's compiler rejects",
        )
        weight_dtype: str = param("", "required dtype of quantized weights (uint8 / int8), empty = any")
        pow2_scales: bool = param(False, "every quantization scale is a power of two")

    def run(self, model: Path, ctx: PassContext) -> Path:
        from onnx import numpy_helper

        from edgefleet.controller.compiler.model_io import onnx_io

        m = onnx_graph.load(model)
        problems = []
        if self.params.static_shapes:
            ins, outs = onnx_io(m)
            dyn = [s.name for s in (*ins, *outs) if not s.is_static]
            if dyn:
                problems.append(f"dynamic shapes on {', '.join(dyn)}")
        bad_ops = sorted({n.op_type for n in m.graph.node if n.op_type in self.params.forbid_ops})
        if bad_ops:
            problems.append(f"forbidden ops {', '.join(bad_ops)}")
        inits = {i.name: i for i in m.graph.initializer}
        dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
        if self.params.weight_dtype:
            want = np.dtype(self.params.weight_dtype)
            for n in dqs:
                w = inits.get(n.input[0])
                if w is not None and w.data_type != 6 and numpy_helper.to_array(w).dtype != want:
                    problems.append(f"weight {n.input[0]} is {numpy_helper.to_array(w).dtype}, not {want}")
                    break
        if self.params.pow2_scales:
            for n in m.graph.node:
                if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] in inits:
                    s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
                    if not np.allclose(np.log2(s), np.round(np.log2(s))):
                        problems.append(f"scale {n.input[1]} is not a power of two")
                        break
        if not dqs and (self.params.weight_dtype or self.params.pow2_scales):
            problems.append("nothing is quantized")
        if problems:
            raise PassError("structure check failed: " + "; ".join(problems))
        ctx.notes.append(f"structure ok for {ctx.target.hardware_class}")
        return model
