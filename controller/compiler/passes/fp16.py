"""fp16 for GPUs: half the bytes and tensor-core math, with fp32 model I/O (``keep_io_types``)
so callers and the agent's golden self-test keep feeding float32."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefleet.controller.compiler import onnx_graph
from edgefleet.controller.compiler.passes import Pass, PassContext, PassError, param


class Float16(Pass["Float16.Params"]):
    name = "fp16"

    @dataclass(frozen=True)
    class Params:
        keep_io_types: bool = param(True, "keep model inputs/outputs float32")
        op_block_list: tuple[str, ...] = param((), "extra op types to keep in fp32 (on top of ORT's list)")

    def run(self, model: Path, ctx: PassContext) -> Path:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        m = onnx_graph.load(model)
        try:
            half = convert_float_to_float16(
                m,
                keep_io_types=self.params.keep_io_types,
                op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(self.params.op_block_list),
            )
        except Exception as exc:
            raise PassError(f"fp16 conversion failed ({str(exc).splitlines()[0][:160]})") from exc
        return onnx_graph.save(onnx_graph.topological_sort(half), ctx.new_path("fp16"))
