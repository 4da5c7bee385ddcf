"""Power from captured sysfs layouts: RAPL with wrap-around, hwmon, INA3221, battery, and the estimate."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.agent.power import PowerMeter, PowerModel, energy_per_inference_mj, load_power_models, power_model_for
from edgefleet.protos.v1 import profile_pb2

MODEL = PowerModel(idle_w=5.0, dynamic_w=20.0)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def write(root: Path, rel: str, value: str) -> str:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")
    return rel


def sensor(kind: str, rel: str, name: str = "s", unit: str = "") -> profile_pb2.PowerSensor:
    return profile_pb2.PowerSensor(kind=kind, name=name, path=rel, readable=True, unit=unit)


def test_rapl_deltas_with_wraparound_and_measured_idle(tmp_path: Path) -> None:
    zone = "/sys/class/powercap/intel-rapl:0"
    write(tmp_path, f"{zone}/max_energy_range_uj", "262143328850")
    energy = write(tmp_path, f"{zone}/energy_uj", "262143000000")
    sub = write(tmp_path, f"{zone}/intel-rapl:0:0/energy_uj", "5")  # a sub-zone must not be added again
    clock = Clock()
    meter = PowerMeter([sensor("rapl", energy), sensor("rapl", sub)], MODEL, root=tmp_path, clock=clock)
    first = meter.read(0.5, 0)
    assert first.source == "estimated:model"  # no delta yet: honest estimate, not a made-up measurement
    clock.t += 2.0
    write(tmp_path, f"{zone}/energy_uj", str(20_000_000 - 328_850))  # wrapped: 328850 + 20e6 - 328850 uJ in 2 s
    idle = meter.read(0.1, 0)
    assert idle.source == "measured:rapl" and idle.watts == pytest.approx(10.0)
    assert idle.idle_source == "measured:rapl" and idle.idle_watts == pytest.approx(10.0)
    clock.t += 1.0
    write(tmp_path, f"{zone}/energy_uj", str(20_000_000 - 328_850 + 25_000_000))
    busy = meter.read(0.9, 100)
    assert busy.watts == pytest.approx(25.0) and busy.idle_watts == pytest.approx(10.0)
    mj, source = energy_per_inference_mj(busy, 1.0, 100)
    assert mj == pytest.approx(150.0) and source == "measured:rapl"  # (25 - 10) W x 1 s / 100


def test_ina3221_board_rail_and_hwmon(tmp_path: Path) -> None:
    hw = "/sys/class/hwmon/hwmon1"
    volts = write(tmp_path, f"{hw}/in1_input", "5000")
    amps = write(tmp_path, f"{hw}/curr1_input", "1200")
    cpu_v = write(tmp_path, f"{hw}/in2_input", "5000")
    cpu_a = write(tmp_path, f"{hw}/curr2_input", "400")
    sensors = [sensor("ina3221", volts, "VDD_IN", "mV"), sensor("ina3221", amps, "VDD_IN", "mA"),
               sensor("ina3221", cpu_v, "VDD_CPU_GPU_CV", "mV"), sensor("ina3221", cpu_a, "VDD_CPU_GPU_CV", "mA")]
    reading = PowerMeter(sensors, MODEL, root=tmp_path).read(0.5, 10)
    assert reading.source == "measured:hwmon" and reading.watts == pytest.approx(6.0)  # VDD_IN alone: whole board
    assert reading.idle_source == "estimated:model"
    assert energy_per_inference_mj(reading, 1.0, 10)[1] == "estimated:hwmon-minus-model-idle"
    power = write(tmp_path, "/sys/class/hwmon/hwmon2/power1_input", "7500000")
    assert PowerMeter([sensor("hwmon", power)], MODEL, root=tmp_path).read(0, 0).watts == pytest.approx(7.5)


def test_battery_only_while_discharging(tmp_path: Path) -> None:
    bat = "/sys/class/power_supply/BAT0"
    now = write(tmp_path, f"{bat}/power_now", "9000000")
    write(tmp_path, f"{bat}/status", "Discharging")
    meter = PowerMeter([sensor("battery", now)], MODEL, root=tmp_path)
    assert meter.read(0.2, 0).source == "measured:battery"
    write(tmp_path, f"{bat}/status", "Charging")
    charging = meter.read(0.2, 0)
    assert charging.source == "estimated:model" and charging.watts == pytest.approx(9.0)  # 5 + 0.2 x 20


def test_unreadable_sensor_falls_back_to_the_labelled_estimate(tmp_path: Path) -> None:
    gone = profile_pb2.PowerSensor(kind="rapl", path="/sys/class/powercap/intel-rapl:0/energy_uj", readable=False)
    reading = PowerMeter([gone], MODEL, root=tmp_path).read(0.5, 3)
    assert reading.source == "estimated:model" and reading.watts == pytest.approx(15.0)
    assert energy_per_inference_mj(reading, 2.0, 4) == (pytest.approx(5000.0), "estimated:model")
    assert energy_per_inference_mj(reading, 2.0, 0) == (0.0, "")


def test_power_model_table_and_override(tmp_path: Path) -> None:
    models = load_power_models()
    assert power_model_for("arm64-dotprod", models) == models["arm64-dotprod"]
    assert power_model_for("cuda-sm99", models) == models["default"]
    override = tmp_path / "p.json"
    override.write_text('{"arm64-dotprod": {"idle_w": 1.0, "dynamic_w": 2.0}}')
    assert load_power_models(override)["arm64-dotprod"] == PowerModel(1.0, 2.0)
    override.write_text('{"x": {"idle_w": "a lot"}}')
    with pytest.raises(ValueError, match="needs numeric idle_w and dynamic_w"):
        load_power_models(override)


def test_estimated_energy_bills_only_the_serving_process() -> None:
    from edgefleet.agent.power import estimated_energy_per_inference_mj

    # 20 W dynamic, the agent used 10% of the device for 2 s and served 40 inferences: 2 W x 2 s / 40.
    assert estimated_energy_per_inference_mj(MODEL, 0.10, 2.0, 40) == pytest.approx(100.0)
    assert estimated_energy_per_inference_mj(MODEL, 3.0, 1.0, 10) == pytest.approx(2000.0)  # clamped to 100%
    assert estimated_energy_per_inference_mj(MODEL, 0.5, 1.0, 0) == 0.0
