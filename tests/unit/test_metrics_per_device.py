"""/metrics at fleet scale: per-device series capped (or off), fleet and per-class series always there,
and the cut said out loud (edgefleet_metrics_per_device_omitted_devices), through the real HTTP server."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.common import latency
from edgefleet.controller.api.http_server import HttpApi
from edgefleet.controller.cli.controller import controller_serve
from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.store.base import DeviceRecord, EnrollmentTokenRecord
from edgefleet.controller.store.sqlite import SQLiteStore
from edgefleet.controller.telemetry.ingest import LiveTelemetry, convert
from edgefleet.controller.telemetry.metrics import DEFAULT_PER_DEVICE_CAP, parse_per_device_cap
from edgefleet.protos.v1 import fleet_pb2

DEVICES = 10
PER_DEVICE = ("edgefleet_device_inferences", "edgefleet_device_inference_latency_seconds",
              "edgefleet_device_power_watts", "edgefleet_device_cpu_percent")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[SQLiteStore, LiveTelemetry]]:
    """Ten devices in two hardware classes, each with one telemetry batch in the live view."""
    store = SQLiteStore(tmp_path / "c.db")
    store.create_enrollment_token(EnrollmentTokenRecord("t", "h", DEVICES, DEVICES, 0, 2**50, {}))
    live = LiveTelemetry()
    now = int(time.time() * 1000)
    h = latency.new_histogram()
    latency.record_seconds(h, 0.004)
    for i in range(DEVICES):
        store.enroll_device("h", 0, DeviceRecord(f"dev-{i:02d}", "s", {}, 0,
                                                 hardware_class="arm64-dotprod" if i % 2 else "x86_64-avx2"))
        batch = fleet_pb2.TelemetryBatch(seq=1, start_unix_ms=now - 1000, end_unix_ms=now)
        batch.models.add(model="det", version="3", count=10, errors=1, latency=latency.to_proto(h))
        batch.power.watts, batch.power.source = 2.0, "estimated:model"
        live(*convert(f"dev-{i:02d}", batch, now, lambda reason: None))
    yield store, live
    store.close()


def scrape(store: SQLiteStore, live: LiveTelemetry, cap: int | None) -> dict[str, list[tuple[dict[str, str], float]]]:
    http = HttpApi(store, PresenceTracker(store, 5.0), live, CollectorRegistry(), metrics_per_device=cap)
    port = http.start("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    finally:
        http.stop()
    return {f.name: [(s.labels, s.value) for s in f.samples if not s.name.endswith("_created")]
            for f in text_string_to_metric_families(text)}


def devices_in(families: dict[str, list[tuple[dict[str, str], float]]], name: str) -> set[str]:
    return {labels["device"] for labels, _ in families.get(name, [])}


def check_fleet_and_class_series(families: dict[str, list[tuple[dict[str, str], float]]]) -> None:
    """Whatever the cap: every device counted, fleet-wide and per class."""
    assert {(d["hardware_class"], d["state"]): v for d, v in families["edgefleet_class_devices"]} == {
        ("arm64-dotprod", "online"): 0, ("arm64-dotprod", "offline"): 5,
        ("x86_64-avx2", "online"): 0, ("x86_64-avx2", "offline"): 5}
    served = {d["hardware_class"]: v for d, v in families["edgefleet_class_inferences"]}
    assert served == {"arm64-dotprod": 50, "x86_64-avx2": 50}
    assert {d["hardware_class"]: v for d, v in families["edgefleet_class_inference_errors"]} == {
        "arm64-dotprod": 5, "x86_64-avx2": 5}
    assert {d["hardware_class"]: v for d, v in families["edgefleet_class_power_watts"]} == {
        "arm64-dotprod": 10.0, "x86_64-avx2": 10.0}
    count = [v for d, v in families["edgefleet_inference_latency_seconds"] if d.get("le") == "+Inf"]
    assert count == [DEVICES]  # the fleet histogram holds every device's batch


def test_a_cap_keeps_the_first_devices_by_id_and_counts_the_rest(fleet: tuple[SQLiteStore, LiveTelemetry]) -> None:
    families = scrape(*fleet, cap=3)
    for name in PER_DEVICE:
        assert devices_in(families, name) == {"dev-00", "dev-01", "dev-02"}, name
    assert families["edgefleet_metrics_per_device_omitted_devices"] == [({}, DEVICES - 3)]
    assert families["edgefleet_metrics_per_device_limit"] == [({}, 3)]
    check_fleet_and_class_series(families)


def test_per_device_series_off_and_all(fleet: tuple[SQLiteStore, LiveTelemetry]) -> None:
    off = scrape(*fleet, cap=0)
    assert not any(devices_in(off, name) for name in PER_DEVICE)
    assert off["edgefleet_metrics_per_device_omitted_devices"] == [({}, DEVICES)]
    check_fleet_and_class_series(off)
    everything = scrape(*fleet, cap=None)
    assert devices_in(everything, "edgefleet_device_inferences") == {f"dev-{i:02d}" for i in range(DEVICES)}
    assert everything["edgefleet_metrics_per_device_omitted_devices"] == [({}, 0)]
    assert everything["edgefleet_metrics_per_device_limit"] == [({}, float("inf"))]
    check_fleet_and_class_series(everything)


def test_the_serve_flag_parses_counts_off_and_all_and_says_what_is_wrong() -> None:
    assert [parse_per_device_cap(v) for v in ("500", "0", "off", "ALL")] == [500, 0, 0, None]
    for bad in ("-1", "lots", "1e3", ""):
        with pytest.raises(ValueError, match=r"is not a device count, 'off' or 'all'; e\.g\."):
            parse_per_device_cap(bad)
    option = next(p for p in controller_serve.params if p.name == "metrics_per_device")
    assert isinstance(option, click.Option) and option.default == str(DEFAULT_PER_DEVICE_CAP)
