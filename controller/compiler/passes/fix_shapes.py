"""Fixed shapes: NPUs, DPUs and TFLite Micro compile static graphs only.

Dims come from ``--input-shape``, else from the calibration samples, else batch 1 on axis 0;
exporters name dynamic dims oddly (``p2o.DynamicDimension.0``), so we fix inputs by position.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefleet.controller.compiler import onnx_graph
from edgefleet.controller.compiler.errors import CompileError
from edgefleet.controller.compiler.passes import Pass, PassContext, PassError, param


class FixShapes(Pass["FixShapes.Params"]):
    name = "fix_shapes"

    @dataclass(frozen=True)
    class Params:
        batch: int = param(1, "batch size the device serves with (axis 0 of every input)")

    def run(self, model: Path, ctx: PassContext) -> Path:
        import onnx

        from edgefleet.controller.compiler.model_io import onnx_io

        m = onnx_graph.load(model)
        inputs, _ = onnx_io(m)
        if all(spec.is_static for spec in inputs) and not ctx.input_shapes:
            return model
        for spec in inputs:
            shape = ctx.input_shapes.get(spec.name)
            if shape is None:
                dims: list[int] = []
                for axis, dim in enumerate(spec.shape):
                    if isinstance(dim, int) and dim > 0:
                        dims.append(dim)
                    elif axis == 0:
                        dims.append(self.params.batch)
                    elif ctx.calib is not None and spec.name in ctx.calib.inputs:
                        dims.append(int(ctx.calib.inputs[spec.name].shape[axis]))
                    else:
                        raise CompileError(
                            f"input '{spec.name}' has dynamic dim '{dim or '?'}' at axis {axis} and class "
                            f"'{ctx.target.hardware_class}' needs static shapes; pass --input-shape "
                            f"{spec.name}=1,... or --calib samples"
                        )
                shape = tuple(dims)
            vi = next(v for v in m.graph.input if v.name == spec.name)
            tensor_shape = vi.type.tensor_type.shape
            del tensor_shape.dim[:]
            for value in shape:
                tensor_shape.dim.add().dim_value = int(value)
        # Stale symbolic shapes downstream would contradict the fixed ones: re-infer from scratch.
        del m.graph.value_info[:]
        for out in m.graph.output:
            out.type.tensor_type.ClearField("shape")
        m = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
        dynamic = [
            o.name
            for o in m.graph.output
            if not o.type.tensor_type.HasField("shape")
            or any(not d.HasField("dim_value") for d in o.type.tensor_type.shape.dim)
        ]
        if dynamic:
            raise PassError(
                f"outputs {', '.join(dynamic)} stay dynamic after fixing the inputs "
                "(data-dependent shapes); the target needs a static graph"
            )
        ctx.notes.append(
            "static shapes: "
            + ", ".join(
                f"{s.name}={list(ctx.input_shapes.get(s.name, ()))}" for s in inputs if s.name in ctx.input_shapes
            )
            if ctx.input_shapes
            else "static shapes fixed"
        )
        return onnx_graph.save(m, ctx.new_path("static"))
