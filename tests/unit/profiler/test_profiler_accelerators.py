"""Accelerators no captured board carries: small synthetic trees laid out like the vendors' sysfs."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from edgefleet.agent.profiler import collect_profile
from edgefleet.agent.profiler.accelerators import _nvml_gpus, nvidia_compute_capability
from edgefleet.agent.profiler.tree import ProfiledTree

A76_CPUINFO = (
    "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp "
    "cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\n"
    "CPU part\t: 0xd0b\nCPU revision\t: 1\n"
)


def write(root: Path, rel: str, text: str = "") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def link(root: Path, rel: str, target: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def arm_host(root: Path) -> Path:
    write(root, "proc/cpuinfo", A76_CPUINFO)
    write(root, "proc/meminfo", "MemTotal:        8000000 kB\nMemAvailable:    7000000 kB\n")
    return root


def test_hailo8_on_pci(tmp_path: Path) -> None:
    root = arm_host(tmp_path)
    write(root, "dev/hailo0")
    write(root, "sys/class/hailo_chardev/hailo0/device/device", "0x2864\n")
    link(root, "sys/class/hailo_chardev/hailo0/device/driver", "../../../../bus/pci/drivers/hailo_pci")
    profile = collect_profile(root)
    hailo = profile.accelerators[0]
    assert (hailo.vendor, hailo.model, hailo.driver, hailo.details["pci_id"]) == (
        "hailo",
        "Hailo-8",
        "hailo_pci",
        "1e60:2864",
    )
    assert "hailo8l" in hailo.details["note"]
    assert profile.hardware_class == "hailo8"


def test_hailo_without_sysfs_is_assumed_hailo8_with_a_gap(tmp_path: Path) -> None:
    root = arm_host(tmp_path)
    write(root, "dev/hailo0")
    profile = collect_profile(root)
    assert profile.hardware_class == "hailo8"
    assert "Hailo model of /dev/hailo0" in {g.what for g in profile.gaps}


def test_qualcomm_cdsp(tmp_path: Path) -> None:
    root = arm_host(tmp_path)
    for node in ("fastrpc-adsp", "fastrpc-cdsp", "fastrpc-cdsp-secure"):
        write(root, f"dev/{node}")
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/compatible").write_bytes(b"qcom,qcs6490-rb3gen2\x00qcom,qcm6490\x00")
    profile = collect_profile(root)
    dsp = profile.accelerators[0]
    assert (dsp.kind, dsp.vendor, dsp.device_path, dsp.details["soc"]) == (
        "dsp",
        "qualcomm",
        "/dev/fastrpc-cdsp",
        "qcs6490-rb3gen2",
    )
    assert profile.hardware_class == "qnn-htp"


def test_nvidia_dgpu_from_proc_without_nvml(tmp_path: Path) -> None:
    write(
        tmp_path,
        "proc/cpuinfo",
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon\nflags\t\t: lm avx2 fma\n",
    )
    write(
        tmp_path,
        "proc/driver/nvidia/version",
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.90.07  Fri May 31 09:35:42 UTC 2024\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n",
    )
    write(
        tmp_path,
        "proc/driver/nvidia/gpus/0000:01:00.0/information",
        "Model: \t\t NVIDIA L4\nIRQ:   \t\t 139\nGPU UUID: \t GPU-5e0f1d3a-0000-0000-0000-000000000000\n"
        "Video BIOS: \t 95.04.5b.00.00\nBus Type: \t PCIe\nDMA Size: \t 47 bits\nDMA Mask: \t 0x7fffffffffff\n"
        "Bus Location: \t 0000:01:00.0\nDevice Minor: \t 0\nGPU Excluded:\t No\n",
    )
    profile = collect_profile(tmp_path)
    gpu = profile.accelerators[0]
    assert (gpu.model, gpu.compute_capability, gpu.driver, gpu.device_path) == (
        "NVIDIA L4",
        "8.9",
        "nvidia 550.90.07",
        "/dev/nvidia0",
    )
    assert profile.hardware_class == "cuda-sm89"
    assert "install nvidia-ml-py" in {g.what: g.reason for g in profile.gaps}["memory of NVIDIA L4"]


def test_compute_capability_table() -> None:
    assert nvidia_compute_capability("NVIDIA H100 80GB HBM3") == "9.0"
    assert nvidia_compute_capability("NVIDIA GeForce RTX 3090") == "8.6"
    assert nvidia_compute_capability("Tesla T4") == "7.5"
    assert nvidia_compute_capability("NVIDIA A100-SXM4-40GB") == "8.0"
    assert nvidia_compute_capability("Some Future GPU") == ""


def test_coral_usb_after_firmware_load(tmp_path: Path) -> None:
    root = arm_host(tmp_path)
    for key, value in (("idVendor", "18d1"), ("idProduct", "9302"), ("busnum", "1"), ("devnum", "4"), ("speed", "480")):
        write(
            root, f"sys/devices/platform/scb/fd500000.pcie/pci0000:00/0000:00:00.0/0000:01:00.0/usb1/1-1/{key}", value
        )
    link(
        root,
        "sys/bus/usb/devices/1-1",
        "../../../devices/platform/scb/fd500000.pcie/pci0000:00/0000:00:00.0/0000:01:00.0/usb1/1-1",
    )
    profile = collect_profile(root)
    tpu = profile.accelerators[0]
    assert (tpu.source, tpu.details["state"], tpu.device_path) == ("usb 18d1:9302", "running", "/dev/bus/usb/001/004")
    assert "USB 2" in tpu.details["warning"]
    assert profile.hardware_class == "edgetpu"


def test_mcu_manifest(tmp_path: Path) -> None:
    root = arm_host(tmp_path)
    manifest = {
        "schema_version": 1,
        "devices": [
            {
                "name": "door-sensor",
                "core": "Cortex-M7",
                "vendor": "st",
                "model": "STM32H747",
                "flash_bytes": 2097152,
                "ram_bytes": 1048576,
                "runtime": "tflite-micro",
                "transport": "usb-cdc",
                "port": "/dev/ttyACM0",
            },
            {"name": "broken"},
        ],
    }
    write(root, "etc/edgefleet/mcu.json", json.dumps(manifest))
    profile = collect_profile(root)
    mcu = profile.accelerators[0]
    assert (mcu.kind, mcu.model, mcu.memory_bytes, mcu.device_path) == ("mcu", "STM32H747", 1048576, "/dev/ttyACM0")
    assert mcu.details["core"] == "Cortex-M7" and mcu.source == "/etc/edgefleet/mcu.json"
    assert profile.hardware_class == "mcu-cortex-m"
    assert 'devices[1] needs "name" and "core"' in {g.what: g.reason for g in profile.gaps}["MCU manifest"]


def test_mcu_manifest_passed_explicitly(tmp_path: Path) -> None:
    root = arm_host(tmp_path / "root")
    manifest = tmp_path / "elsewhere.json"
    manifest.write_text(json.dumps({"schema_version": 1, "devices": [{"name": "m", "core": "Cortex-M33"}]}))
    assert collect_profile(root, mcu_manifest=manifest).hardware_class == "mcu-cortex-m"
    missing = collect_profile(root, mcu_manifest=tmp_path / "missing.json")
    assert "MCU manifest" in {g.what for g in missing.gaps}


def test_alveo_with_xocl(tmp_path: Path) -> None:
    write(
        tmp_path,
        "proc/cpuinfo",
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: EPYC\nflags\t\t: lm avx2 fma\n",
    )
    write(tmp_path, "dev/xclmgmt256")
    write(tmp_path, "dev/dri/renderD128")
    link(tmp_path, "sys/class/drm/renderD128/device/driver", "../../../../bus/pci/drivers/xocl")
    profile = collect_profile(tmp_path)
    fpga = profile.accelerators[0]
    assert (fpga.kind, fpga.vendor, fpga.driver, fpga.device_path) == ("fpga", "xilinx", "xocl", "/dev/dri/renderD128")
    assert profile.hardware_class == "vitis-dpu"


def test_amd_xdna_npu_is_recorded_but_keeps_the_cpu_class(tmp_path: Path) -> None:
    write(
        tmp_path,
        "proc/cpuinfo",
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD Ryzen 7 8845HS\nflags\t\t: lm avx2 fma avx512f "
        "avx512bw avx512vl avx512_vnni avx512_bf16\n",
    )
    write(tmp_path, "dev/accel/accel0")
    link(tmp_path, "sys/class/accel/accel0/device/driver", "../../../../bus/pci/drivers/amdxdna")
    profile = collect_profile(tmp_path)
    assert (profile.accelerators[0].vendor, profile.accelerators[0].driver) == ("amd", "amdxdna")
    assert profile.hardware_class == "x86_64-avx512vnni"


def test_nvml_path_with_a_fake_pynvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML is only asked on the live machine; this checks the translation with a stand-in module."""

    class Memory:
        total = 80 * 1024**3

    class Pci:
        busId = b"00000000:17:00.0"

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: "550.90.07",
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetName=lambda handle: b"NVIDIA H100 80GB HBM3",
        nvmlDeviceGetCudaComputeCapability=lambda handle: (9, 0),
        nvmlDeviceGetMemoryInfo=lambda handle: Memory(),
        nvmlDeviceGetPciInfo=lambda handle: Pci(),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    tree = ProfiledTree(tmp_path)
    gpus = _nvml_gpus(tree)
    assert gpus is not None and len(gpus) == 1
    gpu = gpus[0]
    assert (gpu.model, gpu.compute_capability, gpu.memory_bytes, gpu.source) == (
        "NVIDIA H100 80GB HBM3",
        "9.0",
        80 * 1024**3,
        "nvml",
    )
    assert gpu.details["pci_bus_id"] == "00000000:17:00.0" and not tree.gaps


def test_nvml_that_fails_to_init_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise RuntimeError("Driver Not Loaded")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=broken))
    (tmp_path / "proc/driver/nvidia").mkdir(parents=True)
    tree = ProfiledTree(tmp_path)
    assert _nvml_gpus(tree) is None
    assert "Driver Not Loaded" in tree.gaps[0].reason
