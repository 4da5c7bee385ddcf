"""Static (calibrated) int8: QDQ or QOperator, per-channel or per-tensor, MinMax/Entropy/Percentile.

The data types follow the ISA: u8s8 on x86 with VNNI, u8s8 with 7-bit weights (``reduce_range``) on
AVX2/AVX-512 without VNNI (vpmaddubsw saturates otherwise), s8s8 on Arm with dot product. Calibration
memory is bounded by a sample cap and by flushing intermediate outputs (``CalibMaxIntermediateOutputs``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.controller.compiler import onnx_graph
from edgefleet.controller.compiler.errors import CompileError
from edgefleet.controller.compiler.passes import Pass, PassContext, PassError, param


def calibration_batches(
    model: Path, ctx: PassContext, max_samples: int, memory_mb: int = 1024
) -> list[dict[str, np.ndarray]]:
    """Feeds for the calibrator: the model's fixed batch size (or 8 when dynamic), capped in count.

    onnxruntime's calibrators keep every intermediate output of every batch in memory (and 1.32's
    ``CalibMaxIntermediateOutputs`` drops MinMax data instead of merging it), so memory is bounded
    here: no more samples than ``memory_mb`` of float activations per sample allows.
    """
    from edgefleet.controller.compiler.analysis import activation_bytes_per_sample
    from edgefleet.controller.compiler.model_io import onnx_io

    if ctx.calib is None:
        raise CompileError(
            "static int8 needs realistic calibration data (random data flatters int8); "
            "pass --calib DATA.npz with samples of real inputs"
        )
    loaded = onnx_graph.load(model)
    ins, _ = onnx_io(loaded)
    per_sample = max(activation_bytes_per_sample(loaded), 1)
    max_samples = max(1, min(max_samples, (memory_mb << 20) // per_sample))
    first = ins[0].shape[0] if ins and ins[0].shape else None
    fixed = isinstance(first, int) and first > 0
    batch = int(first) if fixed else 8  # type: ignore[arg-type]
    n = min(ctx.calib.count, max_samples)
    if not ctx.calib.batchable:  # inputs stored stacked or on a later axis: one sample per feed, as the model takes it
        return [{spec.name: feed[spec.name] for spec in ins} for feed in ctx.calib.model_feeds(1, n)]
    feeds = []
    for start in range(0, n, batch):
        feed = {spec.name: ctx.calib.inputs[spec.name][start : start + batch] for spec in ins}
        if fixed and any(v.shape[0] != batch for v in feed.values()):
            break
        feeds.append(feed)
    if not feeds:
        raise CompileError(f"calibration needs at least {batch} samples for a batch-{batch} model; pass more")
    return feeds


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over prepared feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


class StaticInt8(Pass["StaticInt8.Params"]):
    name = "static_int8"

    @dataclass(frozen=True)
    class Params:
        quant_format: str = param("qdq", "qdq (portable, EP-fusable) or qoperator (QLinear* ops, CPU EP)")
        per_channel: bool = param(True, "per-output-channel weight scales (needs opset >= 13 for QDQ)")
        calibration: str = param("minmax", "minmax | entropy | percentile")
        percentile: float = param(99.999, "percentile for percentile calibration")
        activation_type: str = param("auto", "auto (from the target ISA) | uint8 | int8")
        weight_type: str = param("auto", "auto (from the target ISA) | uint8 | int8")
        reduce_range: str = param("auto", "auto (7-bit weights only without VNNI) | true | false")
        symmetric_activations: bool = param(False, "force zero point 0 for activations")
        max_calib_samples: int = param(128, "cap on calibration samples: bounds time and memory")
        max_calib_memory_mb: int = param(1024, "cap on activation memory held by the calibrator")
        nodes_to_exclude: tuple[str, ...] = param((), "node names kept in float (set by mixed precision)")
        op_types: tuple[str, ...] = param((), "op types to quantize; empty = onnxruntime's default set")

    def resolved_types(self, ctx: PassContext) -> tuple[str, str, bool]:
        """(activation, weight, reduce_range) after applying the target's int8 kind to 'auto'."""
        kind = ctx.target.int8_kind
        act_auto, w_auto = {
            "s8s8": ("int8", "int8"),
            "u8u8-npu": ("uint8", "uint8"),
            "pow2-s8": ("int8", "int8"),
        }.get(kind, ("uint8", "int8"))
        act = act_auto if self.params.activation_type == "auto" else self.params.activation_type
        wt = w_auto if self.params.weight_type == "auto" else self.params.weight_type
        rr = ctx.target.reduce_range if self.params.reduce_range == "auto" else self.params.reduce_range == "true"
        return act, wt, rr

    def run(self, model: Path, ctx: PassContext) -> Path:
        return self.quantize(model, ctx, tag=f"int8-{self.params.quant_format}")

    def quantize(self, model: Path, ctx: PassContext, *, tag: str, extra_options: dict[str, Any] | None = None) -> Path:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        p = self.params
        act, wt, rr = self.resolved_types(ctx)
        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        methods = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }
        if p.calibration not in methods or act not in qtype or wt not in qtype:
            raise PassError(f"bad static_int8 params calibration={p.calibration} act={act} weight={wt}")
        if p.quant_format not in ("qdq", "qoperator"):
            raise PassError(f"quant_format '{p.quant_format}' is not qdq or qoperator")
        if p.per_channel and onnx_graph.opset_of(onnx_graph.load(model)) < 13:
            raise PassError("per-channel QDQ needs opset >= 13 (DequantizeLinear axis); run opset_upgrade first")
        options: dict[str, Any] = {
            "ActivationSymmetric": p.symmetric_activations,
        }
        if p.calibration == "percentile":
            options["CalibPercentile"] = p.percentile
        options.update(extra_options or {})
        out = ctx.new_path(tag)
        ctx.say(
            f"calibrating {tag} ({p.calibration}, {'per-channel' if p.per_channel else 'per-tensor'}, "
            f"{act}/{wt}{', reduce_range' if rr else ''})"
        )
        source = onnx_graph.load(model)
        _require_quantizable(source, p.op_types)
        if onnx_graph.flatten_gemm_bias(source):
            model = onnx_graph.save(source, ctx.new_path(f"{tag}-gemm-bias"))
        try:
            quantize_static(
                str(model),
                str(out),
                _Reader(calibration_batches(model, ctx, p.max_calib_samples, p.max_calib_memory_mb)),
                quant_format=QuantFormat.QDQ if p.quant_format == "qdq" else QuantFormat.QOperator,
                op_types_to_quantize=list(p.op_types) or None,
                per_channel=p.per_channel,
                reduce_range=rr,
                activation_type=qtype[act],
                weight_type=qtype[wt],
                nodes_to_exclude=list(p.nodes_to_exclude),
                calibrate_method=methods[p.calibration],
                extra_options=options,
            )
        except CompileError:
            raise
        except Exception as exc:
            raise PassError(f"static quantization failed ({str(exc).strip().splitlines()[0][:160]})") from exc
        if not any(
            n.op_type in ("QuantizeLinear", "QLinearConv", "QLinearMatMul", "QGemm")
            for n in onnx_graph.load(out).graph.node
        ):
            raise PassError(f"{_NOTHING_QUANTIZED}; the float model stays")
        return out


_NOTHING_QUANTIZED = "nothing was quantized (no op onnxruntime can quantize)"


def _require_quantizable(model: Any, op_types: tuple[str, ...]) -> None:
    """Fail before calibrating when no node of the main graph is of a type onnxruntime quantizes
    statically: it does not quantize inside If/Loop bodies, so a network wrapped in control flow
    (Silero VAD) has nothing to quantize, and its histogram calibrators would fail on the empty set."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    kinds = set(op_types) or set(QDQRegistry) | set(QLinearOpsRegistry)
    present = {n.op_type for n in model.graph.node}
    if present & kinds:
        return
    nested = {n.op_type for n in onnx_graph.all_nodes(model.graph)} - present
    where = " (the network is inside If/Loop bodies, which onnxruntime does not quantize)" if nested & kinds else ""
    raise PassError(f"{_NOTHING_QUANTIZED}{where}; the float model stays")
