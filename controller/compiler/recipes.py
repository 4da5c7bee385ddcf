"""Recipes: for each hardware class, the ordered candidate builds worth trying.

The first recipe of every row is the baseline (the optimized fp32 graph): it is always built and
measured, and it is the answer when nothing else passes the gate or beats it. Recipes marked
``fallback`` run only when every full-int8 candidate failed the gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.controller.compiler.errors import CompileError
from edgefleet.controller.compiler.runner import RuntimeChoice
from edgefleet.controller.compiler.target import TargetSpec

Step = tuple[str, tuple[tuple[str, Any], ...]]


def step(pass_name: str, **params: Any) -> Step:
    return pass_name, tuple(sorted(params.items()))


@dataclass(frozen=True)
class Recipe:
    """A named chain of passes; ``precision`` is what the result computes in."""

    name: str
    steps: tuple[Step, ...]
    precision: str
    fallback: bool = False
    summary: str = ""
    needs_ops: tuple[str, ...] = ()  # skip (and say so) when the model has none of these op types
    runtime: RuntimeChoice = field(default_factory=RuntimeChoice)
    # Built only when every one of these recipes was built and failed the gate (accuracy-aware search).
    after_failure_of: tuple[str, ...] = ()
    # Built only when every one of these recipes was built and failed the gate, with no search
    # around it: a variant that gives up some speed for accuracy, not worth its build otherwise.
    when_failed: tuple[str, ...] = ()
    # A retrained network (pruned, distilled) the steps start from instead of the source; ``origin``
    # names it (see compiler/retrain). The path is one compile's work file, so it is not compared.
    start_from: Path | None = field(default=None, compare=False)
    origin: str = ""

    def describe(self) -> list[dict[str, Any]]:
        steps = [{"pass": name, "params": dict(params)} for name, params in self.steps]
        if self.origin:
            steps.insert(0, {"pass": "retrain", "params": {"network": self.origin}})
        if self.runtime != RuntimeChoice():
            steps.append({"runtime": self.runtime.describe()})
        return steps


PREP = (step("opset_upgrade"), step("simplify"))
PREP_STATIC = (step("opset_upgrade"), step("fix_shapes"), step("simplify"))
BASELINE = Recipe(
    "fp32-optimized",
    (*PREP, step("ort_fusion", level="auto")),
    "fp32",
    summary="opset upgrade, simplification, ORT offline fusion for the target EP",
)
BASELINE_STATIC = Recipe(
    "fp32-optimized",
    (*PREP_STATIC, step("ort_fusion", level="basic")),
    "fp32",
    summary="static shapes, simplification, portable (basic) fusion",
)
# The source as given, on onnxruntime: when fusion gains nothing (a tiny recurrent model), the
# optimized graph can still be bigger than the source (constants folded into both If branches),
# and then the file the user gave is the better fp32 build.
SOURCE = Recipe("fp32-source", (), "fp32", summary="the ONNX model as given")
_QDQ_PC = (("calibration", "minmax"), ("per_channel", True), ("quant_format", "qdq"))
# The ops where int8 buys the time. onnxruntime's default set also puts Q/DQ around Add, Mul,
# LayerNormalization, Softmax, Concat...: on models with decomposed norms or tanh-GELU (Magika,
# MiniLM) that alone costs the accuracy (Magika top-1 agreement 0.00 with them, 1.00 without).
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _int8(name: str, prep: tuple[Step, ...] = PREP, **params: Any) -> Recipe:
    return Recipe(name, (*prep, step("static_int8", **params)), "int8")


CPU_INT8 = [
    BASELINE,
    _int8("int8-qdq-perchannel-minmax", quant_format="qdq", per_channel=True, calibration="minmax"),
    _int8("int8-qdq-pertensor-minmax", quant_format="qdq", per_channel=False, calibration="minmax"),
    Recipe(
        "int8-qdq-perchannel-compute",
        (*PREP, step("static_int8", quant_format="qdq", per_channel=True, calibration="minmax",
                     op_types=COMPUTE_OPS)),
        "int8",
        summary="int8 for convolutions and matmuls only; norms, activations and elementwise ops stay float",
        when_failed=("int8-qdq-perchannel-minmax",),
    ),
    _int8("int8-qdq-perchannel-percentile", quant_format="qdq", per_channel=True, calibration="percentile"),
    _int8("int8-qoperator-perchannel-minmax", quant_format="qoperator", per_channel=True, calibration="minmax"),
    Recipe(
        "int8-qdq+dynamic-rnn",
        (
            *PREP,
            step("static_int8", quant_format="qdq", per_channel=True),
            step("dynamic_int8", op_types=("LSTM", "GRU")),
        ),
        "int8",
        summary="conv nets with a recurrent head: static int8 for conv/matmul, dynamic int8 for LSTM/GRU weights",
        needs_ops=("LSTM", "GRU"),
    ),
    Recipe(
        "int8-dynamic-matmul",
        (*PREP, step("dynamic_int8")),
        "int8-dynamic",
        summary="transformer/RNN MatMuls only; chosen only if it measures faster",
    ),
    Recipe(
        "int8-mixed",
        (*PREP, step("mixed_precision", base=_QDQ_PC)),
        "mixed",
        fallback=True,
        summary="full int8 failed the gate: keep the most sensitive nodes in float",
        # The search starts from this build, so whether it can pay is judged on this build alone
        # (a faster compute-ops-only build that failed too says nothing about this one).
        after_failure_of=("int8-qdq-perchannel-minmax",),
    ),
]

_X86_ONLY = ("int8-qdq-perchannel-percentile", "int8-qoperator-perchannel-minmax")
ARM_INT8 = [
    *CPU_INT8[:4],  # baseline, qdq per-channel, per-tensor, compute ops only
    _int8("int8-qdq-perchannel-entropy", quant_format="qdq", per_channel=True, calibration="entropy"),
    *[r for r in CPU_INT8[4:] if r.name not in _X86_ONLY],  # qdq+dynamic-rnn, dynamic-matmul, mixed
    Recipe(
        "int8-qdq-pruned30",
        (*PREP, step("prune", sparsity=0.3), step("static_int8", quant_format="qdq", per_channel=True)),
        "int8",
        summary="smaller bundle over slow links; latency as unpruned int8",
    ),
]

_NPU_CHECK = step("structure_check", weight_dtype="uint8")
_DPU_CHECK = step("structure_check", weight_dtype="int8", pow2_scales=True)
# fmt: off
GPU = [
    BASELINE,
    Recipe("fp16", (*PREP, step("ort_fusion", level="basic"), step("fp16", keep_io_types=True)), "fp16"),
]
NPU = [
    BASELINE_STATIC,
    Recipe("uint8-npu-minmax", (*PREP_STATIC, step("npu_uint8", calibration="minmax"), _NPU_CHECK), "uint8"),
    Recipe("uint8-npu-percentile", (*PREP_STATIC, step("npu_uint8", calibration="percentile"), _NPU_CHECK),
           "uint8"),
]
DPU = [
    BASELINE_STATIC,
    Recipe("int8-pow2-minmax", (*PREP_STATIC, step("pow2_int8", calibration="minmax"), _DPU_CHECK), "int8"),
]
TFLITE_TARGETS = [
    BASELINE_STATIC,
    Recipe("tflite-full-int8", (*PREP_STATIC, step("tflite_export")), "int8",
           summary="ONNX to full-int8 TFLite (needs the tflite-convert extra)", runtime=RuntimeChoice("litert")),
]

# Hardware class pattern (first full match wins) -> ordered candidates. This table is the policy.
RECIPE_TABLE: tuple[tuple[str, list[Recipe]], ...] = (
    (r"x86_64.*",                                   CPU_INT8),
    (r"arm64.*|armv7.*",                            ARM_INT8),
    (r"cuda-sm[0-9]+",                              GPU),
    (r"qnn-htp|intel-npu|rknpu|hailo8l?|hailo10h",  NPU),
    (r"vitis-dpu",                                  DPU),
    (r"edgetpu|mcu-.*",                             TFLITE_TARGETS),
)
# fmt: on

_LITERT = RuntimeChoice("litert")
TFLITE_BASELINE = Recipe("tflite-float", (), "fp32", summary="the TFLite model as given", runtime=_LITERT)
TFLITE_RECIPES = [
    TFLITE_BASELINE,
    Recipe("tflite-dynamic", (step("tflite_quantize", recipe="dynamic"),), "int8-dynamic", runtime=_LITERT),
    Recipe("tflite-weight-only", (step("tflite_quantize", recipe="weight_only"),), "weight-only", runtime=_LITERT),
    Recipe("tflite-static-int8", (step("tflite_quantize", recipe="static"),), "int8", runtime=_LITERT),
]


def _ov(name: str, steps: tuple[Step, ...], precision: str, hint: str | None, device: str = "CPU",
        **extra: Any) -> Recipe:
    return Recipe(name, steps, precision, runtime=RuntimeChoice("openvino", device, hint), **extra)


_OV_IR = step("openvino_convert", compress_to_fp16=False, keep_tflite=True)
_OV_IR16 = step("openvino_convert", compress_to_fp16=True, keep_tflite=True)
_OV_INT8 = step("openvino_int8")
_OV_INT8_AC = step("openvino_int8", accuracy_control=True)


def openvino_recipes(target: TargetSpec) -> list[Recipe]:
    """OpenVINO candidates for the devices and precisions the target's profile found OpenVINO running.

    The precision hint is explicit everywhere, fp32 included: on AMX and AVX512-BF16 CPUs OpenVINO
    computes in bf16 by default, and an "fp32" build that silently ran in bf16 would be gated wrongly.
    """
    rows: list[Recipe] = []
    cpu = target.openvino_capabilities("CPU")
    if cpu is not None:
        rows.append(_ov("ov-fp32", (_OV_IR,), "fp32", "f32", summary="OpenVINO CPU, fp32"))
        rows.append(_ov("ov-fp32-fp16w", (_OV_IR16,), "fp32", "f32", summary="fp32 compute, fp16 weights on disk"))
        if "BF16" in cpu:
            rows.append(_ov("ov-bf16", (_OV_IR,), "bf16", "bf16", summary="OpenVINO CPU in bf16 (AMX, AVX512-BF16)"))
            rows.append(_ov("ov-bf16-fp16w", (_OV_IR16,), "bf16", "bf16", summary="bf16 compute, fp16 weights"))
        if "FP16" in cpu:
            rows.append(_ov("ov-fp16", (_OV_IR16,), "fp16", "f16", summary="OpenVINO CPU in fp16 (AMX-FP16)"))
        if "INT8" in cpu:
            rows.append(_ov("ov-int8", (_OV_IR, _OV_INT8), "int8", None, summary="NNCF int8 on OpenVINO CPU"))
            rows.append(_ov("ov-int8-accuracy", (_OV_IR, _OV_INT8_AC), "mixed", None, after_failure_of=("ov-int8",),
                            summary="NNCF accuracy control: int8 with the ops that hurt the metric in float"))
    gpu = target.openvino_capabilities("GPU")
    if gpu is not None:
        hint = "f16" if "FP16" in gpu else "f32"
        rows.append(_ov("ov-gpu-fp16", (_OV_IR16,), "fp16", hint, "GPU", summary="OpenVINO Intel GPU, fp16"))
        if "INT8" in gpu:
            rows.append(_ov("ov-gpu-int8", (_OV_IR, _OV_INT8), "int8", None, "GPU", summary="NNCF int8 on Intel GPU"))
    npu = target.openvino_capabilities("NPU")
    if npu is not None:
        rows.append(_ov("ov-npu-int8", (_OV_IR, _OV_INT8), "int8", None, "NPU",
                        summary="NNCF int8 on the Intel NPU (static shapes: pass --input-shape for dynamic dims)"))
        rows.append(_ov("ov-npu-fp16", (_OV_IR16,), "fp16", "f16", "NPU", summary="Intel NPU, fp16"))
    return rows


def all_recipe_names() -> list[str]:
    from dataclasses import replace

    names = {r.name for _, rows in RECIPE_TABLE for r in rows} | {r.name for r in TFLITE_RECIPES} | {SOURCE.name}
    base = TargetSpec.from_class("x86_64")
    for cpu in (("FP32", "BF16", "FP16", "INT8"), ("FP32", "INT8")):  # every OpenVINO device and capability
        devices = (("CPU", cpu), ("GPU", ("FP16", "INT8")), ("NPU", ()))
        names |= {r.name for r in openvino_recipes(replace(base, openvino_devices=devices))}
    return sorted(names)


def recipes_for(target: TargetSpec, model_format: str, only: tuple[str, ...] | None = None) -> list[Recipe]:
    """Ordered candidates for a target; ``only`` limits them by name (the baseline always stays)."""
    import re

    if model_format == "tflite":
        rows = TFLITE_RECIPES
    else:
        key = target.recipe_class or target.hardware_class
        rows = next((r for pattern, r in RECIPE_TABLE if re.fullmatch(pattern, key)), [])
        if not rows:
            raise CompileError(f"no recipes for class '{target.hardware_class}'; add a row to RECIPE_TABLE")
    if model_format != "tflite":
        rows = [rows[0], SOURCE, *rows[1:]]
    # The runtime is part of the candidate: OpenVINO builds compete with the ORT and LiteRT ones.
    rows = [*rows, *openvino_recipes(target)]
    if only:
        known = {r.name for r in rows}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise CompileError(
                f"recipe '{unknown[0]}' does not apply to class '{target.hardware_class}' "
                f"(available: {', '.join(sorted(known))}); pass one of those to --recipes"
            )
        rows = [rows[0], *[r for r in rows[1:] if r.name in only]]
    return list(rows)
