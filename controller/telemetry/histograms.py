"""Latency histograms at the controller, as numpy arrays of bucket counts.

Agents send HdrHistograms (``edgefleet.common.latency``: microseconds, 1 us to 10 min, 2
significant digits). The controller decodes every batch's histogram once, then works on its
bucket counts: percentiles for the stored point, the fleet-wide sums behind /metrics, and the
per-minute merges of the rollups. hdrh does the decoding and encoding (its C codec); what it
does in Python per bucket (building a histogram object, adding, walking buckets for
percentiles and Prometheus bounds) is done here on whole arrays, which made it most of the
controller's CPU per batch at fleet scale.

Every array here has the standard layout: index i counts values between LOWEST[i] and
HIGHEST[i] (inclusive), exactly hdrh's buckets for the agents' histogram settings.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from hdrh.codec import HdrHistogramEncoder
from hdrh.histogram import HdrHistogram

from edgefleet.common import latency
from edgefleet.protos.v1 import fleet_pb2

_STANDARD = latency.new_histogram()
STANDARD_SETTINGS = (latency.LOWEST_US, latency.HIGHEST_US, latency.SIGNIFICANT_DIGITS)
COUNTS_LEN: int = _STANDARD.counts_len
LOWEST = np.array([_STANDARD.get_value_from_index(i) for i in range(COUNTS_LEN)], dtype=np.int64)
HIGHEST = np.array([_STANDARD.get_highest_equivalent_value(int(v)) for v in LOWEST], dtype=np.int64)
MEDIAN = np.array([_STANDARD._hdr_median_equiv_value(int(v)) for v in LOWEST], dtype=np.float64)
# A batch covers seconds of one device; anything near this is a forged or corrupted count.
MAX_COUNT = 1 << 48


def empty() -> np.ndarray:
    return np.zeros(COUNTS_LEN, dtype=np.int64)


def decode(hdr: bytes) -> np.ndarray:
    """Bucket counts of an encoded histogram (standard layout); ValueError for anything undecodable.

    A histogram recorded with other settings is re-bucketed into the standard layout by hdrh."""
    if not hdr:
        return empty()
    try:
        payload = HdrHistogramEncoder.decode(hdr)
        header = payload.payload
        settings = (header.lowest_trackable_value, header.highest_trackable_value, header.significant_figures)
        if settings == STANDARD_SETTINGS:
            payload.init_counts(COUNTS_LEN)
            raw = payload.get_counts()
        else:
            other = HdrHistogram(*settings, hdr_payload=payload)
            standard = latency.new_histogram()
            standard.add(other)
            raw = standard.counts
    except Exception as exc:  # the codec raises assorted zlib/struct/base64/ctypes errors
        raise ValueError(f"undecodable latency histogram: {exc}") from None
    counts = np.ctypeslib.as_array(raw)[:COUNTS_LEN]  # unsigned 64-bit, as hdrh decodes them
    if counts.size != COUNTS_LEN or int(counts.max(initial=0)) > MAX_COUNT:
        raise ValueError("latency histogram holds impossible bucket counts")
    return counts.view(np.int64)  # every count is below 2**48: the same numbers, signed


def merge(blobs: Iterable[bytes]) -> np.ndarray:
    """The bucket counts of several encoded histograms added together."""
    merged = empty()
    for blob in blobs:
        if blob:
            merged += decode(blob)
    return merged


def summary(counts: np.ndarray, hdr: bytes) -> fleet_pb2.LatencyHistogram:
    """Count, p50/p95/p99 and max, as hdrh computes them (upper edge of the bucket reached)."""
    cumulative = np.cumsum(counts)
    total = int(cumulative[-1])
    if total == 0:
        return fleet_pb2.LatencyHistogram()
    # The first index where the running count reaches the whole count is the last non-empty bucket.
    targets = [max(1, int(p * total / 100 + 0.5)) for p in (50, 95, 99)] + [total]
    p50, p95, p99, top = HIGHEST[np.searchsorted(cumulative, targets, side="left")].tolist()
    return fleet_pb2.LatencyHistogram(hdr=hdr, count=total, p50_ms=p50 / 1000, p95_ms=p95 / 1000,
                                      p99_ms=p99 / 1000, max_ms=top / 1000)


def encode(counts: np.ndarray) -> bytes:
    """The hdrh encoding of these counts (what agents send and rollups store)."""
    histogram = latency.new_histogram()
    nonzero = np.flatnonzero(counts)
    if nonzero.size:
        np.ctypeslib.as_array(histogram.counts)[:COUNTS_LEN] = counts
        histogram.set_internal_tacking_values(int(nonzero[0]), int(nonzero[-1]), int(counts.sum()))
    return bytes(histogram.encode())


def to_proto(counts: np.ndarray) -> fleet_pb2.LatencyHistogram:
    return summary(counts, encode(counts))


def at_or_below(counts: np.ndarray, limits_us: list[int]) -> list[int]:
    """Cumulative counts for Prometheus-style buckets: values whose bucket lies at or below each limit."""
    cumulative = np.concatenate(([0], np.cumsum(counts)))
    return [int(cumulative[np.searchsorted(HIGHEST, limit, side="right")]) for limit in limits_us]


def mean_us(counts: np.ndarray) -> float:
    """hdrh's mean: every count taken at the middle of its bucket."""
    total = int(counts.sum())
    return float(counts @ MEDIAN) / total if total else 0.0
