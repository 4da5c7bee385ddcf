"""/metrics scraped over HTTP while the ingest stores telemetry: no scrape fails.

The WSGI thread formats the live fleet histograms and per-device gauges while the event loop adds
to them. That once failed scrapes with HTTP 500 under load: the fleet histograms were hdrh objects,
which raise when read while they are added to. Since b9065d8 they are numpy bucket arrays, and
`LiveTelemetry.snapshot` copies them (and the per-device dicts) under the lock the ingest adds
under, so a scrape reads data nobody else touches. This test holds that: every batch is from a new
device and a new model version, so every dict grows on every add, while two threads scrape back
to back for the whole time, through the real HTTP server and a real ingest into SQLite.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.common import latency
from edgefleet.controller.api.http_server import HttpApi
from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.store.sqlite import SQLiteStore
from edgefleet.controller.telemetry.ingest import LiveTelemetry, TelemetryIngest, TelemetryMetrics
from edgefleet.protos.v1 import fleet_pb2

INGEST_S = 2.0


def batch(seq: int, version: int) -> fleet_pb2.TelemetryBatch:
    h = latency.new_histogram()
    for value in (0.002, 0.004, 0.008):
        latency.record_seconds(h, value)
    now = int(time.time() * 1000)
    b = fleet_pb2.TelemetryBatch(seq=seq, start_unix_ms=now - 1000, end_unix_ms=now)
    b.models.add(model="det", version=str(version), count=3, latency=latency.to_proto(h),
                 energy_per_inference_mj=1.0, energy_source="estimated:model")
    b.power.watts, b.power.source = 3.0, "estimated:model"
    return b


def test_scrapes_never_fail_while_telemetry_is_ingested(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "c.db")
    registry = CollectorRegistry()
    live = LiveTelemetry()
    ingest = TelemetryIngest(store, TelemetryMetrics(registry), flush_interval_s=0.001, max_group=50)
    ingest.listeners.append(live)
    http = HttpApi(store, PresenceTracker(store, 5.0), live, registry)
    port = http.start("127.0.0.1", 0)
    stop = threading.Event()
    failures: list[str] = []
    scrapes = 0

    def scrape_loop() -> None:
        nonlocal scrapes
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                    list(text_string_to_metric_families(reply.read().decode()))
                scrapes += 1
            except (urllib.error.URLError, ValueError) as exc:
                failures.append(repr(exc))

    async def feed() -> int:
        writer = asyncio.create_task(ingest.run())
        added = 0
        deadline = time.monotonic() + INGEST_S
        while time.monotonic() < deadline:
            for _ in range(20):
                added += 1
                ingest.submit(f"dev-{added}", batch(1, added), lambda ack: None)
            await asyncio.sleep(0)  # the writer stores a group and the listeners add it
        ingest.close()
        await writer
        return added

    scrapers = [threading.Thread(target=scrape_loop) for _ in range(2)]
    for thread in scrapers:
        thread.start()
    try:
        added = asyncio.run(feed())
    finally:
        stop.set()
        for thread in scrapers:
            thread.join(10)
        http.stop()
        store.close()
    assert not failures, f"{len(failures)} of {scrapes + len(failures)} scrapes failed: {failures[:3]}"
    assert scrapes >= 5 and len(live.latest) == added  # both sides really ran, and the ingest kept up
