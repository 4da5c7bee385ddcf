"""Agent-side telemetry: histograms, the on-disk outbox, and the cut into batches."""

from __future__ import annotations

from pathlib import Path

import hdr_reference
import numpy as np
import pytest

from edgefleet.agent.device_stats import DeviceSampler
from edgefleet.agent.outbox import TelemetryOutbox
from edgefleet.agent.power import PowerMeter, PowerModel
from edgefleet.agent.telemetry import TelemetryCollector
from edgefleet.common import latency
from edgefleet.protos.v1 import fleet_pb2


def test_histograms_merge_exactly_and_percentiles_hold() -> None:
    rng = np.random.default_rng(0)
    a_values = rng.lognormal(0, 0.5, 5000) / 1000  # seconds, around 1 ms
    b_values = rng.lognormal(1, 0.3, 3000) / 1000
    a, b = latency.new_histogram(), latency.new_histogram()
    for v in a_values:
        latency.record_seconds(a, v)
    for v in b_values:
        latency.record_seconds(b, v)
    merged = hdr_reference.from_proto(latency.to_proto(a))
    merged.add(hdr_reference.from_proto(latency.to_proto(b)))
    assert merged.get_total_count() == 8000
    truth = np.percentile(np.concatenate([a_values, b_values]) * 1000, 95)
    assert latency.to_proto(merged).p95_ms == pytest.approx(truth, rel=0.02)  # 2 significant digits
    with pytest.raises(ValueError, match="undecodable"):
        hdr_reference.from_proto(fleet_pb2.LatencyHistogram(hdr=b"garbage"))
    limits = [500, 1000, 2000, 10_000_000]
    cumulative = hdr_reference.count_at_or_below(merged, limits)
    assert cumulative == sorted(cumulative) and cumulative[-1] == 8000


def test_percentiles_match_the_library_scan() -> None:
    """latency.percentile_values (numpy) gives exactly what hdrh's own Python scan gives."""
    rng = np.random.default_rng(7)
    percentiles = (0, 1, 50, 95, 99, 99.9, 100)
    for _ in range(60):
        histogram = latency.new_histogram()
        spread = float(rng.uniform(0.05, 2.0))
        for value in rng.lognormal(np.log(10 ** rng.uniform(-5, 2)), spread, int(rng.integers(1, 1500))):
            latency.record_seconds(histogram, float(value))
        for h in (histogram, hdr_reference.decode(latency.to_proto(histogram))):  # live and as decoded from the wire
            assert latency.percentile_values(h, percentiles) == h.get_percentile_to_value_dict(list(percentiles))


def test_histogram_whose_counts_do_not_add_up_is_refused() -> None:
    histogram = latency.new_histogram()
    latency.record_seconds(histogram, 0.002)
    histogram.total_count = 5  # what a forged header would claim
    with pytest.raises(ValueError, match="do not add up"):
        latency.percentile_values(histogram, (99,))


def test_outbox_assigns_persistent_seqs_caps_and_reports_drops(tmp_path: Path) -> None:
    box = TelemetryOutbox(tmp_path / "q.db", cap=3)
    appended = [box.append(fleet_pb2.TelemetryBatch()) for _ in range(5)]
    assert [b.seq for b in appended] == [1, 2, 3, 4, 5]
    assert [b.dropped_batches for b in appended] == [0, 0, 0, 0, 1]  # 1 went when 4 came; reported by 5
    assert [b.seq for b in box.pending()] == [3, 4, 5] and box.dropped_total == 2
    box.close()
    again = TelemetryOutbox(tmp_path / "q.db", cap=3)  # the counters survive a restart
    for _ in range(3):
        again.append(fleet_pb2.TelemetryBatch())
    # 5 (which carried one drop) was dropped too: its count is passed on, so none is ever lost.
    remaining = again.pending()
    assert [b.seq for b in remaining] == [6, 7, 8] and again.dropped_total == 5
    again.ack([6, 7, 8])
    last = again.append(fleet_pb2.TelemetryBatch())
    assert last.seq == 9
    # Every dropped sequence number (1-5) is reported exactly once by the batches that reach the controller.
    assert sum(b.dropped_batches for b in [*remaining, last]) == 5
    again.ack([9])
    assert again.pending() == [] and len(again) == 0


def test_collector_cut_separates_queue_and_compute_and_resets(tmp_path: Path) -> None:
    box = TelemetryOutbox(tmp_path / "q.db")
    clock = iter([1000.0, 1002.0, 1004.0]).__next__
    collector = TelemetryCollector(box, PowerMeter([], PowerModel(5, 20)), DeviceSampler(), clock=clock)
    recorder = collector.recorder("det", "3", "onnxruntime:CPUExecutionProvider")
    for _ in range(50):
        recorder.record(0.012, 0.010, 0.002)
    recorder.record_error()
    batch = collector.cut()
    assert batch.seq == 1 and batch.end_unix_ms - batch.start_unix_ms == 2000
    (stats,) = batch.models
    assert (stats.count, stats.errors) == (50, 1)
    assert stats.compute.p50_ms == pytest.approx(10, rel=0.02)
    assert stats.queue_wait.p50_ms == pytest.approx(2, rel=0.02)
    assert stats.latency.p99_ms == pytest.approx(12, rel=0.02)
    assert batch.power.source == "estimated:model" and stats.energy_source == "estimated:model"
    assert box.pending()[0] == batch
    assert collector.cut().models == []  # reset after the cut; idle models are not reported
