"""Power-of-two symmetric per-tensor int8 for FPGA DPUs (Vitis AI): their shifters only scale by 2^k.

Scales are rounded up to the next power of two (never down, so nothing new clips); constant int8
weights are re-expressed in their new scale, and int32 biases are re-quantized with the product of
their conv's new input and weight scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.controller.compiler import onnx_graph
from edgefleet.controller.compiler.passes import Pass, PassContext, PassError, param
from edgefleet.controller.compiler.passes.static_int8 import StaticInt8


class PowerOfTwoInt8(Pass["PowerOfTwoInt8.Params"]):
    name = "pow2_int8"

    @dataclass(frozen=True)
    class Params:
        calibration: str = param("minmax", "minmax | entropy | percentile")
        max_calib_samples: int = param(128, "cap on calibration samples")

    def run(self, model: Path, ctx: PassContext) -> Path:
        from onnx import numpy_helper

        static = StaticInt8(
            quant_format="qdq",
            per_channel=False,
            calibration=self.params.calibration,
            activation_type="int8",
            weight_type="int8",
            reduce_range="false",
            symmetric_activations=True,
            max_calib_samples=self.params.max_calib_samples,
        )
        quantized = static.quantize(model, ctx, tag="int8-sym", extra_options={"WeightSymmetric": True})
        m = onnx_graph.load(quantized)
        inits = {i.name: i for i in m.graph.initializer}
        producers = {o: n for n in m.graph.node for o in n.output}
        consumers: dict[str, list[object]] = {}
        for n in m.graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)

        def set_init(name: str, value: np.ndarray) -> None:
            inits[name].CopyFrom(numpy_helper.from_array(value, name))

        bias_dq = []
        rounded: set[str] = set()
        for node in m.graph.node:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                continue
            data = inits.get(node.input[0])
            if node.op_type == "DequantizeLinear" and data is not None and data.data_type == 6:  # int32 bias
                bias_dq.append(node)
                continue
            scale_name = node.input[1]
            if scale_name in rounded or scale_name not in inits:
                continue
            scale = numpy_helper.to_array(inits[scale_name]).astype(np.float64)
            if np.any(scale <= 0):
                raise PassError(f"non-positive scale in {scale_name}")
            new_scale = np.power(2.0, np.ceil(np.log2(scale)))
            if node.op_type == "DequantizeLinear" and data is not None:
                # A constant weight was stored in units of the old scale: re-express it in the new one.
                weights = numpy_helper.to_array(data)
                info = np.iinfo(weights.dtype)
                requant = np.round(weights.astype(np.float64) * scale / new_scale)
                set_init(data.name, np.clip(requant, info.min, info.max).astype(weights.dtype))
            set_init(scale_name, new_scale.astype(np.float32))
            rounded.add(scale_name)
            if len(node.input) > 2 and node.input[2] in inits:
                zp = numpy_helper.to_array(inits[node.input[2]])
                if np.any(zp != 0):
                    raise PassError(f"asymmetric zero point in {node.input[2]}")
        # Biases were quantized with the old scales: requantize with input_scale * weight_scale (now pow2).
        for dq in bias_dq:
            old_scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
            values = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64) * old_scale
            user = next(iter(consumers.get(dq.output[0], [])), None)
            if user is None:
                continue
            scales = []
            for idx in (0, 1):
                src = producers.get(user.input[idx])  # type: ignore[attr-defined]
                if src is None or src.op_type != "DequantizeLinear":
                    raise PassError(f"bias of {user.name} is not fed by quantized input and weight")  # type: ignore[attr-defined]
                scales.append(numpy_helper.to_array(inits[src.input[1]]).astype(np.float64))
            new_scale = scales[0] * scales[1]
            set_init(dq.input[1], new_scale.astype(np.float32).reshape(old_scale.shape))
            set_init(dq.input[0], np.clip(np.round(values / new_scale), -(2**31), 2**31 - 1).astype(np.int32))
        ctx.notes.append(f"{len(rounded)} scales rounded up to powers of two, {len(bias_dq)} biases requantized")
        return onnx_graph.save(m, ctx.new_path("int8-pow2"))
