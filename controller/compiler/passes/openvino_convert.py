"""The file an OpenVINO build ships: the source as OpenVINO reads it, with fixed input shapes.

OpenVINO reads the source as given, not the ORT-simplified graph: its frontends know the original
opsets and fuse on their own when the device compiles the model.

- An ONNX source stays ONNX (OpenVINO's ONNX frontend reads it on the device): the input dims are
  fixed, and with ``compress_to_fp16`` every float weight is stored as fp16 behind a Cast, the
  pattern OpenVINO itself writes for compressed weights. An IR would hold the same weights plus an
  XML graph that, for a small CNN, outweighs them (0.59 MB of ONNX became 0.75 MB of fp16 IR).
- A TFLite source is saved as IR (.xml + .bin), with fp16 weights under ``compress_to_fp16``,
  unless that IR is no smaller than the TFLite file and no input shape had to be fixed: then the
  TFLite file itself ships and OpenVINO's TFLite frontend reads it on the device, the same graph.
  MediaPipe-style models keep fp16 weights behind DEQUANTIZE, and their IR's XML alone outweighs
  the whole TFLite file (0.32 MB of TFLite became 0.69 MB of IR).

Either way the device decompresses fp16 weights to its inference precision at load, so accuracy and
speed follow the precision hint, not the file. A model OpenVINO cannot read (a custom op) fails this
pass, which drops only the OpenVINO candidates.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.controller.compiler.passes import Pass, PassContext, PassError, param
from edgefleet.controller.compiler.runner import build_files, build_size


class OpenVinoConvert(Pass["OpenVinoConvert.Params"]):
    name = "openvino_convert"

    @dataclass(frozen=True)
    class Params:
        compress_to_fp16: bool = param(False, "store float weights as fp16 in the IR (smaller on disk)")
        keep_tflite: bool = param(True, "ship a TFLite source as it is when its IR would be no smaller")

    def run(self, model: Path, ctx: PassContext) -> Path:
        import openvino as ov

        if model.suffix == ".tflite":
            from edgefleet.controller.compiler.passes.tflite_quantize import builtin_copy

            model, replaced = builtin_copy(model, ctx.new_path("builtin-ops", ".tflite"))
            if replaced:
                ctx.notes.append(f"{replaced} custom op(s) rewritten as the builtin OpenVINO reads")
        try:
            ov_model = ov.Core().read_model(str(model))
        except Exception as exc:  # OpenVINO raises a generic RuntimeError for an op its frontend lacks
            raise PassError(
                f"OpenVINO cannot read the model ({_first_line(exc)}); OpenVINO candidates skipped"
            ) from exc
        if model.suffix == ".onnx":
            return self._onnx(model, ctx)
        shapes = {
            name: ov.PartialShape(list(shape))
            for name, shape in ctx.input_shapes.items()
            if any(name in port.get_names() for port in ov_model.inputs)
        }
        if shapes:
            ov_model.reshape(shapes)
        out = ctx.new_path("openvino-fp16w" if self.params.compress_to_fp16 else "openvino", ".xml")
        ov.save_model(ov_model, str(out), compress_to_fp16=self.params.compress_to_fp16)
        ir_bytes, tflite_bytes = build_size(out), model.stat().st_size
        if self.params.keep_tflite and not shapes and ir_bytes >= tflite_bytes:
            for part in build_files(out):
                part.unlink()
            shipped = ctx.new_path("openvino-tflite", ".tflite")
            shutil.copyfile(model, shipped)  # never the user's own file: the chosen build is moved
            ctx.notes.append(f"the TFLite file ships as it is, read by OpenVINO on the device "
                             f"(its IR would be {ir_bytes} bytes, the TFLite is {tflite_bytes})")
            return shipped
        if self.params.compress_to_fp16:
            ctx.notes.append("IR weights stored as fp16")
        return out


    def _onnx(self, model: Path, ctx: PassContext) -> Path:
        import onnx

        proto = onnx.load(str(model))
        for value in proto.graph.input:
            shape = ctx.input_shapes.get(value.name)
            dims = value.type.tensor_type.shape.dim
            if shape is None or len(shape) != len(dims):
                continue
            for dim, size in zip(dims, shape, strict=True):
                dim.Clear()
                dim.dim_value = int(size)
        stem = "openvino"
        if self.params.compress_to_fp16:
            count = fp16_weights(proto)
            ctx.notes.append(f"{count} float weight tensor(s) stored as fp16")
            stem = "openvino-fp16w"
        out = ctx.new_path(stem, ".onnx")
        onnx.save(proto, str(out))
        return out


# Tensors this small (scalars, shapes, epsilons) stay fp32: no bytes to save, and they are often
# read by shape arithmetic that a Cast would only obscure.
_MIN_FP16_ELEMENTS = 16
_FP16_MAX = 65504.0


def fp16_weights(proto: Any) -> int:
    """Store the ONNX graph's float32 weights (initializers and Constant nodes) as fp16, each behind a
    Cast back to float32, so compute and every consumer stay as they were. A tensor outside fp16's
    range stays fp32. Returns how many tensors were stored as fp16."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph

    def halve(tensor: Any) -> Any | None:
        if tensor.data_type != TensorProto.FLOAT or int(np.prod(tensor.dims)) < _MIN_FP16_ELEMENTS:
            return None
        values = numpy_helper.to_array(tensor)
        if not np.all(np.isfinite(values)) or float(np.max(np.abs(values))) > _FP16_MAX:
            return None
        return values.astype(np.float16)

    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    # An initializer that is also a graph input can be overridden at run time: it stays as it is.
    overridable = {value.name for value in graph.input}
    casts, initializers, count = [], [], 0
    for tensor in graph.initializer:
        half = None if tensor.name in overridable or tensor.name not in used else halve(tensor)
        if half is None:
            initializers.append(tensor)
            continue
        initializers.append(numpy_helper.from_array(half, f"{tensor.name}__fp16"))
        casts.append(helper.make_node("Cast", [f"{tensor.name}__fp16"], [tensor.name], to=TensorProto.FLOAT,
                                      name=f"{tensor.name}__to_fp32"))
        count += 1
    for node in graph.node:
        if node.op_type != "Constant":
            continue
        for attribute in node.attribute:
            if attribute.name != "value":
                continue
            half = halve(attribute.t)
            if half is None:
                continue
            attribute.t.CopyFrom(numpy_helper.from_array(half, attribute.t.name))
            original = node.output[0]
            node.output[0] = f"{original}__fp16"
            casts.append(helper.make_node("Cast", [node.output[0]], [original], to=TensorProto.FLOAT,
                                          name=f"{original}__to_fp32"))
            count += 1
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    # Nodes stay topologically sorted: Constants first, then the Casts that read them, then the rest.
    nodes = list(graph.node)
    del graph.node[:]
    constants = [n for n in nodes if n.op_type == "Constant"]
    graph.node.extend(constants + casts + [n for n in nodes if n.op_type != "Constant"])
    return count


def _first_line(exc: BaseException) -> str:
    """OpenVINO's frontends put where the check failed first and what failed last: keep the summary
    ("Conversion is failed for: If-16") or the last line that is not a source location."""
    lines = [line.strip().lstrip("- ").strip() for line in str(exc).splitlines() if line.strip()]
    summary = [line for line in lines if line.startswith("Conversion is failed for")]
    told = [line for line in lines if not line.startswith(("Exception from", "Check ", "Summary"))]
    return (summary or told[-1:] or lines[:1] or [type(exc).__name__])[0][:200]
