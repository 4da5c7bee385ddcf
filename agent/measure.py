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

import numpy as np

from edgefleet.protos.v1 import fleet_pb2


def _feed(inputs_npz: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(inputs_npz), allow_pickle=False) as data:
        return {name: np.ascontiguousarray(data[name][:1]) for name in data.files}


def _session(path: Path, provider: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
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
    sessions: dict[str, tuple[object, dict[str, np.ndarray], str]] = {}
    timings = {c.name: fleet_pb2.CandidateTiming(name=c.name) for c in spec.candidates}
    for candidate in spec.candidates:
        try:
            if candidate.runtime not in ("", "onnxruntime"):
                raise ValueError(f"runtime {candidate.runtime!r} cannot be timed by this agent")
            session, used = _session(files[candidate.name], candidate.execution_provider or "CPUExecutionProvider",
                                     threads)
            feed = _feed(candidate.inputs_npz)
            for _ in range(warmup):
                session.run(None, feed)
            sessions[candidate.name] = (session, feed, used)
            timings[candidate.name].runtime = used
        except Exception as exc:  # a candidate that does not load here is a result, not a crash
            timings[candidate.name].error = f"{type(exc).__name__}: {exc}"
    order = list(sessions)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            session, feed, _ = sessions[name]
            started = time.perf_counter()
            for _ in range(runs):
                session.run(None, feed)  # type: ignore[attr-defined]
            timings[name].latencies_ms.append((time.perf_counter() - started) * 1000 / runs)
    return [timings[c.name] for c in spec.candidates]
