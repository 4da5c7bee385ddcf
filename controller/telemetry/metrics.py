"""The fleet as Prometheus metrics: what a scrape of /metrics computes (the HTTP side only serves it)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.store.base import Store
from edgefleet.controller.telemetry import histograms
from edgefleet.controller.telemetry.ingest import LATENCY_BUCKETS_S, LiveTelemetry


class FleetCollector(Collector):
    """Gauges computed at scrape time from the store and the live sessions."""

    def __init__(self, store: Store, presence: PresenceTracker) -> None:
        self.store = store
        self.presence = presence

    def collect(self) -> Iterator[GaugeMetricFamily]:
        devices = self.store.list_devices()
        online = sum(1 for d in devices if self.presence.presence(d).online)
        gauge = GaugeMetricFamily("edgefleet_devices", "Enrolled devices by presence", labels=["state"])
        gauge.add_metric(["online"], online)
        gauge.add_metric(["offline"], len(devices) - online)
        yield gauge


class TelemetryCollector(Collector):
    """Fleet latency histograms and per-device gauges from the live telemetry view."""

    def __init__(self, live: LiveTelemetry) -> None:
        self.live = live

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

        inferences = CounterMetricFamily("edgefleet_device_inferences", "Inferences served",
                                         labels=["device", "model", "version"])
        errors = CounterMetricFamily("edgefleet_device_inference_errors", "Failed inferences",
                                     labels=["device", "model", "version"])
        for (device, model, version), (count, failed) in sorted(totals.items()):
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
        for device, point in sorted(latest.items()):
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
