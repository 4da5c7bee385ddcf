"""OpenVINO as a compile target and a device runtime: real OpenVINO and NNCF on this machine's CPU."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgefleet.controller.compiler import CompileError, LatencyStats, TargetSpec
from edgefleet.controller.compiler.api import CompileSpec, compile_model, fewer_threads
from edgefleet.controller.compiler.measure import DeviceMeasurer, LocalMeasurer
from edgefleet.controller.compiler.passes import PassContext, PassError
from edgefleet.controller.compiler.passes.openvino_convert import OpenVinoConvert
from edgefleet.controller.compiler.recipes import recipes_for
from edgefleet.controller.compiler.runner import ModelRunner, RuntimeChoice


class OpenVinoWinsMeasurer:
    """Times nothing: says OpenVINO builds take half the time of the others, so selection is testable."""

    measured_on = "fake"

    def cannot_measure(self, path: Path) -> str:
        return "fake"

    def measure(
        self, candidates: Sequence[Path], inputs: Mapping[str, np.ndarray], runtimes: object = None
    ) -> dict[Path, LatencyStats]:
        chosen = dict(runtimes or {})
        return {
            Path(p): LatencyStats(
                1.0 if chosen.get(Path(p), RuntimeChoice()).name == "openvino" else 2.0, 1.0, 1.0, 9, "fake"
            )
            for p in candidates
        }


def local_target() -> TargetSpec:
    return TargetSpec.resolve("local")


def test_profile_reports_openvino_devices_found_by_a_probe() -> None:
    target = local_target()
    caps = target.openvino_capabilities("CPU")
    assert caps is not None, "openvino is installed with the controller extra, so the CPU must be listed"
    assert "FP32" in caps
    assert target.as_dict()["openvino"]["devices"]["CPU"] == list(caps)


def test_recipes_follow_the_capabilities() -> None:
    base = TargetSpec.from_class("x86_64-avx2")
    assert not [r for r in recipes_for(base, "onnx") if r.runtime.name == "openvino"], "no profile, no OpenVINO"
    amx = replace(base, openvino_devices=(("CPU", ("FP32", "BF16", "INT8")),))
    names = {r.name: r for r in recipes_for(amx, "onnx")}
    assert names["ov-bf16"].runtime == RuntimeChoice("openvino", "CPU", "bf16")
    assert names["ov-fp32"].runtime.inference_precision == "f32", "fp32 must be explicit: AMX defaults to bf16"
    assert "ov-fp16" not in names, "no FP16 capability, no fp16 compute"
    assert "ov-fp32-fp16w" in names and "ov-bf16-fp16w" in names, "fp16 weights on disk need no capability"
    avx2 = replace(base, openvino_devices=(("CPU", ("FP32", "INT8")), ("GPU", ("FP16", "INT8"))))
    names = {r.name: r for r in recipes_for(avx2, "tflite")}
    assert {"ov-fp32", "ov-fp32-fp16w", "ov-int8", "ov-gpu-fp16", "tflite-float"} <= set(names)
    assert names["ov-gpu-fp16"].runtime == RuntimeChoice("openvino", "GPU", "f16")


def test_openvino_build_is_chosen_when_it_measures_faster(tmp_path: Path, mlp: dict[str, Path]) -> None:
    out = tmp_path / "out"
    report = compile_model(
        CompileSpec(model=mlp["model"], target=local_target(), calib=mlp["calib"], out=out,
                    recipes=("ov-fp32-fp16w", "ov-fp32")),
        measurer=OpenVinoWinsMeasurer(),
    )
    rows = {r["recipe"]: r for r in report.candidates}
    assert rows["ov-fp32"]["runtime"] == "openvino:CPU/f32" and rows["ov-fp32"]["passed_gate"]
    assert report.chosen == "ov-fp32-fp16w", "equal speed: the smaller build (fp16 weights) wins the tie"
    assert report.runtime == {"name": "openvino", "device": "CPU", "inference_precision": "f32",
                              "version": report.toolchain["openvino"]}
    # An ONNX source ships as ONNX that OpenVINO reads on the device: no IR graph text to carry.
    assert (out / "model.onnx").is_file() and not (out / "model.xml").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifact"]["format"] == "onnx"
    assert [f["file"] for f in manifest["artifact"]["files"]] == ["model.onnx"]
    # fp16 weights: about half the source's bytes, each weight behind a Cast back to float32.
    assert (out / "model.onnx").stat().st_size < 0.6 * mlp["model"].stat().st_size
    shipped = onnx.load(str(out / "model.onnx"))
    halves = [t for t in shipped.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert halves and len([n for n in shipped.graph.node if n.op_type == "Cast"]) >= len(halves)
    # The shipped build reproduces fp32 on the gate data when OpenVINO runs it as the manifest says.
    with np.load(mlp["eval"]) as data:
        x = data["x"][:16].astype(np.float32)
    ref = ModelRunner(mlp["model"]).run({"x": x})
    got = ModelRunner(out / "model.onnx", runtime=RuntimeChoice("openvino", "CPU", "f32")).run({"x": x})
    np.testing.assert_allclose(next(iter(got.values())), next(iter(ref.values())), rtol=1e-2, atol=1e-3)


def test_a_tflite_model_ships_as_it_is_on_openvino_and_an_identical_build_is_timed_once(tmp_path: Path) -> None:
    """A small TFLite model's IR outweighs it, with or without fp16 weights: both OpenVINO recipes end
    in the TFLite file itself, so the second is the same build and is neither gated nor timed again."""
    from tests.models.tiny_models import tflite_mlp

    model = tflite_mlp(tmp_path / "small.tflite", din=8, dhidden=8, dout=4)
    out = tmp_path / "out"
    report = compile_model(
        CompileSpec(model=model, target=local_target(), out=out, recipes=("ov-fp32", "ov-fp32-fp16w")),
        measurer=OpenVinoWinsMeasurer(),
    )
    rows = {r["recipe"]: r for r in report.candidates}
    assert rows["ov-fp32"]["passed_gate"] and rows["ov-fp32"]["latency_ms"] == 1.0
    assert rows["ov-fp32-fp16w"]["error"] == "skipped: the same build as ov-fp32"
    assert rows["ov-fp32-fp16w"]["latency_ms"] is None and not rows["ov-fp32-fp16w"]["passed_gate"]
    assert report.chosen == "ov-fp32" and report.runtime["name"] == "openvino"
    assert (out / "model.tflite").read_bytes() == model.read_bytes() and not (out / "model.xml").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["file"] for f in manifest["artifact"]["files"]] == ["model.tflite"]
    assert manifest["runtime"]["name"] == "openvino"


def test_openvino_int8_by_nncf_is_gated_and_the_cache_key_names_the_runtime(
    tmp_path: Path, conv: dict[str, Path]
) -> None:
    report = compile_model(
        CompileSpec(model=conv["model"], target=local_target(), calib=conv["calib"], out=tmp_path / "o",
                    recipes=("ov-int8",)),
        measurer=OpenVinoWinsMeasurer(),
    )
    row = next(r for r in report.candidates if r["recipe"] == "ov-int8")
    assert row["error"] is None and row["metric_score"] is not None
    assert row["runtime"] == "openvino:CPU"
    assert any(p.get("pass") == "openvino_int8" for p in row["passes"])
    if row["passed_gate"]:
        assert report.chosen == "ov-int8"
        ir = (tmp_path / "o" / "model.xml").read_text()
        assert 'type="FakeQuantize"' in ir or 'element_type="i8"' in ir, "the build must really be int8"


def test_a_model_openvino_cannot_read_skips_only_those_candidates(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-model.onnx"
    bogus.write_bytes(b"\x08\x07garbage")
    ctx = PassContext(target=local_target(), workdir=tmp_path)
    with pytest.raises(PassError, match="OpenVINO cannot read the model"):
        OpenVinoConvert().run(bogus, ctx)


def test_estimated_targets_never_choose_an_unmeasured_openvino_build(tmp_path: Path, mlp: dict[str, Path]) -> None:
    target = replace(TargetSpec.from_class("x86_64-avx2"), openvino_devices=(("CPU", ("FP32", "INT8")),))
    report = compile_model(
        CompileSpec(model=mlp["model"], target=target, calib=mlp["calib"], out=tmp_path / "o", measure="estimate",
                    recipes=("ov-fp32",)),
    )
    row = next(r for r in report.candidates if r["recipe"] == "ov-fp32")
    assert row["latency_ms"] is None and any("not measured" in n for n in row["notes"])
    assert report.chosen != "ov-fp32"


def test_metric_accuracy_needs_labels(tmp_path: Path, mlp: dict[str, Path]) -> None:
    with pytest.raises(CompileError, match="--eval-labels"):
        compile_model(CompileSpec(model=mlp["model"], target="x86_64-avx2", calib=mlp["calib"], metric="accuracy",
                                  budget=0.01, out=tmp_path / "o"))


def test_intel_gpu_and_npu_builds_from_a_profile_are_built_and_checked_here(
    tmp_path: Path, conv: dict[str, Path]
) -> None:
    """No Intel GPU or NPU here: a profile that has them gets their builds, gated for numerics on this
    CPU and never timed (estimated targets never choose an OpenVINO build)."""
    from edgefleet.protos.v1 import profile_pb2

    profile = profile_pb2.HardwareProfile(hardware_class="x86_64-avx2")
    profile.cpu.arch = "x86_64"
    runtime = profile.runtimes.add(name="openvino", version="2026.4.1", loadable_providers=["CPU", "GPU", "NPU"])
    runtime.devices.add(name="CPU", capabilities=["FP32", "INT8"], loadable=True)
    runtime.devices.add(name="GPU", capabilities=["FP32", "FP16", "INT8"], loadable=True)
    runtime.devices.add(name="NPU", capabilities=["FP16", "INT8"], loadable=True)
    target = TargetSpec.from_profile(profile)
    assert target.openvino_capabilities("NPU") == ("FP16", "INT8")
    report = compile_model(
        CompileSpec(model=conv["model"], target=target, calib=conv["calib"], out=tmp_path / "o", measure="estimate",
                    recipes=("ov-gpu-fp16", "ov-npu-int8")),
    )
    rows = {r["recipe"]: r for r in report.candidates}
    assert rows["ov-gpu-fp16"]["runtime"] == "openvino:GPU/f16" and rows["ov-gpu-fp16"]["error"] is None
    assert rows["ov-gpu-fp16"]["passed_gate"], "fp16 weights stay within a 0.99 cosine on a small conv net"
    assert rows["ov-npu-int8"]["runtime"] == "openvino:NPU" and rows["ov-npu-int8"]["metric_score"] is not None
    assert all(r["latency_ms"] is None for name, r in rows.items() if name.startswith("ov-"))
    assert report.chosen == "fp32-optimized"


def test_an_accuracy_search_is_skipped_when_the_failed_int8_build_was_not_faster(tmp_path: Path) -> None:
    from edgefleet.controller.compiler.api import _Candidate, _not_worth_searching
    from edgefleet.controller.compiler.data import Dataset
    from edgefleet.controller.compiler.recipes import BASELINE, Recipe

    class Quick:
        def __init__(self, ms: dict[str, float]) -> None:
            self.ms = ms

        def measure(self, paths: Sequence[Path], inputs: object, runtimes: object = None) -> dict[Path, LatencyStats]:
            return {p: LatencyStats(self.ms[p.name], 0, 0, 1, "quick", rounds_ms=(self.ms[p.name],)) for p in paths}

    base = _Candidate(BASELINE, path=tmp_path / "fp32.onnx", passed=True)
    int8 = _Candidate(Recipe("ov-int8", (), "int8"), path=tmp_path / "int8.xml", passed=False)
    data = Dataset({"x": np.zeros((2, 4), np.float32)}, {}, "test")
    slow = _not_worth_searching([int8], [base, int8], Quick({"fp32.onnx": 1.0, "int8.xml": 1.0}),  # type: ignore[arg-type]
                                gate_set=data, min_speedup=1.05)
    assert "ov-int8 was not 1.05x faster than fp32-optimized" in slow
    assert _not_worth_searching([int8], [base, int8], Quick({"fp32.onnx": 2.0, "int8.xml": 1.0}),  # type: ignore[arg-type]
                                gate_set=data, min_speedup=1.05) == ""
    assert _not_worth_searching([int8], [base, int8], None, gate_set=data, min_speedup=1.05) == "", \
        "with timings from a device or an estimate there is nothing to compare here: search"


def test_accuracy_search_is_skipped_when_int8_lost_far_more_than_allowed(tmp_path: Path) -> None:
    from edgefleet.controller.compiler.api import _Candidate, _GateJudge, _too_far_to_recover
    from edgefleet.controller.compiler.data import Dataset
    from edgefleet.controller.compiler.gate import Gate
    from edgefleet.controller.compiler.recipes import Recipe

    data = Dataset({"x": np.zeros((2, 4), np.float32)}, {}, "test")
    judge = _GateJudge(Gate(budget=0.99), data, 1, {}, None)
    hopeless = _Candidate(Recipe("ov-int8", (), "int8"), path=tmp_path / "a.xml", fidelity=0.68)
    near = _Candidate(Recipe("int8-qdq", (), "int8"), path=tmp_path / "b.onnx", fidelity=0.96)
    why = _too_far_to_recover([hopeless], judge)
    assert "ov-int8 lost 0.320 against the 0.010 allowed" in why
    assert _too_far_to_recover([hopeless, near], judge) == "", "one build within reach is enough to search"
    labelled = _GateJudge(Gate(budget=0.01, metric="accuracy"), data, 1, {}, 0.91)
    dropped = _Candidate(Recipe("ov-int8", (), "int8"), fidelity=0.99, score=0.70)
    assert "lost 0.210" in _too_far_to_recover([dropped], labelled)
    dropped.score = 0.86
    assert _too_far_to_recover([dropped], labelled) == ""


def test_accuracy_control_runs_after_ov_int8_fails_and_is_gated_like_any_build(
    tmp_path: Path, conv: dict[str, Path]
) -> None:
    """A budget plain int8 cannot meet: NNCF accuracy control returns ops to float on the gate's metric.
    (Timed by a fake measurer, so no quick pre-timing can skip the search.)"""
    report = compile_model(
        CompileSpec(model=conv["model"], target=local_target(), calib=conv["calib"], out=tmp_path / "o",
                    budget=0.99999, recipes=("ov-int8", "ov-int8-accuracy")),
        measurer=OpenVinoWinsMeasurer(),
    )
    rows = {r["recipe"]: r for r in report.candidates}
    assert not rows["ov-int8"]["passed_gate"]
    searched = rows["ov-int8-accuracy"]
    assert searched["error"] is None, searched
    assert any("kept" in n and "in float" in n for n in searched["notes"]), searched["notes"]
    assert searched["passed_gate"] == (searched["metric_score"] >= 0.99999)


def test_accuracy_control_stops_at_its_time_budget_and_says_so(tmp_path: Path, conv: dict[str, Path]) -> None:
    """NNCF has no time limit (each step back ranks every op again: 9 min on PP-OCRv4 det); the pass
    stops it at its budget with a one-line reason, and the compile carries on without it."""
    import time

    from edgefleet.controller.compiler.data import Dataset
    from edgefleet.controller.compiler.passes import GateProbe
    from edgefleet.controller.compiler.passes.openvino_int8 import OpenVinoInt8

    x = np.load(conv["calib"])["x"]
    calib = Dataset({"x": x}, {}, "test")
    probe = GateProbe(feeds=[{"x": x[i : i + 1]} for i in range(8)], score=lambda runs: 0.0, allowed_drop=0.01)
    ctx = PassContext(target=local_target(), workdir=tmp_path, calib=calib, gate_probe=probe)
    started = time.monotonic()
    with pytest.raises(PassError, match=r"accuracy control stopped at its 0 s budget without reaching a drop"):
        OpenVinoInt8(accuracy_control=True, time_budget_s=0.0).run(conv["model"], ctx)
    assert time.monotonic() - started < 60


def test_fp16_weights_halve_initializers_and_constant_nodes_and_keep_the_outputs() -> None:
    """Exported graphs keep weights as initializers or as Constant nodes (Paddle's exporter does the
    latter): both are stored as fp16 behind a Cast, and what overrides at run time stays fp32."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgefleet.controller.compiler.passes.openvino_convert import fp16_weights

    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 16)).astype(np.float32)
    w2 = rng.normal(size=(16, 4)).astype(np.float32)
    bias = rng.normal(size=(4,)).astype(np.float32)  # an initializer that is also an input: overridable
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2, "w2")),
         helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("MatMul", ["h", "w2"], ["z"]),
         helper.make_node("Add", ["z", "bias"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
              helper.make_tensor_value_info("bias", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(2, 8)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert fp16_weights(model) == 2
    onnx.checker.check_model(model)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types == {"w1__fp16": TensorProto.FLOAT16, "bias": TensorProto.FLOAT}
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-2, atol=1e-2)
    assert not np.array_equal(after, before), "the weights really were rounded to fp16"


class FewerThreadsWin(LocalMeasurer):
    """Times nothing: says a build on one thread takes half the time, so the thread search is testable."""

    def measure(
        self, candidates: Sequence[Path], inputs: Mapping[str, np.ndarray], runtimes: object = None
    ) -> dict[Path, LatencyStats]:
        chosen = dict(runtimes or {})  # type: ignore[call-overload]
        return {
            Path(p): LatencyStats(1.0 if chosen.get(Path(p), RuntimeChoice()).threads == 1 else 2.0, 1.0, 1.0, 9,
                                  "fake")
            for p in candidates
        }


def test_fewer_threads_are_tried_gated_and_shipped_when_faster(tmp_path: Path, mlp: dict[str, Path]) -> None:
    out = tmp_path / "out"
    target = replace(local_target(), threads=4)
    report = compile_model(
        CompileSpec(model=mlp["model"], target=target, calib=mlp["calib"], out=out, recipes=("ov-fp32",)),
        measurer=FewerThreadsWin(),
    )
    rows = {r["recipe"]: r for r in report.candidates}
    assert {"ov-fp32-t2", "ov-fp32-t1"} <= set(rows), "half the cores and one thread are tried"
    assert rows["ov-fp32-t1"]["runtime"] == "openvino:CPU/f32 x1 thread"
    assert rows["ov-fp32-t1"]["passed_gate"] and rows["ov-fp32-t1"]["metric_score"] is not None, "gated again"
    assert report.chosen.endswith("-t1") and report.runtime["threads"] == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runtime"]["threads"] == 1
    # The shipped runtime carries the thread count back into a runner, as the bench and agent read it.
    assert RuntimeChoice.from_manifest(manifest["runtime"]).threads == 1


def test_no_thread_search_times_only_the_cores(tmp_path: Path, mlp: dict[str, Path]) -> None:
    target = replace(local_target(), threads=2)
    report = compile_model(
        CompileSpec(model=mlp["model"], target=target, calib=mlp["calib"], out=tmp_path / "o", recipes=("ov-fp32",),
                    thread_search=False),
        measurer=FewerThreadsWin(),
    )
    assert not [r for r in report.candidates if r["recipe"].endswith("-t1")]
    assert "threads" not in report.runtime, "a build on the device's own thread count writes no count"


def test_thread_counts_tried() -> None:
    assert fewer_threads(1) == [] and fewer_threads(2) == [1] and fewer_threads(3) == [1]
    assert fewer_threads(4) == [2, 1] and fewer_threads(16) == [8, 1]


def test_a_device_that_times_thread_counts_gets_the_search(tmp_path: Path, mlp: dict[str, Path]) -> None:
    """Device-in-the-loop: the variants go to the device only when its agent times a candidate on the
    count it asks for; each is sent as a Candidate naming that count."""
    from edgefleet.controller.fleet.device_measure import candidate_for
    from edgefleet.controller.store.artifacts import ArtifactStore

    artifacts = ArtifactStore(tmp_path / "artifacts")
    sent: list[int] = []

    def submit(device_id: str, paths: Sequence[Path], inputs: Mapping[str, np.ndarray],
               runtimes: Mapping[Path, RuntimeChoice] | None = None) -> dict[str, object]:
        candidates = [candidate_for(artifacts, Path(p), (runtimes or {}).get(Path(p))) for p in paths]
        sent.extend(c.threads for c in candidates)
        return {str(p): {"median_ms": 1.0 if c.threads == 1 else 2.0, "samples": 9}
                for p, c in zip(paths, candidates, strict=True)}

    target = replace(local_target(), threads=2)
    for times_threads in (False, True):
        sent.clear()
        report = compile_model(
            CompileSpec(model=mlp["model"], target=target, calib=mlp["calib"], out=tmp_path / f"o{times_threads}",
                        recipes=("ov-fp32",)),
            measurer=DeviceMeasurer("dev-1", submit, times_threads=times_threads),
        )
        assert (1 in sent) == times_threads
        assert report.chosen.endswith("-t1") == times_threads
        assert report.runtime.get("threads") == (1 if times_threads else None)
