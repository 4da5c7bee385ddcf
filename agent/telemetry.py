"""What the agent measures between two telemetry batches, and the cut into a batch.

Inference threads call `ModelRecorder.record`; the telemetry loop calls `TelemetryCollector.cut`
every interval, which snapshots and resets the histograms, reads power and device health, and
appends the batch to the on-disk outbox (which assigns its sequence number).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from edgefleet.agent.device_stats import DeviceSampler
from edgefleet.agent.outbox import TelemetryOutbox
from edgefleet.agent.power import PowerMeter, energy_per_inference_mj, estimated_energy_per_inference_mj
from edgefleet.common import latency
from edgefleet.protos.v1 import fleet_pb2


class ModelRecorder:
    """Counts and latency histograms for one model version; thread-safe."""

    def __init__(self, model: str, version: str, runtime: str) -> None:
        self.model = model
        self.version = version
        self.runtime = runtime
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.count = 0
        self.errors = 0
        self.total = latency.new_histogram()
        self.compute = latency.new_histogram()
        self.queue = latency.new_histogram()

    def record(self, total_s: float, compute_s: float, queue_s: float) -> None:
        with self._lock:
            self.count += 1
            latency.record_seconds(self.total, total_s)
            latency.record_seconds(self.compute, compute_s)
            latency.record_seconds(self.queue, queue_s)

    def record_error(self) -> None:
        with self._lock:
            self.errors += 1

    def snapshot(self) -> fleet_pb2.ModelStats:
        with self._lock:
            stats = fleet_pb2.ModelStats(
                model=self.model,
                version=self.version,
                count=self.count,
                errors=self.errors,
                latency=latency.to_proto(self.total),
                compute=latency.to_proto(self.compute),
                queue_wait=latency.to_proto(self.queue),
                runtime=self.runtime,
            )
            self._reset()
        return stats


class TelemetryCollector:
    def __init__(
        self,
        outbox: TelemetryOutbox,
        power: PowerMeter,
        sampler: DeviceSampler,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.outbox = outbox
        self.power = power
        self.sampler = sampler
        self.clock = clock
        self._recorders: dict[tuple[str, str], ModelRecorder] = {}
        self._lock = threading.Lock()
        self._start = clock()
        self.on_batch: Callable[[fleet_pb2.TelemetryBatch], None] | None = None

    def recorder(self, model: str, version: str, runtime: str) -> ModelRecorder:
        with self._lock:
            key = (model, version)
            if key not in self._recorders:
                self._recorders[key] = ModelRecorder(model, version, runtime)
            return self._recorders[key]

    def retire(self, model: str, version: str) -> None:
        """Stop reporting a model version that is no longer served (after its last batch)."""
        with self._lock:
            self._recorders.pop((model, version), None)

    def cut(self) -> fleet_pb2.TelemetryBatch:
        end = self.clock()
        interval_s = max(1e-3, end - self._start)
        with self._lock:
            recorders = list(self._recorders.values())
        models = [r.snapshot() for r in recorders]
        device = self.sampler.sample()
        inferences = sum(m.count for m in models)
        power = self.power.read(device.cpu_percent_system / 100.0, inferences)
        # Dynamic power is shared between the models served in proportion to their inferences.
        if power.source.startswith("estimated"):
            share = device.cpu_percent_process / 100.0 / (os.cpu_count() or 1)
            energy = (estimated_energy_per_inference_mj(self.power.model, share, interval_s, inferences),
                      "estimated:model")
        else:
            energy = energy_per_inference_mj(power, interval_s, inferences)
        for stats in models:
            if stats.count:
                stats.energy_per_inference_mj, stats.energy_source = energy
        batch = fleet_pb2.TelemetryBatch(
            start_unix_ms=int(self._start * 1000),
            end_unix_ms=int(end * 1000),
            models=[m for m in models if m.count or m.errors],
            device=device,
            power=power,
        )
        self._start = end
        stored = self.outbox.append(batch)
        if self.on_batch is not None:
            self.on_batch(stored)
        return stored
