"""A peer is never sent what its negotiated capability version predates; the refusal says why."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edgefleet.controller.errors import FailedPrecondition
from edgefleet.controller.fleet.device_measure import DeviceMeasure, measure_spec
from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.rollouts.builds import compile_target, serves_build_threads
from edgefleet.controller.store.artifacts import ArtifactStore
from edgefleet.controller.store.base import DeviceRecord, EnrollmentTokenRecord
from edgefleet.controller.store.sqlite import SQLiteStore
from edgefleet.protos.capability import (
    CANDIDATE_THREADS,
    CAPABILITY_VERSION,
    HISTORY,
    MEASURE_CANDIDATES,
    OPENVINO_RUNTIME,
    PROFILE_ON_MQTT,
    lacks,
)
from edgefleet.protos.v1 import profile_pb2

CLASS = "x86_64-avx2"


def openvino_profile() -> profile_pb2.HardwareProfile:
    profile = profile_pb2.HardwareProfile(hardware_class=CLASS)
    profile.cpu.arch = "x86_64"
    runtime = profile.runtimes.add(name="openvino", version="2026.4.1", loadable_providers=["CPU"])
    runtime.devices.add(name="CPU", capabilities=["FP32", "INT8"], loadable=True)
    return profile


def fleet(tmp_path: Path, versions: dict[str, int]) -> SQLiteStore:
    """Enrolled devices of one class, each recorded with the capability version its session negotiated."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = SQLiteStore(tmp_path / "store.db")
    store.create_enrollment_token(EnrollmentTokenRecord("tok", "hash", 100, 100, 0, 2**62, {}))
    for device_id, version in versions.items():
        store.enroll_device("hash", 1, DeviceRecord(device_id, "secret", {}, 0, hardware_class=CLASS,
                                                    capability_version=version,
                                                    profile=openvino_profile().SerializeToString()))
    return store


class RecordingCommands:
    def __init__(self) -> None:
        self.issued: list[str] = []

    def issue(self, device_id: str, **_: Any) -> Any:
        self.issued.append(device_id)
        raise AssertionError("a command was issued to a device that cannot run it")


def measure(tmp_path: Path, store: SQLiteStore, online: list[str]) -> tuple[DeviceMeasure, RecordingCommands]:
    presence = PresenceTracker(store, heartbeat_interval_s=60)
    for device_id in online:
        record = store.get_device(device_id)
        assert record is not None
        presence.session_opened(device_id, agent_version="t", capability_version=record.capability_version,
                                hardware_class=CLASS, profile=record.profile, hostname="h")
    commands = RecordingCommands()
    return DeviceMeasure(store, presence, ArtifactStore(tmp_path / "a"), commands,  # type: ignore[arg-type]
                         asyncio.new_event_loop()), commands


def test_every_gate_has_a_dated_history_line() -> None:
    assert max(HISTORY) == CAPABILITY_VERSION and sorted(HISTORY) == list(range(1, CAPABILITY_VERSION + 1))
    assert {MEASURE_CANDIDATES, OPENVINO_RUNTIME, PROFILE_ON_MQTT} <= set(HISTORY)
    assert lacks(CAPABILITY_VERSION, OPENVINO_RUNTIME, "x") is None
    why = lacks(OPENVINO_RUNTIME - 1, OPENVINO_RUNTIME, "an OpenVINO build")
    assert why == (f"an OpenVINO build needs capability version {OPENVINO_RUNTIME} (added "
                   f"{HISTORY[OPENVINO_RUNTIME][0]}) and this device speaks {OPENVINO_RUNTIME - 1}; upgrade its agent")


def test_no_measure_command_to_a_device_that_predates_it(tmp_path: Path) -> None:
    store = fleet(tmp_path, {"dev-old": MEASURE_CANDIDATES - 1})
    device_measure, commands = measure(tmp_path, store, ["dev-old"])
    spec = measure_spec([("a" * 64, 10)], b"")
    with pytest.raises(FailedPrecondition, match=r"dev-old: timing candidates \(MeasureCandidates\) needs capability "
                                                 rf"version {MEASURE_CANDIDATES}"):
        asyncio.run(device_measure.run("dev-old", spec))
    assert commands.issued == []
    assert device_measure.online_device(CLASS) is None  # online, but it cannot time: the compiler estimates


def test_the_measuring_device_is_one_that_can(tmp_path: Path) -> None:
    store = fleet(tmp_path, {"dev-old": MEASURE_CANDIDATES - 1, "dev-new": CAPABILITY_VERSION})
    device_measure, _ = measure(tmp_path, store, ["dev-old", "dev-new"])
    assert device_measure.online_device(CLASS) == "dev-new"


def test_no_openvino_candidate_to_a_device_that_predates_it(tmp_path: Path) -> None:
    store = fleet(tmp_path, {"dev-4": OPENVINO_RUNTIME - 1, "dev-5": OPENVINO_RUNTIME})
    device_measure, _ = measure(tmp_path, store, [])
    spec = measure_spec([("a" * 64, 10), ("b" * 64, 10)], b"")
    assert device_measure.refusal("dev-4", spec) is None  # onnxruntime candidates only
    spec.candidates[1].runtime = "openvino"
    why = device_measure.refusal("dev-4", spec)
    assert why is not None and f"OpenVINO candidate c1 needs capability version {OPENVINO_RUNTIME}" in why
    assert device_measure.refusal("dev-5", spec) is None


def test_no_openvino_build_for_a_class_with_a_device_that_predates_it(tmp_path: Path) -> None:
    def openvino_devices(store: SQLiteStore) -> Any:
        target = compile_target(store, CLASS)
        return target.openvino_devices

    assert openvino_devices(fleet(tmp_path / "new", {"d1": CAPABILITY_VERSION, "d2": OPENVINO_RUNTIME})) == (
        ("CPU", ("FP32", "INT8")),)
    assert openvino_devices(fleet(tmp_path / "mixed", {"d1": CAPABILITY_VERSION, "d2": OPENVINO_RUNTIME - 1})) == ()



def test_no_thread_count_to_a_device_that_predates_it(tmp_path: Path) -> None:
    """An older agent would time a candidate that asks for one thread on all of its threads, silently."""
    store = fleet(tmp_path, {"dev-7": CANDIDATE_THREADS - 1, "dev-8": CANDIDATE_THREADS})
    device_measure, _ = measure(tmp_path, store, [])
    spec = measure_spec([("a" * 64, 10), ("b" * 64, 10)], b"")
    spec.candidates[1].threads = 1
    why = device_measure.refusal("dev-7", spec)
    assert why is not None and f"candidate c1 on 1 threads needs capability version {CANDIDATE_THREADS}" in why
    assert device_measure.refusal("dev-8", spec) is None
    for version, times_threads in ((CANDIDATE_THREADS - 1, False), (CANDIDATE_THREADS, True)):
        alone = fleet(tmp_path / str(version), {"dev": version})
        measurer = measure(tmp_path / str(version), alone, ["dev"])[0].measurer_factory()(compile_target(alone, CLASS))
        assert (measurer.device_id, measurer.times_threads) == ("dev", times_threads)


def test_no_thread_search_for_a_class_with_a_device_that_predates_it(tmp_path: Path) -> None:
    assert serves_build_threads(fleet(tmp_path / "new", {"d1": CAPABILITY_VERSION, "d2": CANDIDATE_THREADS}), CLASS)
    assert not serves_build_threads(fleet(tmp_path / "mixed", {"d1": CAPABILITY_VERSION,
                                                               "d2": CANDIDATE_THREADS - 1}), CLASS)


def test_device_timings_keep_their_rounds_in_order_so_candidates_pair_by_round() -> None:
    """The agent times candidates interleaved, round by round: the compiler pairs them like local ones."""
    from edgefleet.controller.compiler.measure import DeviceMeasurer, paired_speedup
    from edgefleet.controller.fleet.device_measure import summarize
    from edgefleet.protos.v1 import fleet_pb2

    # 5% faster in two rounds of three, one round hit by noise: the ratio of medians would read 0.70x.
    base = fleet_pb2.CandidateTiming(name="c0", latencies_ms=[1.0, 2.0, 3.0])
    pick = fleet_pb2.CandidateTiming(name="c1", latencies_ms=[0.95, 2.9, 2.85])
    rows = {"a.onnx": summarize("d1", base, 10), "b.onnx": summarize("d1", pick, 10)}
    assert rows["a.onnx"]["rounds_ms"] == [1.0, 2.0, 3.0] and rows["a.onnx"]["median_ms"] == 2.0
    stats = DeviceMeasurer("d1", lambda *_: rows).measure([Path("a.onnx"), Path("b.onnx")], {})
    assert abs(paired_speedup(stats[Path("a.onnx")], stats[Path("b.onnx")]) - 1 / 0.95) < 1e-9
