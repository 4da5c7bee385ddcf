"""--retrain / --student for real: a tiny conv net pruned by channels, distilled for a few epochs
on its calibration samples, exported and compiled through the usual candidates (issue #19).

Kept small (16x16 inputs, a handful of epochs, one int8 recipe) so the whole file stays near 30 s."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgefleet.controller.cli.compile import compile_command
from edgefleet.controller.compiler import retrain as retrain_mod
from edgefleet.controller.compiler.api import CompileSpec, compile_model
from edgefleet.controller.compiler.retrain import MIN_TRAIN_SAMPLES, RetrainSpec
from tests.models import tiny_models

FAST = {"measure_rounds": 3, "measure_round_ms": 10.0, "recipes": ("int8-qdq-perchannel-minmax",)}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("retrain")
    model = tiny_models.conv_net(root / "conv.onnx", channels=(16, 32))
    np.savez(root / "calib.npz", x=tiny_models.conv_inputs(96))
    np.savez(root / "few.npz", x=tiny_models.conv_inputs(MIN_TRAIN_SAMPLES // 2))
    student = tiny_models.conv_net(root / "student.onnx", channels=(4, 8), seed=7)
    return {"model": model, "calib": root / "calib.npz", "few": root / "few.npz", "student": student}


def _compile(teacher: dict[str, Path], out: Path, **retrain: object) -> object:
    spec = CompileSpec(model=teacher["model"], calib=teacher["calib"], out=out,
                       retrain=RetrainSpec(**{"ratios": (0.5,), "budget_s": 60.0, "max_epochs": 6, **retrain}),  # type: ignore[arg-type]
                       **FAST)  # type: ignore[arg-type]
    return compile_model(spec)


def test_pruned_and_distilled_candidates_join_the_search(tmp_path: Path, teacher: dict[str, Path]) -> None:
    out = tmp_path / "out"
    report = _compile(teacher, out)
    section = report.retrain  # type: ignore[attr-defined]
    (model,) = section["models"]
    assert model["error"] is None and model["kind"] == "pruned" and model["ratio"] == 0.5
    # Whole channels went: parameters and MACs both fall, roughly with the square of the kept share.
    assert model["params_after"] < 0.5 * model["params_before"]
    assert model["macs_after"] < 0.5 * model["macs_before"]
    assert 0.4 < model["macs_removed"] < 0.9
    # Distillation lowered the held-out loss, and the curve has a point per epoch plus the start.
    curve = model["loss_curve"]["held_out"]
    assert len(curve) == int(np.ceil(model["epochs"])) + 1 and min(curve[1:]) < curve[0]
    assert model["stopped"] == "max_epochs" and model["train_s"] > 0
    assert (out / model["loss_curve_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The pruned network went through the normal chain: fp32 and int8, gated and timed like the rest.
    rows = {r["recipe"]: r for r in report.candidates}  # type: ignore[attr-defined]
    assert {"pruned50+fp32-optimized", "pruned50+int8-qdq-perchannel-minmax"} <= set(rows)
    pruned = rows["pruned50+fp32-optimized"]
    assert pruned["error"] is None and pruned["metric_score"] is not None
    assert pruned["size_bytes"] < rows["fp32-optimized"]["size_bytes"]
    assert pruned["passes"][0] == {"pass": "retrain", "params": {"network": "pruned50"}}
    assert [c["recipe"] for c in model["candidates"]] == [r for r in rows if r.startswith("pruned50+")]
    written = json.loads((out / "report.json").read_text())
    assert written["retrain"]["models"][0]["loss_curve"]["held_out"] == curve
    # A second compile of the same class is a cache hit, loss curve included.
    again = _compile(teacher, tmp_path / "again")
    assert again.cached and (tmp_path / "again" / model["loss_curve_png"]).is_file()  # type: ignore[attr-defined]


def test_student_is_distilled_to_the_teacher(tmp_path: Path, teacher: dict[str, Path]) -> None:
    report = _compile(teacher, tmp_path / "out", ratios=(), student=teacher["student"], max_epochs=15, lr=1e-2)
    (model,) = report.retrain["models"]  # type: ignore[attr-defined]
    assert model["kind"] == "student" and model["error"] is None
    assert model["params_after"] < model["params_before"]
    curve = model["loss_curve"]["held_out"]
    assert min(curve) < 0.8 * curve[0], curve
    assert any(r["recipe"] == "student+fp32-optimized" for r in report.candidates)  # type: ignore[attr-defined]


def test_training_is_seeded_and_stops_at_the_budget(teacher: dict[str, Path]) -> None:
    from edgefleet.controller.compiler.retrain.convert import to_torch
    from edgefleet.controller.compiler.retrain.distill import TrainSettings, distill
    from edgefleet.controller.compiler.runner import ModelRunner

    x = np.load(teacher["calib"])["x"]
    target = ModelRunner(teacher["model"], 1).run_dataset({"x": x})["logits"]
    curves = []
    for _ in range(2):
        net = to_torch(teacher["student"])
        curves.append(distill(net, [x], [target], TrainSettings(budget_s=60, max_epochs=2, seed=3)).val_loss)
    assert curves[0] == curves[1]
    lines: list[str] = []
    cut = distill(to_torch(teacher["student"]), [x], [target], TrainSettings(budget_s=0.0, max_epochs=500),
                  progress=lines.append)
    assert cut.stopped == "budget" and cut.epochs < 1.0
    assert "eta" in lines[-1] and "[" in lines[-1]


def test_a_graph_the_converter_cannot_handle_is_skipped_with_the_reason(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("LpNormalization", ["c"], ["y"], axis=1)],
        "lpnorm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 8, 8])],
        [numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "lp.onnx"))
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 1, 8, 8)).astype(np.float32))
    report = compile_model(CompileSpec(model=tmp_path / "lp.onnx", calib=tmp_path / "calib.npz", out=tmp_path / "o",
                                       retrain=RetrainSpec(ratios=(0.5,), budget_s=5), **FAST))  # type: ignore[arg-type]
    (model_row,) = report.retrain["models"]
    assert model_row["error"].startswith("skipped: onnx2torch cannot convert")
    assert "LpNormalization" in model_row["error"]
    assert not any(r["recipe"].startswith("pruned50+") for r in report.candidates)
    assert report.chosen  # the usual candidates still ran


def _one_error_line(output: str) -> None:
    """Progress lines may come first; the error itself is one line, and no traceback."""
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if line.startswith("Error")] == [output.strip().splitlines()[-1]]


def _cli(*args: object) -> object:
    return CliRunner().invoke(compile_command, [str(a) for a in args])


def test_bad_input_is_one_line(tmp_path: Path, teacher: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    few = _cli(teacher["model"], "--calib", teacher["few"], "--retrain", "--out", tmp_path / "a")
    assert few.exit_code == 2 and f"minimum of {MIN_TRAIN_SAMPLES}" in few.output  # type: ignore[attr-defined]
    _one_error_line(few.output)  # type: ignore[attr-defined]
    budget = _cli(teacher["model"], "--calib", teacher["calib"], "--retrain", "--retrain-budget", "soon")
    assert budget.exit_code == 2 and "--retrain-budget" in budget.output  # type: ignore[attr-defined]

    other = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["images"], ["logits"])], "other",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])]),
        opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(other, str(tmp_path / "other.onnx"))
    student = _cli(teacher["model"], "--calib", teacher["calib"], "--student", tmp_path / "other.onnx")
    assert student.exit_code == 2 and "export the student with the same I/O" in student.output  # type: ignore[attr-defined]
    _one_error_line(student.output)  # type: ignore[attr-defined]

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch_pruning" else real(name, *a))
    missing = _cli(teacher["model"], "--calib", teacher["calib"], "--retrain", "--out", tmp_path / "b")
    assert missing.exit_code == 2, missing.output  # type: ignore[attr-defined]
    assert "'train' extra" in missing.output and "torch-pruning" in missing.output  # type: ignore[attr-defined]
    _one_error_line(missing.output)  # type: ignore[attr-defined]
    assert not (tmp_path / "b").exists()


def test_ctrl_c_while_training_leaves_nothing(tmp_path: Path, teacher: dict[str, Path],
                                              private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgefleet.controller.compiler.retrain import distill as distill_mod

    real = distill_mod.distill

    def interrupted(*args: object, **kwargs: object) -> object:
        kwargs["progress"] = lambda line: (_ for _ in ()).throw(KeyboardInterrupt())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(distill_mod, "distill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _compile(teacher, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == []
    assert not private_cache.exists() or not any(private_cache.rglob("report.json"))


def test_retrain_recipes_combine_with_int8_and_openvino() -> None:
    from edgefleet.controller.compiler.recipes import recipes_for
    from edgefleet.controller.compiler.target import TargetSpec

    base = TargetSpec.from_class("x86_64")
    from dataclasses import replace

    target = replace(base, openvino_devices=(("CPU", ("FP32", "BF16", "INT8")),))
    rows = recipes_for(target, "onnx")
    made = retrain_mod.retrained_recipes(rows, [retrain_mod.RetrainedModel("pruned25", "pruned", Path("/x.onnx"))])
    names = [r.name for r in made]
    assert names[:2] == ["pruned25+fp32-optimized", "pruned25+int8-qdq-perchannel-minmax"]
    assert "pruned25+ov-bf16" in names and "pruned25+ov-int8" in names
    assert not any("accuracy" in n or "fp16w" in n or "mixed" in n for n in names)
    assert all(r.start_from == Path("/x.onnx") for r in made)


def test_cli_retrain_prints_what_each_network_removed(tmp_path: Path, teacher: dict[str, Path]) -> None:
    result = CliRunner().invoke(compile_command, [
        str(teacher["model"]), "--calib", str(teacher["calib"]), "--retrain", "--retrain-ratios", "0.5",
        "--retrain-budget", "3s", "--recipes", "int8-qdq-perchannel-minmax", "--out", str(tmp_path / "out"),
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "retrain pruned50 [" in result.output and "eta" in result.output  # the per-epoch progress bar
    summary = [line for line in result.output.splitlines()
               if line.startswith("retrain pruned50: MACs") and "removed" in line]
    assert len(summary) == 1 and "removed" in summary[0] and "retrain-pruned50.png" in summary[0]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["retrain"]["models"][0]["train_s"] <= 3.5
