"""Other source kinds and targets: TFLite input through ai-edge-quantizer, and --target local."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgefleet.controller.cli.compile import compile_command
from edgefleet.controller.compiler import CompileSpec, compile_model
from tests.models import tiny_models

needs_quantizer = pytest.mark.skipif(
    importlib.util.find_spec("ai_edge_quantizer") is None, reason="ai-edge-quantizer not installed"
)


@needs_quantizer
def test_tflite_input_quantized_with_ai_edge_quantizer(tmp_path: Path) -> None:
    model = tiny_models.tflite_mlp(tmp_path / "m.tflite")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(0).random((40, 64)).astype(np.float32))
    report = compile_model(
        CompileSpec(
            model=model,
            target="x86_64-avx512vnni",
            calib=calib,
            out=tmp_path / "o",
            recipes=("tflite-dynamic", "tflite-static-int8"),
            measure="local",
            measure_rounds=3,
            measure_round_ms=5.0,
        )
    )
    rows = {c["recipe"]: c for c in report.candidates}
    assert set(rows) == {"tflite-float", "tflite-dynamic", "tflite-static-int8"}
    for name in ("tflite-dynamic", "tflite-static-int8"):
        assert rows[name]["error"] is None and rows[name]["size_bytes"] < rows["tflite-float"]["size_bytes"] / 2
        assert rows[name]["fidelity"] > 0.98  # quantized I/O is (de)quantized by the runner, not compared raw
    assert report.artifact.endswith(".tflite") and Path(report.artifact).is_file()


def test_tflite_without_quantizer_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_models.tflite_mlp(tmp_path / "m.tflite")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ai_edge_quantizer" else real(name, *a)
    )
    result = CliRunner().invoke(compile_command, [str(model), "--target", "x86_64-avx2", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "pip install 'edgefleet[controller]'" in result.stderr


def test_target_local_profiles_and_measures_here(tmp_path: Path, mlp: dict[str, Path]) -> None:
    result = CliRunner().invoke(
        compile_command,
        [
            str(mlp["model"]),
            "--target",
            "local",
            "--calib",
            str(mlp["calib"]),
            "--recipes",
            "int8-dynamic-matmul",
            "--out",
            str(tmp_path / "o"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["target"]["source"] == "local" and report["target"]["microbench"]["source"] == "profile"
    assert report["latency"]["estimated"] is False
    assert report["latency"]["measured_on"].startswith("local:")
