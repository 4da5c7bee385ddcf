"""Controller-side telemetry: validation, de-duplication, group commit, rollups and queries."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from edgefleet.common import latency
from edgefleet.controller.store.sqlite import SQLiteStore
from edgefleet.controller.telemetry import histograms
from edgefleet.controller.telemetry import ingest as telemetry
from edgefleet.protos.v1 import fleet_pb2

NOW_MS = 1_800_000_000_000


def batch(
    seq: int, end_ms: int = NOW_MS, count: int = 10, value_s: float = 0.004, **power: float
) -> fleet_pb2.TelemetryBatch:
    h = latency.new_histogram()
    for _ in range(count):
        latency.record_seconds(h, value_s)
    b = fleet_pb2.TelemetryBatch(seq=seq, start_unix_ms=end_ms - 5000, end_unix_ms=end_ms)
    b.models.add(
        model="det",
        version="3",
        count=count,
        latency=latency.to_proto(h),
        energy_per_inference_mj=2.0,
        energy_source="measured:rapl",
    )
    b.power.watts = power.get("watts", 7.5)
    b.power.source = "measured:rapl"
    b.device.cpu_percent_system = 40
    return b


@pytest.fixture
def ingest(tmp_path: Path):  # type: ignore[no-untyped-def]
    store = SQLiteStore(tmp_path / "c.db")
    registry = CollectorRegistry()
    service = telemetry.TelemetryIngest(
        store, telemetry.TelemetryMetrics(registry), known_device=lambda d: d != "ghost", clock=lambda: NOW_MS / 1000
    )
    yield service, store, registry
    store.close()


def run(
    service: telemetry.TelemetryIngest, items: list[tuple[str, fleet_pb2.TelemetryBatch]]
) -> list[fleet_pb2.TelemetryAck]:
    acks: list[fleet_pb2.TelemetryAck] = []
    for device, b in items:
        service.submit(device, b, acks.append)
    asyncio.run(service.flush())
    return acks


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_duplicates_are_acked_but_stored_once(ingest) -> None:  # type: ignore[no-untyped-def]
    service, store, registry = ingest
    acks = run(service, [("d1", batch(1)), ("d1", batch(2)), ("d1", batch(1)), ("d2", batch(1))])
    assert sorted(s for a in acks for s in a.seqs) == [1, 1, 1, 2]
    acks = run(service, [("d1", batch(2))])
    assert list(acks[0].seqs) == [2]
    assert [p.seq for p in store.telemetry_window("d1", 0)] == [1, 2]
    assert value(registry, "edgefleet_telemetry_batches_total", result="stored") == 3
    assert value(registry, "edgefleet_telemetry_batches_total", result="duplicate") == 2


def test_groups_are_written_on_the_loop_unless_another_writer_holds_the_store(ingest, tmp_path) -> None:  # type: ignore[no-untyped-def]
    service, store, registry = ingest
    run(service, [("d1", batch(1))])
    assert value(registry, "edgefleet_telemetry_group_writes_total", path="loop") == 1
    other = SQLiteStore(tmp_path / "c.db")  # another worker process, mid-write

    async def write_while_held() -> list[fleet_pb2.TelemetryAck]:
        acks: list[fleet_pb2.TelemetryAck] = []
        service.submit("d1", batch(2), acks.append)
        with other._tx():
            flush = asyncio.ensure_future(service.flush())
            await asyncio.sleep(0.2)
            assert acks == []  # waiting for the lock, in a thread: the loop goes on
        await flush
        return acks

    acks = asyncio.run(write_while_held())
    assert [list(a.seqs) for a in acks] == [[2]]
    assert value(registry, "edgefleet_telemetry_group_writes_total", path="thread") == 1
    assert [p.seq for p in store.telemetry_window("d1", 0)] == [1, 2]
    other.close()


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda b: setattr(b.power, "watts", math.nan), "not_finite"),
        (lambda b: setattr(b.device, "cpu_percent_system", math.inf), "not_finite"),
        (lambda b: setattr(b, "end_unix_ms", NOW_MS + 3_600_000), "future_timestamp"),
        (
            lambda b: (
                setattr(b, "end_unix_ms", NOW_MS - 30 * 86_400_000),
                setattr(b, "start_unix_ms", NOW_MS - 30 * 86_400_000 - 5000),
            ),
            "stale_timestamp",
        ),
        (lambda b: setattr(b, "start_unix_ms", b.end_unix_ms + 1), "bad_timestamp"),
        (lambda b: setattr(b, "seq", 0), "missing_seq"),
        (lambda b: b.models[0].latency.__setattr__("hdr", b"not a histogram"), "bad_histogram"),
        (lambda b: [b.models.add(model=f"m{i}") for i in range(40)], "oversized"),
    ],
)
def test_bad_batches_are_rejected_with_a_counter_and_never_stored(ingest, mutate, reason) -> None:  # type: ignore[no-untyped-def]
    service, store, registry = ingest
    bad = batch(5)
    mutate(bad)
    acks = run(service, [("d1", bad)])
    assert len(acks[0].rejected) == 1 and not acks[0].seqs
    assert value(registry, "edgefleet_telemetry_rejected_batches_total", reason=reason) == 1
    assert store.telemetry_window("d1", 0) == []
    run(service, [("d1", batch(6))])
    assert [p.seq for p in store.telemetry_window("d1", 0)] == [6]


def test_unknown_devices_and_negative_watts(ingest) -> None:  # type: ignore[no-untyped-def]
    service, store, registry = ingest
    acks = run(service, [("ghost", batch(1)), ("d1", batch(1, watts=-3.0))])
    assert acks[0].rejected[0].reason.startswith("device 'ghost' is not enrolled")
    assert store.telemetry_window("d1", 0)[0].watts == 0.0
    assert value(registry, "edgefleet_telemetry_clamped_values_total", reason="negative_watts") == 1
    assert value(registry, "edgefleet_telemetry_rejected_batches_total", reason="unknown_device") == 1


def test_percentiles_are_recomputed_from_the_histogram_not_trusted(ingest) -> None:  # type: ignore[no-untyped-def]
    service, store, _ = ingest
    lying = batch(1, value_s=0.004)
    lying.models[0].latency.p95_ms = 0.001
    run(service, [("d1", lying)])
    assert store.telemetry_window("d1", 0)[0].models[0].p95_ms == pytest.approx(4.0, rel=0.02)


def test_the_periodic_rollup_waits_for_its_minute_to_close(ingest) -> None:  # type: ignore[no-untyped-def]
    service, store, _ = ingest
    minute = NOW_MS - NOW_MS % 60_000
    run(service, [("d1", batch(1, minute - 30_000)), ("d1", batch(2, minute + 5_000))])
    # The minute before is closed; the current one gains points every few seconds, so it waits.
    assert telemetry.compute_rollups(store, closed_before_ms=minute + 20_000) == 1
    assert [r.minute_ms for r in store.rollups("d1", 0) if r.model == ""] == [minute - 60_000]
    assert telemetry.compute_rollups(store, closed_before_ms=minute + 59_999) == 0
    assert telemetry.compute_rollups(store, closed_before_ms=minute + 60_000) == 1
    assert [r.minute_ms for r in store.rollups("d1", 0) if r.model == ""] == [minute - 60_000, minute]


def test_rollups_merge_minutes_and_late_points_rebuild_them(ingest) -> None:  # type: ignore[no-untyped-def]
    service, store, _ = ingest
    minute = NOW_MS - NOW_MS % 60_000 - 60_000
    run(
        service,
        [
            ("d1", batch(1, minute + 5_000, count=10, value_s=0.002)),
            ("d1", batch(2, minute + 10_000, count=30, value_s=0.008)),
        ],
    )
    assert telemetry.compute_rollups(store) == 1
    (device_row, model_row) = store.rollups("d1", 0)
    assert device_row.model == "" and device_row.watts_avg == pytest.approx(7.5)
    assert model_row.count == 40 and model_row.p50_ms == pytest.approx(8.0, rel=0.02)
    # A late batch for the same minute (e.g. drained after an outage) rebuilds that rollup.
    run(service, [("d1", batch(3, minute + 20_000, count=60, value_s=0.002))])
    assert telemetry.compute_rollups(store) == 1
    model_row = store.rollups("d1", 0)[1]
    assert model_row.count == 100 and model_row.p50_ms == pytest.approx(2.0, rel=0.02)
    assert telemetry.compute_rollups(store) == 0
    samples = telemetry.query(store, "d1", "p95_ms", 0, use_rollups=True)
    assert len(samples) == 1 and samples[0].value == pytest.approx(8.0, rel=0.02)
    raw = telemetry.query(store, "d1", "throughput", 0)
    assert [s.value for s in raw] == [pytest.approx(2.0), pytest.approx(6.0), pytest.approx(12.0)]
    with pytest.raises(ValueError, match="unknown metric"):
        telemetry.query(store, "d1", "bogus", 0)


def test_pruned_sequences_stay_duplicates(ingest) -> None:  # type: ignore[no-untyped-def]
    service, store, _ = ingest
    run(service, [("d1", batch(1, NOW_MS - 100_000)), ("d1", batch(2, NOW_MS))])
    assert store.prune_telemetry(NOW_MS - 50_000, 0) == 1
    acks = run(service, [("d1", batch(1, NOW_MS - 100_000))])
    assert list(acks[0].seqs) == [1]
    assert [p.seq for p in store.telemetry_window("d1", 0)] == [2]


def test_metrics_can_be_scraped_while_telemetry_arrives(ingest) -> None:  # type: ignore[no-untyped-def]
    import threading

    from edgefleet.controller.telemetry.metrics import TelemetryCollector

    service, store, _ = ingest
    live = telemetry.LiveTelemetry()
    run(service, [("d1", batch(1))])
    point = store.telemetry_window("d1", 0)[0]
    counts = [histograms.decode(m.latency_hdr) for m in point.models]
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            live(point, counts)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        for _ in range(200):
            families = {f.name: f for f in TelemetryCollector(live).collect()}
            assert "edgefleet_inference_latency_seconds" in families
    finally:
        stop.set()
        feeder.join()
