"""The class table: precedence, CPU ISA rows, and that identical hardware shares one class."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgefleet.agent.profiler import collect_profile, derive_hardware_class
from edgefleet.agent.profiler.hardware_class import cpu_hardware_class
from edgefleet.protos.v1 import profile_pb2

BOARDS = Path(__file__).resolve().parents[2] / "data" / "boards"


def profile(
    arch: str, *features: str, accelerators: tuple[profile_pb2.Accelerator, ...] = ()
) -> profile_pb2.HardwareProfile:
    result = profile_pb2.HardwareProfile(cpu=profile_pb2.CpuInfo(arch=arch, isa_features=sorted(features)))
    result.accelerators.extend(accelerators)
    return result


@pytest.mark.parametrize(
    ("arch", "features", "expected"),
    [
        ("x86_64", ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_int8"), "x86_64-amx"),
        ("x86_64", ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"), "x86_64-avx512vnni"),
        ("x86_64", ("avx2", "fma", "avx_vnni"), "x86_64-avxvnni"),
        ("x86_64", ("avx2", "fma", "avx512f", "avx512bw", "avx512vl"), "x86_64-avx512"),
        ("x86_64", ("avx2", "fma"), "x86_64-avx2"),
        ("x86_64", ("sse4_2",), "x86_64"),
        ("aarch64", ("neon", "dotprod", "i8mm", "sve"), "arm64-i8mm"),
        ("aarch64", ("neon", "dotprod"), "arm64-dotprod"),
        ("aarch64", ("neon",), "arm64"),
        ("armv7l", ("neon",), "armv7-neon"),
        ("armv7l", (), "armv7"),
        ("riscv64", (), "riscv64"),
        ("", (), "unknown"),
    ],
)
def test_cpu_rows(arch: str, features: tuple[str, ...], expected: str) -> None:
    assert derive_hardware_class(profile(arch, *features)) == expected


def acc(**fields: str) -> profile_pb2.Accelerator:
    return profile_pb2.Accelerator(**fields)


CUDA = acc(kind="gpu", vendor="nvidia", compute_capability="8.9")
EDGETPU = acc(kind="tpu", vendor="google")
HAILO = acc(kind="npu", vendor="hailo", model="Hailo-8")
VITIS = acc(kind="fpga", vendor="xilinx", driver="zocl")
QNN = acc(kind="dsp", vendor="qualcomm", device_path="/dev/fastrpc-cdsp")
RKNPU = acc(kind="npu", vendor="rockchip")
INTEL_NPU = acc(kind="npu", vendor="intel", driver="intel_vpu")
MCU = profile_pb2.Accelerator(kind="mcu", details={"core": "Cortex-M55"})


@pytest.mark.parametrize(
    ("accelerators", "expected"),
    [
        ((INTEL_NPU, MCU, RKNPU, QNN, VITIS, HAILO, EDGETPU, CUDA), "cuda-sm89"),
        ((INTEL_NPU, MCU, RKNPU, QNN, VITIS, HAILO, EDGETPU), "edgetpu"),
        ((INTEL_NPU, MCU, RKNPU, QNN, VITIS, HAILO), "hailo8"),
        ((INTEL_NPU, MCU, RKNPU, QNN, VITIS), "vitis-dpu"),
        ((INTEL_NPU, MCU, RKNPU, QNN), "qnn-htp"),
        ((INTEL_NPU, MCU, RKNPU), "rknpu"),
        ((INTEL_NPU, MCU), "intel-npu"),
        ((MCU,), "mcu-cortex-m"),
        ((profile_pb2.Accelerator(kind="mcu", details={"core": "ESP32-S3"}),), "mcu-esp32-s3"),
        ((acc(kind="npu", vendor="hailo", model="Hailo-10H"),), "hailo10h"),
        ((acc(kind="gpu", vendor="nvidia"),), "arm64-dotprod"),  # compute capability unknown: CPU class
        ((acc(kind="gpu", vendor="intel", driver="i915"),), "arm64-dotprod"),  # informational only
        ((acc(kind="fpga", vendor="xilinx", driver="fpga_manager"),), "arm64-dotprod"),  # no XRT: no target
        ((acc(kind="dsp", vendor="qualcomm", device_path="/dev/fastrpc-adsp"),), "arm64-dotprod"),  # no HTP
    ],
)
def test_accelerator_precedence(accelerators: tuple[profile_pb2.Accelerator, ...], expected: str) -> None:
    subject = profile("aarch64", "neon", "dotprod", accelerators=accelerators)
    assert derive_hardware_class(subject) == expected
    assert cpu_hardware_class(subject) == "arm64-dotprod"


def test_same_hardware_same_class_whatever_the_size(tmp_path: Path) -> None:
    """Core count, frequency, memory and hostname vary between identical boards; the class must not."""
    twin = tmp_path / "rpi5-twin"
    shutil.copytree(BOARDS / "rpi5", twin, symlinks=True)
    (twin / "sys/devices/system/cpu/online").write_text("0-1\n")
    for freq in twin.glob("sys/devices/system/cpu/cpu*/cpufreq/cpuinfo_max_freq"):
        freq.write_text("1500000\n")
    (twin / "proc/meminfo").write_text("MemTotal:        2000000 kB\nMemAvailable:    1000000 kB\n")
    (twin / "proc/sys/kernel/hostname").write_text("another-pi\n")
    original, copy = collect_profile(BOARDS / "rpi5"), collect_profile(twin)
    assert copy.cpu.logical_cores == 2 and copy.cpu.max_freq_mhz == 1500.0
    assert copy.hardware_class == original.hardware_class == "arm64-dotprod"


def test_cpu_class_of_accelerated_boards() -> None:
    expected = {
        "coral-usb": "x86_64-avx2",
        "intel-core-ultra": "x86_64-avxvnni",
        "rk3588": "arm64-dotprod",
        "jetson-orin-nano": "arm64-dotprod",
        "kria-kv260": "arm64",
        "coral-devboard": "arm64",
    }
    for board, cpu_class in expected.items():
        assert cpu_hardware_class(collect_profile(BOARDS / board)) == cpu_class, board


def test_32_bit_raspberry_pi_os_is_armv7(tmp_path: Path) -> None:
    """A 32-bit kernel prints ARMv7 feature names even on a Cortex-A72; artifacts must be armv7 then."""
    cpu = (
        "processor\t: {n}\nmodel name\t: ARMv7 Processor rev 3 (v7l)\nBogoMIPS\t: 108.00\n"
        "Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32\n"
        "CPU implementer\t: 0x41\nCPU architecture: 7\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n"
    )
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("\n".join(cpu.format(n=n) for n in range(4)))
    profile = collect_profile(tmp_path)
    assert (profile.cpu.arch, profile.cpu.model, list(profile.cpu.isa_features)) == (
        "armv7l",
        "Cortex-A72",
        ["fp16", "neon"],
    )
    assert profile.hardware_class == "armv7-neon"
