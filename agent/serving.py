"""Inference serving inside the agent: one worker, a queue, and batching of concurrent requests.

Requests from the local API and the synthetic workload share this path, so telemetry sees the
latency applications see. Requests waiting together are stacked along the batch axis into one
runtime call when the model has a free first dimension and their other dimensions agree.
Queue wait (arrival to start of the runtime call) and compute are recorded apart.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time

import numpy as np

from edgefleet.agent.runtime import InputMismatch, LoadedModel, check_inputs
from edgefleet.agent.telemetry import TelemetryCollector

log = logging.getLogger("edgefleet.agent.serving")


class NoModel(RuntimeError):
    """Nothing is installed yet."""


@dataclasses.dataclass
class InferResult:
    outputs: dict[str, np.ndarray]
    model: str
    version: str
    queue_s: float
    compute_s: float
    batched_with: int


@dataclasses.dataclass
class _Request:
    inputs: dict[str, np.ndarray]
    arrived: float
    future: asyncio.Future[InferResult]

    def shape_key(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        return tuple(sorted((k, str(v.dtype), tuple(v.shape[1:])) for k, v in self.inputs.items()))


class InferenceService:
    def __init__(self, collector: TelemetryCollector, max_batch: int = 16) -> None:
        self.collector = collector
        self.max_batch = max_batch
        self.model: LoadedModel | None = None
        self._pending: collections.deque[_Request] = collections.deque()
        self._wake = asyncio.Event()

    def swap(self, model: LoadedModel | None) -> None:
        """Serve `model` from the next request on; requests already running finish on the old one."""
        old = self.model
        self.model = model
        if old is not None and (model is None or (old.name, old.version) != (model.name, model.version)):
            self.collector.retire(old.name, old.version)
        if model is not None:
            log.info("serving", extra={"model": model.name, "version": model.version, "runtime": model.runtime})

    async def infer(self, inputs: dict[str, np.ndarray]) -> InferResult:
        model = self.model
        if model is None:
            raise NoModel("no model is installed on this device yet; roll one out or `edgefleet-agent install`")
        check_inputs(model.io, inputs)  # raises InputMismatch before anything is queued
        future: asyncio.Future[InferResult] = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(inputs, time.perf_counter(), future))
        self._wake.set()
        return await future

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                group = self._take_group()
                await self._execute(group)

    def _take_group(self) -> list[_Request]:
        first = self._pending.popleft()
        group = [first]
        model = self.model
        if model is None or not model.batchable:
            return group
        key = first.shape_key()
        kept: list[_Request] = []
        while self._pending and len(group) < self.max_batch:
            request = self._pending.popleft()
            (group if request.shape_key() == key else kept).append(request)
        self._pending.extendleft(reversed(kept))
        return group

    async def _execute(self, group: list[_Request]) -> None:
        model = self.model
        if model is None:
            for request in group:
                request.future.set_exception(NoModel("the model was removed while the request waited"))
            return
        recorder = self.collector.recorder(model.name, model.version, model.runtime)
        started = time.perf_counter()
        try:
            if len(group) == 1:
                batch = group[0].inputs
            else:
                batch = {name: np.concatenate([r.inputs[name] for r in group]) for name in group[0].inputs}
            outputs = await asyncio.to_thread(model.run, batch)
        except Exception as exc:
            log.warning("inference failed", extra={"model": model.name, "version": model.version, "error": str(exc)})
            for request in group:
                recorder.record_error()
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        finished = time.perf_counter()
        compute = finished - started
        offset = 0
        for request in group:
            rows = next(iter(request.inputs.values())).shape[0] if len(group) > 1 else 0
            mine = outputs if len(group) == 1 else {k: v[offset:offset + rows] for k, v in outputs.items()}
            offset += rows
            queue_wait = started - request.arrived
            recorder.record(finished - request.arrived, compute, queue_wait)
            if not request.future.done():
                request.future.set_result(
                    InferResult(mine, model.name, model.version, queue_wait, compute, len(group))
                )


__all__ = ["InferResult", "InferenceService", "InputMismatch", "NoModel"]
