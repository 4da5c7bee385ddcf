"""Dynamic int8 for transformer and RNN MatMuls only.

Dynamic int8 of conv nets measured 3 to 7x slower than fp32 on this kind of CPU, so Conv is never in
the default op list; the candidate still has to win the interleaved measurement to be chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefleet.controller.compiler import onnx_graph
from edgefleet.controller.compiler.passes import Pass, PassContext, PassError, param


class DynamicInt8(Pass["DynamicInt8.Params"]):
    name = "dynamic_int8"

    @dataclass(frozen=True)
    class Params:
        op_types: tuple[str, ...] = param(
            ("MatMul", "Gemm", "Attention", "LSTM", "GRU"),
            "ops whose weights are quantized; Conv is left out on purpose",
        )
        per_channel: bool = param(False, "per-column weight scales")
        reduce_range: str = param("auto", "auto (7-bit weights only without VNNI) | true | false")

    def run(self, model: Path, ctx: PassContext) -> Path:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from edgefleet.controller.compiler.analysis import QOPERATOR_OPS

        rr = ctx.target.reduce_range if self.params.reduce_range == "auto" else self.params.reduce_range == "true"
        out = ctx.new_path("int8-dynamic")
        try:
            quantize_dynamic(
                str(model),
                str(out),
                op_types_to_quantize=list(self.params.op_types),
                per_channel=self.params.per_channel,
                reduce_range=rr,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
        except Exception as exc:
            raise PassError(f"dynamic quantization failed ({str(exc).strip().splitlines()[0][:160]})") from exc
        m = onnx_graph.load(out)
        quantized = sum(
            1
            for n in m.graph.node
            if n.op_type in QOPERATOR_OPS or n.op_type in ("DynamicQuantizeMatMul", "DynamicQuantizeLSTM")
        )
        if quantized == 0:
            raise PassError(f"nothing was quantized: no {'/'.join(self.params.op_types)} node with constant weights")
        ctx.notes.append(f"dynamic int8 on {quantized} nodes")
        return out
