"""Hardware profiler: what this device can run, keyed to a hardware class.

`collect_profile()` builds the `HardwareProfile` the agent sends on Enroll and prints for
`edgefleet-agent profile`. Every probe reads through a root path, so captured board trees under
`tests/data/boards/` profile exactly like the live machine; probes that can only ask the live machine
(psutil, uname, NVML, onnxruntime providers, LiteRT delegates, the micro-benchmark) run only when the
root is `/`. Nothing that is missing or unreadable raises: it becomes a `ProfileGap` with the reason.

Modules: `cpu` (+ `arm_cores`), `system`, `accelerators` (+ `mcu_manifest`), `power`, `runtimes`,
`microbench`, and `hardware_class`, the one place that derives the class string.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from edgefleet.protos.v1 import profile_pb2

from .accelerators import collect_accelerators
from .cpu import CpuFacts, collect_cpu
from .hardware_class import cpu_hardware_class, derive_hardware_class
from .power import collect_power_sensors
from .runtimes import collect_runtimes
from .system import SystemFacts, collect_system
from .tree import ProfiledTree

__all__ = [
    "PROFILE_SCHEMA_VERSION",
    "collect_profile",
    "cpu_hardware_class",
    "derive_hardware_class",
    "profile_to_dict",
]

log = logging.getLogger(__name__)

PROFILE_SCHEMA_VERSION = 1

T = TypeVar("T")


def _probe(tree: ProfiledTree, name: str, default: T, probe: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one probe; a bug in it (a sysfs layout nobody foresaw) costs that part of the profile, not enrollment."""
    try:
        return probe(*args, **kwargs)
    except Exception as exc:
        log.warning("event=profiler_probe_failed probe=%s error=%r", name, exc)
        tree.gap(
            f"{name} probe", f"failed unexpectedly ({type(exc).__name__}: {exc}); please report it with this profile"
        )
        return default


def collect_profile(
    root: Path = Path("/"),
    *,
    microbench: bool = True,
    cache_dir: Path | None = None,
    hardware_class_override: str | None = None,
    mcu_manifest: Path | None = None,
) -> profile_pb2.HardwareProfile:
    """Profile the machine under `root` (the live one by default).

    `microbench` runs the ~3 s benchmark on the live machine (reused from `cache_dir` when cached there;
    without a cache_dir it runs every time). `hardware_class_override` pins the class an operator chose;
    the derived one is kept in `derived_hardware_class` so the controller can show both.
    `mcu_manifest` points at an MCU manifest elsewhere than `<root>/etc/edgefleet/mcu.json`.
    """
    tree = ProfiledTree(Path(root))
    profile = profile_pb2.HardwareProfile(
        schema_version=PROFILE_SCHEMA_VERSION, collected_at_unix_ms=int(time.time() * 1000)
    )
    if not tree.root.is_dir():
        tree.gap("everything", f"profile root {root} is not a directory")
        profile.gaps.extend(profile_pb2.ProfileGap(what=g.what, reason=g.reason) for g in tree.gaps)
        profile.hardware_class = hardware_class_override or "unknown"
        profile.derived_hardware_class = "unknown"
        return profile

    no_board: dict[str, str] = {}
    cpu, cpuinfo_board = _probe(tree, "CPU", (CpuFacts(), no_board), collect_cpu, tree)
    profile.cpu.CopyFrom(
        profile_pb2.CpuInfo(
            arch=cpu.arch,
            vendor=cpu.vendor,
            model=cpu.model,
            physical_cores=cpu.physical_cores,
            logical_cores=cpu.logical_cores,
            max_freq_mhz=cpu.max_freq_mhz,
            isa_features=cpu.isa_features,
            core_types=cpu.core_types,
            caches=[
                profile_pb2.CacheLevel(level=lvl, type=kind, size_bytes=size, shared_by_cpus=shared)
                for lvl, kind, size, shared in cpu.caches
            ],
        )
    )
    system = _probe(tree, "system", SystemFacts(), collect_system, tree, cpuinfo_board)
    profile.memory.CopyFrom(
        profile_pb2.MemoryInfo(total_bytes=system.total_bytes, available_bytes=system.available_bytes)
    )
    profile.disks.extend(profile_pb2.DiskInfo(path=p, total_bytes=t, free_bytes=f) for p, t, f in system.disks)
    profile.os.CopyFrom(
        profile_pb2.OsInfo(
            system=system.system,
            kernel=system.kernel,
            distro=system.distro,
            python_version=system.python_version,
            hostname=system.hostname,
            board_model=system.board_model,
        )
    )
    profile.accelerators.extend(
        _probe(
            tree,
            "accelerator",
            [],
            collect_accelerators,
            tree,
            total_memory=system.total_bytes,
            mcu_manifest=mcu_manifest,
        )
    )
    profile.power_sensors.extend(_probe(tree, "power sensor", [], collect_power_sensors, tree))
    profile.runtimes.extend(_probe(tree, "runtime", [], collect_runtimes, tree))

    if not tree.is_live:
        tree.gap(
            "live-only probes",
            f"profiling the captured tree {tree.root}, not this machine: disk usage, "
            "Python version, onnxruntime providers, LiteRT delegates, NVML and the micro-benchmark skipped",
        )
    elif microbench:
        _add_microbench(tree, profile, cache_dir)

    derived = derive_hardware_class(profile)
    profile.derived_hardware_class = derived
    profile.hardware_class = hardware_class_override or derived
    profile.gaps.extend(profile_pb2.ProfileGap(what=g.what, reason=g.reason) for g in tree.gaps)
    return profile


def _add_microbench(tree: ProfiledTree, profile: profile_pb2.HardwareProfile, cache_dir: Path | None) -> None:
    from .microbench import run_microbench

    last_level = max((c.size_bytes for c in profile.cpu.caches), default=0)
    try:
        result = run_microbench(
            cpu_model=profile.cpu.model,
            threads=profile.cpu.physical_cores or 1,
            last_level_cache=last_level,
            available_memory=profile.memory.available_bytes,
            cache_dir=cache_dir,
        )
    except ImportError as exc:
        tree.gap("micro-benchmark", f"needs onnxruntime and numpy ({exc}); install edgefleet[agent]")
        return
    except Exception as exc:  # a benchmark failure must never stop enrollment
        log.warning("event=microbench_failed error=%s", exc)
        tree.gap("micro-benchmark", f"failed ({type(exc).__name__}: {exc})")
        return
    profile.microbench.CopyFrom(result)


def profile_to_dict(profile: profile_pb2.HardwareProfile) -> dict[str, Any]:
    """JSON-ready dict with the proto field names (snake_case), as `edgefleet-agent profile --json` prints."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(profile, preserving_proto_field_name=True)
