"""TFLite input: ai-edge-quantizer recipes (dynamic, weight-only, static int8 with calibration).

If the quantizer leaves every weight in float (no op it supports), the pass fails with "nothing was
quantized" instead of shipping a float model under an int8 name and a made-up size ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.controller.compiler.errors import CompileError
from edgefleet.controller.compiler.passes import Pass, PassContext, PassError, param


def _int_tensor_count(path: Path) -> int:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    return sum(1 for d in interp.get_tensor_details() if np.dtype(d["dtype"]) in (np.int8, np.uint8, np.int16))


class TfliteQuantize(Pass["TfliteQuantize.Params"]):
    name = "tflite_quantize"

    @dataclass(frozen=True)
    class Params:
        recipe: str = param(
            "dynamic",
            "dynamic (int8 weights, float activations computed in int8) | "
            "weight_only (int8 weights dequantized at load) | static (int8 everywhere)",
        )
        max_calib_samples: int = param(64, "cap on calibration samples for the static recipe")

    def run(self, model: Path, ctx: PassContext) -> Path:
        from ai_edge_quantizer import quantizer, recipe

        recipes: dict[str, Any] = {
            "dynamic": recipe.dynamic_wi8_afp32,
            "weight_only": recipe.weight_only_wi8_afp32,
            "static": recipe.static_wi8_ai8,
        }
        if self.params.recipe not in recipes:
            raise PassError(f"unknown ai-edge-quantizer recipe '{self.params.recipe}'")
        qt = quantizer.Quantizer(str(model))
        qt.load_quantization_recipe(recipes[self.params.recipe]())
        try:
            if self.params.recipe == "static":
                if ctx.calib is None:
                    raise CompileError("the static TFLite recipe needs realistic calibration data; pass --calib")
                n = min(ctx.calib.count, self.params.max_calib_samples)
                samples = [{k: v[i : i + 1] for k, v in ctx.calib.inputs.items()} for i in range(n)]
                result = qt.quantize(qt.calibrate({"serving_default": samples}))
            else:
                result = qt.quantize()
        except CompileError:
            raise
        except Exception as exc:
            raise PassError(f"ai-edge-quantizer failed ({str(exc).strip().splitlines()[0][:160]})") from exc
        out = ctx.new_path(f"tflite-{self.params.recipe}", ".tflite")
        result.export_model(str(out))
        if _int_tensor_count(out) <= _int_tensor_count(model):
            raise PassError(
                f"nothing was quantized by the '{self.params.recipe}' recipe (no supported op); "
                "the float model stays the answer"
            )
        return out
