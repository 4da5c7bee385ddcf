"""Retrained candidates: structured channel pruning and knowledge distillation (``--retrain``,
``--student``), fine-tuned on the user's own unlabeled data, on the controller only.

The ONNX source is converted to PyTorch (onnx2torch), pruned by whole channels at a few ratios
with Torch-Pruning, and each pruned network is distilled against the source's outputs; a smaller
architecture the user gives (``--student``) is trained the same way. Each result is exported back
to ONNX and enters the normal candidate chain (fp32, int8, OpenVINO), where the gate and the
timing decide as for every other candidate.

Importing this package does not import torch: :mod:`torch_env` does, inside the functions that
train, so a compile without these flags (and every device) never needs the ``train`` extra.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.controller.compiler.data import Dataset, load_npz
from edgefleet.controller.compiler.errors import CompileError
from edgefleet.controller.compiler.gate import LABELS_KEY
from edgefleet.controller.compiler.model_io import SourceModel, load_source, sha256_file
from edgefleet.controller.compiler.recipes import Recipe
from edgefleet.controller.compiler.retrain.torch_env import check_train_extra

Progress = Callable[[str], None]

# Fewer samples than this and a held-out slice of them cannot say whether fine-tuning helped
# (15% of 32 is 5 samples); below it --retrain is refused rather than trained on noise.
MIN_TRAIN_SAMPLES = 32
DEFAULT_RATIOS = (0.25, 0.5)


@dataclass(frozen=True)
class RetrainSpec:
    """What to retrain: pruning ratios (none for a student-only run), a student, the time budget for
    all of it, and extra unlabeled data to learn from. Part of the compile's cache key."""

    ratios: tuple[float, ...] = DEFAULT_RATIOS
    student: Path | None = None
    budget_s: float = 600.0
    data: Path | None = None  # unlabeled samples beside --calib
    max_epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0

    def flag(self) -> str:
        return "--student" if self.student is not None and not self.ratios else "--retrain"

    def describe(self, train: Dataset) -> dict[str, Any]:
        versions: dict[str, str | None] = {}
        for dist in ("torch", "onnx2torch", "torch-pruning"):
            try:
                versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[dist] = None
        return {
            "ratios": list(self.ratios),
            "student_sha256": sha256_file(self.student) if self.student else None,
            "budget_s": self.budget_s,
            "max_epochs": self.max_epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "seed": self.seed,
            "train_sha256": train.sha256(),
            "versions": versions,
        }


@dataclass
class RetrainedModel:
    """One retrained network: its ONNX file (None when it was skipped) and its report numbers."""

    tag: str
    kind: str  # "pruned" | "student"
    path: Path | None = None
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    curve_png: Path | None = None


def check_retrain(spec: RetrainSpec, source: SourceModel) -> None:
    """The input checks --retrain/--student make before any work: the extra, the source, the student."""
    check_train_extra(spec.flag())
    if source.format != "onnx":
        raise CompileError(f"{spec.flag()} retrains ONNX models; {source.path.name} is {source.format}")
    for ratio in spec.ratios:
        if not 0.0 < ratio < 1.0:
            raise CompileError(f"pruning ratio {ratio} is outside (0, 1); pass ratios such as 0.25,0.5")
    if spec.budget_s <= 0:
        raise CompileError("--retrain-budget must be positive, e.g. 10m")
    if spec.student is not None:
        if not Path(spec.student).is_file():
            raise CompileError(f"--student {spec.student} does not exist; pass the student's .onnx file")
        student = load_source(Path(spec.student))
        if student.format != "onnx":
            raise CompileError(f"--student must be an ONNX model; {Path(spec.student).name} is {student.format}")
        names = [t.name for t in source.inputs]
        if [t.name for t in student.inputs] != names or len(student.outputs) != len(source.outputs):
            raise CompileError(
                f"--student takes {[t.name for t in student.inputs]} and gives {len(student.outputs)} output(s); "
                f"the model takes {names} and gives {len(source.outputs)}: export the student with the same I/O"
            )


def training_data(
    spec: RetrainSpec, source: SourceModel, calib: Dataset | None, shapes: dict[str, tuple[int, ...]]
) -> Dataset:
    """The samples to learn from: the calibration part of --calib (never the gate's held-out part)
    plus --retrain-data. Labels come along only when every sample has one."""
    parts = [calib] if calib is not None else []
    if spec.data is not None:
        parts.append(load_npz(spec.data, source.inputs, flag="--retrain-data", shape_overrides=shapes))
    if not parts:
        raise CompileError(f"{spec.flag()} learns from your data; pass --calib DATA.npz (or --retrain-data)")
    if any(not p.batchable for p in parts):
        raise CompileError(f"{spec.flag()} needs samples on axis 0 of every input; store the arrays as N x shape")
    count = sum(p.count for p in parts)
    if count < MIN_TRAIN_SAMPLES:
        raise CompileError(
            f"{spec.flag()} has {count} training samples, under the minimum of {MIN_TRAIN_SAMPLES}; "
            "pass more unlabeled samples with --calib or --retrain-data"
        )
    inputs = {k: np.concatenate([p.inputs[k] for p in parts]) for k in parts[0].inputs}
    extra = {}
    if all(LABELS_KEY in p.extra for p in parts):
        extra[LABELS_KEY] = np.concatenate([p.extra[LABELS_KEY] for p in parts])
    return Dataset(inputs, extra, " + ".join(p.source for p in parts))


def retrain(
    spec: RetrainSpec,
    source: SourceModel,
    train: Dataset,
    work: Path,
    *,
    threads: int,
    progress: Progress | None = None,
) -> list[RetrainedModel]:
    """Prune and distill (and train the student); a network that fails is returned with its reason."""
    from edgefleet.controller.compiler.retrain.channel_prune import Footprint, footprint, prune_channels
    from edgefleet.controller.compiler.retrain.convert import (
        ConversionError,
        check_agrees,
        check_runs,
        export_onnx,
        to_torch,
    )
    from edgefleet.controller.compiler.retrain.curve import plot_loss_curve
    from edgefleet.controller.compiler.retrain.distill import TrainSettings, distill
    from edgefleet.controller.compiler.retrain.torch_env import load_torch
    from edgefleet.controller.compiler.runner import ModelRunner

    torch, _, _ = load_torch()
    torch.set_num_threads(max(1, threads))
    folder = work / "retrain"
    folder.mkdir(parents=True, exist_ok=True)
    names = [t.name for t in source.inputs]
    teacher = ModelRunner(source.path, threads).run_dataset(train)
    targets = [teacher[t.name] for t in source.outputs]
    inputs = [train.inputs[n] for n in names]
    example = [torch.from_numpy(np.ascontiguousarray(x[:2])) for x in inputs]
    expected = [(2, *t.shape[1:]) for t in targets]
    labels = train.extra.get(LABELS_KEY)
    jobs: list[tuple[str, str, float | None]] = [(f"pruned{round(r * 100)}", "pruned", r) for r in spec.ratios]
    if spec.student is not None:
        jobs.append(("student", "student", None))
    share = spec.budget_s / max(len(jobs), 1)
    _say(progress, f"retrain: {len(jobs)} network(s) on {train.count} samples, {spec.budget_s:.0f}s budget")

    original: Footprint | None = None
    reference = None
    try:
        reference = to_torch(source.path)
        check_runs(reference, example, expected, "the converted model")
        check_agrees(reference, example, [t[:2] for t in targets], "the converted model")
        original = footprint(reference, example)
    except ConversionError as exc:
        reference = None
        reason = f"skipped: {exc}"
        _say(progress, f"retrain: {reason}")
        if not any(kind == "student" for _, kind, _ in jobs):
            return [RetrainedModel(tag, kind, error=reason) for tag, kind, _ in jobs]
        jobs = [j for j in jobs if j[1] == "student"] + [j for j in jobs if j[1] != "student"]
    models: list[RetrainedModel] = []
    deadline = time.monotonic() + spec.budget_s
    for i, (tag, kind, ratio) in enumerate(jobs):
        model = RetrainedModel(tag, kind)
        models.append(model)
        if kind == "pruned" and original is None:
            model.error = "skipped: the model could not be converted to PyTorch"
            continue
        try:
            if kind == "pruned":
                assert ratio is not None
                net = prune_channels(to_torch(source.path), example, ratio, expected)
            else:
                assert spec.student is not None
                net = to_torch(Path(spec.student))
                check_runs(net, example, expected, "the student")
            after = footprint(net, example)
            left = max(deadline - time.monotonic(), 0.0)
            budget = min(left, max(share, left / (len(jobs) - i)))  # time a skipped job left over goes on
            settings = TrainSettings(budget_s=budget, max_epochs=spec.max_epochs, batch_size=spec.batch_size,
                                     lr=spec.lr, seed=spec.seed)
            result = distill(net, inputs, targets, settings, labels=labels, name=tag, progress=progress,
                             teacher=reference)
            model.path = export_onnx(net, example, source, folder / f"{tag}.onnx")
        except ConversionError as exc:
            model.error = f"skipped: {exc}"
            _say(progress, f"retrain {tag}: {model.error}")
            continue
        model.info = {
            "tag": tag,
            "kind": kind,
            "ratio": ratio,
            "student": Path(spec.student).name if kind == "student" and spec.student else None,
            "params_before": original.params if original else None,
            "params_after": after.params,
            "macs_before": original.macs if original else None,
            "macs_after": after.macs,
            "params_removed": _removed(original.params if original else None, after.params),
            "macs_removed": _removed(original.macs if original else None, after.macs),
            "epochs": round(result.epochs, 2),
            "train_s": result.train_s,
            "stopped": result.stopped,
            "best_epoch": result.best_epoch,
            "loss_curve": {"held_out": result.val_loss, "train": result.train_loss},
            "labels_used": labels is not None,
            "samples": train.count,
        }
        model.curve_png = plot_loss_curve(folder / f"retrain-{tag}.png", f"{source.path.stem} {tag}",
                                          result.val_loss, result.train_loss)
        _say(progress, f"retrain {tag}: MACs {_fmt(original.macs if original else None)} -> {_fmt(after.macs)}, "
                       f"params {_fmt(original.params if original else None)} -> {_fmt(after.params)}, "
                       f"{result.epochs:.1f} epochs in {result.train_s:.0f}s ({result.stopped}), "
                       f"loss {result.val_loss[0]:.5f} -> {result.best_loss:.5f}")
    return models


def retrained_recipes(recipes: Sequence[Recipe], models: Sequence[RetrainedModel]) -> list[Recipe]:
    """Each retrained network through the class's fp32 baseline, its first static-int8 recipe and
    its OpenVINO recipes (fp32, bf16, int8 ...), so pruned + int8 and pruned + bf16 combine. The
    accuracy-aware fallbacks and the fp16-weights-on-disk variants are left to the source model."""
    chosen: list[Recipe] = [recipes[0]]
    int8 = next((r for r in recipes[1:] if any(s[0] == "static_int8" for s in r.steps)
                 and not r.fallback and not r.after_failure_of and not r.needs_ops), None)
    if int8 is not None:
        chosen.append(int8)
    chosen += [r for r in recipes if r.runtime.name == "openvino" and not r.after_failure_of
               and "fp16w" not in r.name]
    out = []
    for model in models:
        if model.path is None:
            continue
        for recipe in chosen:
            out.append(replace(recipe, name=f"{model.tag}+{recipe.name}", start_from=model.path, origin=model.tag,
                               summary=f"{model.tag} (retrained), then {recipe.name}"))
    return out


def report_section(models: Sequence[RetrainedModel], candidates: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The report's ``retrain`` object: per network, the numbers above plus each of its candidates'
    metric and latency, and the best of them."""
    rows = []
    for model in models:
        entry: dict[str, Any] = {"tag": model.tag, "kind": model.kind, "error": model.error, **model.info}
        if model.curve_png is not None:
            entry["loss_curve_png"] = model.curve_png.name
        mine = [c for c in candidates if str(c.get("recipe", "")).startswith(f"{model.tag}+")]
        entry["candidates"] = [
            {k: c.get(k) for k in ("recipe", "runtime", "metric_score", "task_score", "passed_gate", "latency_ms",
                                   "error")}
            for c in mine
        ]
        rows.append(entry)
    return {"models": rows, "min_train_samples": MIN_TRAIN_SAMPLES}


def _removed(before: int | None, after: int) -> float | None:
    return None if not before else round(1.0 - after / before, 4)


def _fmt(value: int | None) -> str:
    if value is None:
        return "?"
    return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value / 1e3:.1f}k"


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)

