"""The serving queue: input checks before queueing, batching of concurrent requests, errors contained."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.device_stats import DeviceSampler
from edgefleet.agent.outbox import TelemetryOutbox
from edgefleet.agent.power import PowerMeter, PowerModel
from edgefleet.agent.runtime import InputMismatch, LoadedModel, batch_axis
from edgefleet.agent.serving import InferenceService
from edgefleet.agent.telemetry import TelemetryCollector
from edgefleet.firmware.manifest import IOSpec, TensorSpec

IO = IOSpec(inputs=(TensorSpec("x", "float32", ("batch", 4)),), outputs=(TensorSpec("y", "float32", ("batch", 4)),))


class SlowDouble:
    """Doubles its input; slow enough that requests queue up behind a running call."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:
            self.calls.append(inputs["x"].shape[0])
        time.sleep(0.05)
        if np.isnan(inputs["x"]).any():
            raise RuntimeError("NaN input")
        return {"y": inputs["x"] * 2}


def service(tmp_path: Path, runner: SlowDouble, batchable: bool = True) -> InferenceService:
    power = PowerMeter([], PowerModel(1, 1))
    collector = TelemetryCollector(TelemetryOutbox(tmp_path / "q.db"), power, DeviceSampler())
    svc = InferenceService(collector)
    svc.swap(LoadedModel("m", "1", IO, "test", "", runner, batchable))
    return svc


def test_concurrent_requests_are_batched_and_split_back(tmp_path: Path) -> None:
    runner = SlowDouble()
    svc = service(tmp_path, runner)

    async def scenario() -> list:  # type: ignore[type-arg]
        worker = asyncio.create_task(svc.run())
        inputs = [np.full((1, 4), i, np.float32) for i in range(6)]
        results = await asyncio.gather(*(svc.infer({"x": x}) for x in inputs))
        worker.cancel()
        return results

    results = asyncio.run(scenario())
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.outputs["y"], np.full((1, 4), 2 * i, np.float32))
    assert len(runner.calls) < 6 and sum(runner.calls) == 6  # fewer runtime calls than requests
    assert max(r.batched_with for r in results) > 1
    assert all(r.queue_s >= 0 and r.compute_s > 0.04 for r in results)


def test_unbatchable_models_run_one_at_a_time_and_errors_stay_contained(tmp_path: Path) -> None:
    runner = SlowDouble()
    svc = service(tmp_path, runner, batchable=False)

    async def scenario() -> tuple:  # type: ignore[type-arg]
        worker = asyncio.create_task(svc.run())
        good = svc.infer({"x": np.ones((1, 4), np.float32)})
        bad = svc.infer({"x": np.full((1, 4), np.nan, np.float32)})
        results = await asyncio.gather(good, bad, return_exceptions=True)
        after = await svc.infer({"x": np.ones((1, 4), np.float32)})
        worker.cancel()
        return results, after

    (good, bad), after = asyncio.run(scenario())
    assert runner.calls == [1, 1, 1]
    assert isinstance(bad, RuntimeError) and not isinstance(good, Exception)
    assert after.outputs["y"].shape == (1, 4)
    stats = svc.collector.cut().models[0]
    assert (stats.count, stats.errors) == (2, 1)


def test_inputs_are_checked_before_queueing(tmp_path: Path) -> None:
    svc = service(tmp_path, SlowDouble())
    with pytest.raises(InputMismatch, match=r"expected x: float32\[batch,4\]"):
        asyncio.run(svc.infer({"x": np.ones((1, 5), np.float32)}))
    assert batch_axis(IO)
    assert not batch_axis(IOSpec(inputs=(TensorSpec("x", "float32", (1, 4)),), outputs=()))
