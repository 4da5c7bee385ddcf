"""Latency histograms: HdrHistogram in microseconds, exactly mergeable across devices and minutes.

The agent records into one, ships it encoded in every telemetry batch, and the controller
decodes and adds them for rollups, fleet percentiles and the Prometheus histogram.
"""

from __future__ import annotations

from hdrh.histogram import HdrHistogram

from edgefleet.protos.v1 import fleet_pb2

LOWEST_US = 1
HIGHEST_US = 600_000_000  # 10 minutes: anything slower is clamped, not dropped
SIGNIFICANT_DIGITS = 2    # 1% value precision


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def record_seconds(histogram: HdrHistogram, seconds: float) -> None:
    histogram.record_value(min(HIGHEST_US, max(LOWEST_US, round(seconds * 1e6))))


def to_proto(histogram: HdrHistogram) -> fleet_pb2.LatencyHistogram:
    count = histogram.get_total_count()
    if count == 0:
        return fleet_pb2.LatencyHistogram()
    return fleet_pb2.LatencyHistogram(
        hdr=histogram.encode(),
        count=count,
        p50_ms=histogram.get_value_at_percentile(50) / 1000,
        p95_ms=histogram.get_value_at_percentile(95) / 1000,
        p99_ms=histogram.get_value_at_percentile(99) / 1000,
        max_ms=histogram.get_max_value() / 1000,
    )


def from_proto(message: fleet_pb2.LatencyHistogram) -> HdrHistogram:
    """Decode (raises ValueError on garbage); an empty message gives an empty histogram."""
    if not message.hdr:
        return new_histogram()
    try:
        decoded = HdrHistogram.decode(message.hdr)
    except Exception as exc:  # the decoder raises assorted zlib/struct/base64 errors
        raise ValueError(f"undecodable latency histogram: {exc}") from None
    histogram = new_histogram()
    histogram.add(decoded)
    return histogram


def count_at_or_below(histogram: HdrHistogram, limits_us: list[int]) -> list[int]:
    """Cumulative counts for Prometheus-style buckets (value <= limit)."""
    counts = [0] * len(limits_us)
    for item in histogram.get_recorded_iterator():
        value = histogram.get_highest_equivalent_value(item.value_iterated_to)
        for i, limit in enumerate(limits_us):
            if value <= limit:
                counts[i] += item.count_at_value_iterated_to
    return counts
