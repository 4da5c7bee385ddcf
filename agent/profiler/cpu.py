"""CPU: architecture, vendor, model, cores, frequency, caches and the ISA features inference cares about.

Sources, all read through the profiled tree so captured boards work like the live machine:

- `/proc/cpuinfo`: x86 prints `vendor_id`, `model name` and `flags`; arm64 prints `Features` and the
  `CPU implementer` / `CPU part` hex ids (see `arm_cores`) but no model name.
- `/sys/devices/system/cpu/online`, `cpu*/topology`, `cpu*/cpufreq/cpuinfo_max_freq` (kHz),
  `cpu*/cache/index*/{level,type,size,shared_cpu_list}` and `cpu*/cpu_capacity` (big.LITTLE order).
- `/sys/devices/cpu_core` and `/sys/devices/cpu_atom` (Intel hybrid P/E cores).

ISA feature names are normalised so the compiler asks one question whatever the kernel printed:

| normalised      | x86 `flags`    | arm64 `Features`       | armv7 `Features` |
|-----------------|----------------|------------------------|------------------|
| `neon`          |                | `asimd`                | `neon`           |
| `dotprod`       |                | `asimddp`              |                  |
| `i8mm`          |                | `i8mm`                 |                  |
| `fp16`          | `f16c` (as is) | `fphp` + `asimdhp`     | `vfpv4`+`half`*  |
| `bf16`          |                | `bf16`                 |                  |
| `sve`, `sve2`   |                | `sve`, `sve2`          |                  |
| `sme`           |                | `sme`                  |                  |
| x86 names       | kept verbatim: `sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512dq  |
|                 | avx512_vnni avx512_bf16 avx512_fp16 avx_vnni amx_tile amx_int8 amx_bf16`       |

(*) armv7 `fp16` means half-precision storage only (`half` + `vfpv4`), not fp16 arithmetic.
"""

from __future__ import annotations

import platform
import re
import sys
from dataclasses import dataclass, field

from .arm_cores import core_name, implementer_name
from .tree import ProfiledTree

X86_FEATURES: tuple[str, ...] = (
    "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512bw", "avx512vl", "avx512dq",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
    "amx_tile", "amx_int8", "amx_bf16",
)  # fmt: skip

# arm64 kernel feature name -> normalised name (see the module table).
ARM64_FEATURES: dict[str, str] = {
    "asimd": "neon",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "bf16": "bf16",
    "sve": "sve",
    "sve2": "sve2",
    "sme": "sme",
}


@dataclass
class CpuFacts:
    """What the CPU probe learned; `__init__` copies it into `CpuInfo`."""

    arch: str = ""
    vendor: str = ""
    model: str = ""
    physical_cores: int = 0
    logical_cores: int = 0
    max_freq_mhz: float = 0.0
    isa_features: list[str] = field(default_factory=list)
    caches: list[tuple[int, str, int, int]] = field(default_factory=list)  # level, type, bytes, shared_by
    core_types: list[str] = field(default_factory=list)


def parse_cpuinfo(text: str) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Split /proc/cpuinfo into per-processor blocks and the trailing board block (Pi `Hardware`, `Model`)."""
    processors: list[dict[str, str]] = []
    board: dict[str, str] = {}
    for block in re.split(r"\n\s*\n", text.strip()):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "processor" in fields and (
            "vendor_id" in fields
            or "CPU part" in fields
            or "Features" in fields
            or "flags" in fields
            or "model name" in fields
        ):
            processors.append(fields)
        else:
            board.update(fields)
    return processors, board


def isa_features(arch: str, processors: list[dict[str, str]]) -> list[str]:
    """Normalised features every processor has (a feature missing on one core cannot be relied on)."""
    if not processors:
        return []
    key = "flags" if "flags" in processors[0] else "Features"
    common = set.intersection(*(set(p.get(key, "").split()) for p in processors))
    found: set[str] = set()
    if key == "flags":
        found = {name for name in X86_FEATURES if name in common}
    elif arch == "aarch64":
        found = {norm for raw, norm in ARM64_FEATURES.items() if raw in common}
        if {"fphp", "asimdhp"} <= common:
            found.add("fp16")
    else:
        if "neon" in common or "asimd" in common:
            found.add("neon")
        if {"half", "vfpv4"} <= common:
            found.add("fp16")
    return sorted(found)


def infer_arch(tree: ProfiledTree, processors: list[dict[str, str]]) -> str:
    """uname machine on the live box; a captured tree is judged from what its cpuinfo prints."""
    if tree.is_live:
        machine = platform.machine()
        # A 32-bit userspace on a 64-bit kernel (Raspberry Pi OS armhf) must get armv7 artifacts.
        if machine == "aarch64" and sys.maxsize <= 2**32:
            return "armv7l"
        return machine
    recorded = tree.read_text("/proc/sys/kernel/arch")
    if recorded:
        return recorded
    if not processors:
        return ""
    first = processors[0]
    if "flags" in first:
        return "x86_64" if " lm " in f" {first['flags']} " else "i686"
    features = first.get("Features", "").split()
    if "asimd" in features or ("fp" in features and "neon" not in features):
        return "aarch64"
    return "armv7l"


def _cpu_list_count(text: str) -> int:
    """Count the CPUs in a kernel cpu list such as `0-3,8-11`."""
    count = 0
    for part in text.replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        count += int(high) - int(low) + 1 if high else 1
    return count


def _cache_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([KMG]?)", text.strip())
    if not match:
        return 0
    return int(match.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[match.group(2)]


def _caches(tree: ProfiledTree) -> list[tuple[int, str, int, int]]:
    found: set[tuple[int, str, int, int]] = set()
    for index in tree.glob("/sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*"):
        level = tree.read_int(index / "level")
        kind = tree.read_text(index / "type") or ""
        size = _cache_size(tree.read_text(index / "size") or "")
        shared = tree.read_text(index / "shared_cpu_list")
        if level is None or not size:
            continue
        found.add((level, kind, size, _cpu_list_count(shared) if shared else 0))
    if not found:
        tree.gap(
            "CPU caches",
            "/sys/devices/system/cpu/cpu*/cache not present (the kernel got no cache "
            "topology from the device tree or ACPI PPTT)",
        )
    return sorted(found)


def _max_freq_mhz(tree: ProfiledTree, model: str) -> float:
    khz = [tree.read_int(p) for p in tree.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq")]
    values = [v for v in khz if v]
    if values:
        return max(values) / 1000.0
    if tree.is_live:
        import psutil

        freq = psutil.cpu_freq()
        if freq is not None and freq.max:
            return float(freq.max)
    # Intel model names carry the base clock ("@ 2.50GHz"): better than nothing inside a VM.
    match = re.search(r"@\s*([\d.]+)\s*GHz", model)
    if match:
        return float(match.group(1)) * 1000.0
    tree.gap("CPU max frequency", "/sys/devices/system/cpu/cpu*/cpufreq not present (no cpufreq driver, common in VMs)")
    return 0.0


def _arm_cores(tree: ProfiledTree, processors: list[dict[str, str]]) -> tuple[str, list[str]]:
    """Vendor and distinct core names, biggest first (by sysfs cpu_capacity when the kernel has it)."""
    order: dict[str, int] = {}
    vendors: list[str] = []
    for position, proc in enumerate(processors):
        try:
            implementer = int(proc.get("CPU implementer", ""), 16)
            part = int(proc.get("CPU part", ""), 16)
        except ValueError:
            continue
        name = core_name(implementer, part)
        capacity = tree.read_int(f"/sys/devices/system/cpu/cpu{proc.get('processor', position)}/cpu_capacity")
        rank = -(capacity or 0) * 1000 + position
        order[name] = min(order.get(name, rank), rank)
        vendor = implementer_name(implementer)
        if vendor not in vendors:
            vendors.append(vendor)
    return " / ".join(vendors), sorted(order, key=order.__getitem__)


def _physical_cores(tree: ProfiledTree, processors: list[dict[str, str]], logical: int, x86: bool) -> int:
    if tree.is_live:
        import psutil

        cores = psutil.cpu_count(logical=False)
        if cores:
            return int(cores)
    if not x86:
        return logical  # no ARM core used at the edge has SMT
    pairs = set()
    for topo in tree.glob("/sys/devices/system/cpu/cpu[0-9]*/topology"):
        package = tree.read_text(topo / "physical_package_id")
        core = tree.read_text(topo / "core_id")
        if package is not None and core is not None:
            pairs.add((package, core))
    if pairs and len(pairs) <= logical:
        return len(pairs)
    packages = {p.get("physical id", "0") for p in processors}
    per_package = processors[0].get("cpu cores") if processors else None
    if per_package and per_package.isdigit():
        return int(per_package) * len(packages)
    return len({(p.get("physical id"), p.get("core id")) for p in processors}) or logical


def collect_cpu(tree: ProfiledTree) -> tuple[CpuFacts, dict[str, str]]:
    """Profile the CPU; also returns cpuinfo's board block (Raspberry Pi `Model`, `Hardware`)."""
    facts = CpuFacts()
    text = tree.read_text("/proc/cpuinfo", what="CPU (vendor, model, ISA features)")
    processors, board = parse_cpuinfo(text or "")
    facts.arch = infer_arch(tree, processors)
    x86 = bool(processors) and "flags" in processors[0]

    online = tree.read_text("/sys/devices/system/cpu/online")
    facts.logical_cores = _cpu_list_count(online) if online else len(processors)
    if tree.is_live:
        import psutil

        facts.logical_cores = int(psutil.cpu_count() or facts.logical_cores)

    if x86:
        first = processors[0]
        facts.vendor = first.get("vendor_id", "")
        facts.model = re.sub(r"\s+", " ", first.get("model name", ""))
        if tree.exists("/sys/devices/cpu_core/cpus") and tree.exists("/sys/devices/cpu_atom/cpus"):
            facts.core_types = ["P-core", "E-core"]
        elif facts.model:
            facts.core_types = [facts.model]
    elif processors:
        facts.vendor, facts.core_types = _arm_cores(tree, processors)
        facts.model = " + ".join(facts.core_types) or processors[0].get("model name", "")
    facts.physical_cores = _physical_cores(tree, processors, facts.logical_cores, x86) if processors else 0
    facts.isa_features = isa_features(facts.arch, processors)
    facts.max_freq_mhz = _max_freq_mhz(tree, facts.model)
    facts.caches = _caches(tree)
    return facts, board
