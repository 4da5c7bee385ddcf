"""OpenVINO IR: the source (ONNX or TFLite) read by OpenVINO's own frontend and saved as .xml + .bin.

OpenVINO reads the source as given, not the ORT-simplified graph: its frontends know the original
opsets and fuse on their own when the device compiles the model. With ``compress_to_fp16`` the
weights are stored as fp16 (half the bytes on disk and on the wire); the device decompresses them to
its inference precision at load, so accuracy and speed follow the precision hint, not the file.
A model OpenVINO cannot read (a custom op) fails this pass, which drops only the OpenVINO candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefleet.controller.compiler.passes import Pass, PassContext, PassError, param


class OpenVinoConvert(Pass["OpenVinoConvert.Params"]):
    name = "openvino_convert"

    @dataclass(frozen=True)
    class Params:
        compress_to_fp16: bool = param(False, "store float weights as fp16 in the IR (smaller on disk)")

    def run(self, model: Path, ctx: PassContext) -> Path:
        import openvino as ov

        try:
            ov_model = ov.Core().read_model(str(model))
        except Exception as exc:  # OpenVINO raises a generic RuntimeError for an op its frontend lacks
            raise PassError(
                f"OpenVINO cannot read the model ({_first_line(exc)}); OpenVINO candidates skipped"
            ) from exc
        shapes = {
            name: ov.PartialShape(list(shape))
            for name, shape in ctx.input_shapes.items()
            if any(name in port.get_names() for port in ov_model.inputs)
        }
        if shapes:
            ov_model.reshape(shapes)
        out = ctx.new_path("openvino-fp16w" if self.params.compress_to_fp16 else "openvino", ".xml")
        ov.save_model(ov_model, str(out), compress_to_fp16=self.params.compress_to_fp16)
        if self.params.compress_to_fp16:
            ctx.notes.append("IR weights stored as fp16")
        return out


def _first_line(exc: BaseException) -> str:
    """OpenVINO's frontends put where the check failed first and what failed last: keep the summary
    ("Conversion is failed for: If-16") or the last line that is not a source location."""
    lines = [line.strip().lstrip("- ").strip() for line in str(exc).splitlines() if line.strip()]
    summary = [line for line in lines if line.startswith("Conversion is failed for")]
    told = [line for line in lines if not line.startswith(("Exception from", "Check ", "Summary"))]
    return (summary or told[-1:] or lines[:1] or [type(exc).__name__])[0][:200]
