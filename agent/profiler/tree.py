"""Read-only access to the machine being profiled, through a root path.

Every probe reads through a `ProfiledTree` instead of opening `/proc` or `/sys` directly, so the same code
profiles the live machine (root `/`) and a captured board tree kept as test data (root
`tests/data/boards/rpi5`). The tree also collects the gaps: a probe that cannot read something records
what and why, and the profile shrinks instead of the agent crashing.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

# Mode bits are useless for telling "missing" from "root only" on sysfs, so probes try to read and
# translate the error; these strings say what the operator can do about it.
PERMISSION_HINT = "permission denied; run the agent as root or grant read access (udev rule or chmod o+r)"


@dataclass(frozen=True)
class Gap:
    """Something the profile could not learn, and why (becomes a `ProfileGap`)."""

    what: str
    reason: str


@dataclass
class ProfiledTree:
    """The filesystem of the profiled machine, rooted at `root`, plus the gaps found while reading it."""

    root: Path
    gaps: list[Gap] = field(default_factory=list)

    @property
    def is_live(self) -> bool:
        """True when the tree is this very machine, so live-only probes (psutil, NVML, ORT) may run."""
        try:
            return self.root.resolve() == Path("/")
        except OSError:
            return False

    def path(self, rel: str) -> Path:
        """Map an absolute path of the profiled machine (`/proc/cpuinfo`) into the tree."""
        return self.root / rel.lstrip("/")

    def rel(self, path: Path) -> str:
        """Map a path inside the tree back to the path the profiled machine would print."""
        try:
            relative = path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)
        return "/" if relative == "." else "/" + relative

    def gap(self, what: str, reason: str) -> None:
        """Record one thing the profile does not know; duplicates are dropped so gaps stay readable."""
        item = Gap(what, reason)
        if item not in self.gaps:
            self.gaps.append(item)

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self.path(rel))

    def glob(self, pattern: str) -> list[Path]:
        """Sorted matches of an absolute glob pattern inside the tree (sorted for deterministic profiles)."""
        try:
            return sorted(self.root.glob(pattern.lstrip("/")), key=_natural_key)
        except OSError:
            return []

    def read_text(self, rel: str | Path, *, what: str | None = None) -> str | None:
        """Read a small text file; None when it cannot be read.

        A missing file is silent unless `what` names something the profile expected to find (then it is
        a gap); an unreadable file is always a gap, because it means the hardware is there but hidden.
        Device-tree strings are NUL-terminated, so trailing NULs are stripped with the whitespace.
        """
        path = rel if isinstance(rel, Path) else self.path(rel)
        shown = self.rel(path) if isinstance(rel, Path) else rel
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if what is not None:
                self.gap(what, f"{shown} not found")
            return None
        except OSError as exc:
            self.gap(what or shown, f"{shown} not readable ({describe_os_error(exc)})")
            return None
        return raw.decode("utf-8", errors="replace").replace("\x00", "\n").strip()

    def read_int(self, rel: str | Path, *, what: str | None = None) -> int | None:
        text = self.read_text(rel, what=what)
        if text is None:
            return None
        try:
            return int(text.split()[0], 0) if text else None
        except ValueError:
            self.gap(what or str(rel), f"expected an integer, found {text[:40]!r}")
            return None

    def link_name(self, rel: str | Path) -> str | None:
        """Base name of a symlink's target (sysfs `driver` links name the driver); None when absent."""
        path = rel if isinstance(rel, Path) else self.path(rel)
        try:
            return Path(os.readlink(path)).name
        except OSError:
            return None


def describe_os_error(exc: OSError) -> str:
    """Turn an OSError into a reason an operator can act on."""
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return PERMISSION_HINT
    if isinstance(exc, IsADirectoryError):
        return "is a directory, expected a file"
    return exc.strerror or type(exc).__name__


def _natural_key(path: Path) -> list[object]:
    """Sort cpu10 after cpu9 and hwmon10 after hwmon2, like the kernel numbers them."""
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]
