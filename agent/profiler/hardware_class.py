"""The hardware class: the one place that decides which compiled artifact a device can share.

A rollout groups devices by this string and compiles once per class, so two devices whose relevant
features match must get the same string, and nothing that varies between identical boards (core count,
frequency, memory size, hostname) may go into it. The rows are tried top to bottom; the first that
matches wins. Accelerators come first because a model compiled for one beats any CPU build on the same
device (an operator who plugs in a Coral wants it used); among them, the order is the usual throughput
order. A device with none of them falls through to its CPU ISA, keyed by the best int8 instruction the
runtime's kernels use (int8 is what the compiler ships to CPUs).

| #  | class                    | matches when                                                          |
|----|--------------------------|-----------------------------------------------------------------------|
| 1  | `cuda-sm<major><minor>`  | an NVIDIA GPU (dGPU or Jetson) with a known compute capability; the   |
|    |                          | first GPU, the one onnxruntime's CUDA provider uses by default        |
| 2  | `edgetpu`                | a Coral Edge TPU (PCIe `/dev/apex_*` or USB)                          |
| 3  | `hailo8` / `hailo10h`    | a Hailo device (Hailo-8L must be pinned by hand: same PCI id)         |
| 4  | `vitis-dpu`              | a Xilinx FPGA driven by XRT (`zocl` on Kria/Zynq, `xocl` on Alveo)    |
| 5  | `qnn-htp`                | a Qualcomm cDSP through fastrpc (`/dev/fastrpc-cdsp*`)                |
| 6  | `rknpu`                  | a Rockchip NPU                                                        |
| 7  | `intel-npu`              | an Intel NPU (`intel_vpu` driver)                                     |
| 8  | `mcu-cortex-m`           | an MCU in the manifest with a Cortex-M core (else `mcu-<core>`)      |
| 9  | `x86_64-amx`             | x86_64 with `amx_int8`                                                |
| 10 | `x86_64-avx512vnni`      | x86_64 with `avx512_vnni`                                             |
| 11 | `x86_64-avxvnni`         | x86_64 with `avx_vnni` (VEX-encoded VNNI: Alder Lake, Meteor Lake)    |
| 12 | `x86_64-avx512`          | x86_64 with `avx512f` + `avx512bw` + `avx512vl`                       |
| 13 | `x86_64-avx2`            | x86_64 with `avx2` + `fma`                                            |
| 14 | `x86_64`                 | any other x86_64                                                      |
| 15 | `arm64-i8mm`             | aarch64 with `i8mm` (int8 matrix multiply: Neoverse-V1/N2, A710+)    |
| 16 | `arm64-dotprod`          | aarch64 with `dotprod` (`asimddp`: A55, A76, A78AE, ...)              |
| 17 | `arm64`                  | aarch64 with plain NEON (A53, A72)                                    |
| 18 | `armv7-neon` / `armv7`   | 32-bit ARM with / without NEON                                        |
| 19 | `<arch>`                 | anything else, e.g. `riscv64`                                         |

Accelerators recorded for information only (Intel/AMD render-node GPUs, AMD/Qualcomm `/dev/accel` NPUs,
FPGAs without XRT) do not change the class until the compiler has a target for them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from edgefleet.protos.v1.profile_pb2 import Accelerator
from edgefleet.protos.v1.profile_pb2 import HardwareProfile as Profile


def _first(profile: Profile, predicate: Callable[[Accelerator], bool]) -> Accelerator | None:
    return next((acc for acc in profile.accelerators if predicate(acc)), None)


def _cuda(profile: Profile) -> str | None:
    gpu = _first(profile, lambda a: a.kind == "gpu" and a.vendor == "nvidia" and bool(a.compute_capability))
    return f"cuda-sm{gpu.compute_capability.replace('.', '')}" if gpu else None


def _edgetpu(profile: Profile) -> str | None:
    return "edgetpu" if _first(profile, lambda a: a.vendor == "google" and a.kind == "tpu") else None


def _hailo(profile: Profile) -> str | None:
    device = _first(profile, lambda a: a.vendor == "hailo")
    if device is None:
        return None
    return "hailo10h" if "10H" in device.model else "hailo8l" if "8L" in device.model else "hailo8"


def _vitis(profile: Profile) -> str | None:
    fpga = _first(profile, lambda a: a.kind == "fpga" and a.vendor == "xilinx" and a.driver in ("zocl", "xocl"))
    return "vitis-dpu" if fpga else None


def _qnn(profile: Profile) -> str | None:
    dsp = _first(profile, lambda a: a.vendor == "qualcomm" and a.device_path.startswith("/dev/fastrpc-cdsp"))
    return "qnn-htp" if dsp else None


def _rknpu(profile: Profile) -> str | None:
    return "rknpu" if _first(profile, lambda a: a.vendor == "rockchip" and a.kind == "npu") else None


def _intel_npu(profile: Profile) -> str | None:
    return "intel-npu" if _first(profile, lambda a: a.kind == "npu" and a.driver == "intel_vpu") else None


def _mcu(profile: Profile) -> str | None:
    mcu = _first(profile, lambda a: a.kind == "mcu")
    if mcu is None:
        return None
    core = mcu.details.get("core", "")
    if re.match(r"(?i)cortex-m", core):
        return "mcu-cortex-m"
    return "mcu-" + (re.sub(r"[^a-z0-9]+", "-", core.lower()).strip("-") or "unknown")


def _cpu(profile: Profile) -> str:
    arch = profile.cpu.arch
    features = set(profile.cpu.isa_features)
    if arch in ("x86_64", "amd64"):
        if "amx_int8" in features:
            return "x86_64-amx"
        if "avx512_vnni" in features:
            return "x86_64-avx512vnni"
        if "avx_vnni" in features:
            return "x86_64-avxvnni"
        if {"avx512f", "avx512bw", "avx512vl"} <= features:
            return "x86_64-avx512"
        if {"avx2", "fma"} <= features:
            return "x86_64-avx2"
        return "x86_64"
    if arch in ("aarch64", "arm64"):
        if "i8mm" in features:
            return "arm64-i8mm"
        if "dotprod" in features:
            return "arm64-dotprod"
        return "arm64"
    if arch.startswith("armv7") or arch.startswith("armv8l"):
        return "armv7-neon" if "neon" in features else "armv7"
    return arch or "unknown"


# The precedence table above, as code: first non-None wins, then the CPU ISA.
ACCELERATOR_RULES: tuple[Callable[[Profile], str | None], ...] = (
    _cuda,
    _edgetpu,
    _hailo,
    _vitis,
    _qnn,
    _rknpu,
    _intel_npu,
    _mcu,
)


def derive_hardware_class(profile: Profile) -> str:
    """The class key of a profile; see the module table for the rules and why they are ordered so."""
    for rule in ACCELERATOR_RULES:
        found = rule(profile)
        if found:
            return found
    return _cpu(profile)


def cpu_hardware_class(profile: Profile) -> str:
    """The class the CPU alone would get: the fallback when an accelerator build fails its self-test."""
    return _cpu(profile)
