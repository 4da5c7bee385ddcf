"""Every bad input the issue lists: a one-line error that says how to fix it, exit code 2, and
nothing left in --out."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgefleet.controller.cli.compile import compile_command

HERE = str(Path(__file__).parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def run_bad(tmp_path: Path, args: list[object], expect: str) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(compile_command, [*map(str, args), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    assert expect in lines[0], lines[0]
    assert ";" in lines[0] or "pass" in lines[0]  # the message carries the fix
    assert result.stdout == ""
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*")), "no partial output next to --out either"


def test_truncated_model(tmp_path: Path, mlp: dict[str, Path]) -> None:
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(mlp["model"].read_bytes()[:300])
    run_bad(tmp_path, [bad, "--target", "x86_64-avx2"], "re-export the model")


def test_corrupt_model(tmp_path: Path, mlp: dict[str, Path]) -> None:
    data = bytearray(mlp["model"].read_bytes())
    data[10:40] = b"\xff" * 30
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(bytes(data))
    run_bad(tmp_path, [bad, "--target", "x86_64-avx2"], "corrupt.onnx")


def test_non_model_file(tmp_path: Path) -> None:
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n")
    run_bad(tmp_path, [bad, "--target", "x86_64-avx2"], "notes.onnx")
    txt = tmp_path / "model.txt"
    txt.write_text("x")
    run_bad(tmp_path, [txt, "--target", "x86_64-avx2"], "neither .onnx nor .tflite")
    fake_tflite = tmp_path / "m.tflite"
    fake_tflite.write_bytes(b"\x00" * 64)
    run_bad(tmp_path, [fake_tflite, "--target", "x86_64-avx2"], "TFLite flatbuffer header")


def test_calibration_keys_do_not_match(tmp_path: Path, mlp: dict[str, Path]) -> None:
    calib = tmp_path / "c.npz"
    np.savez(calib, images=np.zeros((8, 64), np.float32))
    run_bad(
        tmp_path,
        [mlp["model"], "--target", "x86_64-avx2", "--calib", calib],
        "has no array for input 'x' (found: 'images')",
    )


def test_wrong_sample_shape(tmp_path: Path, mlp: dict[str, Path]) -> None:
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.zeros((8, 63), np.float32))
    run_bad(tmp_path, [mlp["model"], "--target", "x86_64-avx2", "--calib", calib], "sample shape (63,)")
    np.savez(calib, x=np.zeros((8, 8, 8), np.float32))
    run_bad(tmp_path, [mlp["model"], "--target", "x86_64-avx2", "--calib", calib], "expects rank 2")


def test_nan_in_calibration(tmp_path: Path, mlp: dict[str, Path]) -> None:
    calib = tmp_path / "c.npz"
    x = np.zeros((8, 64), np.float32)
    x[3, 5] = np.nan
    np.savez(calib, x=x)
    run_bad(tmp_path, [mlp["model"], "--target", "x86_64-avx2", "--calib", calib], "1 NaN/Inf values")


def test_unknown_class(tmp_path: Path, mlp: dict[str, Path]) -> None:
    run_bad(tmp_path, [mlp["model"], "--target", "riscv-toaster"], "unknown hardware class 'riscv-toaster'")


def test_budget_no_candidate_meets(tmp_path: Path, mlp: dict[str, Path]) -> None:
    import eval_fixtures

    eval_fixtures.CALLS["n"] = 0
    run_bad(
        tmp_path,
        [
            mlp["model"],
            "--target",
            "x86_64-avx2",
            "--calib",
            mlp["calib"],
            "--eval-data",
            mlp["eval"],
            "--eval",
            "eval_fixtures:only_the_reference_scores",
            "--max-drop",
            "0.01",
            "--recipes",
            "int8-qdq-pertensor-minmax",
        ],
        "no candidate meets the accuracy gate",
    )


@pytest.mark.parametrize(
    ("flag", "value", "expect"),
    [
        ("--budget", "1.5", "outside (0, 1]"),
        ("--input-shape", "x=1,abc", "is not NAME=D0,D1"),
        ("--input-shape", "images=1,64", "--input-shape names 'images'"),
        ("--eval", "no_such_module_xyz:fn", "cannot be imported"),
        ("--recipes", "fp16", "does not apply to class"),
    ],
)
def test_bad_flags(tmp_path: Path, mlp: dict[str, Path], flag: str, value: str, expect: str) -> None:
    run_bad(
        tmp_path,
        [mlp["model"], "--target", "x86_64-avx2", "--calib", mlp["calib"], "--eval-data", mlp["eval"], flag, value],
        expect,
    )


def test_out_that_is_someone_elses_folder(tmp_path: Path, mlp: dict[str, Path]) -> None:
    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    result = CliRunner().invoke(compile_command, [str(mlp["model"]), "--target", "x86_64-avx2", "--out", str(other)])
    assert result.exit_code == 2 and "not empty" in result.stderr
    assert (other / "thesis.tex").read_text() == "precious"


def test_missing_converter_extra_is_named(tmp_path: Path, mlp: dict[str, Path]) -> None:
    run_bad(
        tmp_path,
        [mlp["model"], "--target", "mcu-cortex-m4", "--calib", mlp["calib"]],
        "pip install 'edgefleet[tflite-convert]'",
    )
