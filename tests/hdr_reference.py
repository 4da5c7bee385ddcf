"""Reference readings of latency histograms done by hdrh itself (its Python decoder and bucket
walk), for tests to hold `edgefleet.controller.telemetry.histograms` and `edgefleet.common.latency` to.
Nothing in the product uses these: the controller works on numpy bucket counts instead."""

from __future__ import annotations

from hdrh.histogram import HdrHistogram

from edgefleet.common import latency
from edgefleet.protos.v1 import fleet_pb2


def decode(message: fleet_pb2.LatencyHistogram) -> HdrHistogram:
    """The sender's histogram as sent (raises ValueError on garbage); empty gives an empty one."""
    if not message.hdr:
        return latency.new_histogram()
    try:
        return HdrHistogram.decode(message.hdr)
    except Exception as exc:  # the decoder raises assorted zlib/struct/base64 errors
        raise ValueError(f"undecodable latency histogram: {exc}") from None


def from_proto(message: fleet_pb2.LatencyHistogram) -> HdrHistogram:
    """Decode into the agents' standard range, ready to be added to."""
    histogram = latency.new_histogram()
    histogram.add(decode(message))
    return histogram


def count_at_or_below(histogram: HdrHistogram, limits_us: list[int]) -> list[int]:
    """Cumulative counts for Prometheus-style buckets (value <= limit), by hdrh's own iterator."""
    counts = [0] * len(limits_us)
    for item in histogram.get_recorded_iterator():
        value = histogram.get_highest_equivalent_value(item.value_iterated_to)
        for i, limit in enumerate(limits_us):
            if value <= limit:
                counts[i] += item.count_at_value_iterated_to
    return counts
