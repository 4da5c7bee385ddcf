"""Compiler passes: one file per pass, one shape for all (after Olive).

Each pass declares typed, described parameters (a frozen dataclass ``Params`` whose fields carry a
``help`` string) and implements ``run(model, ctx) -> model`` on model files. Heavy imports live inside
``run``. ``PASS_REGISTRY`` records, as data, which hardware families and precisions a pass serves and
which optional packages it needs, so the compiler can check a pass suits a target before importing it.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from edgefleet.controller.compiler.data import Dataset
from edgefleet.controller.compiler.errors import CompileError, MissingExtraError
from edgefleet.controller.compiler.target import TargetSpec

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


class PassError(Exception):
    """This pass cannot produce this candidate; the candidate is dropped with this reason."""


@dataclass(frozen=True)
class GateResult:
    """What the gate said about one model file (used by passes that search, like mixed precision)."""

    fidelity: float  # the gate's agreement metric against fp32 (cosine unless --metric says otherwise)
    score: float | None
    passed: bool
    cosine: float | None = None  # cosine against fp32, reported beside a task metric


@dataclass(frozen=True)
class GateProbe:
    """The gate's held-out samples and metric, for passes that search against it (accuracy control).

    ``score`` takes the outputs of one run per feed (outputs in the model's order) and gives the
    gate's score on them, higher is better; a build may lose at most ``allowed_drop`` of fp32's."""

    feeds: list[dict[str, Any]]
    score: Callable[[list[list[Any]]], float]
    allowed_drop: float


@dataclass
class PassContext:
    """Everything a pass may read besides the model; passed explicitly, never global."""

    target: TargetSpec
    workdir: Path
    calib: Dataset | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    evaluate: Callable[[Path], GateResult] | None = None
    gate_probe: GateProbe | None = None
    progress: Callable[[str], None] | None = None
    notes: list[str] = field(default_factory=list)
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    def new_path(self, stem: str, suffix: str = ".onnx") -> Path:
        """A fresh file name in the candidate's work folder."""
        return self.workdir / f"{next(self._counter):02d}-{stem}{suffix}"

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


def param(default: Any, help: str) -> Any:
    """A described pass parameter: ``x: int = param(1, "why it exists")``."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples or frozen values for pass parameters")
    return field(default=default, metadata={"help": help})


ParamsT = TypeVar("ParamsT", bound="DataclassInstance")


class Pass(Generic[ParamsT], abc.ABC):
    """Base of all passes: ``Params`` holds the typed, described parameters.

    A pass names its own ``Params`` as the type argument (``class Float16(Pass["Float16.Params"])``)
    so ``self.params`` has that type, and a typo in a parameter name is a type error, not a crash
    halfway through a compile. ``params`` is positional-only so every keyword is a parameter
    override, including ones that come from a recipe's ``**dict``.
    """

    name: ClassVar[str] = ""
    Params: type[ParamsT]

    def __init__(self, params: ParamsT | None = None, /, **overrides: Any) -> None:
        base = params if params is not None else self.Params()
        if overrides:
            known = {f.name for f in fields(base)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise CompileError(
                    f"pass '{self.name}' has no parameter {unknown[0]!r} (has: {sorted(known)}); fix the recipe"
                )
            base = type(base)(**{**{f.name: getattr(base, f.name) for f in fields(base)}, **overrides})
        self.params: ParamsT = base

    @abc.abstractmethod
    def run(self, model: Path, ctx: PassContext) -> Path:
        """Take a model file, return a new one (written under ctx.workdir)."""

    @classmethod
    def describe(cls) -> dict[str, dict[str, str]]:
        """Parameter name -> {type, default, help}: what ``edgefleet compile --list-passes`` would print."""
        return {
            f.name: {"type": str(f.type), "default": repr(f.default), "help": f.metadata.get("help", "")}
            for f in fields(cls.Params)
        }


@dataclass(frozen=True)
class PassInfo:
    """Registry row: where the pass lives and what it serves."""

    module: str
    class_name: str
    families: frozenset[str]
    precisions: frozenset[str]
    formats: frozenset[str] = frozenset({"onnx"})
    requires: tuple[str, ...] = ()  # import names of optional packages
    extra: str = ""  # the pyproject extra that installs them
    summary: str = ""


_ALL = frozenset({"cpu", "gpu", "npu", "fpga", "tpu", "mcu"})
PASS_REGISTRY: Mapping[str, PassInfo] = {
    "opset_upgrade": PassInfo(
        "opset_upgrade",
        "OpsetUpgrade",
        _ALL,
        frozenset({"fp32"}),
        summary="raise the opset (per-channel QDQ needs >= 13)",
    ),
    "fix_shapes": PassInfo(
        "fix_shapes",
        "FixShapes",
        _ALL,
        frozenset({"fp32"}),
        summary="dynamic dims to fixed ones for targets that need static shapes",
    ),
    "simplify": PassInfo(
        "simplify",
        "Simplify",
        _ALL,
        frozenset({"fp32"}),
        summary="constant folding and redundant-node removal (onnxslim when installed)",
    ),
    "ort_fusion": PassInfo(
        "ort_fusion",
        "OrtFusion",
        _ALL,
        frozenset({"fp32", "fp16"}),
        summary="onnxruntime offline fusion at the level the target EP supports",
    ),
    "fp16": PassInfo(
        "fp16",
        "Float16",
        frozenset({"gpu"}),
        frozenset({"fp16"}),
        summary="fp16 weights and compute, fp32 model I/O",
    ),
    "static_int8": PassInfo(
        "static_int8",
        "StaticInt8",
        frozenset({"cpu", "npu", "fpga", "gpu"}),
        frozenset({"int8"}),
        summary="calibrated int8 (QDQ or QOperator, per-channel or per-tensor)",
    ),
    "dynamic_int8": PassInfo(
        "dynamic_int8",
        "DynamicInt8",
        frozenset({"cpu"}),
        frozenset({"int8-dynamic"}),
        summary="dynamic int8 for MatMul/Gemm/RNN weights only",
    ),
    "mixed_precision": PassInfo(
        "mixed_precision",
        "MixedPrecision",
        frozenset({"cpu", "npu", "fpga"}),
        frozenset({"int8", "mixed"}),
        summary="int8 with the most sensitive nodes kept in float until the gate passes",
    ),
    "pow2_int8": PassInfo(
        "pow2_int8",
        "PowerOfTwoInt8",
        frozenset({"fpga", "cpu"}),
        frozenset({"int8"}),
        summary="symmetric per-tensor int8 with power-of-two scales (FPGA DPUs)",
    ),
    "npu_uint8": PassInfo(
        "npu_uint8",
        "NpuUint8",
        frozenset({"npu", "cpu"}),
        frozenset({"uint8"}),
        summary="full-integer uint8 QDQ, static shapes, no QOperator / DynamicQuantizeLinear",
    ),
    "structure_check": PassInfo(
        "structure_check",
        "StructureCheck",
        _ALL,
        frozenset({"any"}),
        summary="assert the build fits hardware we cannot run here",
    ),
    "prune": PassInfo(
        "prune",
        "MagnitudePrune",
        _ALL,
        frozenset({"fp32", "int8"}),
        summary="unstructured magnitude pruning (shrinks the compressed bundle, not latency)",
    ),
    "tflite_quantize": PassInfo(
        "tflite_quantize",
        "TfliteQuantize",
        frozenset({"cpu", "tpu", "mcu", "gpu"}),
        frozenset({"int8", "int8-dynamic", "weight-only"}),
        frozenset({"tflite"}),
        requires=("ai_edge_quantizer",),
        extra="controller",
        summary="ai-edge-quantizer recipes on TFLite input",
    ),
    "openvino_convert": PassInfo(
        "openvino_convert",
        "OpenVinoConvert",
        frozenset({"cpu", "gpu", "npu"}),
        frozenset({"fp32", "bf16", "fp16"}),
        frozenset({"onnx", "tflite"}),
        requires=("openvino",),
        extra="controller",
        summary="OpenVINO IR from ONNX or TFLite, weights optionally stored as fp16",
    ),
    "openvino_int8": PassInfo(
        "openvino_int8",
        "OpenVinoInt8",
        frozenset({"cpu", "gpu", "npu"}),
        frozenset({"int8"}),
        frozenset({"onnx", "tflite"}),
        requires=("openvino", "nncf"),
        extra="controller",
        summary="NNCF int8 on the OpenVINO IR, accuracy-controlled on the gate's metric when asked",
    ),
    "tflite_export": PassInfo(
        "tflite_export",
        "TfliteExport",
        frozenset({"tpu", "mcu"}),
        frozenset({"int8"}),
        requires=("onnx2tf", "tensorflow"),
        extra="tflite-convert",
        summary="ONNX to full-int8 TFLite for MCU and Edge TPU targets",
    ),
}


def check_pass(name: str, target: TargetSpec, model_format: str = "onnx") -> PassInfo:
    """The registry check alone (family, format, optional packages): no import, so it is cheap to run
    for every recipe before any work starts."""
    info = PASS_REGISTRY.get(name)
    if info is None:
        raise CompileError(f"unknown pass '{name}' (known: {', '.join(sorted(PASS_REGISTRY))}); fix the recipe")
    if target.family not in info.families:
        raise CompileError(
            f"pass '{name}' does not serve {target.family} targets like "
            f"'{target.hardware_class}'; pick a recipe made for that class"
        )
    if model_format not in info.formats:
        raise CompileError(
            f"pass '{name}' takes {'/'.join(sorted(info.formats))} models, not {model_format}; "
            "pick a recipe for the model's format"
        )
    missing = tuple(pkg for pkg in info.requires if importlib.util.find_spec(pkg) is None)
    if missing:
        raise MissingExtraError(f"pass '{name}' ({info.summary})", missing, info.extra)
    return info


def load_pass(name: str, target: TargetSpec, model_format: str = "onnx") -> type[Pass[Any]]:
    """Check the registry first (family, format, optional packages), then import the pass module."""
    info = check_pass(name, target, model_format)
    module = importlib.import_module(f"{__name__}.{info.module}")
    cls: type[Pass[Any]] = getattr(module, info.class_name)
    return cls
