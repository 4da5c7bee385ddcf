"""Power in watts, always with its source, and energy per inference derived from it.

Sources, in order of preference (the first that reads wins):
- `measured:rapl`: deltas of powercap `energy_uj` over the interval, wrap-around at
  `max_energy_range_uj` handled; top-level package zones only, so sub-zones are not counted twice.
- `measured:hwmon`: instant `power*_input` (uW), or INA3221 rails as `in*_input` (mV) x
  `curr*_input` (mA); the Jetson `VDD_IN` rail is the whole board, so it is used alone when present.
- `measured:battery`: `power_now` (uW), or `current_now` x `voltage_now`, while discharging.
- `estimated:model`: idle W + CPU utilisation x dynamic W, from agent/data/power_models.json
  (per hardware class; an operator file can override it).

Energy per inference subtracts an idle baseline: the lowest measured power seen over an interval
without inferences, or the model's idle W (then the idle source says estimated).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from edgefleet.protos.v1 import fleet_pb2, profile_pb2

_RAPL_TOP = re.compile(r"/intel-rapl:\d+/energy_uj$")


@dataclasses.dataclass(frozen=True)
class PowerModel:
    idle_w: float
    dynamic_w: float


def load_power_models(override: Path | None = None) -> dict[str, PowerModel]:
    table = json.loads(resources.files("edgefleet.agent").joinpath("data/power_models.json").read_text())
    if override is not None:
        try:
            table.update(json.loads(override.read_text()))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read power model file {override}: {exc}; it must be JSON like "
                             '{"arm64-dotprod": {"idle_w": 2.7, "dynamic_w": 6.0}}') from None
    models = {}
    for key, value in table.items():
        if key.startswith("_"):
            continue
        try:
            models[key] = PowerModel(float(value["idle_w"]), float(value["dynamic_w"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"power model {key!r} needs numeric idle_w and dynamic_w") from None
    return models


def power_model_for(hardware_class: str, models: dict[str, PowerModel]) -> PowerModel:
    if hardware_class in models:
        return models[hardware_class]
    family = hardware_class.split("-")[0]
    return models.get(family, models["default"])


def _read_number(path: Path) -> float | None:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


class PowerMeter:
    """Call `read(cpu_utilisation)` once per telemetry interval."""

    def __init__(
        self,
        sensors: Sequence[profile_pb2.PowerSensor],
        model: PowerModel,
        *,
        root: Path = Path("/"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.model = model
        self.clock = clock
        readable = [s for s in sensors if s.readable]
        self.rapl = [self._path(s) for s in readable if s.kind == "rapl" and _RAPL_TOP.search(s.path)]
        self.hwmon = [self._path(s) for s in readable if s.kind == "hwmon"]
        rails: dict[str, dict[str, Path]] = {}
        for s in readable:
            if s.kind == "ina3221":
                rails.setdefault(s.name, {})[s.unit] = self._path(s)
        board = {k: v for k, v in rails.items() if k.upper() in ("VDD_IN", "VIN_SYS_5V0", "POM_5V_IN")}
        self.ina_rails = [(r["mV"], r["mA"]) for r in (board or rails).values() if "mV" in r and "mA" in r]
        self.battery = [self._path(s) for s in readable if s.kind == "battery"]
        self._last_energy: dict[Path, float] = {}
        self._last_time: float | None = None
        self.idle_w: float | None = None

    def _path(self, sensor: profile_pb2.PowerSensor) -> Path:
        return self.root / sensor.path.lstrip("/")

    @property
    def measured_kind(self) -> str | None:
        if self.rapl:
            return "rapl"
        if self.hwmon or self.ina_rails:
            return "hwmon"
        if self.battery:
            return "battery"
        return None

    def _rapl_watts(self, now: float) -> float | None:
        total_uj = 0.0
        previous_time = self._last_time
        complete = True
        for path in self.rapl:
            energy = _read_number(path)
            if energy is None:
                return None
            last = self._last_energy.get(path)
            self._last_energy[path] = energy
            if last is None:
                complete = False
                continue
            delta = energy - last
            if delta < 0:  # the counter wrapped
                delta += _read_number(path.parent / "max_energy_range_uj") or 0.0
            total_uj += delta
        if not complete or previous_time is None or now <= previous_time:
            return None
        return total_uj / 1e6 / (now - previous_time)

    def _hwmon_watts(self) -> float | None:
        if self.ina_rails:
            values = [(_read_number(v), _read_number(c)) for v, c in self.ina_rails]
            if any(v is None or c is None for v, c in values):
                return None
            return sum(v * c for v, c in values if v is not None and c is not None) / 1e6  # mV x mA = uW
        readings = [_read_number(p) for p in self.hwmon]
        if not readings or any(r is None for r in readings):
            return None
        return sum(r for r in readings if r is not None) / 1e6

    def _battery_watts(self) -> float | None:
        for path in self.battery:
            status = (path.parent / "status")
            try:
                if status.read_text().strip() != "Discharging":
                    return None
            except OSError:
                return None
            value = _read_number(path)
            if value is None:
                continue
            if path.name == "power_now":
                return value / 1e6
            volts = _read_number(path.parent / "voltage_now")
            if volts is not None:
                return value * volts / 1e12
        return None

    def read(self, cpu_utilisation: float, inferences: int) -> fleet_pb2.PowerReading:
        """Power over the interval just ended; `cpu_utilisation` in 0..1 drives the estimate."""
        now = self.clock()
        watts: float | None = None
        source = ""
        kind = self.measured_kind
        if kind == "rapl":
            watts, source = self._rapl_watts(now), "measured:rapl"
        elif kind == "hwmon":
            watts, source = self._hwmon_watts(), "measured:hwmon"
        elif kind == "battery":
            watts, source = self._battery_watts(), "measured:battery"
        self._last_time = now
        if watts is None:
            utilisation = min(1.0, max(0.0, cpu_utilisation))
            watts, source = self.model.idle_w + utilisation * self.model.dynamic_w, "estimated:model"
        elif inferences == 0:
            self.idle_w = watts if self.idle_w is None else min(self.idle_w, watts)
        if source.startswith("measured") and self.idle_w is not None:
            idle, idle_source = self.idle_w, source
        else:
            idle, idle_source = self.model.idle_w, "estimated:model"
        return fleet_pb2.PowerReading(watts=watts, source=source, idle_watts=idle, idle_source=idle_source)


def estimated_energy_per_inference_mj(model: PowerModel, process_utilisation: float, interval_s: float,
                                      inferences: int) -> float:
    """The modelled dynamic energy of the serving process alone: its share of the CPU x dynamic W.

    Without a sensor, charging inference with the whole device's utilisation would bill it for
    every other process on the board."""
    if inferences <= 0 or interval_s <= 0:
        return 0.0
    return model.dynamic_w * min(1.0, max(0.0, process_utilisation)) * interval_s / inferences * 1000


def energy_per_inference_mj(power: fleet_pb2.PowerReading, interval_s: float, inferences: int) -> tuple[float, str]:
    """Dynamic energy per inference over the interval, with its source.

    It is measured only when both the power and the idle baseline were measured by the same
    sensor; a measured power minus a modelled idle is an estimate and says so.
    """
    if inferences <= 0 or interval_s <= 0:
        return 0.0, ""
    joules = max(0.0, power.watts - power.idle_watts) * interval_s / inferences
    if power.source.startswith("measured") and power.idle_source == power.source:
        source = power.source
    elif power.source.startswith("measured"):
        source = f"estimated:{power.source.split(':', 1)[1]}-minus-model-idle"
    else:
        source = "estimated:model"
    return joules * 1000, source
