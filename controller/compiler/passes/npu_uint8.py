"""Full-integer uint8 QDQ for NPUs (QNN HTP, RKNN-style): uint8 weights and activations, per-tensor,
QDQ only (no QOperator, no DynamicQuantizeLinear), every op quantized, static shapes required."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefleet.controller.compiler.passes import Pass, PassContext, param
from edgefleet.controller.compiler.passes.static_int8 import StaticInt8


class NpuUint8(Pass["NpuUint8.Params"]):
    name = "npu_uint8"

    @dataclass(frozen=True)
    class Params:
        calibration: str = param("minmax", "minmax | entropy | percentile")
        max_calib_samples: int = param(128, "cap on calibration samples")

    def run(self, model: Path, ctx: PassContext) -> Path:
        q = StaticInt8(
            quant_format="qdq",
            per_channel=False,
            calibration=self.params.calibration,
            activation_type="uint8",
            weight_type="uint8",
            reduce_range="false",
            max_calib_samples=self.params.max_calib_samples,
        )
        return q.quantize(model, ctx, tag="uint8-npu", extra_options={"ForceQuantizeNoInputCheck": True})
