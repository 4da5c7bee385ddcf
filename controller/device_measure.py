"""Device-in-the-loop measurement for the compiler: time candidates on an online device of the class.

The compiler runs in a worker thread and calls `submit` synchronously; the command itself must
be issued and awaited on the controller's event loop, so the call hops there and back.
"""

from __future__ import annotations

import asyncio
import io
import logging
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.controller.artifacts import ArtifactStore
from edgefleet.controller.commands import CommandDispatcher
from edgefleet.controller.presence import PresenceTracker
from edgefleet.controller.store.base import Store
from edgefleet.protos.v1 import fleet_pb2

log = logging.getLogger("edgefleet.controller.device_measure")

MEASURE_TIMEOUT_S = 300.0


class DeviceMeasurementFailed(RuntimeError):
    pass


class DeviceMeasure:
    def __init__(self, store: Store, presence: PresenceTracker, artifacts: ArtifactStore,
                 commands: CommandDispatcher, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.presence = presence
        self.artifacts = artifacts
        self.commands = commands
        self.loop = loop

    def online_device(self, hardware_class: str) -> str | None:
        """An online device of the class, or None."""
        for record in self.store.list_devices():
            if record.hardware_class == hardware_class and self.presence.presence(record).online:
                return record.device_id
        return None

    def submit(self, device_id: str, paths: Sequence[Path], inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """The compiler's DeviceSubmit hook: {str(path): {median_ms, p90_ms, min_ms, samples}}."""
        buffer = io.BytesIO()
        np.savez(buffer, **{k: np.asarray(v)[:4] for k, v in inputs.items()})  # type: ignore[arg-type]
        sample = buffer.getvalue()
        spec = fleet_pb2.MeasureCandidates(warmup=3, runs=10, rounds=7)
        for index, path in enumerate(paths):
            sha = self.artifacts.put_file(Path(path))
            spec.candidates.add(name=f"c{index}", sha256=sha, size=Path(path).stat().st_size,
                                runtime="onnxruntime", inputs_npz=sample)
        future = asyncio.run_coroutine_threadsafe(self._run(device_id, spec), self.loop)
        ack = future.result(MEASURE_TIMEOUT_S + 10)
        out: dict[str, Any] = {}
        for index, path in enumerate(paths):
            timing = next(t for t in ack.timings if t.name == f"c{index}")
            if timing.error or not timing.latencies_ms:
                raise DeviceMeasurementFailed(f"device {device_id} could not time {Path(path).name}: {timing.error}")
            values = sorted(timing.latencies_ms)
            out[str(path)] = {
                "median_ms": statistics.median(values),
                "p90_ms": values[min(len(values) - 1, int(0.9 * len(values)))],
                "min_ms": values[0],
                "samples": len(values) * spec.runs,
            }
        return out

    async def _run(self, device_id: str, spec: fleet_pb2.MeasureCandidates) -> fleet_pb2.CommandAck:
        record = self.commands.issue(device_id, measure=spec, ttl_s=MEASURE_TIMEOUT_S)
        done = await self.commands.wait(record.command_id, MEASURE_TIMEOUT_S)
        if done.state != "done" or not done.ack:
            raise DeviceMeasurementFailed(f"device {device_id} did not answer the measurement ({done.state})")
        ack = fleet_pb2.CommandAck.FromString(done.ack)
        if ack.result != "done":
            raise DeviceMeasurementFailed(f"device {device_id} failed the measurement: {ack.reason} {ack.message}")
        return ack

    def measurer_factory(self) -> Any:
        """For compile_model(device_measurers=...): a DeviceMeasurer for an online device of the class."""
        from edgefleet.controller.compiler.measure import DeviceMeasurer

        def factory(target: Any) -> Any:
            device = self.online_device(target.hardware_class)
            return DeviceMeasurer(device, self.submit) if device else None

        return factory
