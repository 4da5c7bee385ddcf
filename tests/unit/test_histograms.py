"""controller/telemetry/histograms.py gives exactly what hdrh gives, on the bucket counts as numpy arrays."""

from __future__ import annotations

import base64

import hdr_reference
import numpy as np
import pytest
from hdrh.histogram import HdrHistogram

from edgefleet.common import latency
from edgefleet.controller.telemetry import histograms
from edgefleet.controller.telemetry.ingest import LATENCY_BUCKETS_S


def random_histograms(count: int, seed: int = 11) -> list[HdrHistogram]:
    rng = np.random.default_rng(seed)
    made = []
    for _ in range(count):
        histogram = latency.new_histogram()
        for value in rng.lognormal(np.log(10 ** rng.uniform(-5, 2)), rng.uniform(0.05, 2.0),
                                   int(rng.integers(1, 1500))):
            latency.record_seconds(histogram, float(value))
        made.append(histogram)
    return made


def library_counts(histogram: HdrHistogram) -> np.ndarray:
    return np.array([histogram.get_count_at_index(i) for i in range(histogram.counts_len)], dtype=np.int64)


def test_decode_summary_and_encode_match_hdrh() -> None:
    limits_us = [round(b * 1e6) for b in LATENCY_BUCKETS_S]
    for histogram in random_histograms(40):
        hdr = histogram.encode()
        counts = histograms.decode(hdr)
        np.testing.assert_array_equal(counts, library_counts(HdrHistogram.decode(hdr)))
        assert histograms.summary(counts, hdr) == latency.summary(hdr_reference.decode(
            latency.to_proto(histogram)), hdr)
        again = HdrHistogram.decode(histograms.encode(counts))
        np.testing.assert_array_equal(library_counts(again), counts)
        assert (again.get_total_count(), again.get_max_value(), again.get_min_value()) == (
            histogram.get_total_count(), histogram.get_max_value(), histogram.get_min_value())
        assert histograms.at_or_below(counts, limits_us) == hdr_reference.count_at_or_below(histogram, limits_us)
        assert histograms.mean_us(counts) == pytest.approx(histogram.get_mean_value(), rel=1e-12)


def test_merged_counts_are_the_library_sum() -> None:
    parts = random_histograms(5, seed=3)
    merged = latency.new_histogram()
    for part in parts:
        merged.add(part)
    total = sum(histograms.decode(part.encode()) for part in parts)
    np.testing.assert_array_equal(total, library_counts(merged))
    assert histograms.to_proto(total) == latency.to_proto(merged)


def test_other_settings_are_rebucketed_into_the_standard_layout() -> None:
    fine = HdrHistogram(1, 3_600_000_000, 3)  # finer buckets, a longer range
    for value in (7, 1234, 99_999, 5_000_000):
        fine.record_value(value)
    counts = histograms.decode(fine.encode())
    assert counts.shape == (histograms.COUNTS_LEN,) and int(counts.sum()) == 4
    standard = latency.new_histogram()
    standard.add(fine)
    np.testing.assert_array_equal(counts, library_counts(standard))


def test_garbage_and_impossible_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="undecodable"):
        histograms.decode(b"not a histogram")
    with pytest.raises(ValueError, match="undecodable"):
        histograms.decode(base64.b64encode(b"\x1c\x84\x93\x14" + b"\0" * 40))
    forged = latency.new_histogram()
    forged.record_value(1000, histograms.MAX_COUNT + 1)
    with pytest.raises(ValueError, match="impossible"):
        histograms.decode(forged.encode())
    assert int(histograms.decode(b"").sum()) == 0
    assert histograms.summary(histograms.empty(), b"") == latency.summary(latency.new_histogram())
