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
        inputs = [np.full((1, 4), i, np.float32) for i in range(6)]
        return await asyncio.gather(*(svc.infer({"x": x}) for x in inputs))

    results = asyncio.run(scenario())
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.outputs["y"], np.full((1, 4), 2 * i, np.float32))
    assert len(runner.calls) < 6 and sum(runner.calls) == 6  # fewer runtime calls than requests
    assert max(r.batched_with for r in results) > 1
    assert all(r.queue_s >= 0 and r.compute_s > 0.04 for r in results)


def test_blocking_callers_on_many_threads_each_get_their_own_rows(tmp_path: Path) -> None:
    """infer_blocking from 8 threads at once: whoever finds the model idle runs it on its own
    thread, the rest are batched behind it; every caller gets exactly its rows back."""
    runner = SlowDouble()
    svc = service(tmp_path, runner)
    results: dict[int, np.ndarray] = {}

    def caller(i: int) -> None:
        for round_ in range(3):
            rows = 1 + (i + round_) % 3
            x = np.full((rows, 4), 100 * i + round_, np.float32)
            out = svc.infer_blocking({"x": x}).outputs["y"]
            np.testing.assert_array_equal(out, x * 2)
            results[i * 10 + round_] = out

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a caller never got its answer"
    assert len(results) == 24
    assert len(runner.calls) < 24 and sum(runner.calls) == sum(1 + k % 3 for k in range(24))
    assert svc.collector.cut().models[0].count == 24


def test_requests_of_another_shape_wait_for_their_own_batch(tmp_path: Path) -> None:
    runner = SlowDouble()
    svc = service(tmp_path, runner)
    wide = IOSpec(inputs=(TensorSpec("x", "float32", ("batch", "n")),),
                  outputs=(TensorSpec("y", "float32", ("batch", "n")),))
    svc.swap(LoadedModel("m", "1", wide, "test", "", runner, True))

    async def scenario() -> list:  # type: ignore[type-arg]
        inputs = [np.ones((1, 4 if i % 2 else 6), np.float32) * i for i in range(6)]
        return await asyncio.gather(*(svc.infer({"x": x}) for x in inputs))

    results = asyncio.run(scenario())
    for i, result in enumerate(results):
        assert result.outputs["y"].shape == (1, 4 if i % 2 else 6)
        assert float(result.outputs["y"][0, 0]) == 2 * i


def test_unbatchable_models_run_one_at_a_time_and_errors_stay_contained(tmp_path: Path) -> None:
    runner = SlowDouble()
    svc = service(tmp_path, runner, batchable=False)

    async def scenario() -> tuple:  # type: ignore[type-arg]
        good = svc.infer({"x": np.ones((1, 4), np.float32)})
        bad = svc.infer({"x": np.full((1, 4), np.nan, np.float32)})
        results = await asyncio.gather(good, bad, return_exceptions=True)
        after = await svc.infer({"x": np.ones((1, 4), np.float32)})
        return results, after

    (good, bad), after = asyncio.run(scenario())
    assert runner.calls == [1, 1, 1]
    assert isinstance(bad, RuntimeError) and not isinstance(good, Exception)
    assert after.outputs["y"].shape == (1, 4)
    stats = svc.collector.cut().models[0]
    assert (stats.count, stats.errors) == (2, 1)


def test_a_failed_batch_fails_only_its_requests(tmp_path: Path) -> None:
    """A NaN in one request fails the runtime call it was batched into; the requests queued
    behind it are still answered (the lead passes on after a failure)."""
    runner = SlowDouble()
    svc = service(tmp_path, runner)

    async def scenario() -> list:  # type: ignore[type-arg]
        inputs = [np.full((1, 4), np.nan if i == 2 else i, np.float32) for i in range(8)]
        return await asyncio.gather(*(svc.infer({"x": x}) for x in inputs), return_exceptions=True)

    results = asyncio.run(scenario())
    assert isinstance(results[2], RuntimeError)
    answered = [r for r in results if not isinstance(r, Exception)]
    assert answered and all(r.outputs["y"].shape == (1, 4) for r in answered)
    assert svc.infer_blocking({"x": np.ones((1, 4), np.float32)}).outputs["y"].shape == (1, 4)  # not wedged


def test_inputs_are_checked_before_queueing(tmp_path: Path) -> None:
    svc = service(tmp_path, SlowDouble())
    with pytest.raises(InputMismatch, match=r"expected x: float32\[batch,4\]"):
        asyncio.run(svc.infer({"x": np.ones((1, 5), np.float32)}))
    assert batch_axis(IO)
    assert not batch_axis(IOSpec(inputs=(TensorSpec("x", "float32", (1, 4)),), outputs=()))
