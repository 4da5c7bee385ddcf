"""Memory, disks, OS, kernel, Python version and board model.

On the live machine psutil and uname answer; a captured tree answers from `/proc/meminfo`,
`/proc/sys/kernel/{osrelease,hostname}` and `/etc/os-release`, so board tests stay deterministic.
The board model comes from the device tree (`/proc/device-tree/model`, every ARM board) or DMI
(`/sys/class/dmi/id`, x86), which is what an operator recognises in a fleet listing.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass, field

from .tree import ProfiledTree


@dataclass
class SystemFacts:
    total_bytes: int = 0
    available_bytes: int = 0
    disks: list[tuple[str, int, int]] = field(default_factory=list)  # path, total, free
    system: str = ""
    kernel: str = ""
    distro: str = ""
    python_version: str = ""
    hostname: str = ""
    board_model: str = ""


def parse_meminfo(text: str) -> dict[str, int]:
    """`/proc/meminfo` values in bytes (the kernel prints kB)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        match = re.match(r"(\w+):\s+(\d+)(?:\s+kB)?", line)
        if match:
            values[match.group(1)] = int(match.group(2)) * (1024 if "kB" in line else 1)
    return values


def parse_os_release(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip('"')
    return values


def board_model(tree: ProfiledTree, cpuinfo_board: dict[str, str]) -> str:
    model = tree.read_text("/proc/device-tree/model")
    if model:
        return model.splitlines()[0]
    if cpuinfo_board.get("Model"):
        return cpuinfo_board["Model"]
    vendor = tree.read_text("/sys/class/dmi/id/sys_vendor") or ""
    product = tree.read_text("/sys/class/dmi/id/product_name") or ""
    return " ".join(part for part in (vendor, product) if part)


def collect_system(tree: ProfiledTree, cpuinfo_board: dict[str, str]) -> SystemFacts:
    facts = SystemFacts()
    if tree.is_live:
        import psutil

        memory = psutil.virtual_memory()
        facts.total_bytes, facts.available_bytes = int(memory.total), int(memory.available)
        try:
            usage = psutil.disk_usage("/")
            facts.disks.append(("/", int(usage.total), int(usage.free)))
        except OSError as exc:
            tree.gap("disk usage of /", f"statvfs failed ({exc.strerror})")
        uname = platform.uname()
        facts.system, facts.kernel, facts.hostname = uname.system, uname.release, uname.node
        facts.python_version = platform.python_version()
    else:
        meminfo = parse_meminfo(tree.read_text("/proc/meminfo", what="memory size") or "")
        facts.total_bytes = meminfo.get("MemTotal", 0)
        facts.available_bytes = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
        facts.system = "Linux" if tree.exists("/proc") else ""
        facts.kernel = tree.read_text("/proc/sys/kernel/osrelease", what="kernel release") or ""
        facts.hostname = tree.read_text("/proc/sys/kernel/hostname") or tree.read_text("/etc/hostname") or ""
    release = tree.read_text("/etc/os-release") or tree.read_text("/usr/lib/os-release")
    if release is None:
        tree.gap("OS distribution", "/etc/os-release not found")
    facts.distro = parse_os_release(release or "").get("PRETTY_NAME", "")
    facts.board_model = board_model(tree, cpuinfo_board)
    return facts
