"""Power sensors the telemetry side can read, and whether this agent may read them.

| kind      | where                                                        | unit | reads                    |
|-----------|--------------------------------------------------------------|------|--------------------------|
| `rapl`    | `/sys/class/powercap/intel-rapl:*/energy_uj` (+ `name`,      | uJ   | counter; wraps at        |
|           | `max_energy_range_uj`); Intel, and AMD since Linux 5.8       |      | `max_energy_range_uj`    |
| `hwmon`   | `/sys/class/hwmon/hwmon*/power*_input` (INA219/226/260, ...)  | uW   | instant power            |
| `ina3221` | `/sys/class/hwmon/hwmon*` named `ina3221`: a labelled `in*_input`| mV   | volts x amps per channel |
|           | and one `curr*_input` per channel, named by `in*_label`      | mA   | (two sensors, same name) |
| `battery` | `/sys/class/power_supply/*` of type Battery: `power_now`,    | uW / | discharge                |
|           | else `current_now`                                           | uA   |                          |

Readability is found by reading, not by mode bits: since Linux 5.10 `energy_uj` is root only
(CVE-2020-8694, "Platypus"), and sysfs modes do not always tell.
"""

from __future__ import annotations

import errno
from pathlib import Path

from edgefleet.protos.v1.profile_pb2 import PowerSensor

from .tree import ProfiledTree, describe_os_error

RAPL_ROOT_ONLY = (
    "not readable (root only since Linux 5.10); run the agent as root or add a udev rule that makes energy_uj readable"
)


def _readable(path: Path) -> tuple[bool, str]:
    """Try a real read; returns (ok, reason when not)."""
    try:
        with path.open("rb") as handle:
            handle.read(64)
        return True, ""
    except OSError as exc:
        if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
            return False, "permission denied"
        return False, describe_os_error(exc)


def _rapl(tree: ProfiledTree) -> list[PowerSensor]:
    sensors = []
    for zone in tree.glob("/sys/class/powercap/intel-rapl:*"):
        name = tree.read_text(zone / "name") or zone.name
        energy = zone / "energy_uj"
        if not energy.exists() and not energy.is_symlink():
            continue
        ok, why = _readable(energy)
        if not ok:
            reason = RAPL_ROOT_ONLY if why == "permission denied" else f"not readable ({why})"
            tree.gap(f"RAPL energy_uj ({name}, {tree.rel(energy)})", reason)
        sensors.append(PowerSensor(kind="rapl", name=name, path=tree.rel(energy), readable=ok, unit="uJ"))
    return sensors


def _hwmon(tree: ProfiledTree) -> list[PowerSensor]:
    sensors = []
    for hwmon in tree.glob("/sys/class/hwmon/hwmon*"):
        chip = tree.read_text(hwmon / "name") or hwmon.name
        if chip == "ina3221":
            for volts in tree.glob(f"{tree.rel(hwmon)}/in[0-9]*_input"):
                channel = volts.name[2:].split("_")[0]
                label = tree.read_text(hwmon / f"in{channel}_label")
                if not label:
                    continue  # in4..in7 are shunt and sum voltages; only labelled inputs are rails
                current = hwmon / f"curr{channel}_input"
                for path, unit in ((volts, "mV"), (current, "mA")):
                    if not path.exists():
                        continue
                    ok, why = _readable(path)
                    if not ok:
                        tree.gap(f"INA3221 {label} ({tree.rel(path)})", f"not readable ({why})")
                    sensors.append(PowerSensor(kind="ina3221", name=label, path=tree.rel(path), readable=ok, unit=unit))
            continue
        for power in tree.glob(f"{tree.rel(hwmon)}/power[0-9]*_input"):
            channel = power.name[5:].split("_")[0]
            label = tree.read_text(hwmon / f"power{channel}_label") or f"{chip} power{channel}"
            ok, why = _readable(power)
            if not ok:
                tree.gap(f"hwmon {label} ({tree.rel(power)})", f"not readable ({why})")
            sensors.append(PowerSensor(kind="hwmon", name=label, path=tree.rel(power), readable=ok, unit="uW"))
    return sensors


def _batteries(tree: ProfiledTree) -> list[PowerSensor]:
    sensors = []
    for supply in tree.glob("/sys/class/power_supply/*"):
        if (tree.read_text(supply / "type") or "") != "Battery":
            continue
        for attribute, unit in (("power_now", "uW"), ("current_now", "uA")):
            path = supply / attribute
            if path.exists():
                ok, why = _readable(path)
                if not ok:
                    tree.gap(f"battery {supply.name} ({tree.rel(path)})", f"not readable ({why})")
                sensors.append(
                    PowerSensor(kind="battery", name=supply.name, path=tree.rel(path), readable=ok, unit=unit)
                )
                break
        else:
            tree.gap(f"battery {supply.name}", "neither power_now nor current_now present")
    return sensors


def collect_power_sensors(tree: ProfiledTree) -> list[PowerSensor]:
    sensors = _rapl(tree) + _hwmon(tree) + _batteries(tree)
    if not any(sensor.readable for sensor in sensors):
        tree.gap(
            "power sensor",
            "no readable RAPL, hwmon power, INA3221 or battery sensor; power will be "
            "estimated from the hardware-class model",
        )
    return sensors
