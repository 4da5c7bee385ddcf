"""``edgefleet compile`` end to end on tiny models: the report contract, caching, atomic output,
and where latencies come from (local, device-in-the-loop, estimated)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgefleet.controller.cli.compile import compile_command
from edgefleet.controller.compiler import CompileSpec, DeviceMeasurer, TargetSpec, compile_model

HERE = str(Path(__file__).parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

REPORT_KEYS = {"artifact", "chosen", "baseline", "result", "speedup", "candidates", "toolchain", "cache_key"}
CANDIDATE_KEYS = {"recipe", "passes", "latency_ms", "size_bytes", "fidelity", "passed_gate", "measured_on", "error"}


def invoke(args: list[str]):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(compile_command, [str(a) for a in args], catch_exceptions=False)


def test_json_report_contract_local_measurement(tmp_path: Path, mlp: dict[str, Path]) -> None:
    out = tmp_path / "out"
    result = invoke(
        [
            mlp["model"],
            "--target",
            "x86_64-avx512vnni",
            "--measure",
            "local",
            "--calib",
            mlp["calib"],
            "--eval-data",
            mlp["eval"],
            "--recipes",
            "int8-qdq-perchannel-minmax",
            "--out",
            out,
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout is the report and nothing else
    assert set(report) >= REPORT_KEYS
    for key in ("baseline", "result"):
        assert {"latency_ms", "size_bytes", "fidelity"} <= set(report[key])
    assert [c["recipe"] for c in report["candidates"]] == ["fp32-optimized", "int8-qdq-perchannel-minmax"]
    for cand in report["candidates"]:
        assert set(cand) >= CANDIDATE_KEYS
        assert cand["passed_gate"] and cand["measured_on"].startswith("local:") and not cand["estimated"]
    assert {"onnx", "onnxruntime", "numpy"} <= set(report["toolchain"])
    assert report["latency"]["estimated"] is False
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "report.json"]
    assert Path(report["artifact"]) == out.resolve() / "model.onnx"
    onnx.checker.check_model(report["artifact"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["provenance"]["source_sha256"] == report["source"]["sha256"]
    assert manifest["provenance"]["recipe"]["name"] == report["chosen"]
    assert manifest["report"]["cache_key"] == report["cache_key"]
    # Progress went to stderr, not stdout.
    assert "building" in result.stderr


def test_second_compile_is_a_cache_hit(tmp_path: Path, mlp: dict[str, Path]) -> None:
    args = [
        mlp["model"],
        "--target",
        "x86_64-avx512vnni",
        "--calib",
        mlp["calib"],
        "--recipes",
        "int8-qdq-pertensor-minmax",
        "--json",
    ]
    first = json.loads(invoke([*args, "--out", tmp_path / "a"]).stdout)
    t0 = time.monotonic()
    second = json.loads(invoke([*args, "--out", tmp_path / "b"]).stdout)
    assert time.monotonic() - t0 < 2.0
    assert second["cached"] and not first["cached"]
    assert second["cache_key"] == first["cache_key"] and second["chosen"] == first["chosen"]
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    assert Path(second["artifact"]).parent == (tmp_path / "b").resolve()


def test_class_without_device_is_marked_estimated(tmp_path: Path, conv: dict[str, Path]) -> None:
    result = invoke(
        [
            conv["model"],
            "--target",
            "x86_64-avx2",
            "--calib",
            conv["calib"],
            "--recipes",
            "int8-qdq-perchannel-minmax",
            "--out",
            tmp_path / "o",
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["latency"]["estimated"] is True and "ESTIMATED" in report["latency"]["note"]
    assert all(c["estimated"] for c in report["candidates"] if c["latency_ms"] is not None)
    assert report["candidates"][0]["measured_on"].startswith("estimated:x86_64-avx2")
    # The estimate ranks int8 convs ahead of fp32 on a class with int8 throughput > fp32 throughput.
    assert report["chosen"] == "int8-qdq-perchannel-minmax"


def test_device_in_the_loop_measurer_is_used(tmp_path: Path, mlp: dict[str, Path]) -> None:
    seen: list[str] = []

    def submit(
        device: str, paths: Sequence[Path], inputs: Mapping[str, np.ndarray], runtimes: object = None
    ) -> dict[str, dict[str, float]]:
        seen.append(device)
        # The fake device finds fp32 twice as slow as anything quantized.
        return {str(p): {"median_ms": 2.0 if "fp32" in p.name else 1.0, "samples": 10} for p in paths}

    def online(target: TargetSpec) -> DeviceMeasurer | None:
        return DeviceMeasurer("dev-17", submit) if target.hardware_class == "arm64-dotprod" else None

    spec = CompileSpec(
        model=mlp["model"],
        target="arm64-dotprod",
        calib=mlp["calib"],
        out=tmp_path / "o",
        recipes=("int8-qdq-perchannel-minmax",),
    )
    report = compile_model(spec, device_measurers=online)
    assert seen == ["dev-17"]
    assert report.chosen == "int8-qdq-perchannel-minmax" and report.speedup == 2.0
    assert report.latency == {**report.latency, "measured_on": "device:dev-17", "estimated": False}


@pytest.mark.parametrize("int8_ms, chosen, why", [
    (0.98, "int8-qdq-perchannel-minmax", "so the smaller build ships"),  # as fast, a quarter of the size
    (1.10, "fp32-optimized", "no candidate within the gate was faster"),  # smaller, but really slower
])
def test_fp32_stays_unless_something_beats_it_or_is_as_fast_and_smaller(
    tmp_path: Path, mlp: dict[str, Path], int8_ms: float, chosen: str, why: str
) -> None:
    from edgefleet.controller.compiler import LatencyStats

    class FlatMeasurer:
        measured_on = "fake"

        def cannot_measure(self, path: Path) -> str:
            return "fake"

        def measure(
            self, candidates: Sequence[Path], inputs: Mapping[str, np.ndarray], runtimes: object = None
        ) -> dict[Path, LatencyStats]:
            return {
                Path(p): LatencyStats(1.0 if "fp32" in Path(p).name else int8_ms, 1.0, 1.0, 9, "fake")
                for p in candidates
            }

    spec = CompileSpec(
        model=mlp["model"],
        target="x86_64-avx512vnni",
        calib=mlp["calib"],
        out=tmp_path / "o",
        recipes=("int8-qdq-perchannel-minmax",),
    )
    report = compile_model(spec, measurer=FlatMeasurer())
    assert report.chosen == chosen and why in report.why, report.why


def test_task_eval_gate_reports_scores(tmp_path: Path, mlp: dict[str, Path]) -> None:
    result = invoke(
        [
            mlp["model"],
            "--target",
            "x86_64-avx512vnni",
            "--calib",
            mlp["calib"],
            "--eval-data",
            mlp["eval"],
            "--eval",
            "eval_fixtures:top1",
            "--max-drop",
            "0.02",
            "--recipes",
            "int8-dynamic-matmul",
            "--out",
            tmp_path / "o",
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["gate"]["kind"] == "task-score" and report["gate"]["reference_score"] > 0.85
    assert all(c["task_score"] is not None for c in report["candidates"])


def test_rerun_into_previous_output_replaces_it(tmp_path: Path, mlp: dict[str, Path]) -> None:
    out = tmp_path / "o"
    args = [mlp["model"], "--target", "x86_64-avx512vnni", "--out", out, "--json", "--no-cache"]
    assert invoke(args).exit_code == 0
    (out / "stale.txt").write_text("x")
    (out / "stale.txt").unlink()
    assert invoke(args).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "report.json"]
    assert not list(tmp_path.glob(".o.*"))


def test_cache_key_changes_with_the_toolchain(tmp_path: Path, mlp: dict[str, Path], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from edgefleet.controller.compiler import cache

    spec = CompileSpec(model=mlp["model"], target="x86_64-avx512vnni", out=tmp_path / "a", recipes=())
    first = compile_model(spec)
    real = cache.toolchain_versions
    monkeypatch.setattr(cache, "toolchain_versions", lambda: {**real(), "onnxruntime": "9.9.9"})
    second = compile_model(CompileSpec(model=mlp["model"], target="x86_64-avx512vnni", out=tmp_path / "b", recipes=()))
    assert first.cache_key != second.cache_key and not second.cached


def test_one_compile_per_class_whatever_the_device(tmp_path: Path, mlp: dict[str, Path]) -> None:
    """Two devices of one class (different core counts and micro-benchmarks) share one cache entry."""
    keys = []
    for i, gflops in enumerate((80.0, 95.0)):
        profile = tmp_path / f"dev{i}.json"
        profile.write_text(
            json.dumps(
                {
                    "hardwareClass": "arm64-dotprod",
                    "cpu": {"arch": "aarch64", "physicalCores": 4 + i, "isaFeatures": ["asimd", "asimddp"]},
                    "microbench": {"fp32GemmGflops": gflops, "int8GemmGops": 3 * gflops, "memoryBandwidthGbs": 9.0},
                }
            )
        )
        result = invoke(
            [
                mlp["model"],
                "--target",
                profile,
                "--calib",
                mlp["calib"],
                "--recipes",
                "int8-qdq-perchannel-minmax",
                "--out",
                tmp_path / f"o{i}",
                "--json",
            ]
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        keys.append((report["cache_key"], report["cached"]))
    assert keys[0][0] == keys[1][0] and keys[1][1] is True


def test_shared_leading_steps_run_once_per_compile(tmp_path: Path, mlp: dict[str, Path], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every ONNX recipe starts with opset_upgrade + simplify: that prefix runs once, and each
    candidate still gets its output (and the candidates still differ after it)."""
    from edgefleet.controller.compiler.passes.simplify import Simplify

    calls = []
    real = Simplify.run
    monkeypatch.setattr(Simplify, "run", lambda self, model, ctx: calls.append(model) or real(self, model, ctx))
    report = compile_model(CompileSpec(model=mlp["model"], target="x86_64-avx512vnni", out=tmp_path / "o",
                                       calib=mlp["calib"], measure="local", cache_dir=None))
    built = [c for c in report.candidates if c.get("error") is None]
    assert len(built) >= 3, report.candidates
    assert len(calls) == 1
    assert all({"pass": "simplify", "params": {}} in c["passes"] for c in built if c["recipe"] != "fp32-source")
    assert len({c["size_bytes"] for c in built}) >= 2, "the recipes after the shared steps still differ"


def test_plain_fp32_ships_the_source_when_the_optimized_graph_is_no_faster_and_bigger(tmp_path: Path) -> None:
    from edgefleet.controller.compiler.api import CompileSpec, _Candidate, _plain_fp32
    from edgefleet.controller.compiler.measure import LatencyStats
    from edgefleet.controller.compiler.recipes import BASELINE, SOURCE

    def timed(name: str, size: int, rounds: tuple[float, ...]) -> _Candidate:
        path = tmp_path / name
        path.write_bytes(b"\0" * size)
        stats = LatencyStats(sorted(rounds)[len(rounds) // 2], 0, 0, len(rounds), "local", rounds_ms=rounds)
        return _Candidate(BASELINE if name == "opt.onnx" else SOURCE, path=path, passed=True, stats=stats)

    spec = CompileSpec(model=tmp_path / "m.onnx")
    same = (1.0, 1.01, 0.99, 1.0, 1.0)
    optimized, source = timed("opt.onnx", 300, same), timed("src.onnx", 200, same)
    chosen, why = _plain_fp32(spec, optimized, [optimized, source], optimized, 1.0)
    assert chosen is source and "as fast and smaller" in why
    bigger_source = timed("src.onnx", 400, same)
    assert _plain_fp32(spec, optimized, [optimized, bigger_source], optimized, 1.0)[0] is optimized
    slow_source = timed("src.onnx", 200, tuple(1.2 * r for r in same))
    assert _plain_fp32(spec, optimized, [optimized, slow_source], optimized, 1.0)[0] is optimized, \
        "the optimized graph is really faster: it ships, whatever its size"


def test_a_markedly_smaller_build_as_fast_as_fp32_ships_instead(tmp_path: Path) -> None:
    from edgefleet.controller.compiler.api import CompileSpec, _Candidate, _smaller_at_par
    from edgefleet.controller.compiler.measure import LatencyStats
    from edgefleet.controller.compiler.recipes import BASELINE, CPU_INT8

    dynamic = next(r for r in CPU_INT8 if r.name == "int8-dynamic-matmul")

    def timed(recipe_name: str, size: int, rounds: tuple[float, ...]) -> _Candidate:
        path = tmp_path / f"{recipe_name}-{size}-{rounds[0]}.onnx"
        path.write_bytes(b"\0" * size)
        stats = LatencyStats(sorted(rounds)[len(rounds) // 2], 0, 0, len(rounds), "local", rounds_ms=rounds)
        return _Candidate(BASELINE if recipe_name == BASELINE.name else dynamic, path=path, passed=True, stats=stats)

    spec = CompileSpec(model=tmp_path / "m.onnx")
    same = (1.0, 1.01, 0.99, 1.0, 1.0)
    plain = timed(BASELINE.name, 1000, same)
    int8 = timed("int8-dynamic", 300, same)
    chosen = _smaller_at_par(spec, plain, [plain, int8])
    assert chosen is not None and chosen[0] is int8 and "0.30x its size" in chosen[1]
    assert _smaller_at_par(spec, plain, [plain, timed("int8-dynamic", 900, same)]) is None, \
        "only markedly smaller builds are worth it"
    slower = timed("int8-dynamic", 300, tuple(1.1 * r for r in same))
    assert _smaller_at_par(spec, plain, [plain, slower]) is None, "a slower build never ships for its size"
    tiny = timed(BASELINE.name, 1000, tuple(0.008 * r for r in same))
    one_us_slower = timed("int8-dynamic", 300, tuple(0.009 * r for r in same))
    assert _smaller_at_par(spec, tiny, [tiny, one_us_slower]) is not None, \
        "1 us on an 8 us model is below any runtime's call overhead: as fast"


def test_a_close_call_is_timed_again_against_the_source_before_it_ships(tmp_path: Path) -> None:
    """The search's figures here claim a small win for a build that is really ~20x slower: the second,
    two-build timing catches it and the source ships; a real win keeps its pick with the new figure."""
    from onnx import TensorProto, helper, numpy_helper

    from edgefleet.controller.compiler.api import _Candidate, _confirm
    from edgefleet.controller.compiler.data import Dataset
    from edgefleet.controller.compiler.measure import LatencyStats, LocalMeasurer
    from edgefleet.controller.compiler.recipes import BASELINE, SOURCE

    def matmuls(name: str, depth: int) -> Path:
        w = numpy_helper.from_array(np.eye(256, dtype=np.float32) * 0.5, "w")
        nodes = [helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]) for i in range(depth)]
        graph = helper.make_graph(
            nodes, name, [helper.make_tensor_value_info("h0", TensorProto.FLOAT, [64, 256])],
            [helper.make_tensor_value_info(f"h{depth}", TensorProto.FLOAT, [64, 256])], [w],
        )
        path = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        return path

    claimed = LatencyStats(1.0, 1.0, 1.0, 3, "local", rounds_ms=(1.0, 1.0, 1.0))
    fast, slow = matmuls("fast", 1), matmuls("slow", 20)
    data = Dataset({"h0": np.ones((64, 256), np.float32)}, {}, "test")
    spec = CompileSpec(model=fast)
    measurer = LocalMeasurer(threads=1, rounds=3, round_ms=5.0)

    source = _Candidate(SOURCE, path=fast, passed=True, stats=claimed)
    slow_pick = _Candidate(BASELINE, path=slow, passed=True, stats=claimed)
    chosen, gain, why = _confirm(spec, slow_pick, source, 1.05, "fastest", measurer, data, None)
    assert chosen is source and gain == 1.0, why
    assert "timed again" in why and "so fp32-source ships" in why
    assert any(n.startswith("timed again with fp32-source") for n in slow_pick.notes)

    source = _Candidate(SOURCE, path=slow, passed=True, stats=claimed)
    fast_pick = _Candidate(BASELINE, path=fast, passed=True, stats=claimed)
    chosen, gain, why = _confirm(spec, fast_pick, source, 1.02, "fastest", measurer, data, None)
    assert chosen is fast_pick and gain > 3, why
    assert "timed again with fp32-source over 6 rounds" in why
    # The pair's second timing replaces the search's claimed 1.0 ms for both, so latencies match the gain.
    assert fast_pick.timed_again is not None and source.timed_again is not None
    assert source.timed_again.median_ms / fast_pick.timed_again.median_ms > 3
    assert fast_pick.stats is claimed, "the candidate rows keep the search's figures"

    untouched = _confirm(spec, fast_pick, source, 1.5, "fastest", measurer, data, None)
    assert untouched == (fast_pick, 1.5, "fastest"), "a clear win is not timed twice"


def test_a_device_timed_close_call_is_timed_again_on_the_device(tmp_path: Path) -> None:
    """On a device the second look is a second measurement of the two builds; its rounds are paired
    like local ones. A device that fails it leaves the first figure, with a note."""
    from edgefleet.controller.compiler.api import _Candidate, _confirm
    from edgefleet.controller.compiler.data import Dataset
    from edgefleet.controller.compiler.measure import DeviceMeasurer, LatencyStats
    from edgefleet.controller.compiler.recipes import BASELINE, SOURCE

    ref_path, pick_path = tmp_path / "ref.onnx", tmp_path / "pick.onnx"
    asked: list[list[str]] = []
    pick_rounds = [1.2, 1.3, 1.2, 1.25, 1.2, 1.3, 1.2]  # slower than the reference in every round

    def submit(device_id: str, paths, inputs, runtimes):  # type: ignore[no-untyped-def]
        asked.append([Path(p).name for p in paths])
        rows = {str(ref_path): [1.0] * 7, str(pick_path): pick_rounds}
        return {str(p): {"median_ms": sorted(rows[str(p)])[3], "samples": 70, "rounds_ms": rows[str(p)]}
                for p in paths}

    claimed = LatencyStats(1.0, 1.0, 1.0, 7, "device:d1", rounds_ms=(1.0,) * 7)
    data = Dataset({"x": np.ones((2, 4), np.float32)}, {}, "test")
    spec = CompileSpec(model=ref_path)
    source = _Candidate(SOURCE, path=ref_path, passed=True, stats=claimed)
    pick = _Candidate(BASELINE, path=pick_path, passed=True, stats=claimed)
    chosen, gain, why = _confirm(spec, pick, source, 1.06, "fastest", DeviceMeasurer("d1", submit), data, None)
    assert asked == [["ref.onnx", "pick.onnx"]], "the reference first: the device must be able to run it"
    assert chosen is source and gain == 1.0 and "timed again alone with fp32-source on device:d1" in why

    pick_rounds[:] = [0.9] * 7
    chosen, gain, why = _confirm(spec, pick, source, 1.06, "fastest", DeviceMeasurer("d1", submit), data, None)
    assert chosen is pick and abs(gain - 1 / 0.9) < 1e-6 and "timed again with fp32-source on device:d1" in why

    def offline(*_args):  # type: ignore[no-untyped-def]
        raise RuntimeError("device d1 did not answer the measurement (expired)")

    kept = _Candidate(BASELINE, path=pick_path, passed=True, stats=claimed)
    assert _confirm(spec, kept, source, 1.06, "fastest", DeviceMeasurer("d1", offline), data, None) == (
        kept, 1.06, "fastest")
    assert kept.notes == ["not timed again on device:d1: device d1 did not answer the measurement (expired)"]


def test_candidate_table_says_why_each_build_did_not_ship() -> None:
    from edgefleet.controller.cli.compile import candidate_table
    from edgefleet.controller.compiler.api import CompileReport

    def row(recipe: str, **kw: object) -> dict[str, object]:
        return {"recipe": recipe, "runtime": "onnxruntime", "latency_ms": 1.0, "size_bytes": 2000,
                "passed_gate": True, "metric_score": 0.999, "notes": [], **kw}

    report = CompileReport.from_dict({
        "artifact": "", "chosen": "fp32-source", "why": "", "baseline": {}, "result": {}, "speedup": 1.0,
        "size_ratio": 1.0, "target": {}, "gate": {"metric": "cosine"}, "latency": {}, "toolchain": {},
        "cache_key": "", "source": {},
        "candidates": [
            row("fp32-source"),
            row("int8-qdq", passed_gate=False),
            row("ov-fp32-fp16w", notes=["timed again with fp32-source over 30 rounds: x0.91 (search: x1.04)"]),
            row("fp16"),
            row("ov-bf16", latency_ms=None, notes=["not measured on local:vm: it did not load here"]),
        ],
    })
    verdicts = {line.split()[0]: line for line in candidate_table(report).splitlines()[1:]}
    assert verdicts["fp32-source"].endswith("CHOSEN")
    assert verdicts["int8-qdq"].endswith("failed the gate")
    assert "sent back, timed again with fp32-source over 30 rounds: x0.91" in verdicts["ov-fp32-fp16w"]
    assert verdicts["fp16"].endswith("slower")
    assert verdicts["ov-bf16"].endswith("it did not load here")


@pytest.mark.parametrize(("source_ms", "pick_ms", "kept"), [
    (1.0, 1.02, True),      # within the 3% tie tolerance
    (1.0, 1.05, False),     # 5% slower: the source ships
    (0.008, 0.009, True),   # 1 us on an 8 us model: under PAR_FLOOR_MS, as fast (the smaller-at-par rule's own)
    (0.008, 0.016, False),  # 8 us slower: over it
])
def test_the_second_timing_uses_the_same_as_fast_as_the_smaller_at_par_rule(
    tmp_path: Path, monkeypatch, source_ms: float, pick_ms: float, kept: bool  # type: ignore[no-untyped-def]
) -> None:
    from edgefleet.controller.compiler.api import _Candidate, _confirm
    from edgefleet.controller.compiler.data import Dataset
    from edgefleet.controller.compiler.measure import LatencyStats, LocalMeasurer
    from edgefleet.controller.compiler.recipes import BASELINE, SOURCE

    src, pick = tmp_path / "src.onnx", tmp_path / "pick.onnx"
    timings = {src: source_ms, pick: pick_ms}

    def fake(self, paths, inputs, runtimes=None):  # type: ignore[no-untyped-def]
        return {p: LatencyStats(timings[p], timings[p], timings[p], 6, "local", rounds_ms=(timings[p],) * 6)
                for p in paths}

    monkeypatch.setattr(LocalMeasurer, "measure", fake)
    source = _Candidate(SOURCE, path=src, passed=True)
    chosen_in = _Candidate(BASELINE, path=pick, passed=True)
    chosen, _, why = _confirm(CompileSpec(model=src), chosen_in, source, 1.0, "smaller at par",
                              LocalMeasurer(rounds=3), Dataset({}, {}, "test"), None)
    assert (chosen is chosen_in) is kept, why
