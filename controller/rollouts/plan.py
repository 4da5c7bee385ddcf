"""The operator's rollout spec, parsed: waves, gates and device selectors.

Pure functions of their input (no store, no clock, no I/O): the engine calls them on create and
on every tick, and they are tested without a controller.
"""

from __future__ import annotations

import dataclasses
import math
import re

from edgefleet.controller.errors import InvalidArgument
from edgefleet.controller.store.base import DeviceRecord

GATE_METRICS = ("p50_ms", "p95_ms", "p99_ms", "error_rate", "watts", "energy_mj")
_GATE_RE = re.compile(r"^\s*([a-z0-9_]+)\s*<=\s*([0-9.]+)\s*(x?)\s*$")


@dataclasses.dataclass(frozen=True)
class WaveSize:
    count: int | None = None      # an absolute number of devices per class (the canary)
    fraction: float | None = None  # a cumulative share of each class


def parse_waves(text: str) -> list[WaveSize]:
    waves = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if part.endswith("%"):
                value = float(part[:-1]) / 100
                if not 0 < value <= 1:
                    raise ValueError
                waves.append(WaveSize(fraction=value))
            else:
                count = int(part)
                if count < 1:
                    raise ValueError
                waves.append(WaveSize(count=count))
        except ValueError:
            raise InvalidArgument(
                f"--waves part {part!r} is not a device count or a percentage; e.g. --waves 1,10%,50%,100%"
            ) from None
    if not waves or waves[-1].fraction != 1.0:
        raise InvalidArgument("--waves must end at 100%, e.g. --waves 1,10%,100%")
    return waves


@dataclasses.dataclass(frozen=True)
class Gate:
    metric: str
    limit: float
    relative: bool  # a multiple of the device's own baseline on its previous model

    def __str__(self) -> str:
        return f"{self.metric}<={self.limit:g}{'x' if self.relative else ''}"


def parse_gate(text: str) -> Gate:
    match = _GATE_RE.match(text)
    if not match or match.group(1) not in GATE_METRICS:
        raise InvalidArgument(
            f"--gate {text!r} is not understood; write METRIC<=LIMIT or METRIC<=FACTORx with METRIC one of "
            f"{', '.join(GATE_METRICS)}, e.g. --gate p95_ms<=1.2x --gate error_rate<=0.01"
        )
    return Gate(match.group(1), float(match.group(2)), match.group(3) == "x")


def selector_matches(selector: str, device: DeviceRecord) -> bool:
    kind, _, rest = selector.partition(" ") if " " in selector else (selector, "", "")
    if selector == "all":
        return True
    if selector.startswith("class="):
        return device.hardware_class == selector[len("class="):]
    if kind == "label":
        key, _, value = rest.partition("=")
        return device.labels.get(key.strip()) == value.strip()
    if kind == "devices":
        return device.device_id in {d.strip() for d in rest.split(",")}
    raise InvalidArgument(f"--to {selector!r} is not understood; use all, class=C, 'label k=v' or 'devices a,b'")


def assign_waves(device_ids: list[str], waves: list[WaveSize]) -> dict[str, int]:
    """Wave index per device of one class: a count is absolute, a fraction cumulative."""
    n = len(device_ids)
    targets: list[int] = []
    for wave in waves:
        target = min(n, wave.count) if wave.count is not None else math.ceil((wave.fraction or 0) * n)
        targets.append(max(target, targets[-1] if targets else 0))
    out: dict[str, int] = {}
    for position, device_id in enumerate(device_ids):
        out[device_id] = next(i for i, t in enumerate(targets) if position < t)
    return out
