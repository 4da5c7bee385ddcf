"""Profile every captured board tree and check what an edge-ML engineer would read off that board."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgefleet.agent.profiler import collect_profile, profile_to_dict

BOARDS = Path(__file__).resolve().parents[2] / "data" / "boards"
LIVE_ONLY = "live-only probes"
NO_POWER = "power sensor"
NO_CACHES = "CPU caches"


@dataclass(frozen=True)
class Expected:
    hardware_class: str
    arch: str
    model: str
    isa: tuple[str, ...]
    core_types: tuple[str, ...]
    cores: tuple[int, int]  # physical, logical
    max_freq_mhz: float
    board_model: str
    accelerators: tuple[tuple[str, str, str, str], ...]  # kind, vendor, driver, compute capability
    power: tuple[tuple[str, str, str], ...]  # kind, name, unit
    gaps: frozenset[str] = field(default_factory=frozenset)


PLAIN_NEON = ("neon",)
ARM_DOTPROD = ("dotprod", "fp16", "neon")

EXPECTED: dict[str, Expected] = {
    "rpi4": Expected(
        "arm64", "aarch64", "Cortex-A72", PLAIN_NEON, ("Cortex-A72",), (4, 4), 1800.0,
        "Raspberry Pi 4 Model B Rev 1.4", (), (), frozenset({NO_POWER, LIVE_ONLY}),
    ),
    "rpi5": Expected(
        "arm64-dotprod", "aarch64", "Cortex-A76", ARM_DOTPROD, ("Cortex-A76",), (4, 4), 2400.0,
        "Raspberry Pi 5 Model B Rev 1.0", (), (), frozenset({NO_POWER, LIVE_ONLY}),
    ),
    "jetson-orin-nano": Expected(
        "cuda-sm87", "aarch64", "Cortex-A78AE", ARM_DOTPROD, ("Cortex-A78AE",), (6, 6), 1510.4,
        "NVIDIA Jetson Orin Nano Developer Kit", (("gpu", "nvidia", "nvgpu", "8.7"),),
        tuple(("ina3221", rail, unit) for rail in ("VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC") for unit in ("mV", "mA")),
        frozenset({LIVE_ONLY}),
    ),
    "coral-devboard": Expected(
        "edgetpu", "aarch64", "Cortex-A53", PLAIN_NEON, ("Cortex-A53",), (4, 4), 1500.0,
        "Freescale i.MX8MQ Phanbax", (("tpu", "google", "apex", ""),), (),
        frozenset({NO_CACHES, NO_POWER, LIVE_ONLY}),
    ),
    "coral-usb": Expected(
        "edgetpu", "x86_64", "Intel(R) Core(TM) i5-8259U CPU @ 2.30GHz", ("avx", "avx2", "f16c", "fma", "sse4_2"),
        ("Intel(R) Core(TM) i5-8259U CPU @ 2.30GHz",), (4, 8), 3800.0, "Intel(R) Client Systems NUC8i5BEH",
        (("tpu", "google", "libedgetpu (usb)", ""),),
        (("rapl", "package-0", "uJ"), ("rapl", "core", "uJ"), ("rapl", "uncore", "uJ"), ("rapl", "psys", "uJ")),
        frozenset({LIVE_ONLY}),
    ),
    "intel-core-ultra": Expected(
        "intel-npu", "x86_64", "Intel(R) Core(TM) Ultra 7 155H", ("avx", "avx2", "avx_vnni", "f16c", "fma", "sse4_2"),
        ("P-core", "E-core"), (16, 22), 4800.0, "ASUSTeK COMPUTER INC. ASUS Zenbook 14 UX3405MA_UX3405MA",
        (("npu", "intel", "intel_vpu", ""), ("gpu", "intel", "i915", "")),
        (("rapl", "package-0", "uJ"), ("rapl", "core", "uJ"), ("rapl", "uncore", "uJ"), ("rapl", "psys", "uJ"),
         ("battery", "BAT0", "uW")),
        frozenset({LIVE_ONLY}),
    ),
    "kria-kv260": Expected(
        "vitis-dpu", "aarch64", "Cortex-A53", PLAIN_NEON, ("Cortex-A53",), (4, 4), 1333.333, "ZynqMP KV260 revB",
        (("fpga", "xilinx", "zocl", ""),), (("hwmon", "ina260_u14 power1", "uW"),),
        frozenset({NO_CACHES, LIVE_ONLY}),
    ),
    "rk3588": Expected(
        "rknpu", "aarch64", "Cortex-A76 + Cortex-A55", ARM_DOTPROD, ("Cortex-A76", "Cortex-A55"), (8, 8), 2400.0,
        "Radxa ROCK 5 Model B", (("npu", "rockchip", "rknpu", ""),), (), frozenset({NO_POWER, LIVE_ONLY}),
    ),
    "x86-ci-vm": Expected(
        "x86_64-avx512vnni", "x86_64", "Intel(R) Xeon(R) Processor @ 2.50GHz",
        ("avx", "avx2", "avx512_vnni", "avx512bw", "avx512dq", "avx512f", "avx512vl", "f16c", "fma", "sse4_2"),
        ("Intel(R) Xeon(R) Processor @ 2.50GHz",), (2, 2), 2500.0, "", (), (), frozenset({NO_POWER, LIVE_ONLY}),
    ),
}  # fmt: skip


def test_every_board_folder_has_expectations() -> None:
    folders = {p.name for p in BOARDS.iterdir() if p.is_dir()}
    assert folders == set(EXPECTED)


@pytest.mark.parametrize("board", sorted(EXPECTED))
def test_board_profile(board: str) -> None:
    expected = EXPECTED[board]
    profile = collect_profile(BOARDS / board)

    assert profile.hardware_class == expected.hardware_class
    assert profile.derived_hardware_class == expected.hardware_class
    cpu = profile.cpu
    assert (cpu.arch, cpu.model) == (expected.arch, expected.model)
    assert tuple(cpu.isa_features) == expected.isa
    assert tuple(cpu.core_types) == expected.core_types
    assert (cpu.physical_cores, cpu.logical_cores) == expected.cores
    assert cpu.max_freq_mhz == pytest.approx(expected.max_freq_mhz)
    assert profile.os.board_model == expected.board_model
    assert profile.os.kernel and profile.os.distro and profile.memory.total_bytes > 0
    found = tuple((a.kind, a.vendor, a.driver, a.compute_capability) for a in profile.accelerators)
    assert found == expected.accelerators
    assert tuple((s.kind, s.name, s.unit) for s in profile.power_sensors) == expected.power
    assert all(s.readable and s.path.startswith("/sys/") for s in profile.power_sensors)
    assert {g.what for g in profile.gaps} == expected.gaps
    # A captured tree never reaches into the live machine.
    assert not profile.runtimes and not profile.disks and not profile.microbench.duration_s
    assert profile_to_dict(profile)["hardware_class"] == expected.hardware_class


def test_caches_of_big_little_keep_both_clusters() -> None:
    caches = {(c.level, c.type, c.size_bytes, c.shared_by_cpus) for c in collect_profile(BOARDS / "rk3588").cpu.caches}
    assert (2, "Unified", 128 * 1024, 1) in caches  # Cortex-A55 L2
    assert (2, "Unified", 512 * 1024, 1) in caches  # Cortex-A76 L2
    assert (3, "Unified", 3 * 1024 * 1024, 8) in caches


def test_accelerator_details() -> None:
    jetson = collect_profile(BOARDS / "jetson-orin-nano").accelerators[0]
    assert jetson.details["l4t_release"] == "36.3.0" and jetson.details["soc"] == "tegra234"
    assert jetson.memory_bytes == 7620268 * 1024  # shared with the CPU
    usb = collect_profile(BOARDS / "coral-usb").accelerators[0]
    assert usb.source == "usb 1a6e:089a" and usb.device_path == "/dev/bus/usb/002/003"
    npu = collect_profile(BOARDS / "intel-core-ultra").accelerators[0]
    assert npu.model == "Intel AI Boost NPU (Meteor Lake)" and npu.device_path == "/dev/accel/accel0"
    rknpu = collect_profile(BOARDS / "rk3588").accelerators[0]
    assert rknpu.details["driver_version"] == "v0.9.6" and rknpu.device_path == "/dev/dri/renderD129"
    kria = collect_profile(BOARDS / "kria-kv260").accelerators[0]
    assert kria.details["fpga_manager_state"] == "operating" and kria.device_path == "/dev/dri/renderD128"
    apex = collect_profile(BOARDS / "coral-devboard").accelerators[0]
    assert apex.details["pci_id"] == "1ac1:089a"


def test_ina3221_skips_unlabelled_shunt_inputs() -> None:
    paths = [s.path for s in collect_profile(BOARDS / "jetson-orin-nano").power_sensors]
    assert "/sys/class/hwmon/hwmon1/in1_input" in paths
    assert not any(p.endswith(("in4_input", "in7_input")) for p in paths)


def test_rapl_mmio_duplicate_is_not_listed() -> None:
    names = [s.path for s in collect_profile(BOARDS / "intel-core-ultra").power_sensors]
    assert not any("intel-rapl-mmio" in n for n in names)


def test_board_trees_keep_their_symlinks() -> None:
    link = BOARDS / "intel-core-ultra" / "sys" / "class" / "accel" / "accel0"
    assert link.is_symlink(), "git must keep sysfs symlinks; copy trees with symlinks=True"
