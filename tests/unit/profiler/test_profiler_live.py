"""The profile of the machine running the tests must agree with what the machine itself says."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest

from edgefleet.agent.profiler import collect_profile, derive_hardware_class, profile_to_dict
from edgefleet.agent.profiler.cpu import ARM64_FEATURES, X86_FEATURES
from edgefleet.agent.profiler.runtimes import PROBE_ONNX
from edgefleet.protos.v1.profile_pb2 import HardwareProfile

CPUINFO = Path("/proc/cpuinfo")
pytestmark = pytest.mark.skipif(not CPUINFO.exists() or platform.system() != "Linux", reason="needs Linux /proc")


@pytest.fixture(scope="module")
def live_profile() -> HardwareProfile:
    return collect_profile(microbench=False)


def cpuinfo_features() -> set[str]:
    for line in CPUINFO.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def test_isa_flags_match_proc_cpuinfo(live_profile: HardwareProfile) -> None:
    cpu = live_profile.cpu
    raw = cpuinfo_features()
    if cpu.arch == "x86_64":
        expected = {name for name in X86_FEATURES if name in raw}
    elif cpu.arch == "aarch64":
        expected = {norm for kernel, norm in ARM64_FEATURES.items() if kernel in raw}
        if {"fphp", "asimdhp"} <= raw:
            expected.add("fp16")
    else:
        pytest.skip(f"no flag table for {cpu.arch}")
    assert set(cpu.isa_features) == expected
    assert list(cpu.isa_features) == sorted(cpu.isa_features)


def test_cpu_and_system_match_the_machine(live_profile: HardwareProfile) -> None:
    profile = live_profile
    assert profile.cpu.arch == platform.machine()
    assert profile.cpu.logical_cores == os.cpu_count()
    assert 0 < profile.cpu.physical_cores <= profile.cpu.logical_cores
    assert profile.os.kernel == platform.release()
    assert profile.os.python_version == platform.python_version()
    assert profile.memory.total_bytes >= profile.memory.available_bytes > 0
    assert profile.disks and profile.disks[0].path == "/"
    assert "live-only probes" not in {g.what for g in profile.gaps}


def test_every_loadable_provider_really_creates_a_session(live_profile: HardwareProfile) -> None:
    import numpy as np
    import onnxruntime as ort

    runtime = next(r for r in live_profile.runtimes if r.name == "onnxruntime")
    assert runtime.version == ort.__version__
    assert list(runtime.available_providers) == ort.get_available_providers()
    assert "CPUExecutionProvider" in runtime.loadable_providers
    for provider in runtime.loadable_providers:
        session = ort.InferenceSession(str(PROBE_ONNX), providers=[provider])
        assert provider in session.get_providers()
        ones = np.ones((2, 2), dtype=np.float32)
        assert session.run(None, {"A": ones, "B": ones})[0].tolist() == [[2.0, 2.0], [2.0, 2.0]]
    unloadable = set(runtime.available_providers) - set(runtime.loadable_providers)
    gap_names = {g.what for g in live_profile.gaps}
    assert {f"onnxruntime {p}" for p in unloadable} <= gap_names


def test_litert_when_installed(live_profile: HardwareProfile) -> None:
    litert = [r for r in live_profile.runtimes if r.name in ("ai-edge-litert", "tflite-runtime")]
    try:
        import ai_edge_litert  # noqa: F401
    except ImportError:
        pytest.skip("ai-edge-litert not installed")
    assert litert and "XNNPACK" in litert[0].loadable_providers


def test_class_and_json(live_profile: HardwareProfile) -> None:
    profile = live_profile
    assert profile.hardware_class == profile.derived_hardware_class == derive_hardware_class(profile)
    data = json.loads(json.dumps(profile_to_dict(profile)))
    assert data["cpu"]["isa_features"] == list(profile.cpu.isa_features)
    assert data["schema_version"] == 1


def test_hardware_class_override_keeps_the_derived_one() -> None:
    profile = collect_profile(microbench=False, hardware_class_override="hailo8l")
    assert profile.hardware_class == "hailo8l"
    assert profile.derived_hardware_class == derive_hardware_class(profile)
    assert profile.derived_hardware_class != "hailo8l"
