"""TargetSpec: class strings, profile JSON, and the ISA -> int8 data-type rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefleet.controller.compiler import CompileError, TargetSpec


@pytest.mark.parametrize(
    ("cls", "family", "int8_kind", "static"),
    [
        ("x86_64-avx512vnni", "cpu", "u8s8", False),
        ("x86_64-avx2", "cpu", "u8s8-reduce-range", False),
        ("arm64-dotprod", "cpu", "s8s8", False),
        ("cuda-sm87", "gpu", "none", False),
        ("qnn-htp", "npu", "u8u8-npu", True),
        ("vitis-dpu", "fpga", "pow2-s8", True),
        ("mcu-cortex-m", "mcu", "tflite-int8", True),
        ("edgetpu", "tpu", "tflite-int8", True),
    ],
)
def test_class_table(cls: str, family: str, int8_kind: str, static: bool) -> None:
    t = TargetSpec.from_class(cls)
    assert (t.family, t.int8_kind, t.static_shapes) == (family, int8_kind, static)


def test_reduce_range_only_without_vnni() -> None:
    assert TargetSpec.from_class("x86_64-avx2").reduce_range
    assert not TargetSpec.from_class("x86_64-avx512vnni").reduce_range
    assert not TargetSpec.from_class("arm64-dotprod").reduce_range


def test_unknown_class_names_the_fix() -> None:
    with pytest.raises(CompileError, match=r"unknown hardware class .toaster-9000.*--target local"):
        TargetSpec.from_class("toaster-9000")


def test_profile_json_takes_microbench_and_derives_class_from_isa(tmp_path: Path) -> None:
    profile = {
        "hardwareClass": "x86_64-zen4-custom",
        "cpu": {"arch": "x86_64", "physicalCores": 2, "isaFeatures": ["avx2", "avx512f", "avx512_vnni"]},
        "microbench": {"fp32GemmGflops": 91.5, "int8GemmGops": 300.0, "memoryBandwidthGbs": 12.0},
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    t = TargetSpec.resolve(str(path))
    assert t.hardware_class == "x86_64-zen4-custom"
    assert t.int8_kind == "u8s8" and t.source == "profile" and t.microbench_source == "profile"
    assert (t.fp32_gflops, t.int8_gops, t.threads) == (91.5, 300.0, 2)


def test_bad_profile_json(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(CompileError, match="cannot read hardware profile"):
        TargetSpec.resolve(str(path))
