"""Device health for each telemetry batch: CPU, memory, temperature, load (psutil)."""

from __future__ import annotations

import os

import psutil

from edgefleet.protos.v1 import fleet_pb2

# Sensor chips whose first reading is the SoC/CPU temperature, in order of preference.
_TEMPERATURE_CHIPS = ("cpu_thermal", "coretemp", "k10temp", "soc_thermal", "cpu-thermal", "acpitz")


class DeviceSampler:
    def __init__(self) -> None:
        self.process = psutil.Process(os.getpid())
        self.process.cpu_percent(None)  # the first call only sets the reference point
        # psutil.cpu_percent(None) keeps its reference per calling thread, and samples are taken
        # from a thread pool, so the system figure is computed from our own cpu_times deltas.
        self._last_times = psutil.cpu_times()

    def system_cpu_percent(self) -> float:
        now = psutil.cpu_times()
        last, self._last_times = self._last_times, now
        idle = (now.idle + getattr(now, "iowait", 0.0)) - (last.idle + getattr(last, "iowait", 0.0))
        total = sum(now) - sum(last)
        return 0.0 if total <= 0 else max(0.0, min(100.0, 100.0 * (1.0 - idle / total)))

    def sample(self) -> fleet_pb2.DeviceStats:
        stats = fleet_pb2.DeviceStats(
            cpu_percent_system=self.system_cpu_percent(),
            cpu_percent_process=self.process.cpu_percent(None),
            rss_bytes=self.process.memory_info().rss,
            memory_available_bytes=psutil.virtual_memory().available,
            load1=os.getloadavg()[0],
        )
        temperature = self.temperature()
        if temperature is not None:
            stats.temperature_c = temperature
        return stats

    @staticmethod
    def temperature() -> float | None:
        reader = getattr(psutil, "sensors_temperatures", None)
        if reader is None:
            return None
        try:
            chips = reader()
        except OSError:
            return None
        for name in (*_TEMPERATURE_CHIPS, *chips):
            readings = chips.get(name) or []
            if readings:
                return float(readings[0].current)
        return None
