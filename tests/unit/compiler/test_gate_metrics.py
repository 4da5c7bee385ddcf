"""Task-aware gate metrics: each can fail, and each measures what its task cares about."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.controller.compiler import CompileError
from edgefleet.controller.compiler.gate import LABELS_KEY, Gate, agreement, parse_metric

rng = np.random.default_rng(0)


def test_top1_counts_argmax_agreement_not_tensor_closeness() -> None:
    ref = rng.standard_normal((100, 10)).astype(np.float32)
    flipped = ref.copy()
    flipped[:3] = -flipped[:3]  # 3 of 100 samples change their top class
    assert agreement("top1", {"y": ref}, {"y": flipped}) == pytest.approx(0.97)
    scaled = ref * 3.0 + 1.0  # far from fp32 as a tensor, same decisions
    assert agreement("top1", {"y": ref}, {"y": scaled}) == 1.0


def test_seq_argmax_collapses_repeats_and_the_blank() -> None:
    blank, n, t, c = 0, 8, 40, 6
    ref = np.full((n, t, c), -5.0, dtype=np.float32)
    ref[:, :, blank] = 5.0
    ref[:, 10:13, 3] = 9.0  # "3" held for three frames
    moved = ref.copy()
    moved[:, 10, 3] = -5.0  # one frame less of the same character: the same text
    assert agreement("seq-argmax", {"y": ref}, {"y": moved}) == 1.0
    wrong = ref.copy()
    wrong[0, 11, 4] = 20.0  # sample 0 now reads "343": two characters inserted
    # 1 - CER: 2 edits over 8 one-character reference lines
    assert agreement("seq-argmax", {"y": ref}, {"y": wrong}) == pytest.approx(1 - 2 / 8)
    lines = np.full((n, t, c), -5.0, dtype=np.float32)
    lines[:, :, blank] = 5.0
    for i, char in enumerate((1, 2, 3, 4)):  # every line reads "1234"
        lines[:, 4 + 8 * i:7 + 8 * i, char] = 9.0
    swapped = lines.copy()
    swapped[1, 4:7, 1], swapped[1, 4:7, 5] = -5.0, 9.0  # sample 1 reads "5234": one substitution
    assert agreement("seq-argmax", {"y": lines}, {"y": swapped}) == pytest.approx(1 - 1 / (4 * n))


def test_mask_iou_at_a_threshold() -> None:
    ref = np.zeros((2, 1, 10, 10), dtype=np.float32)
    ref[:, :, 2:6, 2:6] = 0.9  # 16 pixels
    got = ref.copy()
    got[0, :, 2:6, 5] = 0.2  # sample 0 loses 4 pixels
    assert agreement("mask-iou", {"p": ref}, {"p": got}) == pytest.approx((12 / 16 + 1) / 2)
    assert agreement("mask-iou", {"p": ref}, {"p": got}, threshold=0.1) == 1.0  # 0.2 still counts at 0.1
    assert agreement("mask-iou", {"p": ref}, {"p": got}, threshold=0.95) == 1.0  # both empty


def test_rel_l2_and_the_minimum_over_outputs() -> None:
    a, b = rng.standard_normal((4, 32)), rng.standard_normal((4, 32))
    assert agreement("rel-l2", {"a": a, "b": b}, {"a": a * 1.01, "b": b}) == pytest.approx(0.99)
    assert agreement("rel-l2", {"a": a, "b": b}, {"a": a, "b": b * 1.5}) == pytest.approx(0.5)


def test_labelled_accuracy_gate_is_a_drop_in_points() -> None:
    gate = Gate(budget=0.01, metric="accuracy")
    labels = np.arange(100) % 10
    logits = np.eye(10)[labels]
    data = {LABELS_KEY: labels}
    ref_score = gate.score({"y": logits}, data)
    assert ref_score == 1.0
    worse = logits.copy()
    worse[:2] = np.roll(worse[:2], 1, axis=1)
    score = gate.score({"y": worse}, data)
    assert score == pytest.approx(0.98)
    assert not gate.passes(0.0, score, ref_score), "a 2-point drop is over a 1-point budget"
    assert gate.passes(0.0, gate.score({"y": np.roll(logits, 0)}, data), ref_score)


def test_bad_metrics_and_budgets_are_one_line_errors() -> None:
    with pytest.raises(CompileError, match="--metric 'top5' is unknown"):
        parse_metric("top5")
    with pytest.raises(CompileError, match="largest accuracy drop"):
        Gate(budget=0.99, metric="accuracy")
    with pytest.raises(CompileError, match="takes no '@'"):
        Gate(metric="top1@0.5")
    assert Gate(metric="mask-iou@0.3").threshold == 0.3


def test_compile_gated_on_labelled_accuracy(tmp_path, mlp) -> None:
    from edgefleet.controller.compiler.api import CompileSpec, compile_model

    with np.load(mlp["eval"]) as data:
        np.savez(tmp_path / "x.npz", x=data["x"])
        np.savez(tmp_path / "labels.npz", labels=data["labels"])
    report = compile_model(CompileSpec(
        model=mlp["model"], target="x86_64-avx2", calib=mlp["calib"], eval_data=tmp_path / "x.npz",
        eval_labels=tmp_path / "labels.npz", metric="accuracy", budget=0.01, out=tmp_path / "o",
        recipes=("int8-qdq-perchannel-minmax",),
    ))
    assert report.gate["kind"] == "labelled" and report.gate["max_drop"] == 0.01
    assert report.gate["reference_score"] > 0.9, "the digits MLP is ~97% accurate in fp32"
    for row in report.candidates:
        if row["task_score"] is not None:
            assert row["passed_gate"] == (report.gate["reference_score"] - row["task_score"] <= 0.01 + 1e-12)
    with pytest.raises(CompileError, match="holds 2 arrays"):
        np.savez(tmp_path / "two.npz", a=np.zeros(200, int), b=np.zeros(200, int))
        compile_model(CompileSpec(model=mlp["model"], target="x86_64-avx2", calib=mlp["calib"],
                                  eval_data=tmp_path / "x.npz", eval_labels=tmp_path / "two.npz", metric="accuracy",
                                  budget=0.01, out=tmp_path / "o2"))
