"""Hardware targets: one frozen description of what the compiler compiles for.

The target is always passed in explicitly (never read from global state) so the same compile can run
for a profile that arrived over the wire, a class named on the command line, or this machine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from edgefleet.controller.compiler.errors import CompileError

Family = Literal["cpu", "gpu", "npu", "fpga", "tpu", "mcu"]
Int8Kind = Literal["u8s8", "u8s8-reduce-range", "s8s8", "u8u8-npu", "pow2-s8", "tflite-int8", "none"]


@dataclass(frozen=True)
class ClassTraits:
    """What a hardware class implies for compilation; nominal figures are used only for estimates."""

    family: Family
    execution_provider: str
    static_shapes: bool
    int8_kind: Int8Kind
    artifact_format: Literal["onnx", "tflite"]
    # Nominal micro-benchmark figures, used to estimate latency when no profile and no device exist.
    fp32_gflops: float
    int8_gops: float
    bandwidth_gbs: float
    description: str


# One readable table: class pattern (full match, first row wins) -> traits. Class names are the ones the
# agent profiler derives (edgefleet.agent.profiler.hardware_class). Figures: fp32 GFLOP/s, int8 GOP/s, GB/s.
_CPU: Family = "cpu"
_ORT = "CPUExecutionProvider"
# fmt: off
CLASS_TABLE: tuple[tuple[str, ClassTraits], ...] = (
    (r"x86_64-(avx512vnni|avxvnni|amx)", ClassTraits(_CPU, _ORT, False, "u8s8", "onnx", 60.0, 240.0, 20.0,
        "x86-64 with VNNI: u8s8 int8, full 8-bit weights")),
    (r"x86_64-(avx512|avx2|avx)", ClassTraits(_CPU, _ORT, False, "u8s8-reduce-range", "onnx", 40.0, 80.0, 15.0,
        "x86-64 without VNNI: u8s8 with 7-bit weights (reduce_range), else vpmaddubsw saturates")),
    (r"x86_64(-sse[0-9.]*)?", ClassTraits(_CPU, _ORT, False, "u8s8-reduce-range", "onnx", 10.0, 15.0, 8.0,
        "x86-64 baseline")),
    (r"arm64-(i8mm|dotprod|sve|sve2)", ClassTraits(_CPU, _ORT, False, "s8s8", "onnx", 20.0, 80.0, 8.0,
        "64-bit Arm with sdot/udot: s8s8 int8")),
    (r"arm64(-neon)?", ClassTraits(_CPU, _ORT, False, "u8s8", "onnx", 10.0, 20.0, 4.0,
        "64-bit Arm without dot product")),
    (r"armv7(-neon)?", ClassTraits(_CPU, _ORT, False, "u8s8", "onnx", 3.0, 6.0, 2.0,
        "32-bit Arm")),
    (r"cuda-sm[0-9]+", ClassTraits("gpu", "CUDAExecutionProvider", False, "none", "onnx", 2000.0, 4000.0, 100.0,
        "NVIDIA GPU: fp16 with fp32 I/O")),
    (r"qnn-htp", ClassTraits("npu", "QNNExecutionProvider", True, "u8u8-npu", "onnx", 20.0, 2000.0, 10.0,
        "Qualcomm HTP: full-integer uint8 QDQ, static shapes")),
    (r"intel-npu", ClassTraits("npu", "OpenVINOExecutionProvider", True, "u8u8-npu", "onnx", 20.0, 2000.0, 10.0,
        "Intel NPU through OpenVINO: full-integer QDQ, static shapes")),
    (r"rknpu|hailo8l?|hailo10h", ClassTraits("npu", "vendor-sdk", True, "u8u8-npu", "onnx", 20.0, 2000.0, 10.0,
        "RKNN / Hailo: full-integer uint8 QDQ ONNX, static shapes, for the vendor compiler")),
    (r"vitis-dpu", ClassTraits("fpga", "VitisAIExecutionProvider", True, "pow2-s8", "onnx", 20.0, 1000.0, 10.0,
        "FPGA DPU: power-of-two symmetric per-tensor int8")),
    (r"edgetpu", ClassTraits("tpu", "edgetpu-delegate", True, "tflite-int8", "tflite", 5.0, 4000.0, 4.0,
        "Edge TPU: full-int8 TFLite")),
    (r"mcu-[a-z0-9-]+", ClassTraits("mcu", "tflite-micro", True, "tflite-int8", "tflite", 0.2, 0.4, 0.2,
        "MCU: full-int8 TFLite for TFLite Micro")),
)
# fmt: on


def known_class_patterns() -> list[str]:
    """Human-readable list of class patterns, for error messages."""
    return [pattern for pattern, _ in CLASS_TABLE]


def traits_for_class(hardware_class: str) -> ClassTraits | None:
    """Traits of the first table row whose pattern matches the whole class string."""
    for pattern, traits in CLASS_TABLE:
        if re.fullmatch(pattern, hardware_class):
            return traits
    return None


def _norm_feature(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(".", "")


def _class_from_isa(arch: str, features: tuple[str, ...]) -> str | None:
    """Derive a class from ISA features when a profile carries a class our table does not know."""
    feats = {_norm_feature(f) for f in features}
    arch = arch.lower()
    if arch in ("x86_64", "amd64"):
        if feats & {"avx512vnni", "avxvnni", "amxint8"}:
            return "x86_64-avx512vnni"
        if feats & {"avx512f", "avx512bw"}:
            return "x86_64-avx512"
        if "avx2" in feats:
            return "x86_64-avx2"
        return "x86_64"
    if arch in ("aarch64", "arm64"):
        if feats & {"asimddp", "dotprod", "i8mm"}:
            return "arm64-dotprod"
        return "arm64"
    if arch.startswith("armv7"):
        return "armv7"
    return None


@dataclass(frozen=True)
class TargetSpec:
    """The hardware a compile is for. ``source`` tells where it came from (class, profile, local)."""

    hardware_class: str
    family: Family
    execution_provider: str
    static_shapes: bool
    int8_kind: Int8Kind
    artifact_format: Literal["onnx", "tflite"]
    isa_features: tuple[str, ...] = ()
    fp32_gflops: float = 0.0
    int8_gops: float = 0.0
    bandwidth_gbs: float = 0.0
    threads: int = 0
    microbench_source: Literal["profile", "nominal"] = "nominal"
    source: Literal["class", "profile", "local"] = "class"
    recipe_class: str = field(default="", compare=False)
    # OpenVINO devices that ran a probe model on the device(s), with OPTIMIZATION_CAPABILITIES:
    # (("CPU", ("FP32", "BF16", "INT8")), ("GPU", ("FP16", ...))). Empty: no OpenVINO candidates.
    openvino_devices: tuple[tuple[str, tuple[str, ...]], ...] = ()
    openvino_version: str = ""

    def openvino_capabilities(self, device: str) -> tuple[str, ...] | None:
        """The device's capabilities when OpenVINO runs on it, else None."""
        for name, caps in self.openvino_devices:
            if name == device or name.split(".")[0] == device:
                return caps
        return None

    @property
    def reduce_range(self) -> bool:
        """7-bit weights: only where int8 dot products saturate (AVX2/AVX-512 without VNNI)."""
        return self.int8_kind == "u8s8-reduce-range"

    def as_dict(self) -> dict[str, Any]:
        return {
            "hardware_class": self.hardware_class,
            "family": self.family,
            "execution_provider": self.execution_provider,
            "static_shapes": self.static_shapes,
            "int8_kind": self.int8_kind,
            "artifact_format": self.artifact_format,
            "isa_features": list(self.isa_features),
            "microbench": {
                "fp32_gemm_gflops": self.fp32_gflops,
                "int8_gemm_gops": self.int8_gops,
                "memory_bandwidth_gbs": self.bandwidth_gbs,
                "source": self.microbench_source,
            },
            "threads": self.threads,
            "source": self.source,
            "openvino": {
                "version": self.openvino_version,
                "devices": {name: list(caps) for name, caps in self.openvino_devices},
            }
            if self.openvino_devices
            else None,
        }

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_class(cls, hardware_class: str) -> TargetSpec:
        """A target from a class name alone; micro-benchmark figures are the table's nominal ones."""
        traits = traits_for_class(hardware_class)
        if traits is None:
            raise CompileError(
                f"unknown hardware class '{hardware_class}' (known: {', '.join(known_class_patterns())}); "
                "pass --target local, one of these classes, or a profile JSON from a device"
            )
        return cls(
            hardware_class=hardware_class,
            family=traits.family,
            execution_provider=traits.execution_provider,
            static_shapes=traits.static_shapes,
            int8_kind=traits.int8_kind,
            artifact_format=traits.artifact_format,
            fp32_gflops=traits.fp32_gflops,
            int8_gops=traits.int8_gops,
            bandwidth_gbs=traits.bandwidth_gbs,
            recipe_class=hardware_class,
        )

    @classmethod
    def from_profile(cls, profile: Any, *, source: Literal["profile", "local"] = "profile") -> TargetSpec:
        """A target from an ``edgefleet.v1.HardwareProfile`` (the agent's own description)."""
        hw_class = str(profile.hardware_class or "")
        features = tuple(str(f) for f in profile.cpu.isa_features)
        traits_class = hw_class if traits_for_class(hw_class) else _class_from_isa(profile.cpu.arch, features)
        if not traits_class:
            raise CompileError(
                f"profile has hardware class '{hw_class}' and CPU arch '{profile.cpu.arch}', "
                "which the compiler "
                f"does not know (known: {', '.join(known_class_patterns())}); re-profile the device with a "
                "current agent or pass --target CLASS"
            )
        base = cls.from_class(traits_class)
        ov_devices, ov_version = openvino_from_profile(profile)
        mb = profile.microbench
        has_mb = mb.fp32_gemm_gflops > 0
        return replace(
            base,
            hardware_class=hw_class or traits_class,
            isa_features=features,
            fp32_gflops=mb.fp32_gemm_gflops if has_mb else base.fp32_gflops,
            int8_gops=mb.int8_gemm_gops if mb.int8_gemm_gops > 0 else base.int8_gops,
            bandwidth_gbs=mb.memory_bandwidth_gbs if mb.memory_bandwidth_gbs > 0 else base.bandwidth_gbs,
            threads=int(profile.cpu.physical_cores or 0),
            microbench_source="profile" if has_mb else "nominal",
            source=source,
            recipe_class=traits_class,
            openvino_devices=ov_devices,
            openvino_version=ov_version,
        )

    @classmethod
    def from_profile_json(cls, path: Path) -> TargetSpec:
        """A target from a profile saved as JSON (``MessageToJson`` of a HardwareProfile)."""
        from google.protobuf import json_format

        from edgefleet.protos.v1.profile_pb2 import HardwareProfile

        try:
            raw = json.loads(Path(path).read_text())
            profile = json_format.ParseDict(raw, HardwareProfile(), ignore_unknown_fields=True)
        except (OSError, ValueError, json_format.ParseError) as exc:
            raise CompileError(
                f"cannot read hardware profile {path}: {_first_line(exc)}; pass a profile JSON written by "
                "'edgefleet-agent profile --json' or a class name"
            ) from exc
        return cls.from_profile(profile, source="profile")

    @classmethod
    def local(cls) -> TargetSpec:
        """This machine, profiled by the agent's profiler (imported lazily: the agent never imports us)."""
        try:
            from edgefleet.agent.profiler import collect_profile
        except ImportError as exc:
            raise CompileError(
                "--target local needs the agent profiler (edgefleet.agent.profiler.collect_profile), which "
                "is not importable here; install 'edgefleet[agent]' or pass --target CLASS"
            ) from exc
        from edgefleet.controller.compiler.cache import default_cache_dir

        # The profiler's micro-benchmark (~3 s) is reused from its cache between compiles.
        profile = collect_profile(cache_dir=default_cache_dir().parent / "profile")
        return cls.from_profile(profile, source="local")

    @classmethod
    def resolve(cls, target: str | TargetSpec | Mapping[str, Any]) -> TargetSpec:
        """``local``, a class name, a path to a profile JSON, or an already-built spec."""
        if isinstance(target, TargetSpec):
            return target
        if isinstance(target, Mapping):
            from google.protobuf import json_format

            from edgefleet.protos.v1.profile_pb2 import HardwareProfile

            return cls.from_profile(json_format.ParseDict(dict(target), HardwareProfile()))
        if target == "local":
            return cls.local()
        if target.endswith(".json") or Path(target).is_file():
            if not Path(target).is_file():
                raise CompileError(f"profile file {target} does not exist; pass a profile JSON or a class name")
            return cls.from_profile_json(Path(target))
        return cls.from_class(target)


def openvino_from_profile(profile: Any) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], str]:
    """The OpenVINO devices a profile found loadable, with their capabilities, and the runtime version."""
    for runtime in profile.runtimes:
        if runtime.name == "openvino":
            loadable = set(runtime.loadable_providers)
            devices = tuple(
                (str(d.name), tuple(str(c) for c in d.capabilities)) for d in runtime.devices if d.name in loadable
            )
            return devices, str(runtime.version)
    return (), ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
