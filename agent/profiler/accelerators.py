"""Accelerators: NVIDIA GPUs and Jetson, Coral Edge TPU, Hailo, Intel NPU, Rockchip NPU, Qualcomm
fastrpc DSPs, Xilinx FPGAs, other render-node GPUs, and MCUs from the manifest.

Each probe looks where the vendor's own tools look, so the profile agrees with what the operator sees:

| accelerator       | evidence                                                                             |
|-------------------|--------------------------------------------------------------------------------------|
| NVIDIA dGPU       | NVML (live machine, `pynvml` importable), else `/proc/driver/nvidia/gpus/*/information` |
| NVIDIA Jetson     | `/etc/nv_tegra_release` + `/proc/device-tree/{model,compatible}` (the iGPU is not in  |
|                   | /proc/driver/nvidia; its compute capability follows from the Tegra SoC)              |
| Coral Edge TPU    | `/dev/apex_*` (PCIe, M.2, Dev Board SoM); USB `1a6e:089a` (before firmware load) or   |
|                   | `18d1:9302` (after) in `/sys/bus/usb/devices/*/idVendor,idProduct`                    |
| Hailo             | `/dev/hailo*`, PCI id from `/sys/class/hailo_chardev/hailo*/device`                 |
| Intel NPU         | `/dev/accel/accel*` whose `/sys/class/accel/accel*/device/driver` is `intel_vpu`     |
| Rockchip NPU      | device-tree `npu@*` with a `*-rknpu` compatible, `/sys/kernel/debug/rknpu`, or a      |
|                   | render node driven by `rknpu`                                                        |
| Qualcomm DSP      | `/dev/fastrpc-{cdsp,adsp,sdsp}` (upstream) or `/dev/adsprpc-smd` (downstream); cDSP = HTP |
| FPGA              | `/sys/class/fpga_manager/*`, `/dev/xclmgmt*` (Alveo), render nodes driven by `zocl` / |
|                   | `xocl` (Xilinx XRT)                                                                  |
| MCU               | the manifest, see `mcu_manifest`                                                     |

Devices found but not usable (a driver link missing, NVML failing) are still listed with what is known,
and the missing part becomes a gap.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from edgefleet.protos.v1.profile_pb2 import Accelerator

from .mcu_manifest import read_mcu_manifest
from .tree import ProfiledTree

# Compute capability by product name, for when NVML is absent (/proc/driver/nvidia does not print it).
NVIDIA_COMPUTE_CAPABILITY: tuple[tuple[str, str], ...] = (
    (r"\b(GB|B)(100|200)\b", "10.0"),
    (r"RTX 50\d0|RTX PRO \d+ Blackwell", "12.0"),
    (r"\b(GH200|H100|H200|H800|H20)\b", "9.0"),
    (r"RTX 40\d0|\bL4\b|\bL40S?\b|RTX \d+ Ada", "8.9"),
    (r"\b(A100|A800|A30)\b", "8.0"),
    (r"RTX 30\d0|\bA10G?\b|\bA16\b|\bA2\b|\bA40\b|RTX A\d+", "8.6"),
    (r"\bT4\b|RTX 20\d0|GTX 16\d0|Quadro RTX|TITAN RTX", "7.5"),
    (r"V100|TITAN V\b", "7.0"),
    (r"P100", "6.0"),
    (r"\bP4\b|\bP40\b|GTX 10\d0", "6.1"),
)

# Jetson iGPU by Tegra SoC (device-tree compatible): (family, GPU, compute capability).
TEGRA_SOCS: dict[str, tuple[str, str, str]] = {
    "nvidia,tegra234": ("Orin", "ga10b", "8.7"),
    "nvidia,tegra194": ("Xavier", "gv11b", "7.2"),
    "nvidia,tegra186": ("TX2", "gp10b", "6.2"),
    "nvidia,tegra210": ("TX1/Nano", "gm20b", "5.3"),
}

CORAL_USB_IDS: dict[tuple[str, str], str] = {
    ("1a6e", "089a"): "bootloader (firmware is loaded when libedgetpu first opens it)",
    ("18d1", "9302"): "running",
}

HAILO_PCI_MODELS: dict[str, str] = {"0x2864": "Hailo-8", "0x45c4": "Hailo-10H"}

INTEL_NPU_PCI_MODELS: dict[str, str] = {
    "0x7d1d": "Intel AI Boost NPU (Meteor Lake)",
    "0xad1d": "Intel AI Boost NPU (Arrow Lake)",
    "0x643e": "Intel AI Boost NPU (Lunar Lake)",
    "0xb03e": "Intel AI Boost NPU (Panther Lake)",
}

# /dev/accel drivers other than intel_vpu: (vendor, model).
ACCEL_DRIVERS: dict[str, tuple[str, str]] = {
    "intel_vpu": ("intel", "Intel NPU"),
    "amdxdna": ("amd", "AMD Ryzen AI NPU (XDNA)"),
    "qaic": ("qualcomm", "Qualcomm Cloud AI 100"),
    "habanalabs": ("intel", "Intel Gaudi"),
}

# Render-node drivers that mean an accelerator: driver -> (kind, vendor, model).
RENDER_DRIVERS: dict[str, tuple[str, str, str]] = {
    "zocl": ("fpga", "xilinx", "Xilinx XRT edge (zocl)"),
    "xocl": ("fpga", "xilinx", "Xilinx XRT (xocl)"),
    "rknpu": ("npu", "rockchip", "Rockchip NPU"),
    "amdgpu": ("gpu", "amd", "AMD GPU"),
    "i915": ("gpu", "intel", "Intel GPU (i915)"),
    "xe": ("gpu", "intel", "Intel GPU (xe)"),
}


def nvidia_compute_capability(model: str) -> str:
    for pattern, capability in NVIDIA_COMPUTE_CAPABILITY:
        if re.search(pattern, model):
            return capability
    return ""


def _nvml_gpus(tree: ProfiledTree) -> list[Accelerator] | None:
    """NVIDIA GPUs from NVML; None when NVML cannot answer (then /proc/driver/nvidia is read)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        if tree.exists("/proc/driver/nvidia"):
            tree.gap("NVIDIA GPU via NVML", f"nvmlInit failed ({exc}); check the driver with nvidia-smi")
        return None
    found: list[Accelerator] = []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            found.append(
                Accelerator(
                    kind="gpu",
                    vendor="nvidia",
                    model=_text(pynvml.nvmlDeviceGetName(handle)),
                    driver=f"nvidia {driver}",
                    compute_capability=f"{major}.{minor}",
                    memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                    device_path=f"/dev/nvidia{index}",
                    source="nvml",
                    details={"pci_bus_id": _text(pynvml.nvmlDeviceGetPciInfo(handle).busId)},
                )
            )
    except Exception as exc:
        tree.gap("NVIDIA GPU via NVML", f"NVML query failed ({exc})")
        return found or None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return found


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _proc_nvidia_gpus(tree: ProfiledTree) -> list[Accelerator]:
    found: list[Accelerator] = []
    version = tree.read_text("/proc/driver/nvidia/version") or ""
    match = re.search(r"Kernel Module(?: for \w+)?\s+([\d.]+)", version)
    driver = f"nvidia {match.group(1)}" if match else "nvidia"
    for info in tree.glob("/proc/driver/nvidia/gpus/*/information"):
        fields = {}
        for line in (tree.read_text(info, what=f"NVIDIA GPU {info.parent.name}") or "").splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        model = fields.get("Model", "")
        capability = nvidia_compute_capability(model)
        if not capability:
            tree.gap(
                f"compute capability of {model or info.parent.name}",
                "not in /proc/driver/nvidia and not in the built-in table; install nvidia-ml-py so NVML reports it",
            )
        minor = fields.get("Device Minor", "")
        found.append(
            Accelerator(
                kind="gpu",
                vendor="nvidia",
                model=model,
                driver=driver,
                compute_capability=capability,
                device_path=f"/dev/nvidia{minor}" if minor else "",
                source=tree.rel(info),
                details={"pci_bus_id": fields.get("Bus Location", info.parent.name)},
            )
        )
        tree.gap(
            f"memory of {model or 'NVIDIA GPU'}",
            "/proc/driver/nvidia does not print it; install nvidia-ml-py so NVML reports it",
        )
    return found


def _jetson(tree: ProfiledTree, total_memory: int) -> list[Accelerator]:
    release = tree.read_text("/etc/nv_tegra_release")
    if release is None:
        return []
    match = re.search(r"# R(\d+) \(release\), REVISION: ([\d.]+)", release)
    l4t = f"{match.group(1)}.{match.group(2)}" if match else ""
    compatible = (tree.read_text("/proc/device-tree/compatible") or "").split()
    model = tree.read_text("/proc/device-tree/model", what="Jetson module name") or "NVIDIA Jetson"
    soc = next((name for name in compatible if name in TEGRA_SOCS), "")
    details = {"l4t_release": l4t, "memory": "shared with the CPU", "module": model.splitlines()[0]}
    capability, gpu_model = "", "NVIDIA Jetson iGPU"
    if soc:
        family, gpu, capability = TEGRA_SOCS[soc]
        gpu_model = f"NVIDIA {family} iGPU ({gpu})"
        details.update(soc=soc.split(",")[1], gpu=gpu)
    else:
        tree.gap(
            "Jetson GPU compute capability",
            f"Tegra SoC not recognised in /proc/device-tree/compatible ({' '.join(compatible) or 'absent'})",
        )
    return [
        Accelerator(
            kind="gpu",
            vendor="nvidia",
            model=gpu_model,
            driver="nvgpu",
            compute_capability=capability,
            memory_bytes=total_memory,
            device_path="/dev/nvgpu/igpu0",
            source="/etc/nv_tegra_release",
            details=details,
        )
    ]


def _coral(tree: ProfiledTree) -> list[Accelerator]:
    found: list[Accelerator] = []
    for node in tree.glob("/dev/apex_*"):
        sysdev = f"/sys/class/apex/{node.name}/device"
        vendor, device = tree.read_text(f"{sysdev}/vendor"), tree.read_text(f"{sysdev}/device")
        details = {"bus": "pcie"}
        if vendor and device:
            details["pci_id"] = f"{vendor[2:]}:{device[2:]}"
        found.append(
            Accelerator(
                kind="tpu",
                vendor="google",
                model="Edge TPU",
                driver=tree.link_name(f"{sysdev}/driver") or "apex",
                device_path=tree.rel(node),
                source=tree.rel(node),
                details=details,
            )
        )
    for id_vendor in tree.glob("/sys/bus/usb/devices/*/idVendor"):
        usb = id_vendor.parent
        ids = ((tree.read_text(id_vendor) or "").lower(), (tree.read_text(usb / "idProduct") or "").lower())
        if ids not in CORAL_USB_IDS:
            continue
        bus, dev = tree.read_int(usb / "busnum"), tree.read_int(usb / "devnum")
        details = {"bus": "usb", "state": CORAL_USB_IDS[ids], "usb_port": usb.name}
        speed = tree.read_text(usb / "speed")
        if speed:
            details["usb_speed_mbps"] = speed
            if speed in ("480", "12"):
                details["warning"] = "on a USB 2 port: expect about 1/3 of USB 3 throughput"
        found.append(
            Accelerator(
                kind="tpu",
                vendor="google",
                model="Edge TPU (USB Accelerator)",
                driver="libedgetpu (usb)",
                device_path=f"/dev/bus/usb/{bus:03d}/{dev:03d}" if bus and dev else "",
                source=f"usb {ids[0]}:{ids[1]}",
                details=details,
            )
        )
    return found


def _hailo(tree: ProfiledTree) -> list[Accelerator]:
    found: list[Accelerator] = []
    for node in tree.glob("/dev/hailo[0-9]*"):
        sysdev = f"/sys/class/hailo_chardev/{node.name}/device"
        device = (tree.read_text(f"{sysdev}/device") or "").lower()
        details: dict[str, str] = {}
        if device:
            details["pci_id"] = f"1e60:{device[2:]}"
        if device == "0x2864":
            details["note"] = "Hailo-8 and Hailo-8L share PCI id 1e60:2864; pin --hardware-class hailo8l on a Hailo-8L"
        elif not device:
            tree.gap(f"Hailo model of {tree.rel(node)}", f"{sysdev}/device not readable; assuming Hailo-8")
        elif device not in HAILO_PCI_MODELS:
            tree.gap(f"Hailo model of {tree.rel(node)}", f"unknown PCI device 1e60:{device[2:]}; assuming Hailo-8")
        found.append(
            Accelerator(
                kind="npu",
                vendor="hailo",
                model=HAILO_PCI_MODELS.get(device, "Hailo-8"),
                driver=tree.link_name(f"{sysdev}/driver") or "hailo_pci",
                device_path=tree.rel(node),
                source=tree.rel(node),
                details=details,
            )
        )
    return found


def _accel_nodes(tree: ProfiledTree) -> list[Accelerator]:
    found: list[Accelerator] = []
    for node in tree.glob("/dev/accel/accel[0-9]*"):
        sysdev = f"/sys/class/accel/{node.name}/device"
        driver = tree.link_name(f"{sysdev}/driver")
        if driver is None:
            tree.gap(f"driver of {tree.rel(node)}", f"{sysdev}/driver link not found; is the NPU driver loaded?")
            continue
        vendor, model = ACCEL_DRIVERS.get(driver, ("", f"accelerator ({driver})"))
        pci_device = (tree.read_text(f"{sysdev}/device") or "").lower()
        if driver == "intel_vpu":
            model = INTEL_NPU_PCI_MODELS.get(pci_device, model)
        details = {"pci_id": f"{(tree.read_text(f'{sysdev}/vendor') or '')[2:]}:{pci_device[2:]}"} if pci_device else {}
        found.append(
            Accelerator(
                kind="npu",
                vendor=vendor,
                model=model,
                driver=driver,
                device_path=tree.rel(node),
                source=f"{tree.rel(node)} ({driver})",
                details=details,
            )
        )
    return found


def _render_nodes(tree: ProfiledTree) -> list[tuple[str, str]]:
    """(device path, driver) for every /dev/dri/renderD* whose driver is known."""
    nodes: list[tuple[str, str]] = []
    for node in tree.glob("/dev/dri/renderD*"):
        driver = tree.link_name(f"/sys/class/drm/{node.name}/device/driver")
        if driver is None:
            tree.gap(f"driver of {tree.rel(node)}", f"/sys/class/drm/{node.name}/device/driver link not found")
            continue
        nodes.append((tree.rel(node), driver))
    return nodes


def _rockchip(tree: ProfiledTree, render: list[tuple[str, str]]) -> list[Accelerator]:
    compatible = ""
    for node in tree.glob("/proc/device-tree/npu@*"):
        text = tree.read_text(node / "compatible") or ""
        status = tree.read_text(node / "status") or "okay"
        if "rknpu" in text and status in ("okay", "ok"):
            compatible = text.split()[0]
            break
    render_path = next((path for path, driver in render if driver.lower() == "rknpu"), "")
    debug_dir = tree.path("/sys/kernel/debug/rknpu")
    if not (compatible or render_path or debug_dir.exists() or tree.exists("/dev/rknpu")):
        return []
    details = {}
    version = tree.read_text("/sys/kernel/debug/rknpu/version") if debug_dir.exists() else None
    if version:
        details["driver_version"] = version.split(":")[-1].strip()
    elif compatible or render_path:
        tree.gap("RKNPU driver version", "/sys/kernel/debug/rknpu/version not readable (debugfs is root only)")
    soc = re.match(r"rockchip,(rk\w+)-rknpu", compatible)
    if soc:
        details["soc"] = soc.group(1)
    return [
        Accelerator(
            kind="npu",
            vendor="rockchip",
            model=f"{soc.group(1).upper()} NPU" if soc else "Rockchip NPU",
            driver="rknpu",
            device_path=render_path or ("/dev/rknpu" if tree.exists("/dev/rknpu") else ""),
            source=f"device-tree {compatible}" if compatible else (render_path or "/sys/kernel/debug/rknpu"),
            details=details,
        )
    ]


def _qualcomm(tree: ProfiledTree) -> list[Accelerator]:
    nodes = [tree.rel(p) for p in tree.glob("/dev/fastrpc-*")] + [tree.rel(p) for p in tree.glob("/dev/adsprpc-smd")]
    if not nodes:
        return []
    cdsp = next((n for n in nodes if n.startswith("/dev/fastrpc-cdsp")), "")
    soc = next(
        (
            c.split(",")[1]
            for c in (tree.read_text("/proc/device-tree/compatible") or "").split()
            if c.startswith("qcom,") and re.match(r"qcom,(qcs|qcm|sm|sa|sc|qrb)\d", c)
        ),
        "",
    )
    details = {"fastrpc_nodes": " ".join(nodes)}
    if soc:
        details["soc"] = soc
    return [
        Accelerator(
            kind="dsp",
            vendor="qualcomm",
            model="Hexagon cDSP (HTP)" if cdsp else "Hexagon DSP",
            driver="fastrpc",
            device_path=cdsp or nodes[0],
            source="fastrpc",
            details=details,
        )
    ]


def _fpga(tree: ProfiledTree, render: list[tuple[str, str]]) -> list[Accelerator]:
    found: list[Accelerator] = []
    for manager in tree.glob("/sys/class/fpga_manager/fpga[0-9]*"):
        name = tree.read_text(manager / "name") or manager.name
        vendor = (
            "xilinx"
            if re.search(r"Xilinx|Zynq|Versal", name)
            else ("intel" if re.search(r"Altera|SoCFPGA|Stratix", name) else "")
        )
        details = {"fpga_manager_state": tree.read_text(manager / "state") or "unknown"}
        found.append(
            Accelerator(
                kind="fpga", vendor=vendor, model=name, driver="fpga_manager", source=tree.rel(manager), details=details
            )
        )
    for node in tree.glob("/dev/xclmgmt*"):
        found.append(
            Accelerator(
                kind="fpga",
                vendor="xilinx",
                model="Xilinx Alveo",
                driver="xclmgmt",
                device_path=tree.rel(node),
                source=tree.rel(node),
            )
        )
    for path, driver in render:
        if driver not in ("zocl", "xocl"):
            continue
        target = next((a for a in found if a.vendor == "xilinx" and a.driver in ("fpga_manager", "xclmgmt")), None)
        if target is None:
            target = Accelerator(kind="fpga", vendor="xilinx", model=RENDER_DRIVERS[driver][2], source=path)
            found.append(target)
        target.driver = driver
        target.device_path = path
        target.details["runtime"] = "XRT"
    return found


def _render_gpus(render: list[tuple[str, str]]) -> list[Accelerator]:
    found = []
    for path, driver in render:
        kind, vendor, model = RENDER_DRIVERS.get(driver, ("", "", ""))
        if kind == "gpu":
            found.append(
                Accelerator(
                    kind="gpu", vendor=vendor, model=model, driver=driver, device_path=path, source=f"{path} ({driver})"
                )
            )
    return found


def collect_accelerators(tree: ProfiledTree, *, total_memory: int, mcu_manifest: Path | None) -> list[Accelerator]:
    """Every accelerator found, NVIDIA first, in the order `hardware_class` ranks them."""
    found: list[Accelerator] = []
    nvml = _nvml_gpus(tree) if tree.is_live else None
    found += nvml if nvml is not None else _proc_nvidia_gpus(tree)
    found += _jetson(tree, total_memory)
    found += _coral(tree)
    found += _hailo(tree)
    render = _render_nodes(tree)
    found += _fpga(tree, render)
    found += _qualcomm(tree)
    found += _rockchip(tree, render)
    found += _accel_nodes(tree)
    found += _render_gpus(render)
    found += read_mcu_manifest(tree, mcu_manifest)
    return found
