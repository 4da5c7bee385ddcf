"""Fault injection for the crash-consistency tests: pause or die at a named point, cut the link.

Production code calls :meth:`FaultPlan.point` at every place a crash is interesting. With no plan
configured these calls do nothing. The test harness sets environment variables on the real agent
process:

* ``EDGEFLEET_FAULT_PAUSE=<point>``: print ``EDGEFLEET_FAULT_PAUSED <point>`` on stderr and sleep, so
  the test can SIGKILL the process at exactly that point;
* ``EDGEFLEET_FAULT_CRASH=<point>``: SIGKILL ourselves there, every time (a model that crashes the
  agent, for the crash-loop test);
* ``EDGEFLEET_FAULT_NETCUT=<bytes>``: the artifact source fails once the download passes that offset.

Points are state names (``VERIFYING``: the state is persisted, its work not yet started), named
steps (``activate:swapped``) and byte offsets (``download@4096``, ``stage@100``: that many bytes
written and flushed to the OS, then pause).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class FaultPlan:
    pause_at: str | None = None
    crash_at: str | None = None
    netcut_at: int | None = None

    @classmethod
    def from_env(cls) -> FaultPlan:
        netcut = os.environ.get("EDGEFLEET_FAULT_NETCUT")
        return cls(
            pause_at=os.environ.get("EDGEFLEET_FAULT_PAUSE") or None,
            crash_at=os.environ.get("EDGEFLEET_FAULT_CRASH") or None,
            netcut_at=int(netcut) if netcut else None,
        )

    @property
    def active(self) -> bool:
        return bool(self.pause_at or self.crash_at or self.netcut_at is not None)

    def point(self, name: str) -> None:
        if name == self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if name == self.pause_at:
            self._pause(name)

    def byte_limit(self, kind: str) -> int | None:
        """For ``download``/``stage``: the offset at which to pause, if one is planned."""
        if self.pause_at and self.pause_at.startswith(kind + "@"):
            return int(self.pause_at.split("@", 1)[1])
        return None

    def _pause(self, name: str) -> None:
        sys.stderr.write(f"EDGEFLEET_FAULT_PAUSED {name}\n")
        sys.stderr.flush()
        while True:  # until the test kills us
            time.sleep(3600)

    def pause_now(self, name: str) -> None:
        self._pause(name)


NO_FAULTS = FaultPlan()
