"""Latency measurement: pluggable, so candidates can be timed here, on a device, or estimated.

On a small shared machine timings swing by 2x from run to run, so the local measurer interleaves the
candidates in shuffled rounds, repeats, and compares medians. A device measurer sends the candidate
files to an online agent of the target class, which times them with its serving settings.
"""

from __future__ import annotations

import random
import socket
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgefleet.controller.compiler.runner import RuntimeChoice
from edgefleet.controller.compiler.target import TargetSpec

Runtimes = Mapping[Path, RuntimeChoice]


@dataclass(frozen=True)
class LatencyStats:
    """Median-based latency of one candidate; ``estimated`` is true when nothing was timed."""

    median_ms: float
    p90_ms: float
    min_ms: float
    samples: int
    measured_on: str
    estimated: bool = False
    method: str = ""
    # Per-round means in round order: candidates timed in the same rounds can be compared pairwise,
    # which cancels noise that hits a whole round (another process waking up).
    rounds_ms: tuple[float, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Measurer(Protocol):
    """Times candidate files on some hardware. Keys of the result are the given paths."""

    measured_on: str

    def measure(
        self, candidates: Sequence[Path], inputs: Mapping[str, np.ndarray], runtimes: Runtimes | None = None
    ) -> dict[Path, LatencyStats]:
        """``inputs`` holds a few samples (axis 0) keyed by input name; one batch is fed per run.
        ``runtimes`` names each candidate's runtime (default: the one its file format implies).
        A candidate this measurer cannot time is left out of the result."""
        ...

    def cannot_measure(self, path: Path) -> str:
        """Why a candidate left out of ``measure``'s result was not timed."""
        ...


# Local timing assumes the machine is otherwise idle. When other processes (or, on a VM, the
# hypervisor's steal) took more than this share of all cores while candidates were timed, the
# figures can rank builds wrongly (a 1-thread build looks best while another job holds a core), and
# the report says so.
BUSY_SHARE = 0.25


def _others_cpu_s(before: Any, after: Any, own_s: float) -> float:
    """CPU seconds, over all cores, that something other than this process used between two
    psutil.cpu_times() readings: busy time (steal included, iowait not) minus our own. Linux counts
    guest time inside user time already, so the guest fields are left out of the sum."""
    def busy(t: Any) -> float:
        left_out = ("idle", "iowait", "guest", "guest_nice")
        return float(sum(t)) - sum(float(getattr(t, name, 0.0)) for name in left_out)

    return max(0.0, busy(after) - busy(before) - own_s)


class LocalMeasurer:
    """Interleaved, repeated, median timing on this machine with the agent's serving settings."""

    def __init__(
        self,
        *,
        threads: int = 0,
        rounds: int = 15,
        round_ms: float = 40.0,
        warmup_runs: int = 5,
        seed: int = 0,
    ) -> None:
        self.threads = threads
        self.rounds = rounds
        self.round_ms = round_ms
        self.warmup_runs = warmup_runs
        self.seed = seed
        self.measured_on = f"local:{socket.gethostname()}"
        self.busy_share = 0.0  # of the last measure(): see BUSY_SHARE
        self.busy_note = ""  # what the report and the compile's progress say when that is too much

    def cannot_measure(self, path: Path) -> str:
        return "it did not load here"

    def measure(
        self, candidates: Sequence[Path], inputs: Mapping[str, np.ndarray], runtimes: Runtimes | None = None
    ) -> dict[Path, LatencyStats]:
        import psutil

        from edgefleet.controller.compiler.runner import ModelRunner

        runtimes = runtimes or {}
        runners = {
            Path(p): ModelRunner(Path(p), self.threads, runtime=runtimes.get(Path(p))) for p in candidates
        }
        feeds = {p: r.sample_feed(inputs) for p, r in runners.items()}
        reps: dict[Path, int] = {}
        for path, runner in runners.items():  # warm up and size each round to ~round_ms
            for _ in range(self.warmup_runs):
                runner.run(feeds[path])
            t0 = time.perf_counter()
            runner.run(feeds[path])
            one = max(time.perf_counter() - t0, 1e-6)
            reps[path] = int(min(max(1, (self.round_ms / 1000.0) / one), 2000))
        per_run: dict[Path, list[float]] = {p: [] for p in runners}
        order = list(runners)
        rng = random.Random(self.seed)
        me = psutil.Process()
        cpu0, own0, wall0 = psutil.cpu_times(), me.cpu_times(), time.monotonic()
        for _ in range(self.rounds):
            rng.shuffle(order)  # interleave: machine noise hits every candidate alike
            for path in order:
                runner, feed, k = runners[path], feeds[path], reps[path]
                # One untimed run first: the previous candidate's runtime (another thread pool, an
                # OpenVINO plugin after onnxruntime) must not be charged to this one's round.
                runner.run(feed)
                t0 = time.perf_counter()
                for _ in range(k):
                    runner.run(feed)
                per_run[path].append((time.perf_counter() - t0) * 1000.0 / k)
                time.sleep(runner.settle_s())  # its pool's spin-wait must not be charged to the next
        own1, wall = me.cpu_times(), max(time.monotonic() - wall0, 1e-6)
        own_s = (own1.user - own0.user) + (own1.system - own0.system)
        self.busy_share = _others_cpu_s(cpu0, psutil.cpu_times(), own_s) / (wall * (psutil.cpu_count() or 1))
        self.busy_note = (
            f"other processes used {self.busy_share:.0%} of the CPU while timing, so these figures "
            "may rank builds wrongly: compile on an idle machine"
            if self.busy_share > BUSY_SHARE else ""
        )
        out: dict[Path, LatencyStats] = {}
        for path, values in per_run.items():
            ordered = sorted(values)
            out[path] = LatencyStats(
                median_ms=statistics.median(ordered),
                p90_ms=ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
                min_ms=ordered[0],
                samples=len(ordered) * reps[path],
                measured_on=self.measured_on,
                method=f"interleaved: {self.rounds} shuffled rounds x {reps[path]} runs, median of round means"
                + (f"; {self.busy_note}" if self.busy_note else ""),
                rounds_ms=tuple(values),
            )
        return out


class EstimatedMeasurer:
    """Latency from the target's micro-benchmark figures (a roofline over MACs and weight bytes).

    Used when no device of the class is online. Every value it returns is marked ``estimated``; it is
    good for ranking float against int8 on the same class, not as a promise of absolute latency.
    """

    def __init__(self, target: TargetSpec) -> None:
        self.target = target
        self.measured_on = f"estimated:{target.hardware_class}({target.microbench_source} microbench)"

    def cannot_measure(self, path: Path) -> str:
        return (
            "OpenVINO builds are not estimated (the roofline knows no OpenVINO kernels); they are chosen "
            "only when timed here or on a device of the class"
        )

    def measure(
        self, candidates: Sequence[Path], inputs: Mapping[str, np.ndarray], runtimes: Runtimes | None = None
    ) -> dict[Path, LatencyStats]:
        out = {}
        runtimes = runtimes or {}
        for path in candidates:
            choice = runtimes.get(Path(path)) or RuntimeChoice.for_file(Path(path))
            if choice.name == "openvino":
                continue
            ms = self.estimate_ms(Path(path))
            out[Path(path)] = LatencyStats(
                ms,
                ms,
                ms,
                0,
                self.measured_on,
                estimated=True,
                method="roofline: MACs / gemm throughput + weight bytes / bandwidth",
            )
        return out

    def estimate_ms(self, path: Path) -> float:
        import onnx

        from edgefleet.controller.compiler.analysis import count_macs

        if path.suffix == ".tflite":
            size = path.stat().st_size
            return 1000.0 * size / (self.target.bandwidth_gbs * 1e9)
        model = onnx.load(str(path))
        float_macs, int8_macs = count_macs(model)
        t = self.target
        fp_rate = (t.fp32_gflops * (2.0 if t.family == "gpu" and _has_fp16(model) else 1.0)) * 1e9 / 2
        compute = float_macs / max(fp_rate, 1.0) + int8_macs / max(t.int8_gops * 1e9 / 2, 1.0)
        weight_bytes = sum(
            np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.data_type)).itemsize * int(np.prod(i.dims))
            for i in model.graph.initializer
        )
        memory = weight_bytes / max(t.bandwidth_gbs * 1e9, 1.0)
        return 1000.0 * (compute + memory)


def paired_speedup(baseline: LatencyStats, candidate: LatencyStats) -> float:
    """Median over rounds of baseline/candidate time when both were timed in the same rounds, else the
    ratio of medians. Pairing by round is what makes a 2-core machine shared with others usable."""
    if baseline.rounds_ms and len(baseline.rounds_ms) == len(candidate.rounds_ms):
        ratios = sorted(b / max(c, 1e-9) for b, c in zip(baseline.rounds_ms, candidate.rounds_ms, strict=True))
        return float(statistics.median(ratios))
    return baseline.median_ms / max(candidate.median_ms, 1e-9)


def _has_fp16(model: Any) -> bool:
    import onnx

    return any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


DeviceSubmit = Callable[
    [str, Sequence[Path], Mapping[str, np.ndarray], Runtimes], Mapping[str, Mapping[str, Any]]
]


class DeviceMeasurer:
    """Device-in-the-loop: the controller sends candidates to an online agent of the class.

    ``submit(device_id, paths, inputs)`` is the controller's transport hook: it ships the files, the
    agent times each with its serving settings and answers ``{path: {median_ms, p90_ms, min_ms,
    samples}}``. The compiler does not know about gRPC or MQTT; rollouts pass this measurer in.
    """

    def __init__(self, device_id: str, submit: DeviceSubmit, times_threads: bool = False) -> None:
        self.device_id = device_id
        self.submit = submit
        # The device's agent times a candidate on the thread count it asks for (capability 8).
        self.times_threads = times_threads
        self.measured_on = f"device:{device_id}"

    def cannot_measure(self, path: Path) -> str:
        return f"device {self.device_id} could not run it"

    def measure(
        self, candidates: Sequence[Path], inputs: Mapping[str, np.ndarray], runtimes: Runtimes | None = None
    ) -> dict[Path, LatencyStats]:
        answer = self.submit(self.device_id, list(candidates), inputs, dict(runtimes or {}))
        out = {}
        for path in candidates:
            row = answer.get(str(path))
            if row is None:
                continue
            out[Path(path)] = LatencyStats(
                float(row["median_ms"]),
                float(row.get("p90_ms", row["median_ms"])),
                float(row.get("min_ms", row["median_ms"])),
                int(row.get("samples", 0)),
                self.measured_on,
                method="agent serving session",
                # Round by round, interleaved on the device: paired speedups, as on this machine.
                rounds_ms=tuple(float(v) for v in row.get("rounds_ms", ())),
            )
        return out


# Rollouts register a factory that finds an online device for a class; None means "none online".
DeviceMeasurerFactory = Callable[[TargetSpec], "Measurer | None"]
