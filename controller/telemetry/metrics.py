"""The fleet as Prometheus metrics: what a scrape of /metrics computes (the HTTP side only serves it).

Fleet-wide and per-hardware-class series are always exported. Per-device series (about ten per
device) are capped: at 10,000 devices they were ~90,000 samples and a scrape held the GIL for over
a second. The cap (`controller serve --metrics-per-device`, default DEFAULT_PER_DEVICE_CAP) keeps
the devices first by id, so the same ones are exported scrape after scrape, and says what it cut:
`edgefleet_metrics_per_device_omitted_devices` counts the devices left out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.store.base import DeviceBrief, Store
from edgefleet.controller.telemetry import histograms
from edgefleet.controller.telemetry.ingest import LATENCY_BUCKETS_S, LiveTelemetry

log = logging.getLogger("edgefleet.controller.telemetry.metrics")

DEFAULT_PER_DEVICE_CAP = 500  # ~4,500 samples: a 10,000-device scrape stays well under 200 ms
UNKNOWN_CLASS = "unknown"  # telemetry from a device the store has no row for (yet)


def parse_per_device_cap(value: str) -> int | None:
    """`--metrics-per-device`: a device count, 'off' (0) or 'all' (None: no cap)."""
    text = value.strip().lower()
    if text == "all":
        return None
    if text == "off":
        return 0
    if text.isdigit():
        return int(text)
    raise ValueError(f"{value!r} is not a device count, 'off' or 'all'; e.g. --metrics-per-device 500")


class FleetCollector(Collector):
    """Device counts by presence, fleet-wide and per hardware class, computed at scrape time.

    Its read of the devices also gives `classes` (device -> hardware class) to TelemetryCollector,
    so a scrape reads the device table once: at 10,000 devices each read is tens of ms."""

    CLASSES_MAX_AGE_S = 10.0

    def __init__(self, store: Store, presence: PresenceTracker, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.presence = presence
        self.clock = clock
        self._classes: dict[str, str] = {}
        self._classes_at: float | None = None

    def classes(self) -> Mapping[str, str]:
        """Device -> hardware class from this collector's latest scrape; read afresh when that is
        older than CLASSES_MAX_AGE_S (a class changes only when a device reconnects on new hardware)."""
        if self._classes_at is None or self.clock() - self._classes_at > self.CLASSES_MAX_AGE_S:
            self._remember(self.store.device_briefs())
        return self._classes

    def _remember(self, devices: list[DeviceBrief]) -> None:
        self._classes = {d.device_id: d.hardware_class for d in devices}
        self._classes_at = self.clock()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        devices = self.store.device_briefs()
        self._remember(devices)
        by_class: dict[str, list[int]] = {}  # class -> [online, offline]
        for device, is_online in zip(devices, self.presence.online_flags(devices), strict=True):
            counts = by_class.setdefault(device.hardware_class or UNKNOWN_CLASS, [0, 0])
            counts[0 if is_online else 1] += 1
        gauge = GaugeMetricFamily("edgefleet_devices", "Enrolled devices by presence", labels=["state"])
        gauge.add_metric(["online"], sum(c[0] for c in by_class.values()))
        gauge.add_metric(["offline"], sum(c[1] for c in by_class.values()))
        yield gauge
        per_class = GaugeMetricFamily("edgefleet_class_devices", "Enrolled devices by hardware class and presence",
                                      labels=["hardware_class", "state"])
        for hardware_class, (online, offline) in sorted(by_class.items()):
            per_class.add_metric([hardware_class, "online"], online)
            per_class.add_metric([hardware_class, "offline"], offline)
        yield per_class


class TelemetryCollector(Collector):
    """Fleet latency histograms, per-class totals and (capped) per-device gauges from the live view.

    `per_device_cap`: how many devices get per-device series (None: all, 0: none).
    `device_classes`: device id -> hardware class, read once per scrape (None: every device's
    class is 'unknown')."""

    def __init__(self, live: LiveTelemetry, per_device_cap: int | None = None,
                 device_classes: Callable[[], Mapping[str, str]] | None = None) -> None:
        if per_device_cap is not None and per_device_cap < 0:
            raise ValueError(f"per-device cap {per_device_cap} is negative; give 0 (off), a count, or None (all)")
        self.live = live
        self.per_device_cap = per_device_cap
        self.device_classes = device_classes
        self._warned_cap = False

    def collect(self) -> Iterator[Any]:
        # A consistent snapshot, copied under the lock and formatted outside it: with thousands
        # of devices the formatting takes long enough to stall the ingest that adds to these.
        latest, fleet_counts, totals = self.live.snapshot()
        limits_us = [round(b * 1e6) for b in LATENCY_BUCKETS_S]
        fleet = HistogramMetricFamily(
            "edgefleet_inference_latency_seconds", "Inference latency across the fleet (request to answer)",
            labels=["model", "version"],
        )
        for (model, version), counts in sorted(fleet_counts.items()):
            below = histograms.at_or_below(counts, limits_us)
            total = int(counts.sum())
            buckets = [(repr(b), c) for b, c in zip(LATENCY_BUCKETS_S, below, strict=True)] + [("+Inf", total)]
            fleet.add_metric([model, version], buckets, sum_value=histograms.mean_us(counts) * total / 1e6)
        yield fleet
        yield from self._per_class(latest, totals)

        reporting = sorted(latest.keys() | {device for device, _, _ in totals})
        kept = reporting if self.per_device_cap is None else reporting[:self.per_device_cap]
        omitted = len(reporting) - len(kept)
        cap = GaugeMetricFamily("edgefleet_metrics_per_device_limit",
                                "Most devices given per-device series (controller serve --metrics-per-device)")
        cap.add_metric([], float("inf") if self.per_device_cap is None else self.per_device_cap)
        yield cap
        left_out = GaugeMetricFamily("edgefleet_metrics_per_device_omitted_devices",
                                     "Devices with telemetry whose per-device series this scrape left out (the cap)")
        left_out.add_metric([], omitted)
        yield left_out
        if omitted and not self._warned_cap:
            self._warned_cap = True
            log.warning("per-device metrics capped; fleet and per-class series still cover every device",
                        extra={"cap": self.per_device_cap, "omitted": omitted, "devices": len(reporting)})
        yield from self._per_device(set(kept), latest, totals)

    def _per_class(self, latest: Mapping[str, Any], totals: Mapping[tuple[str, str, str], tuple[int, int]]
                   ) -> Iterator[Any]:
        classes = self.device_classes() if self.device_classes is not None else {}
        inferences: dict[tuple[str, str, str], list[int]] = {}
        for (device, model, version), (count, failed) in totals.items():
            sums = inferences.setdefault((classes.get(device) or UNKNOWN_CLASS, model, version), [0, 0])
            sums[0] += count
            sums[1] += failed
        served = CounterMetricFamily("edgefleet_class_inferences", "Inferences served, by hardware class",
                                     labels=["hardware_class", "model", "version"])
        failed_total = CounterMetricFamily("edgefleet_class_inference_errors", "Failed inferences, by hardware class",
                                           labels=["hardware_class", "model", "version"])
        for key, (count, failed) in sorted(inferences.items()):
            served.add_metric(list(key), count)
            failed_total.add_metric(list(key), failed)
        yield served
        yield failed_total
        watts: dict[str, float] = {}
        reporting: dict[str, int] = {}
        for device, point in latest.items():
            hardware_class = classes.get(device) or UNKNOWN_CLASS
            watts[hardware_class] = watts.get(hardware_class, 0.0) + point.watts
            reporting[hardware_class] = reporting.get(hardware_class, 0) + 1
        power = GaugeMetricFamily("edgefleet_class_power_watts",
                                  "Sum of the latest power reading of the class's reporting devices",
                                  labels=["hardware_class"])
        count_gauge = GaugeMetricFamily("edgefleet_class_reporting_devices",
                                        "Devices of the class that have sent telemetry", labels=["hardware_class"])
        for hardware_class in sorted(watts):
            power.add_metric([hardware_class], watts[hardware_class])
            count_gauge.add_metric([hardware_class], reporting[hardware_class])
        yield power
        yield count_gauge

    @staticmethod
    def _per_device(kept: set[str], latest: Mapping[str, Any],
                    totals: Mapping[tuple[str, str, str], tuple[int, int]]) -> Iterator[Any]:
        inferences = CounterMetricFamily("edgefleet_device_inferences", "Inferences served",
                                         labels=["device", "model", "version"])
        errors = CounterMetricFamily("edgefleet_device_inference_errors", "Failed inferences",
                                     labels=["device", "model", "version"])
        # Filtered first, then sorted: only the kept devices' rows (sorting all 10,000 cost ~0.1 s).
        for (device, model, version), (count, failed) in sorted(t for t in totals.items() if t[0][0] in kept):
            inferences.add_metric([device, model, version], count)
            errors.add_metric([device, model, version], failed)
        yield inferences
        yield errors

        quantiles = GaugeMetricFamily("edgefleet_device_inference_latency_seconds",
                                      "Latest batch's latency quantiles per device",
                                      labels=["device", "model", "version", "quantile"])
        energy = GaugeMetricFamily("edgefleet_device_energy_per_inference_joules",
                                   "Dynamic energy per inference (source says measured or estimated)",
                                   labels=["device", "model", "version", "source"])
        watts = GaugeMetricFamily("edgefleet_device_power_watts", "Device power (source says measured or estimated)",
                                  labels=["device", "source"])
        cpu = GaugeMetricFamily("edgefleet_device_cpu_percent", "System CPU utilisation", labels=["device"])
        rss = GaugeMetricFamily("edgefleet_device_agent_rss_bytes", "Agent resident memory", labels=["device"])
        temperature = GaugeMetricFamily("edgefleet_device_temperature_celsius", "SoC temperature", labels=["device"])
        for device in sorted(kept & latest.keys()):
            point = latest[device]
            for m in point.models:
                for q, value in (("0.5", m.p50_ms), ("0.95", m.p95_ms), ("0.99", m.p99_ms)):
                    quantiles.add_metric([device, m.model, m.version, q], value / 1000)
                if m.energy_source:
                    energy.add_metric([device, m.model, m.version, m.energy_source], m.energy_mj / 1000)
            watts.add_metric([device, point.power_source], point.watts)
            cpu.add_metric([device], point.cpu_system)
            rss.add_metric([device], point.rss_bytes)
            if point.temperature_c is not None:
                temperature.add_metric([device], point.temperature_c)
        yield from (quantiles, energy, watts, cpu, rss, temperature)
