"""Inference serving inside the agent: requests run on the caller's thread, concurrent ones batched.

Requests from the local API (one gRPC worker thread each), in-process callers and the synthetic
workload share this path, so telemetry sees the latency applications see.

There is no worker thread to hand requests to: a hop to another thread costs about 0.1 ms on a
small board, more than a small model's whole compute. Instead the first request to find the
model idle runs it on its own thread (it "leads"). Requests that arrive while a runtime call is
in progress queue; when the call ends, the lead passes to the oldest queued request, which takes
every queued request of the same shape with it and stacks them along the batch axis into one
runtime call, when the model has a free first dimension. Queue wait (arrival to start of the
runtime call) and compute are recorded apart.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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


class _Request:
    __slots__ = ("arrived", "error", "inputs", "result", "turn")

    def __init__(self, inputs: dict[str, np.ndarray]) -> None:
        self.inputs = inputs
        self.arrived = time.perf_counter()
        self.turn = threading.Event()  # set when the request is answered, or when it is handed the lead
        self.result: InferResult | None = None
        self.error: BaseException | None = None

    @property
    def answered(self) -> bool:
        return self.result is not None or self.error is not None

    def shape_key(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        return tuple(sorted((k, str(v.dtype), tuple(v.shape[1:])) for k, v in self.inputs.items()))

    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


class InferenceService:
    def __init__(self, collector: TelemetryCollector, max_batch: int = 16) -> None:
        self.collector = collector
        self.max_batch = max_batch
        self.model: LoadedModel | None = None
        self._lock = threading.Lock()
        self._pending: collections.deque[_Request] = collections.deque()
        self._busy = False  # a request holds the lead; invariant: the queue is empty whenever this is False
        # Asyncio callers (the synthetic workload) wait here, so a backlog of them cannot occupy
        # the event loop's default executor, which installs and telemetry cuts also use.
        self._executor = ThreadPoolExecutor(max_workers=max_batch, thread_name_prefix="inference")

    def swap(self, model: LoadedModel | None) -> None:
        """Serve `model` from the next request on; requests already running finish on the old one."""
        old = self.model
        self.model = model
        if old is not None and (model is None or (old.name, old.version) != (model.name, model.version)):
            self.collector.retire(old.name, old.version)
        if model is not None:
            log.info("serving", extra={"model": model.name, "version": model.version, "runtime": model.runtime})

    def infer_blocking(self, inputs: dict[str, np.ndarray]) -> InferResult:
        """Run one request on this thread (or as part of a batch another thread runs); thread-safe."""
        model = self.model
        if model is None:
            raise NoModel("no model is installed on this device yet; roll one out or `edgefleet-agent install`")
        check_inputs(model.io, inputs)  # raises InputMismatch before anything is queued
        request = _Request(inputs)
        with self._lock:
            self._pending.append(request)
            lead = not self._busy
            self._busy = True
        if not lead:
            request.turn.wait()
        if not request.answered:  # this thread leads: it is the oldest queued request
            try:
                with self._lock:
                    group = self._take_group()
                self._execute(group)
            finally:
                with self._lock:
                    if self._pending:
                        self._pending[0].turn.set()
                    else:
                        self._busy = False
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    async def infer(self, inputs: dict[str, np.ndarray]) -> InferResult:
        """`infer_blocking` for asyncio callers, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.infer_blocking, inputs)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _take_group(self) -> list[_Request]:
        first = self._pending.popleft()
        group = [first]
        model = self.model
        if not self._pending or model is None or not model.batchable:
            return group
        key = first.shape_key()
        kept: list[_Request] = []
        while self._pending and len(group) < self.max_batch:
            request = self._pending.popleft()
            (group if request.shape_key() == key else kept).append(request)
        self._pending.extendleft(reversed(kept))
        return group

    def _execute(self, group: list[_Request]) -> None:
        """One runtime call for the group; answers every request in it and wakes the waiting ones."""
        try:
            self._run_group(group)
        except BaseException as exc:  # answered below, whatever went wrong
            for request in group:
                if not request.answered:
                    request.error = exc
            raise
        finally:
            for request in group:
                request.turn.set()

    def _run_group(self, group: list[_Request]) -> None:
        model = self.model
        if model is None:
            for request in group:
                request.error = NoModel("the model was removed while the request waited")
            return
        recorder = self.collector.recorder(model.name, model.version, model.runtime)
        started = time.perf_counter()
        try:
            if len(group) == 1:
                outputs = model.run(group[0].inputs)
            else:
                batch = {name: np.concatenate([r.inputs[name] for r in group]) for name in group[0].inputs}
                outputs = model.run(batch)
        except Exception as exc:
            log.warning("inference failed", extra={"model": model.name, "version": model.version, "error": str(exc)})
            for request in group:
                recorder.record_error()
                request.error = exc
            return
        finished = time.perf_counter()
        compute = finished - started
        offset = 0
        for request in group:
            if len(group) == 1:
                mine = outputs
            else:
                rows = request.rows()
                mine = {k: v[offset:offset + rows] for k, v in outputs.items()}
                offset += rows
            queue_wait = started - request.arrived
            recorder.record(finished - request.arrived, compute, queue_wait)
            request.result = InferResult(mine, model.name, model.version, queue_wait, compute, len(group))


__all__ = ["InferResult", "InferenceService", "InputMismatch", "NoModel"]
