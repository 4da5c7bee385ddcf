"""ONNX to full-int8 TFLite, for MCU (TFLite Micro) and Edge TPU targets.

This needs a converter (onnx2tf on TensorFlow), which is an extra, not a controller dependency: when
it is missing the registry check fails first with a message naming the extra. The Edge TPU build also
needs Coral's ``edgetpu_compiler`` binary after this pass; it is not run here.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.controller.compiler.errors import CompileError
from edgefleet.controller.compiler.passes import Pass, PassContext, PassError, param


class TfliteExport(Pass["TfliteExport.Params"]):
    name = "tflite_export"

    @dataclass(frozen=True)
    class Params:
        max_calib_samples: int = param(100, "representative samples for the int8 converter")

    def run(self, model: Path, ctx: PassContext) -> Path:
        import onnx2tf

        if ctx.calib is None:
            raise CompileError("full-int8 TFLite needs realistic calibration data; pass --calib DATA.npz")
        work = Path(tempfile.mkdtemp(dir=ctx.workdir, prefix="onnx2tf-"))
        calib_args = []
        for name, arr in ctx.calib.inputs.items():
            sample_path = work / f"{name}.npy"
            # onnx2tf expects NHWC calibration data for 4-D image inputs.
            data = arr[: self.params.max_calib_samples]
            np.save(sample_path, np.transpose(data, (0, 2, 3, 1)) if data.ndim == 4 else data)
            calib_args.append([name, str(sample_path), 0.0, 1.0])
        try:
            onnx2tf.convert(
                input_onnx_file_path=str(model),
                output_folder_path=str(work),
                output_integer_quantized_tflite=True,
                custom_input_op_name_np_data_path=calib_args,
                non_verbose=True,
            )
        except Exception as exc:
            raise PassError(f"onnx2tf conversion failed ({str(exc).strip().splitlines()[0][:160]})") from exc
        found = sorted(work.glob("*_full_integer_quant.tflite"))
        if not found:
            raise PassError("onnx2tf produced no full-integer TFLite model")
        out = ctx.new_path("full-int8", ".tflite")
        found[0].replace(out)
        return out
