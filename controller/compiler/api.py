"""The public compile function: the CLI and rollouts call this, nothing else.

One compile: check every input up front (fail before any work, with a fix-it message), build each
candidate recipe for the class, gate it against the fp32 reference on held-out data, measure the
survivors (interleaved medians here, on a device, or estimated), choose the fastest within budget,
and write artifact + manifest + report atomically. Every number in the report was measured, or is
marked estimated.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgefleet.controller.compiler import cache as cache_mod
from edgefleet.controller.compiler import onnx_graph
from edgefleet.controller.compiler import retrain as retrain_mod
from edgefleet.controller.compiler.data import Dataset, load_npz, read_npz, split_holdout, synthetic
from edgefleet.controller.compiler.errors import CompileError
from edgefleet.controller.compiler.gate import LABELS_KEY, Gate, fidelity, load_eval_fn
from edgefleet.controller.compiler.measure import (
    DeviceMeasurer,
    DeviceMeasurerFactory,
    EstimatedMeasurer,
    LatencyStats,
    LocalMeasurer,
    Measurer,
    paired_speedup,
)
from edgefleet.controller.compiler.model_io import SourceModel, load_source, sha256_file
from edgefleet.controller.compiler.passes import GateProbe, GateResult, PassContext, PassError, check_pass, load_pass
from edgefleet.controller.compiler.recipes import BASELINE, SOURCE, TFLITE_BASELINE, Recipe, recipes_for
from edgefleet.controller.compiler.retrain import RetrainedModel, RetrainSpec
from edgefleet.controller.compiler.runner import ModelRunner, RuntimeChoice, build_files, build_size, move_build
from edgefleet.controller.compiler.target import TargetSpec

REPORT_SCHEMA = 1
Progress = Callable[[str], None]
# Where latencies come from; the CLI's --measure choices are read from here so the two cannot drift.
MeasureMode = Literal["auto", "local", "estimate"]


@dataclass(frozen=True)
class CompileSpec:
    """What to compile for which hardware, under which accuracy budget. Paths, not arrays: a spec
    is what an operator or a rollout writes down, and it must hash to the same cache key every time."""

    model: Path
    target: str | TargetSpec = "local"
    calib: Path | None = None
    eval_data: Path | None = None
    budget: float = 0.99
    eval_fn: str | None = None
    max_drop: float = 0.01
    metric: str = "cosine"
    eval_labels: Path | None = None
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    out: Path | None = None
    recipes: tuple[str, ...] | None = None
    use_cache: bool = True
    cache_dir: Path | None = None
    measure: MeasureMode = "auto"
    min_speedup: float = 1.05
    tie_tolerance: float = 0.03
    measure_rounds: int = 15
    measure_round_ms: float = 40.0
    # Also time every build that passed the gate on fewer intra-op threads than the target's cores
    # (--no-thread-search turns it off); only where candidates are really timed (see thread_counts).
    thread_search: bool = True
    max_gate_samples: int = 512
    holdout_fraction: float = 0.25
    # --retrain / --student: pruned and distilled candidates join the search (needs the train extra).
    retrain: RetrainSpec | None = None


@dataclass
class CompileReport:
    """The report.json: what was chosen, why, and every candidate's measured numbers."""

    artifact: str
    chosen: str
    why: str
    baseline: dict[str, Any]
    result: dict[str, Any]
    speedup: float
    size_ratio: float
    candidates: list[dict[str, Any]]
    target: dict[str, Any]
    gate: dict[str, Any]
    latency: dict[str, Any]
    toolchain: dict[str, str]
    cache_key: str
    source: dict[str, Any]
    cached: bool = False
    # The runtime the chosen build runs on: {name, device, inference_precision, version}.
    runtime: dict[str, Any] = field(default_factory=dict)
    schema_version: int = REPORT_SCHEMA
    elapsed_s: float = 0.0
    # Per retrained network: params and MACs before/after, epochs, time, loss curve, its candidates.
    retrain: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompileReport:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class _Candidate:
    recipe: Recipe
    path: Path | None = None
    error: str | None = None
    fidelity: float | None = None
    score: float | None = None
    passed: bool = False
    stats: LatencyStats | None = None
    # The close-call check's figure (see _confirm): timed again, just this build and the reference.
    timed_again: LatencyStats | None = None
    notes: list[str] = field(default_factory=list)
    build_s: float = 0.0
    compressed: Future[int] | None = None  # _compressed_size, worked out beside the other candidates

    def compressed_bytes(self) -> int | None:
        return self.compressed.result() if self.compressed is not None else None

    cosine: float | None = None

    def row(self) -> dict[str, Any]:
        size = build_size(self.path) if self.path else None
        return {
            "recipe": self.recipe.name,
            "precision": self.recipe.precision,
            "runtime": self.recipe.runtime.describe(),
            "passes": self.recipe.describe(),
            "latency_ms": round(self.stats.median_ms, 4) if self.stats else None,
            "latency_p90_ms": round(self.stats.p90_ms, 4) if self.stats else None,
            "estimated": self.stats.estimated if self.stats else None,
            "measured_on": self.stats.measured_on if self.stats else None,
            "size_bytes": size,
            "compressed_bytes": self.compressed_bytes(),
            "fidelity": None if self.cosine is None else round(self.cosine, 6),
            "metric_score": None if self.fidelity is None else round(self.fidelity, 6),
            "task_score": self.score,
            "passed_gate": self.passed,
            "error": self.error,
            "notes": self.notes,
            "build_s": round(self.build_s, 2),
        }


@contextlib.contextmanager
def _quiet_toolchain() -> Iterator[None]:
    """onnxruntime's quantizer print()s progress and warns on the root logger; with ``--json`` stdout
    must hold only the report, so its prints go to stderr and its advice-level warnings are muted."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        root.setLevel(level)


def _compressed_size(path: Path) -> int:
    """What the bundle costs over the wire: zeros from pruning show up here, not in latency.

    About 1 s for a 40 MB fp32 model; zlib lets go of the GIL, so compile_model works it out on
    a thread while it builds the next candidate and while candidates are timed on a device."""
    return sum(len(zlib.compress(p.read_bytes(), 6)) for p in build_files(path))


_REFERENCES = frozenset((BASELINE.name, SOURCE.name, TFLITE_BASELINE.name))


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


# -- input checks ---------------------------------------------------------------------------------


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CompileError(f"--out {out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise CompileError(
            f"--out {out} is not empty and holds no previous compile (no manifest.json); pass a new or empty directory"
        )


def _gate_data(
    spec: CompileSpec, source: SourceModel, shapes: dict[str, tuple[int, ...]], progress: Progress | None
) -> tuple[Dataset | None, Dataset]:
    calib = load_npz(spec.calib, source.inputs, flag="--calib", shape_overrides=shapes) if spec.calib else None
    if spec.eval_data:
        gate_set = load_npz(spec.eval_data, source.inputs, flag="--eval-data", shape_overrides=shapes)
        if spec.eval_labels:
            gate_set = _with_labels(gate_set, spec.eval_labels, "--eval-data")
    elif calib is not None:
        if spec.eval_labels:  # labels for the --calib samples follow them through the split
            calib = _with_labels(calib, spec.eval_labels, "--calib")
        calib, gate_set = split_holdout(calib, spec.holdout_fraction)
        _say(progress, f"gate: {gate_set.count} held-out --calib samples, calibration: {calib.count}")
    else:
        if spec.eval_fn:
            raise CompileError(
                "--eval needs labelled data: pass --eval-data DATA.npz (inputs plus the keys your eval function reads)"
            )
        concrete: dict[str, tuple[int, ...]] = {}
        for t in source.inputs:
            if t.name in shapes:
                concrete[t.name] = shapes[t.name]
            elif all(isinstance(d, int) for d in t.shape[1:]):
                concrete[t.name] = (1, *[d for d in t.shape[1:] if isinstance(d, int)])
            else:
                raise CompileError(
                    f"input '{t.name}' has dynamic dims and no data was given; pass --calib "
                    f"DATA.npz or --input-shape {t.name}=1,..."
                )
        if spec.eval_labels:
            raise CompileError("--eval-labels label samples: pass them with --eval-data DATA.npz (or --calib)")
        gate_set = synthetic(source.inputs, concrete, 32)
        _say(progress, "warning: no --calib: gating on random inputs, which flatters int8; static int8 skipped")
    if gate_set.count > spec.max_gate_samples:
        gate_set = gate_set.take(slice(0, spec.max_gate_samples))
    return calib, gate_set


def check_compile_data(
    model: Path,
    *,
    calib: Path | None = None,
    eval_data: Path | None = None,
    eval_labels: Path | None = None,
    metric: str = "cosine",
    budget: float = 0.99,
) -> None:
    """The data checks a compile of ``model`` makes, without compiling: the metric and its labels,
    then every array's names, dtypes, shapes and layout, NaN/Inf and sample counts. For `edgefleet
    models add` (before upload, and again at the controller): a rollout must never be the first to
    find out, at build time. Raises :class:`CompileError` with the one-line reason."""
    source = load_source(Path(model))
    gate = Gate(budget, None, 0.01, metric)
    if gate.labelled and eval_labels is None:
        raise CompileError("--metric accuracy scores against labels; pass --eval-labels LABELS.npz")
    spec = CompileSpec(model=Path(model), calib=calib, eval_data=eval_data, eval_labels=eval_labels,
                       metric=metric, budget=budget)
    _gate_data(spec, source, {}, None)


def _with_labels(data: Dataset, path: Path, flag: str) -> Dataset:
    """``--eval-labels``: one integer array (any key) with a class per sample of ``flag``'s data."""
    arrays = read_npz(path, "--eval-labels", "one array of labels", "numpy.savez(path, labels=array)")
    if len(arrays) != 1:
        raise CompileError(
            f"--eval-labels holds {len(arrays)} arrays ({', '.join(sorted(arrays)) or 'none'}); store exactly one, "
            "e.g. numpy.savez(path, labels=array)"
        )
    labels = next(iter(arrays.values()))
    if labels.dtype.kind not in "iu" or labels.ndim < 1 or labels.shape[0] != data.count:
        raise CompileError(
            f"--eval-labels has {labels.dtype} shape {tuple(labels.shape)} but {flag} holds {data.count} samples; "
            "store one integer class per sample (shape N, or N x positions)"
        )
    return replace(data, extra={**data.extra, LABELS_KEY: labels})


def _resolve_measurer(
    spec: CompileSpec,
    target: TargetSpec,
    measurer: Measurer | None,
    device_measurers: DeviceMeasurerFactory | None,
) -> Measurer:
    if measurer is not None:
        return measurer
    local = LocalMeasurer(threads=target.threads, rounds=spec.measure_rounds, round_ms=spec.measure_round_ms)
    if spec.measure == "local":
        return local
    if spec.measure == "estimate":
        return EstimatedMeasurer(target)
    if target.source == "local":
        return local
    if device_measurers is not None:
        online = device_measurers(target)
        if online is not None:
            return online
    return EstimatedMeasurer(target)


# -- the compile ---------------------------------------------------------------------------------


def compile_model(
    spec: CompileSpec,
    *,
    progress: Progress | None = None,
    measurer: Measurer | None = None,
    device_measurers: DeviceMeasurerFactory | None = None,
) -> CompileReport:
    """Compile ``spec.model`` for ``spec.target``; raises :class:`CompileError` on bad input.

    ``measurer`` forces where candidates are timed; ``device_measurers`` lets a rollout offer an online
    device of the class (device-in-the-loop). Without either, ``local`` targets are timed here and
    other classes are estimated from micro-benchmarks, which the report says.
    """
    started = time.monotonic()
    source = load_source(Path(spec.model))
    target = TargetSpec.resolve(spec.target)
    eval_fn = load_eval_fn(spec.eval_fn) if spec.eval_fn else None
    gate = Gate(spec.budget, eval_fn, spec.max_drop, spec.metric)
    if gate.labelled and spec.eval_labels is None:
        raise CompileError("--metric accuracy scores against labels; pass --eval-labels LABELS.npz")
    shapes = {k: tuple(v) for k, v in spec.input_shapes.items()}
    names = [t.name for t in source.inputs]
    for name in shapes:
        if name not in names:
            raise CompileError(
                f"--input-shape names '{name}' but the model inputs are "
                f"{', '.join(repr(n) for n in names)}; use one of those names"
            )
    recipes = recipes_for(target, source.format, spec.recipes)
    for recipe in recipes:  # fail before any work: a missing extra or a misfiled pass is an input problem
        for pass_name, _ in recipe.steps:
            check_pass(pass_name, target, source.format)
    if spec.retrain is not None:
        retrain_mod.check_retrain(spec.retrain, source)
    out = Path(spec.out) if spec.out else Path.cwd() / f"{source.path.stem}-{target.hardware_class}"
    _check_out(out)
    calib, gate_set = _gate_data(spec, source, shapes, progress)
    train_set = retrain_mod.training_data(spec.retrain, source, calib, shapes) if spec.retrain else None
    chosen_measurer = _resolve_measurer(spec, target, measurer, device_measurers)

    cache_dir = Path(spec.cache_dir) if spec.cache_dir else cache_mod.default_cache_dir()
    toolchain = cache_mod.toolchain_versions()
    key = cache_mod.cache_key(
        {
            "source_sha256": source.sha256,
            "hardware_class": target.hardware_class,
            "int8_kind": target.int8_kind,  # not microbench figures: every device of a class shares the key
            "recipes": [{"name": r.name, "passes": r.describe()} for r in recipes],
            "toolchain": toolchain,
            "calib_sha256": calib.sha256() if calib else None,
            "gate_sha256": gate_set.sha256(),
            "gate": gate.describe(),
            "input_shapes": shapes,
            "measured_on": chosen_measurer.measured_on.split(":")[0],
            "min_speedup": spec.min_speedup,
            "tie_tolerance": spec.tie_tolerance,
            # Only when fewer threads are tried, so estimated compiles and older agents keep their key.
            **({"thread_counts": counts} if (counts := thread_counts(spec, target, chosen_measurer)) else {}),
            # Only where a close call is timed again (see _confirm): a build picked without it is re-decided.
            **({"confirm_below": CONFIRM_BELOW} if isinstance(chosen_measurer, LocalMeasurer | DeviceMeasurer) else {}),
            # Only with --retrain, so every other compile keeps the key it had.
            **({"retrain": spec.retrain.describe(train_set)} if spec.retrain and train_set else {}),
        }
    )
    if spec.use_cache:
        hit = cache_mod.lookup(cache_dir, key)
        if hit is not None:
            _say(progress, f"cache hit {key[:12]}: {hit}")
            report = CompileReport.from_dict(json.loads((hit / "report.json").read_text()))
            report.cached = True
            report.artifact = str(out.resolve() / Path(report.artifact).name)
            _publish(out, lambda tmp: _copy_cached(hit, tmp, report))
            return report

    # Compressed sizes for the report are worked out on a side thread while candidates build.
    with tempfile.TemporaryDirectory(prefix="edgefleet-compile-") as work_str, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="compressed-size") as sizes:
        work = Path(work_str)
        retrained: list[RetrainedModel] = []
        if spec.retrain is not None and train_set is not None:
            retrained = retrain_mod.retrain(spec.retrain, source, train_set, work, threads=target.threads,
                                            progress=progress)
        report, artifact, chosen_recipe = _run_candidates(
            spec,
            source,
            target,
            [*recipes, *retrain_mod.retrained_recipes(recipes, retrained)],
            calib,
            gate_set,
            gate,
            chosen_measurer,
            work,
            progress,
            key,
            toolchain,
            sizes,
        )
        report.elapsed_s = round(time.monotonic() - started, 2)
        report.runtime = _runtime_of(chosen_recipe.runtime, target, toolchain)
        if spec.retrain is not None:
            report.retrain = retrain_mod.report_section(retrained, report.candidates)
        artifact_name = f"model{artifact.suffix}"
        report.artifact = str(out.resolve() / artifact_name)
        manifest = _manifest(report, source, target, chosen_recipe, artifact, artifact_name)

        def fill(tmp: Path) -> None:
            move_build(artifact, tmp / artifact_name, copy=True)
            _write_json(tmp / "report.json", report.to_dict())
            _write_json(tmp / "manifest.json", manifest)
            for model in retrained:  # the loss curves, next to report.json
                if model.curve_png is not None:
                    shutil.copy2(model.curve_png, tmp / model.curve_png.name)

        _publish(out, fill)
        if spec.use_cache:
            cache_mod.store(cache_dir, key, out)
    return report


def _run_candidates(
    spec: CompileSpec,
    source: SourceModel,
    target: TargetSpec,
    recipes: list[Recipe],
    calib: Dataset | None,
    gate_set: Dataset,
    gate: Gate,
    measurer: Measurer,
    work: Path,
    progress: Progress | None,
    key: str,
    toolchain: dict[str, str],
    sizes: Executor,
) -> tuple[CompileReport, Path, Recipe]:
    """Build, gate, measure, select, report: each step below is one function."""
    judge = _GateJudge.for_source(source, target, gate, gate_set, progress)
    quick = (
        LocalMeasurer(threads=target.threads, rounds=5, round_ms=20.0) if isinstance(measurer, LocalMeasurer) else None
    )
    candidates = _build_candidates(spec, source, target, recipes, calib, judge, work, progress, sizes, quick)
    candidates += _thread_variants(candidates, target, thread_counts(spec, target, measurer), judge, work, progress)
    _measure(candidates, measurer, gate_set, progress)
    chosen, baseline, gain, why = _select(spec, candidates, judge)
    chosen, gain, why = _confirm(spec, chosen, baseline, gain, why, measurer, gate_set, progress)
    report = _report(
        spec, source, target, candidates, chosen, baseline, gain, why, judge, calib, measurer, key, toolchain
    )
    assert chosen.path is not None
    return report, chosen.path, chosen.recipe


@dataclass
class _GateJudge:
    """The fp32 reference on the gate samples and how a candidate's outputs are judged against it."""

    gate: Gate
    gate_set: Dataset
    threads: int
    reference: dict[str, np.ndarray]
    ref_score: float | None

    @classmethod
    def for_source(
        cls, source: SourceModel, target: TargetSpec, gate: Gate, gate_set: Dataset, progress: Progress | None
    ) -> _GateJudge:
        _say(progress, f"reference: running fp32 source on {gate_set.count} gate samples")
        try:
            reference = ModelRunner(source.path, target.threads).run_dataset(gate_set)
        except CompileError:
            raise
        except Exception as exc:  # the runtimes raise RuntimeError/ValueError/their own types
            runtime = "LiteRT" if source.path.suffix == ".tflite" else "onnxruntime"
            detail = " ".join(str(exc).split())[:300]
            raise CompileError(
                f"{source.path.name} does not run on stock {runtime}, so there is no reference to gate builds "
                f"against: {detail} (a custom op needs a runtime built with it; export the model without it)"
            ) from None
        ref_score = gate.score(reference, {**gate_set.inputs, **gate_set.extra})
        return cls(gate, gate_set, target.threads, reference, ref_score)

    def evaluate(self, path: Path, runtime: RuntimeChoice | None = None) -> GateResult:
        return self.judge(ModelRunner(path, self.threads, runtime=runtime).run_dataset(self.gate_set))

    def judge(self, outs: Mapping[str, np.ndarray]) -> GateResult:
        value = self.gate.agreement(self.reference, outs)
        score = self.gate.score(outs, {**self.gate_set.inputs, **self.gate_set.extra})
        same = self.gate.metric_name == "cosine" or self.gate.labelled  # agreement is cosine then
        cosine = value if same else fidelity(self.reference, outs)
        return GateResult(value, score, self.gate.passes(value, score, self.ref_score), cosine)

    def probe(self) -> GateProbe:
        """The gate as a score on single-sample runs, for NNCF's accuracy control."""
        feeds = self.gate_set.model_feeds(1)
        names = list(self.reference)
        per_sample = not self.gate_set.batchable  # the runner stacks single-sample runs then

        def score(runs: list[list[np.ndarray]]) -> float:
            joined = {
                name: (np.stack if per_sample else np.concatenate)([run[i] for run in runs])
                for i, name in enumerate(names)
            }
            result = self.judge(joined)
            if result.score is not None and self.ref_score is not None:
                return float(result.score) - float(self.ref_score) + 1.0  # 1.0 where it matches fp32's score
            return float(result.fidelity)

        return GateProbe(feeds, score, self.gate.allowed_drop)


def _needs_calib(recipe: Recipe) -> bool:
    return any(
        name in ("static_int8", "mixed_precision", "pow2_int8", "npu_uint8", "tflite_export", "openvino_int8")
        or dict(params).get("recipe") == "static"
        for name, params in recipe.steps
    )


def _build_candidates(
    spec: CompileSpec,
    source: SourceModel,
    target: TargetSpec,
    recipes: list[Recipe],
    calib: Dataset | None,
    judge: _GateJudge,
    work: Path,
    progress: Progress | None,
    sizes: Executor,
    quick: LocalMeasurer | None = None,
) -> list[_Candidate]:
    source_ops = _op_types(source)
    # Recipes share leading steps (every ONNX recipe starts with opset_upgrade + simplify). Within
    # one compile the same steps on the same source give the same file, so each prefix is run once:
    # steps so far -> (the file they produced, the notes they added). Passes never write to their input.
    prefixes: dict[tuple[str, ...], tuple[Path, list[str]]] = {}
    shared = work / "steps"
    shared.mkdir()
    candidates: list[_Candidate] = []
    by_name: dict[str, _Candidate] = {}
    # (bytes of the build, its runtime) -> the candidate that built it first: two recipes that end in
    # the same file on the same runtime (fp16 weights of a model whose weights were fp16 already) are
    # one build, gated and timed once.
    built: dict[tuple[tuple[str, ...], RuntimeChoice], str] = {}
    int8_failed = int8_passed = False
    probe: GateProbe | None = None
    for index, recipe in enumerate(recipes, start=1):
        if recipe.fallback and (int8_passed or not int8_failed):
            continue
        if (must_fail := recipe.after_failure_of + recipe.when_failed) and not all(
            (c := by_name.get(name)) is not None and c.path is not None and not c.passed
            for name in must_fail
        ):
            continue
        cand = _Candidate(recipe)
        candidates.append(cand)
        by_name[recipe.name] = cand
        _say(progress, f"[{index}/{len(recipes)}] building {recipe.name}")
        t0 = time.monotonic()
        if _needs_calib(recipe) and calib is None:
            cand.error = "skipped: needs --calib (static int8 is never calibrated on random data)"
            continue
        if recipe.needs_ops and not set(recipe.needs_ops) & source_ops:
            cand.error = f"skipped: the model has no {'/'.join(recipe.needs_ops)} node"
            continue
        if recipe.fallback or recipe.after_failure_of:
            # What the search starts from: the named builds, or (a fallback) every int8 build that failed.
            failed = [by_name[name] for name in recipe.after_failure_of] or [
                c for c in candidates
                if c.recipe.precision in ("int8", "uint8") and c.path is not None and not c.passed
                and c.recipe.runtime == recipe.runtime
            ]
            slow = _too_far_to_recover(failed, judge) or _not_worth_searching(
                failed, candidates, quick, gate_set=judge.gate_set, min_speedup=spec.min_speedup)
            if slow:
                cand.error = f"skipped: {slow}"
                _say(progress, f"    {recipe.name}: {cand.error}")
                continue
        if recipe.after_failure_of:
            probe = probe or judge.probe()
        cand_dir = work / f"{index:02d}-{recipe.name}"
        cand_dir.mkdir()
        ctx = PassContext(
            target=target,
            workdir=cand_dir,
            calib=calib,
            input_shapes=dict(spec.input_shapes),
            evaluate=judge.evaluate,
            gate_probe=probe,
            progress=progress,
        )
        try:
            path = _run_steps(recipe, source, target, ctx, prefixes, shared, cand_dir)
            final = move_build(path, work / f"{index:02d}-{recipe.name}{path.suffix}", copy=True)
            digest = tuple(sha256_file(part) for part in build_files(final))
            same = built.setdefault((digest, recipe.runtime), recipe.name)
            if same != recipe.name and recipe.name not in _REFERENCES:  # the references are always timed
                raise PassError(f"skipped: the same build as {same}")
            cand.path = final
            cand.compressed = sizes.submit(_compressed_size, final)
            result = judge.evaluate(final, recipe.runtime)
            cand.fidelity, cand.score, cand.passed = result.fidelity, result.score, result.passed
            cand.cosine = result.cosine
        except PassError as exc:
            cand.error = str(exc)
        except CompileError:
            raise
        except Exception as exc:  # a pass bug must not sink the other candidates; it is reported
            cand.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        cand.notes = ctx.notes
        cand.build_s = time.monotonic() - t0
        if recipe.precision in ("int8", "uint8") and index > 1 and cand.path is not None:
            int8_passed |= cand.passed
            int8_failed |= not cand.passed
        shutil.rmtree(cand_dir, ignore_errors=True)
        _say(
            progress,
            f"    {recipe.name}: "
            + (
                f"error: {cand.error}"
                if cand.error
                else f"{judge.gate.metric} {cand.fidelity:.5f} gate {'pass' if cand.passed else 'FAIL'}"
            ),
        )
    return candidates


def fewer_threads(threads: int) -> list[int]:
    """The thread counts tried besides the target's own: one thread, and half the cores on larger parts."""
    return sorted({n for n in (threads // 2, 1) if 0 < n < threads}, reverse=True)


def thread_counts(spec: CompileSpec, target: TargetSpec, measurer: Measurer) -> list[int]:
    """The fewer thread counts this compile tries: only where candidates are really timed (here, or
    on a device whose agent times a candidate on the count it asks for). An estimate cannot tell."""
    timed = isinstance(measurer, LocalMeasurer) or bool(getattr(measurer, "times_threads", False))
    return fewer_threads(target.threads) if spec.thread_search and timed else []


def _thread_variants(
    candidates: list[_Candidate], target: TargetSpec, counts: list[int], judge: _GateJudge, work: Path,
    progress: Progress | None,
) -> list[_Candidate]:
    """Each build that passed the gate again, on fewer intra-op threads than the device has cores.

    A small model spends much of a run handing each op's work to the other threads and waiting for
    them (PP-OCR's direction classifier, ~1 ms: OpenVINO bf16 1.8x faster than onnxruntime on two
    threads, 2.5x on one). The variant is the same file with the thread count in its runtime, gated
    again (a thread count can change reduction order) and timed beside the others; the manifest
    carries the count the chosen build was timed with, and the agent serves it on that many."""
    passed = [c for c in candidates if c.passed and c.path is not None and not c.recipe.runtime.threads]
    if not counts or not passed:
        return []
    _say(progress, f"gating {len(passed) * len(counts)} variants on {'/'.join(map(str, counts))} of "
                   f"{target.threads} threads")
    variants: list[_Candidate] = []
    for cand in passed:
        assert cand.path is not None
        for n in counts:
            runtime = replace(cand.recipe.runtime, threads=n)
            recipe = replace(cand.recipe, name=f"{cand.recipe.name}-t{n}", runtime=runtime)
            variant = _Candidate(recipe, notes=[*cand.notes, f"{cand.recipe.name} on {n} of {target.threads} threads"])
            variant.path = move_build(cand.path, work / f"{cand.path.stem}-t{n}{cand.path.suffix}", copy=True)
            variant.compressed = cand.compressed
            try:
                result = judge.evaluate(variant.path, runtime)
            except Exception as exc:  # the runtimes raise their own types; the parent build stays
                variant.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            else:
                variant.fidelity, variant.score, variant.passed = result.fidelity, result.score, result.passed
                variant.cosine = result.cosine
            variants.append(variant)
    return variants


# An accuracy-aware search (ops back to float until the gate passes) recovers a drop a few times the
# allowed one. Past this multiple it ends with most of the model in float, after many ranking runs
# (MediaPipe's pose landmarks: int8 at cosine 0.68 against a 0.99 budget, 7 minutes of NNCF ranking
# on 2 cores, still 0.67).
_RECOVERABLE_DROP_FACTOR = 10.0


def _too_far_to_recover(failed: list[_Candidate], judge: _GateJudge) -> str:
    """Why the accuracy-aware search is skipped when every build it would start from lost far more
    than the gate allows; "" when one of them is within reach."""
    allowed = max(judge.gate.allowed_drop, 1e-3)
    losses: list[tuple[str, float]] = []
    for cand in failed:
        if cand.score is not None and judge.ref_score is not None:  # a task score: labels or --eval
            loss = judge.ref_score - cand.score
        elif cand.fidelity is not None and judge.ref_score is None:  # an agreement with fp32
            loss = 1.0 - cand.fidelity
        else:
            return ""
        if loss <= _RECOVERABLE_DROP_FACTOR * allowed:
            return ""
        losses.append((cand.recipe.name, loss))
    if not losses:
        return ""
    worst = ", ".join(f"{name} lost {loss:.3f}" for name, loss in losses)
    return (
        f"{worst} against the {allowed:.3f} allowed, more than {_RECOVERABLE_DROP_FACTOR:.0f}x: keeping enough "
        "ops in float to recover that leaves little int8 to gain"
    )


def _not_worth_searching(
    failed: list[_Candidate],
    candidates: list[_Candidate],
    quick: LocalMeasurer | None,
    *,
    gate_set: Dataset,
    min_speedup: float,
) -> str:
    """An accuracy-aware search only takes speed away from the failed build it starts from: when that
    build is already no faster than the fastest build that passed, the search cannot win. Timed here
    (a few short interleaved rounds) only where candidates are timed on this machine."""
    passed = [c for c in candidates if c.passed and c.path is not None]
    if quick is None or not passed or not failed:
        return ""
    paths = [c.path for c in (*failed, *passed) if c.path is not None]
    stats = quick.measure(paths, gate_set.inputs, runtimes={c.path: c.recipe.runtime for c in (*failed, *passed)
                                                             if c.path is not None})
    fastest = min(passed, key=lambda c: stats[c.path].median_ms if c.path in stats else float("inf"))
    best = fastest.path
    for cand in failed:
        if cand.path in stats and best in stats and paired_speedup(stats[best], stats[cand.path]) >= min_speedup:
            return ""
    return (
        f"{', '.join(c.recipe.name for c in failed)} was not {min_speedup:.2f}x faster than "
        f"{fastest.recipe.name} before any op went back to float"
    )


def _run_steps(
    recipe: Recipe,
    source: SourceModel,
    target: TargetSpec,
    ctx: PassContext,
    prefixes: dict[tuple[str, ...], tuple[Path, list[str]]],
    shared: Path,
    cand_dir: Path,
) -> Path:
    path = recipe.start_from or source.path
    done: tuple[str, ...] = (f"start:{recipe.origin}",) if recipe.start_from else ()
    for pass_name, params in recipe.steps:
        done += (f"{pass_name}{json.dumps(dict(params), sort_keys=True, default=str)}",)
        if done in prefixes:
            path, notes = prefixes[done]
            ctx.notes.extend(notes)
            continue
        pass_cls = load_pass(pass_name, target, source.format)
        noted = len(ctx.notes)
        with _quiet_toolchain():
            path = pass_cls(**dict(params)).run(path, ctx)
        if path.parent == cand_dir:  # the candidate's folder goes when it is done; keep the step
            path = move_build(path, shared / f"{len(prefixes):02d}-{path.name}")
        prefixes[done] = (path, ctx.notes[noted:])
    return path


def _measure(candidates: list[_Candidate], measurer: Measurer, gate_set: Dataset, progress: Progress | None) -> None:
    baseline = candidates[0]
    if baseline.path is None:
        raise CompileError(
            f"the fp32 baseline could not be built ({baseline.error}); check the model loads in onnxruntime"
        )
    to_measure = [c for c in candidates if c.path is not None and (c.passed or c is baseline)]
    _say(progress, f"measuring {len(to_measure)} candidates on {measurer.measured_on}")
    paths = [c.path for c in to_measure if c.path]
    runtimes = {c.path: c.recipe.runtime for c in to_measure if c.path}
    stats = measurer.measure(paths, gate_set.inputs, runtimes=runtimes)
    if isinstance(measurer, LocalMeasurer) and measurer.busy_note:
        _say(progress, f"warning: {measurer.busy_note}")
    for cand in to_measure:
        assert cand.path is not None
        cand.stats = stats.get(cand.path)
        if cand.stats is None and cand is not baseline:
            cand.notes.append(f"not measured on {measurer.measured_on}: {measurer.cannot_measure(cand.path)}")


def _select(
    spec: CompileSpec, candidates: list[_Candidate], judge: _GateJudge
) -> tuple[_Candidate, _Candidate, float, str]:
    gate = judge.gate
    baseline = candidates[0]
    passed = [c for c in candidates if c.passed and c.stats is not None]
    if not passed:
        best = max((c for c in candidates if c.fidelity is not None), key=lambda c: c.fidelity or 0.0)
        if best.score is not None and judge.ref_score is not None:
            detail = (
                f"best {best.recipe.name}: score {best.score:.4f} vs fp32 {judge.ref_score:.4f}, "
                f"max drop {gate.allowed_drop:g}"
            )
            fix = "raise the allowed drop or calibrate with data closer to production"
        else:
            detail = f"best {best.recipe.name}: {gate.metric} {best.fidelity:.6f} < budget {gate.budget}"
            fix = "lower --budget, pick a --metric that fits the task, or calibrate with data closer to production"
        raise CompileError(f"no candidate meets the accuracy gate ({detail}); {fix}")

    assert baseline.stats is not None
    base_stats = baseline.stats

    def gain_of(c: _Candidate) -> float:
        return 1.0 if c is baseline or c.stats is None else paired_speedup(base_stats, c.stats)

    quickest = max(passed, key=gain_of)
    assert quickest.stats is not None
    quickest_stats = quickest.stats

    def behind_quickest(c: _Candidate) -> float:
        """How much faster the quickest is than ``c``, paired round by round with it directly (two
        gains over the baseline, each with its own noise, would add their errors)."""
        return 1.0 if c is quickest or c.stats is None else paired_speedup(c.stats, quickest_stats)

    # Gains within tie_tolerance are noise on a shared machine: then the smaller bundle wins.
    ties = [c for c in passed if behind_quickest(c) <= 1 + spec.tie_tolerance]
    fastest = min(ties, key=lambda c: build_size(c.path) if c.path else 0)
    assert fastest.stats is not None
    gain = gain_of(fastest)
    if fastest is baseline or fastest.recipe.name == "fp32-source" or (baseline.passed and gain < spec.min_speedup):
        chosen, why = _plain_fp32(spec, baseline, passed, fastest, gain)
        smaller = _smaller_at_par(spec, chosen, passed)
        if smaller is not None:
            chosen, why = smaller
    elif not baseline.passed:
        chosen = fastest
        why = (
            f"the fp32 baseline fails the gate against the source; {fastest.recipe.name} is the fastest "
            "candidate within it"
        )
    else:
        chosen = fastest
        why = f"fastest candidate within the gate: {gain:.2f}x over the fp32 baseline ({baseline.recipe.name})"
        if fastest is not quickest:
            why += f", and the smallest build within {spec.tie_tolerance:.0%} of the quickest ({quickest.recipe.name})"
    failed_gate = [c.recipe.name for c in candidates if c.path is not None and not c.passed]
    if failed_gate:
        why += f"; failed the gate: {', '.join(failed_gate)}"
    # The speedup and size ratio reported are against the model the user gave, as given, where it was
    # timed: that is what a user compares with. (Without it, against the optimized fp32 graph.)
    source = next((c for c in passed if c.recipe.name == "fp32-source"), None)
    reference = source if source is not None and source.stats is not None else baseline
    assert reference.stats is not None and chosen.stats is not None
    gain = 1.0 if chosen is reference else paired_speedup(reference.stats, chosen.stats)
    return chosen, reference, gain, why


# A pick whose measured gain over the model as given is under this is within reach of one noisy
# measurement: it is timed again against the source, alone with it and over more rounds, before it ships.
CONFIRM_BELOW = 1.15


def _confirm(
    spec: CompileSpec,
    chosen: _Candidate,
    reference: _Candidate,
    gain: float,
    why: str,
    measurer: Measurer,
    gate_set: Dataset,
    progress: Progress | None,
) -> tuple[_Candidate, float, str]:
    """Second look at a close call. The search timed every candidate in the same rounds, so a small
    gain (or a "smaller at par" pick) rests on a few per-round ratios among many builds. Here the pick
    and the reference are timed again, just the two: on this machine on twice the rounds, on a device
    in a second measurement (one more round trip, only for a close call). When that shows the pick
    slower than the reference by more than the tie tolerance (or PAR_FLOOR_MS), the reference ships
    instead, and the report says so; otherwise the pick ships with the confirmed figure. An estimate is
    no measurement: estimated compiles are not timed again."""
    if (
        chosen is reference or not isinstance(measurer, LocalMeasurer | DeviceMeasurer) or gain >= CONFIRM_BELOW
        or not reference.passed or reference.path is None or chosen.path is None
    ):
        return chosen, gain, why
    again: Measurer
    if isinstance(measurer, LocalMeasurer):
        again = LocalMeasurer(
            threads=measurer.threads, rounds=2 * measurer.rounds, round_ms=measurer.round_ms, seed=measurer.seed + 1
        )
        where = f"over {again.rounds} rounds"
    else:
        again, where = measurer, f"on {measurer.measured_on}"
    _say(progress, f"confirming {chosen.recipe.name} against {reference.recipe.name} ({where})")
    paths = [reference.path, chosen.path]
    runtimes = {p: c.recipe.runtime for p, c in ((reference.path, reference), (chosen.path, chosen))}
    try:
        stats = again.measure(paths, gate_set.inputs, runtimes=runtimes)
    except CompileError:
        raise
    except Exception as exc:  # a device that fails the second look (gone offline) leaves the first figure
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        chosen.notes.append(f"not timed again {where}: {detail}")
        return chosen, gain, why
    if reference.path not in stats or chosen.path not in stats:
        return chosen, gain, why
    confirmed = paired_speedup(stats[reference.path], stats[chosen.path])
    note = f"timed again with {reference.recipe.name} {where}: x{confirmed:.2f}"
    note += f" (search: x{gain:.2f})"
    chosen.notes.append(note)
    # Slower by more than the tie tolerance, or than PAR_FLOOR_MS per inference where that is more:
    # the same "as fast" the smaller-at-par rule allows, so a pick that rule made is not undone by it.
    if not _as_fast(spec, stats[reference.path].median_ms, confirmed):
        reference.notes.append(f"ships instead of {chosen.recipe.name}: {note}")
        return reference, 1.0, (
            f"{why}; but timed again alone with {reference.recipe.name} {where}, "
            f"{chosen.recipe.name} was x{confirmed:.2f} of its speed, so {reference.recipe.name} ships"
        )
    # The report's latencies for the pair then come from the same rounds as its speedup.
    chosen.timed_again, reference.timed_again = stats[chosen.path], stats[reference.path]
    return chosen, confirmed, f"{why}; {note}"


# A build this much smaller than the fp32 one that would ship is worth shipping at the same speed:
# less to download to every device, less flash, less memory. Smaller differences are not.
SMALLER_AT_PAR = 0.8
# "The same speed" for that: within the tie tolerance, or within this many milliseconds per
# inference, below a runtime's own per-call overhead and below anything a serving loop can see.
PAR_FLOOR_MS = 0.005


def _as_fast(spec: CompileSpec, ref_ms: float, speedup: float) -> bool:
    """"As fast" as a build taking ``ref_ms``, for one ``speedup`` over it: at most the tie tolerance
    or PAR_FLOOR_MS per inference slower, whichever allows more."""
    return ref_ms * (1 / max(speedup, 1e-9) - 1) <= max(spec.tie_tolerance * ref_ms, PAR_FLOOR_MS)


def _smaller_at_par(
    spec: CompileSpec, plain: _Candidate, passed: list[_Candidate]
) -> tuple[_Candidate, str] | None:
    """When nothing is faster than fp32 by enough, a compressed build within the gate that is as
    fast as the fp32 build (paired round by round, within the tie tolerance) and at most
    SMALLER_AT_PAR of its size ships instead: the smallest such one."""
    if plain.path is None or plain.stats is None:
        return None
    plain_stats, plain_size = plain.stats, build_size(plain.path)
    at_par = [
        c for c in passed
        if c is not plain and c.path is not None and c.stats is not None
        and c.recipe.name != "fp32-source"
        and build_size(c.path) <= SMALLER_AT_PAR * plain_size
        and _as_fast(spec, plain_stats.median_ms, paired_speedup(plain_stats, c.stats))
    ]
    if not at_par:
        return None
    best = min(at_par, key=lambda c: build_size(c.path) if c.path else 0)
    assert best.stats is not None and best.path is not None
    ratio = build_size(best.path) / plain_size
    return best, (
        f"no candidate was faster than fp32 by enough; {best.recipe.name} is as fast as {plain.recipe.name} "
        f"within noise (speed x{paired_speedup(plain_stats, best.stats):.2f}, at most {spec.tie_tolerance:.0%} or "
        f"{PAR_FLOOR_MS * 1000:g} us per inference slower) at {ratio:.2f}x its size, so the smaller build ships"
    )


def _plain_fp32(
    spec: CompileSpec, baseline: _Candidate, passed: list[_Candidate], fastest: _Candidate, gain: float
) -> tuple[_Candidate, str]:
    """Nothing beat fp32 by enough: ship the optimized graph, or the source as given when that is as
    fast (within the tie tolerance, paired round by round) and smaller on disk."""
    if fastest is baseline or fastest.recipe.name == "fp32-source":
        why = "no candidate within the gate was faster than the optimized fp32 graph"
    else:
        why = (
            f"the best candidate within the gate ({fastest.recipe.name}) was only {gain:.2f}x faster, under "
            f"the {spec.min_speedup:.2f}x needed to beat measurement noise; plain fp32 is the answer"
        )
    source = next((c for c in passed if c.recipe.name == "fp32-source"), None)
    if source is None or source.path is None or source.stats is None:
        return baseline, why
    if not baseline.passed or baseline.stats is None or baseline.path is None:
        return source, why + "; the optimized graph is not usable, so the source as given ships"
    behind = paired_speedup(source.stats, baseline.stats)  # > 1: the optimized graph is faster
    if behind > 1 + spec.tie_tolerance:
        return baseline, why
    size, optimized = build_size(source.path), build_size(baseline.path)
    if behind * (1 + spec.tie_tolerance) < 1:
        return source, why + f"; the source as given was {1 / behind:.2f}x faster than the optimized graph"
    if size < optimized:
        return source, why + f"; the source as given is as fast and smaller ({size} vs {optimized} bytes)"
    return baseline, why


def _report(
    spec: CompileSpec,
    source: SourceModel,
    target: TargetSpec,
    candidates: list[_Candidate],
    chosen: _Candidate,
    baseline: _Candidate,
    gain: float,
    why: str,
    judge: _GateJudge,
    calib: Dataset | None,
    measurer: Measurer,
    key: str,
    toolchain: dict[str, str],
) -> CompileReport:
    assert chosen.path is not None and chosen.stats is not None and baseline.path is not None

    # When the close-call check timed the pick and the baseline again, both latencies come from it,
    # so that baseline -> result matches the speedup; the candidate rows keep the search's figures.
    again = chosen.timed_again is not None and baseline.timed_again is not None

    def summary(c: _Candidate) -> dict[str, Any]:
        assert c.path is not None and c.stats is not None
        stats = c.timed_again if again and c.timed_again is not None else c.stats
        return {
            "recipe": c.recipe.name,
            "runtime": c.recipe.runtime.describe(),
            "latency_ms": round(stats.median_ms, 4),
            "timed_again": again,
            "size_bytes": build_size(c.path),
            "compressed_bytes": c.compressed_bytes(),
            "fidelity": None if c.cosine is None else round(c.cosine, 6),
            "metric_score": None if c.fidelity is None else round(c.fidelity, 6),
            "task_score": c.score,
            "estimated": c.stats.estimated,
        }

    estimated = bool(chosen.stats.estimated)
    gate_set = judge.gate_set
    return CompileReport(
        artifact="",
        chosen=chosen.recipe.name,
        why=why,
        baseline=summary(baseline),
        result=summary(chosen),
        speedup=round(gain, 4),
        size_ratio=round(build_size(baseline.path) / max(build_size(chosen.path), 1), 4),
        candidates=[c.row() for c in candidates],
        target=target.as_dict(),
        gate={
            **judge.gate.describe(),
            "data": gate_set.source,
            "samples": gate_set.count,
            "reference_score": judge.ref_score,
            "calibration": calib.source if calib else None,
            "calibration_samples": calib.count if calib else 0,
        },
        latency={
            "measured_on": measurer.measured_on,
            "estimated": estimated,
            "note": (
                "latencies are ESTIMATED from micro-benchmark figures, not measured; no device of this class was online"
                if estimated
                else chosen.stats.method
            ),
        },
        toolchain=toolchain,
        cache_key=key,
        source={
            "path": str(source.path),
            "sha256": source.sha256,
            "format": source.format,
            "opset": source.opset,
            "inputs": [t.as_dict() for t in source.inputs],
            "outputs": [t.as_dict() for t in source.outputs],
        },
    )


def _runtime_of(choice: RuntimeChoice, target: TargetSpec, toolchain: Mapping[str, str]) -> dict[str, Any]:
    if choice.name == "openvino":
        out: dict[str, Any] = {
            "name": "openvino",
            "device": choice.device,
            "inference_precision": choice.inference_precision,
            "version": toolchain.get("openvino"),
        }
    elif choice.name == "litert":
        out = {"name": "litert", "version": toolchain.get("ai-edge-litert")}
    else:
        out = {"name": "onnxruntime", "execution_provider": target.execution_provider,
               "version": toolchain.get("onnxruntime")}
    if choice.threads:  # written only when set: other manifests keep their exact bytes
        out["threads"] = choice.threads
    return out


def _op_types(source: SourceModel) -> set[str]:
    if source.format != "onnx":
        return set()
    import onnx

    return {n.op_type for n in onnx_graph.all_nodes(onnx.load(str(source.path), load_external_data=False).graph)}


def _manifest(
    report: CompileReport,
    source: SourceModel,
    target: TargetSpec,
    recipe: Recipe,
    artifact: Path,
    artifact_name: str,
) -> dict[str, Any]:
    files = build_files(artifact)
    return {
        "schema_version": REPORT_SCHEMA,
        "kind": "edgefleet.compile",
        "artifact": {
            "file": artifact_name,
            "sha256": sha256_file(artifact),
            "size_bytes": build_size(artifact),
            "format": {".tflite": "tflite", ".xml": "openvino-ir"}.get(artifact.suffix, "onnx"),
            "files": [
                {"file": Path(artifact_name).with_suffix(f.suffix).name, "sha256": sha256_file(f),
                 "size_bytes": f.stat().st_size}
                for f in files
            ],
        },
        "hardware_class": target.hardware_class,
        "execution_provider": target.execution_provider,
        "runtime": report.runtime,
        "provenance": {
            "source_sha256": source.sha256,
            "source_file": source.path.name,
            "recipe": {"name": recipe.name, "passes": recipe.describe()},
            "toolchain": report.toolchain,
            "cache_key": report.cache_key,
        },
        "io": report.source.get("inputs"),
        "outputs": report.source.get("outputs"),
        "report": report.to_dict(),
    }


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _copy_cached(entry: Path, tmp: Path, report: CompileReport) -> None:
    for item in entry.iterdir():
        if item.name != "report.json":
            shutil.copy2(item, tmp / item.name)
    _write_json(tmp / "report.json", report.to_dict())


def _publish(out: Path, fill: Callable[[Path], None]) -> None:
    """Build the output in a sibling temp dir and rename it into place: never a partial --out."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    old: Path | None = None
    try:
        fill(tmp)
        for item in tmp.iterdir():
            fd = os.open(item, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
