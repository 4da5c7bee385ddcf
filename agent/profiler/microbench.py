"""A short micro-benchmark the compiler uses to rank recipes before it measures them on the device.

Three numbers, at most about 3 s together, measured through the runtime the device will really use:

- fp32 GEMM GFLOP/s: onnxruntime `MatMul` on float32 matrices;
- int8 GEMM GOP/s: onnxruntime `MatMulInteger` (uint8 x int8 -> int32), the kernel a quantized model hits
  (VNNI / AMX on x86, dotprod / i8mm on ARM), so the int8:fp32 ratio says whether int8 pays off here;
- memory bandwidth GB/s: a numpy copy of a buffer larger than the last-level cache (read + write bytes).

Each figure is the median of timed runs after one warm-up run, within its own time slice. Results are
cached in `cache_dir` keyed by CPU model, onnxruntime version and `METHOD_VERSION`: the hardware does not
change between agent restarts, and re-running it on every boot would steal CPU from inference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from edgefleet.protos.v1 import profile_pb2

from .runtimes import MODELS

log = logging.getLogger(__name__)

METHOD_VERSION = 1  # bump when the method changes so old cache entries are ignored
GEMM_SIZE = 256  # 256^3 multiply-adds: ~34 MOP per run, milliseconds even on a Cortex-A53
SLICE_S = {"fp32": 0.8, "int8": 0.8, "memory": 0.5}  # plus set-up: stays under 3 s


def _median_seconds(run: Callable[[], object], budget_s: float, max_runs: int = 200) -> float:
    run()  # warm-up: first-run allocation and kernel selection are not the steady state
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_runs and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _gemm_ops_per_s(model: str, a: object, b: object, threads: int, budget_s: float) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(MODELS / model), options, providers=["CPUExecutionProvider"])
    feeds = {"A": a, "B": b}
    seconds = _median_seconds(lambda: session.run(None, feeds), budget_s)
    return 2.0 * GEMM_SIZE**3 / seconds


def _memory_bytes_per_s(last_level_cache: int, available: int, budget_s: float) -> float:
    import numpy as np

    size = min(max(32 << 20, 2 * last_level_cache), 128 << 20)
    if available:
        size = min(size, max(available // 8, 4 << 20))
    source = np.ones(size, dtype=np.uint8)
    target = np.empty_like(source)
    seconds = _median_seconds(lambda: np.copyto(target, source), budget_s, max_runs=50)
    return 2.0 * size / seconds


def cache_key(cpu_model: str) -> str:
    import onnxruntime as ort

    text = f"{cpu_model}|onnxruntime {ort.__version__}|method {METHOD_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _load_cached(path: Path) -> profile_pb2.MicroBenchmark | None:
    from google.protobuf.json_format import ParseDict, ParseError

    try:
        result = ParseDict(json.loads(path.read_text()), profile_pb2.MicroBenchmark())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, ParseError) as exc:
        log.warning("event=microbench_cache_unreadable path=%s error=%s action=rerun", path, exc)
        return None
    result.from_cache = True
    return result


def _store(path: Path, result: profile_pb2.MicroBenchmark) -> None:
    """Write temp, fsync, rename: a crash mid-write must not leave a cache entry that parses wrongly."""
    from google.protobuf.json_format import MessageToDict

    path.parent.mkdir(parents=True, exist_ok=True)
    data = MessageToDict(result, preserving_proto_field_name=True)
    data.pop("from_cache", None)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".microbench-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_microbench(
    *, cpu_model: str, threads: int, last_level_cache: int = 0, available_memory: int = 0, cache_dir: Path | None = None
) -> profile_pb2.MicroBenchmark:
    """Measure (or reuse the cached) micro-benchmark; raises ImportError without onnxruntime/numpy."""
    import numpy as np
    import onnxruntime as ort

    cache_path = cache_dir / f"microbench-{cache_key(cpu_model)}.json" if cache_dir is not None else None
    if cache_path is not None:
        cached = _load_cached(cache_path)
        if cached is not None:
            return cached

    threads = max(1, threads)
    rng = np.random.default_rng(0)
    n = GEMM_SIZE
    started = time.perf_counter()
    fp32 = _gemm_ops_per_s(
        "matmul_fp32.onnx",
        rng.standard_normal((n, n), dtype=np.float32),
        rng.standard_normal((n, n), dtype=np.float32),
        threads,
        SLICE_S["fp32"],
    )
    int8 = _gemm_ops_per_s(
        "matmul_int8.onnx",
        rng.integers(0, 255, (n, n), dtype=np.uint8),
        rng.integers(-127, 127, (n, n), dtype=np.int8),
        threads,
        SLICE_S["int8"],
    )
    memory = _memory_bytes_per_s(last_level_cache, available_memory, SLICE_S["memory"])
    result = profile_pb2.MicroBenchmark(
        fp32_gemm_gflops=round(fp32 / 1e9, 2),
        int8_gemm_gops=round(int8 / 1e9, 2),
        memory_bandwidth_gbs=round(memory / 1e9, 2),
        duration_s=round(time.perf_counter() - started, 3),
        measured_at_unix_ms=int(time.time() * 1000),
        from_cache=False,
        method=(
            f"onnxruntime {ort.__version__} CPUExecutionProvider MatMul fp32 vs MatMulInteger u8s8, "
            f"{n}x{n}x{n}, {threads} threads, median; numpy copy for memory; v{METHOD_VERSION}"
        ),
    )
    if cache_path is not None:
        try:
            _store(cache_path, result)
        except OSError as exc:
            log.warning("event=microbench_cache_write_failed path=%s error=%s", cache_path, exc)
    return result
