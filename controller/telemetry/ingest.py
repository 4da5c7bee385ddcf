"""Telemetry at the controller: validate, de-duplicate, store, roll up, and expose.

Transport-agnostic: the gRPC Session (and the MQTT consumer) hand batches to
`TelemetryIngest.submit` with a callback for the ack. Batches are written in groups (one
transaction per group, every `flush_interval_s` or `max_group` batches) and acked only once
stored, so an agent deletes a batch only after it is durable here.

Bad telemetry never corrupts the store: NaN or infinite numbers, timestamps far in the
future or past, oversized batches, undecodable histograms and unknown devices are rejected;
negative watts are clamped to 0. Each outcome has a Prometheus counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from edgefleet.controller.store.base import ModelPoint, Rollup, Store, TelemetryPoint
from edgefleet.controller.telemetry import histograms
from edgefleet.protos.v1 import fleet_pb2

log = logging.getLogger("edgefleet.controller.telemetry.ingest")

MAX_BATCH_BYTES = 64 * 1024
MAX_MODELS_PER_BATCH = 32
MAX_FUTURE_S = 300
MAX_AGE_S = 7 * 24 * 3600
MINUTE_MS = 60_000

Ack = Callable[[fleet_pb2.TelemetryAck], None]


class Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclasses.dataclass
class _Pending:
    device_id: str
    point: TelemetryPoint
    counts: list[np.ndarray]  # each model's latency bucket counts, decoded once for the listeners
    ack: Ack


Listener = Callable[[TelemetryPoint, "list[np.ndarray]"], None]


class TelemetryMetrics:
    """Ingest counters, in the controller's own registry (so two controllers in one process don't clash)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batches = Counter("edgefleet_telemetry_batches", "Telemetry batches by outcome",
                               ["result"], registry=registry)
        self.rejected = Counter("edgefleet_telemetry_rejected_batches", "Telemetry batches rejected, by reason",
                                ["reason"], registry=registry)
        self.clamped = Counter("edgefleet_telemetry_clamped_values", "Telemetry values clamped, by reason",
                               ["reason"], registry=registry)
        self.agent_dropped = Counter("edgefleet_telemetry_agent_dropped_batches",
                                     "Batches agents dropped from full offline queues", registry=registry)
        self.lag = Histogram("edgefleet_telemetry_ingest_lag_seconds", "Batch end to durable storage",
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600), registry=registry)
        self.group_writes = Counter(
            "edgefleet_telemetry_group_writes",
            "Telemetry group writes by where they ran: on the event loop, or in a thread when another "
            "writer held the store", ["path"], registry=registry)


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def convert(device_id: str, batch: fleet_pb2.TelemetryBatch, now_ms: int,
            clamp: Callable[[str], None]) -> tuple[TelemetryPoint, list[np.ndarray]]:
    """Validate a batch and convert it, with each model's decoded latency bucket counts; raises
    Rejected. Percentiles are recomputed from the histogram."""
    size = batch.ByteSize()
    if size > MAX_BATCH_BYTES:
        raise Rejected("oversized", f"batch is {size} bytes; at most {MAX_BATCH_BYTES}")
    if len(batch.models) > MAX_MODELS_PER_BATCH:
        raise Rejected("oversized", f"batch has {len(batch.models)} models; at most {MAX_MODELS_PER_BATCH}")
    if batch.seq == 0:
        raise Rejected("missing_seq", "field 'seq' must be >= 1")
    if batch.end_unix_ms < batch.start_unix_ms:
        raise Rejected("bad_timestamp", "field 'end_unix_ms' is before 'start_unix_ms'")
    if batch.end_unix_ms > now_ms + MAX_FUTURE_S * 1000:
        raise Rejected("future_timestamp", f"batch ends {(batch.end_unix_ms - now_ms) / 1000:.0f}s in the future")
    if batch.end_unix_ms < now_ms - MAX_AGE_S * 1000:
        raise Rejected("stale_timestamp", "batch is older than the telemetry horizon")
    d, p = batch.device, batch.power
    temperature = d.temperature_c if d.HasField("temperature_c") else None
    if not _finite(d.cpu_percent_system, d.cpu_percent_process, d.load1, p.watts, p.idle_watts,
                   temperature if temperature is not None else 0.0):
        raise Rejected("not_finite", "device or power fields hold NaN or infinity")
    watts = p.watts
    if watts < 0:
        clamp("negative_watts")
        watts = 0.0
    models, counts = [], []
    for m in batch.models:
        if not _finite(m.energy_per_inference_mj):
            raise Rejected("not_finite", f"model {m.model!r}: energy_per_inference_mj is not finite")
        try:
            # The sender's encoding is kept as stored; only the percentiles are recomputed, so a
            # batch cannot claim latencies its own histogram does not show.
            buckets = histograms.decode(m.latency.hdr)
            summary = histograms.summary(buckets, m.latency.hdr)
        except ValueError as exc:
            raise Rejected("bad_histogram", f"model {m.model!r}: {exc}") from None
        energy = m.energy_per_inference_mj
        if energy < 0:
            clamp("negative_energy")
            energy = 0.0
        counts.append(buckets)
        models.append(ModelPoint(
            model=m.model[:128], version=m.version[:64], count=m.count, errors=m.errors,
            p50_ms=summary.p50_ms, p95_ms=summary.p95_ms, p99_ms=summary.p99_ms, max_ms=summary.max_ms,
            latency_hdr=summary.hdr, energy_mj=energy, energy_source=m.energy_source[:64], runtime=m.runtime[:128],
        ))
    point = TelemetryPoint(
        device_id=device_id, seq=batch.seq, start_ms=batch.start_unix_ms, end_ms=batch.end_unix_ms,
        received_ms=now_ms, watts=watts, power_source=p.source[:64],
        cpu_system=min(100.0, max(0.0, d.cpu_percent_system)), cpu_process=max(0.0, d.cpu_percent_process),
        rss_bytes=d.rss_bytes, memory_available_bytes=d.memory_available_bytes, temperature_c=temperature,
        load1=max(0.0, d.load1), dropped_batches=batch.dropped_batches, models=tuple(models),
    )
    return point, counts


class TelemetryIngest:
    def __init__(
        self,
        store: Store,
        metrics: TelemetryMetrics,
        *,
        known_device: Callable[[str], bool] | None = None,
        flush_interval_s: float = 0.05,
        max_group: int = 2000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.known_device = known_device
        self.flush_interval_s = flush_interval_s
        self.max_group = max_group
        self.clock = clock
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        self._closing = False
        self.listeners: list[Listener] = []

    def _clamped(self, reason: str) -> None:
        self.metrics.clamped.labels(reason).inc()

    def submit(self, device_id: str, batch: fleet_pb2.TelemetryBatch, ack: Ack) -> None:
        now_ms = int(self.clock() * 1000)
        try:
            if self.known_device is not None and not self.known_device(device_id):
                raise Rejected("unknown_device", f"device {device_id!r} is not enrolled")
            point, counts = convert(device_id, batch, now_ms, self._clamped)
        except Rejected as exc:
            self.metrics.batches.labels("rejected").inc()
            self.metrics.rejected.labels(exc.reason).inc()
            log.warning("telemetry rejected", extra={"device": device_id, "seq": batch.seq, "reason": exc.reason,
                                                      "detail": str(exc)})
            ack(fleet_pb2.TelemetryAck(rejected=[fleet_pb2.RejectedBatch(seq=batch.seq, reason=str(exc))]))
            return
        self._queue.append(_Pending(device_id, point, counts, ack))
        if len(self._queue) >= self.max_group:
            self._wake.set()

    async def run(self) -> None:
        """Write groups until `close`; then write what is queued and return.

        Stopping is asked for, not forced by cancellation: a cancelled `to_thread` write goes on in
        its thread, unseen, while the controller closes the store under it, and its acks are lost."""
        while not self._closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.flush_interval_s)
            self._wake.clear()
            await self.flush()

    def close(self) -> None:
        """`run` ends after one more flush. Batches submitted later wait for an explicit `flush`."""
        self._closing = True
        self._wake.set()

    async def flush(self) -> None:
        while self._queue:
            group, self._queue = self._queue[: self.max_group], self._queue[self.max_group:]
            points = [p.point for p in group]
            try:
                # On the loop when no other writer holds the store (about 1 ms per 100 points): in a
                # thread, the write waited for the GIL at each release while the loop was busy, up
                # to seconds per group, holding the store's write lock all that time.
                stored = self.store.ingest_telemetry_now(points)
                if stored is None:
                    self.metrics.group_writes.labels("thread").inc()
                    stored = await asyncio.to_thread(self.store.ingest_telemetry, points)
                else:
                    self.metrics.group_writes.labels("loop").inc()
            except Exception:
                log.exception("telemetry write failed; batches stay un-acked and will be resent")
                return
            self._after_store(group, stored)

    def _after_store(self, group: list[_Pending], stored: list[bool]) -> None:
        now = self.clock()
        acks: dict[int, tuple[Ack, list[int]]] = {}
        stored_count = duplicates = 0
        for pending, new in zip(group, stored, strict=True):
            acks.setdefault(id(pending.ack), (pending.ack, []))[1].append(pending.point.seq)
            if new:
                stored_count += 1
                self.metrics.lag.observe(max(0.0, now - pending.point.end_ms / 1000))
                if pending.point.dropped_batches:
                    self.metrics.agent_dropped.inc(pending.point.dropped_batches)
                for listener in self.listeners:
                    listener(pending.point, pending.counts)
            else:
                duplicates += 1
        self.metrics.batches.labels("stored").inc(stored_count)
        self.metrics.batches.labels("duplicate").inc(duplicates)
        for ack, seqs in acks.values():
            ack(fleet_pb2.TelemetryAck(seqs=seqs))


def build_rollups(device_id: str, minute_ms: int, points: list[TelemetryPoint]) -> list[Rollup]:
    """One rollup per model version in the minute, plus a device-level one (model '')."""
    by_model: dict[tuple[str, str], list[ModelPoint]] = {}
    for point in points:
        for m in point.models:
            by_model.setdefault((m.model, m.version), []).append(m)
    watts_avg = sum(p.watts for p in points) / len(points) if points else 0.0
    rollups = [Rollup(device_id, "", "", minute_ms, 0, 0, b"", 0, 0, 0, 0, watts_avg, 0.0)] if points else []
    for (model, version), rows in sorted(by_model.items()):
        summary = histograms.to_proto(histograms.merge(r.latency_hdr for r in rows))
        count = sum(r.count for r in rows)
        energy = sum(r.energy_mj * r.count for r in rows) / count if count else 0.0
        rollups.append(Rollup(
            device_id, model, version, minute_ms, count, sum(r.errors for r in rows), summary.hdr,
            summary.p50_ms, summary.p95_ms, summary.p99_ms, summary.max_ms, watts_avg, energy,
        ))
    return rollups


def compute_rollups(store: Store, limit: int = 500, *, closed_before_ms: int | None = None) -> int:
    """Rebuild the rollups of every minute that gained raw points; idempotent, so replicas may race.

    `closed_before_ms`: only minutes that ended by then (None: every dirty minute, the open one
    too). The periodic job passes now less ROLLUP_GRACE_S: a minute still open gains a point every
    few seconds per device, and rebuilding it on every pass re-read and re-merged all of its points
    each time (27% of a worker's CPU at 6,000 devices, bench_ingest). A point arriving after its
    minute was built marks it again, and the next pass rebuilds it."""
    done = 0
    max_minute_ms = None if closed_before_ms is None else closed_before_ms - MINUTE_MS
    while True:
        dirty = store.dirty_rollups(limit, max_minute_ms=max_minute_ms)
        if not dirty:
            return done
        rollups: list[Rollup] = []
        for device_id, minute_ms, _ in dirty:
            points = store.telemetry_window(device_id, minute_ms, minute_ms + MINUTE_MS)
            rollups += build_rollups(device_id, minute_ms, points)
        store.write_rollups(rollups, dirty)
        done += len(dirty)
        if len(dirty) < limit:
            return done


METRICS = ("p50_ms", "p95_ms", "p99_ms", "max_ms", "count", "errors", "error_rate", "throughput",
           "energy_mj", "watts", "cpu_percent", "rss_bytes", "temperature_c", "memory_available_bytes")


def metric_value(point: TelemetryPoint, metric: str, model: str | None = None) -> float | None:
    """One metric of one stored point (models merged when no model is named)."""
    models = [m for m in point.models if model is None or m.model == model]
    device_level: dict[str, Any] = {
        "watts": point.watts, "cpu_percent": point.cpu_system, "rss_bytes": point.rss_bytes,
        "temperature_c": point.temperature_c, "memory_available_bytes": point.memory_available_bytes,
    }
    if metric in device_level:
        value = device_level[metric]
        return None if value is None else float(value)
    if not models:
        return None
    count = sum(m.count for m in models)
    errors = sum(m.errors for m in models)
    if metric == "count":
        return float(count)
    if metric == "errors":
        return float(errors)
    if metric == "error_rate":
        return errors / (count + errors) if count + errors else 0.0
    if metric == "throughput":
        return count / max(1e-3, (point.end_ms - point.start_ms) / 1000)
    if metric == "energy_mj":
        return sum(m.energy_mj * m.count for m in models) / count if count else None
    if metric in ("p50_ms", "p95_ms", "p99_ms", "max_ms"):
        if len(models) == 1:
            return float(getattr(models[0], metric))
        summary = histograms.to_proto(histograms.merge(m.latency_hdr for m in models))
        return float(getattr(summary, metric))
    raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LiveTelemetry:
    """In-memory view fed by the ingest: the latest point per device and cumulative fleet
    histograms (bucket counts) per model version, for /metrics and the live watch."""

    def __init__(self) -> None:
        self.latest: dict[str, TelemetryPoint] = {}
        self.fleet: dict[tuple[str, str], np.ndarray] = {}
        self.totals: dict[tuple[str, str, str], tuple[int, int]] = {}  # (device, model, version) -> count, errors
        # Ingest adds on the event loop while /metrics reads on the HTTP thread.
        self.lock = threading.Lock()

    def __call__(self, point: TelemetryPoint, counts: list[np.ndarray]) -> None:
        with self.lock:
            self._add(point, counts)

    def _add(self, point: TelemetryPoint, counts: list[np.ndarray]) -> None:
        current = self.latest.get(point.device_id)
        if current is None or point.end_ms >= current.end_ms:
            self.latest[point.device_id] = point
        for m, buckets in zip(point.models, counts, strict=True):
            key = (m.model, m.version)
            fleet = self.fleet.get(key)
            if fleet is None:
                self.fleet[key] = buckets.copy()
            else:
                fleet += buckets
            count, errors = self.totals.get((point.device_id, m.model, m.version), (0, 0))
            self.totals[(point.device_id, m.model, m.version)] = (count + m.count, errors + m.errors)

    def snapshot(self) -> tuple[dict[str, TelemetryPoint], dict[tuple[str, str], np.ndarray],
                                dict[tuple[str, str, str], tuple[int, int]]]:
        """Copies to read at leisure: the ingest waits on the lock only while they are taken."""
        with self.lock:
            return dict(self.latest), {k: v.copy() for k, v in self.fleet.items()}, dict(self.totals)


@dataclasses.dataclass(frozen=True)
class Sample:
    unix_ms: int
    value: float
    seq: int = 0
    source: str = ""


def query(store: Store, device_id: str, metric: str, since_ms: int, model: str | None = None,
          use_rollups: bool = False) -> list[Sample]:
    """A metric's time series for one device, from raw batches or 1-minute rollups."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if use_rollups:
        return _rollup_samples(store.rollups(device_id, since_ms), metric, model)
    samples = []
    for point in store.telemetry_window(device_id, since_ms):
        value = metric_value(point, metric, model)
        if value is None:
            continue
        source = ""
        if metric == "watts":
            source = point.power_source
        elif metric == "energy_mj":
            source = ",".join(sorted({m.energy_source for m in point.models if model in (None, m.model)}))
        samples.append(Sample(point.end_ms, value, point.seq, source))
    return samples


def _rollup_samples(rollups: list[Rollup], metric: str, model: str | None) -> list[Sample]:
    by_minute: dict[int, list[Rollup]] = {}
    for r in rollups:
        by_minute.setdefault(r.minute_ms, []).append(r)
    samples = []
    for minute, rows in sorted(by_minute.items()):
        device_row = next((r for r in rows if r.model == ""), None)
        models = [r for r in rows if r.model and model in (None, r.model)]
        count = sum(r.count for r in models)
        errors = sum(r.errors for r in models)
        value: float | None
        if metric == "watts":
            value = device_row.watts_avg if device_row else None
        elif metric in ("p50_ms", "p95_ms", "p99_ms", "max_ms"):
            value = float(getattr(histograms.to_proto(histograms.merge(r.latency_hdr for r in models)), metric)) \
                if models else None
        elif metric == "count":
            value = float(count) if models else None
        elif metric == "errors":
            value = float(errors) if models else None
        elif metric == "error_rate":
            value = errors / (count + errors) if count + errors else None
        elif metric == "throughput":
            value = count / 60.0 if models else None
        elif metric == "energy_mj":
            value = sum(r.energy_mj_avg * r.count for r in models) / count if count else None
        else:
            raise ValueError(f"metric {metric!r} is kept in raw batches only; drop --rollups")
        if value is not None:
            samples.append(Sample(minute, value))
    return samples
