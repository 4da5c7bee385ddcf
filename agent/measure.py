"""Device-in-the-loop timing: candidate builds timed here, with this agent's serving settings.

The controller's compiler sends candidates of one class to one online device of that class;
timing them where they will run beats any estimate. Candidates are interleaved round by round
(the same noise hits all of them) and the mean of each round is reported, so the compiler can
take medians.
"""

from __future__ import annotations

import io
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.runtime import capped_threads
from edgefleet.firmware.selftest import (
    LITERT_RUNTIMES,
    OPENVINO_RUNTIME,
    ORT_SPIN_SETTLE_S,
    LiteRTSession,
    OpenVINOSession,
    ort_serving_options,
)
from edgefleet.protos.v1 import fleet_pb2


def _feed(inputs_npz: bytes, as_is: bool = False) -> dict[str, np.ndarray]:
    """One batch of one sample; ``as_is`` when the controller sent a feed in the model's own shapes."""
    with np.load(io.BytesIO(inputs_npz), allow_pickle=False) as data:
        return {name: np.ascontiguousarray(data[name] if as_is else data[name][:1]) for name in data.files}


class _Timed:
    """One loaded candidate: ``run(feed)`` on its own runtime."""

    def __init__(self, run: Any, used: str) -> None:
        self.run = run
        self.used = used


def _load(path: Path, candidate: fleet_pb2.Candidate, threads: int) -> _Timed:
    runtime = candidate.runtime or "onnxruntime"
    threads = capped_threads(candidate.threads, threads)  # as it would be served
    timed = _load_on(path, candidate, runtime, threads)
    if candidate.threads:
        timed.used += f" x{threads} threads"
    return timed


def _load_on(path: Path, candidate: fleet_pb2.Candidate, runtime: str, threads: int) -> _Timed:
    if runtime == OPENVINO_RUNTIME:
        device = candidate.device or "CPU"
        ov = OpenVINOSession(path, device, candidate.inference_precision or None, threads)
        hint = f"/{candidate.inference_precision}" if candidate.inference_precision else ""
        return _Timed(lambda feed: ov.run(None, feed), f"openvino:{device}{hint}")
    if runtime in LITERT_RUNTIMES:
        lite = LiteRTSession(path, num_threads=threads or 1)
        return _Timed(lambda feed: lite.run(None, feed), "litert:xnnpack")
    if runtime != "onnxruntime":
        raise ValueError(f"runtime {runtime!r} cannot be timed by this agent")
    session, used = _session(path, candidate.execution_provider or "CPUExecutionProvider", threads)
    return _Timed(lambda feed: session.run(None, feed), used)


def _session(path: Path, provider: str, threads: int) -> tuple[Any, str]:
    import onnxruntime as ort

    options = ort_serving_options(threads)  # as served
    available = ort.get_available_providers()
    chosen = provider if provider in available else "CPUExecutionProvider"
    session = ort.InferenceSession(str(path), options, providers=[chosen])
    return session, f"onnxruntime:{session.get_providers()[0]}"


def time_candidates(
    files: dict[str, Path], spec: fleet_pb2.MeasureCandidates, threads: int, seed: int = 0
) -> list[fleet_pb2.CandidateTiming]:
    runs = max(1, spec.runs or 20)
    rounds = max(1, spec.rounds or 9)
    warmup = spec.warmup or 3
    sessions: dict[str, tuple[_Timed, dict[str, np.ndarray]]] = {}
    timings = {c.name: fleet_pb2.CandidateTiming(name=c.name) for c in spec.candidates}
    for candidate in spec.candidates:
        try:
            timed = _load(files[candidate.name], candidate, threads)
            feed = _feed(candidate.inputs_npz, spec.inputs_are_feed)
            for _ in range(warmup):
                timed.run(feed)
            sessions[candidate.name] = (timed, feed)
            timings[candidate.name].runtime = timed.used
        except Exception as exc:  # a candidate that does not load here is a result, not a crash
            timings[candidate.name].error = f"{type(exc).__name__}: {exc}"
    order = list(sessions)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            timed, feed = sessions[name]
            started = time.perf_counter()
            for _ in range(runs):
                timed.run(feed)
            timings[name].latencies_ms.append((time.perf_counter() - started) * 1000 / runs)
            if timed.used.startswith("onnxruntime"):
                time.sleep(ORT_SPIN_SETTLE_S)  # its pool's spin-wait must not be charged to the next
    return [timings[c.name] for c in spec.candidates]
