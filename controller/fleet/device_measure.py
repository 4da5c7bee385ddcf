"""Device-in-the-loop measurement for the compiler: time candidates on an online device of the class.

The compiler runs in a worker thread and calls `submit` synchronously; the command itself must
be issued and awaited on the controller's event loop, so the call hops there and back.
"""

from __future__ import annotations

import asyncio
import io
import logging
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.controller.errors import FailedPrecondition, NotFound
from edgefleet.controller.fleet.commands import CommandDispatcher
from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.store.artifacts import ArtifactStore
from edgefleet.controller.store.base import DeviceRecord, Store
from edgefleet.protos.capability import CANDIDATE_THREADS, MEASURE_CANDIDATES, OPENVINO_RUNTIME, lacks
from edgefleet.protos.v1 import fleet_pb2

log = logging.getLogger("edgefleet.controller.fleet.device_measure")

MEASURE_TIMEOUT_S = 300.0
MEASURE_RUNS = 10  # runs per round; each round's mean is one timing


class DeviceMeasurementFailed(RuntimeError):
    pass


def sample_npz(inputs: Mapping[str, np.ndarray], samples: int = 4) -> bytes:
    """A few samples on axis 0; or, for inputs stored stacked or on a later batch axis (a Dataset's
    inputs carry their layouts), one feed in the model's own shapes (see ``feeds_model_shapes``)."""
    from edgefleet.controller.compiler.data import layouts_of, model_sample

    arrays, layouts = layouts_of(inputs)
    buffer = io.BytesIO()
    if layouts:
        np.savez(buffer, **model_sample(arrays, layouts, 0))  # type: ignore[arg-type]
    else:
        np.savez(buffer, **{k: np.asarray(v)[:samples] for k, v in arrays.items()})  # type: ignore[arg-type]
    return buffer.getvalue()


def feeds_model_shapes(inputs: Mapping[str, np.ndarray]) -> bool:
    from edgefleet.controller.compiler.data import layouts_of

    return bool(layouts_of(inputs)[1])


def measure_spec(candidates: Sequence[tuple[str, int]], inputs_npz: bytes) -> fleet_pb2.MeasureCandidates:
    """Candidates are named c0, c1, ... in order; timings come back under the same names."""
    spec = fleet_pb2.MeasureCandidates(warmup=3, runs=MEASURE_RUNS, rounds=7)
    for index, (sha, size) in enumerate(candidates):
        spec.candidates.add(name=f"c{index}", sha256=sha, size=size, runtime="onnxruntime", inputs_npz=inputs_npz)
    return spec


def with_runtime(candidate: fleet_pb2.Candidate, choice: Any) -> fleet_pb2.Candidate:
    """`candidate` with the runtime fields of the compiler's RuntimeChoice that times it."""
    candidate.runtime = choice.name
    if choice.threads:
        candidate.threads = choice.threads
    if choice.name == "openvino":
        candidate.device = choice.device
        candidate.inference_precision = choice.inference_precision or ""
    return candidate


def candidate_for(artifacts: ArtifactStore, path: Path, runtime: Any | None) -> fleet_pb2.Candidate:
    """Upload one candidate build (an OpenVINO IR is two files) and say which runtime times it."""
    from edgefleet.controller.compiler.runner import RuntimeChoice, build_files

    choice = runtime or RuntimeChoice.for_file(path)
    files = build_files(path)
    candidate = with_runtime(
        fleet_pb2.Candidate(sha256=artifacts.put_file(files[0]), size=files[0].stat().st_size), choice
    )
    if choice.name == "openvino" and len(files) > 1:  # an IR's weights
        candidate.weights_sha256 = artifacts.put_file(files[1])
        candidate.weights_size = files[1].stat().st_size
    return candidate


def summarize(device_id: str, timing: fleet_pb2.CandidateTiming, runs: int) -> dict[str, Any]:
    """Round means -> the compiler's {median_ms, p90_ms, min_ms, samples, rounds_ms}. The agent times
    the candidates interleaved, round by round, so ``rounds_ms`` (in round order) pairs them."""
    if timing.error or not timing.latencies_ms:
        raise DeviceMeasurementFailed(f"device {device_id} could not time candidate {timing.name}: {timing.error}")
    values = sorted(timing.latencies_ms)
    return {
        "median_ms": statistics.median(values),
        "p90_ms": values[min(len(values) - 1, int(0.9 * len(values)))],
        "min_ms": values[0],
        "samples": len(values) * runs,
        "rounds_ms": list(timing.latencies_ms),
    }


class DeviceMeasure:
    def __init__(self, store: Store, presence: PresenceTracker, artifacts: ArtifactStore,
                 commands: CommandDispatcher, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.presence = presence
        self.artifacts = artifacts
        self.commands = commands
        self.loop = loop

    def online_device(self, hardware_class: str) -> str | None:
        """An online device of the class whose agent can time candidates, or None."""
        too_old = []
        for record in self.store.list_devices():
            if record.hardware_class == hardware_class and self.presence.presence(record).online:
                if lacks(record.capability_version, MEASURE_CANDIDATES, "timing candidates"):
                    too_old.append(record.device_id)
                    continue
                return record.device_id
        if too_old:
            log.warning("online devices of the class predate on-device measurement; latencies are estimated",
                        extra={"class": hardware_class, "devices": ",".join(too_old[:5]),
                               "needs_capability": MEASURE_CANDIDATES})
        return None

    def refusal(self, device_id: str, spec: fleet_pb2.MeasureCandidates) -> str | None:
        """Why `spec` must not be sent to the device (its negotiated capability predates it), or None."""
        record = self.store.get_device(device_id)
        if record is None:
            return f"no device {device_id!r}; see `edgefleet devices list`"
        why = lacks(record.capability_version, MEASURE_CANDIDATES, "timing candidates (MeasureCandidates)")
        for candidate in spec.candidates:
            why = why or self._lacks(record, candidate)
        return why

    @staticmethod
    def _lacks(record: DeviceRecord, candidate: fleet_pb2.Candidate) -> str | None:
        """Why this device's agent cannot time `candidate` as asked (it would not know a field), or None."""
        if candidate.runtime == "openvino":
            why = lacks(record.capability_version, OPENVINO_RUNTIME, f"OpenVINO candidate {candidate.name}")
            if why:
                return why
        if candidate.threads:  # an older agent would time it on all its threads, and say nothing
            return lacks(record.capability_version, CANDIDATE_THREADS,
                         f"candidate {candidate.name} on {candidate.threads} threads")
        return None

    def submit(self, device_id: str, paths: Sequence[Path], inputs: Mapping[str, np.ndarray],
               runtimes: Mapping[Path, Any] | None = None) -> dict[str, Any]:
        """The compiler's DeviceSubmit hook: {str(path): {median_ms, p90_ms, min_ms, samples}}.

        A candidate the device could not run (an OpenVINO build on an agent without OpenVINO) is left
        out and logged; the others are still compared. The fp32 baseline must run."""
        inputs_npz = sample_npz(inputs)
        spec = fleet_pb2.MeasureCandidates(warmup=3, runs=MEASURE_RUNS, rounds=7,
                                           inputs_are_feed=feeds_model_shapes(inputs))
        record = self.store.get_device(device_id)
        sent: list[Path] = []
        for index, path in enumerate(paths):
            candidate = candidate_for(self.artifacts, Path(path), (runtimes or {}).get(Path(path)))
            candidate.name, candidate.inputs_npz = f"c{index}", inputs_npz
            why = self._lacks(record, candidate) if record is not None else None
            if why:  # never sent: the agent would not know what the fields mean
                if index == 0:
                    raise DeviceMeasurementFailed(f"device {device_id}: the baseline is not measurable: {why}")
                log.warning("candidate not sent to the device", extra={"device_id": device_id,
                                                                        "candidate": Path(path).name, "reason": why})
                continue
            spec.candidates.append(candidate)
            sent.append(Path(path))
        ack = asyncio.run_coroutine_threadsafe(self.run(device_id, spec), self.loop).result(MEASURE_TIMEOUT_S + 10)
        out: dict[str, Any] = {}
        for index, (path, timing) in enumerate(zip(sent, ack.timings, strict=True)):
            if timing.error and index > 0:
                log.warning("candidate not timed on the device", extra={"device_id": device_id,
                                                                          "candidate": Path(path).name,
                                                                          "reason": timing.error})
                continue
            out[str(path)] = summarize(device_id, timing, spec.runs)
        return out

    async def run(self, device_id: str, spec: fleet_pb2.MeasureCandidates) -> fleet_pb2.CommandAck:
        why = self.refusal(device_id, spec)
        if why:
            raise FailedPrecondition(f"device {device_id}: {why}")
        record = self.commands.issue(device_id, measure=spec, ttl_s=MEASURE_TIMEOUT_S)
        done = await self.commands.wait(record.command_id, MEASURE_TIMEOUT_S)
        if done.state != "done" or not done.ack:
            raise DeviceMeasurementFailed(f"device {device_id} did not answer the measurement ({done.state})")
        ack = fleet_pb2.CommandAck.FromString(done.ack)
        if ack.result != "done":
            raise DeviceMeasurementFailed(f"device {device_id} failed the measurement: {ack.reason} {ack.message}")
        return ack

    async def measure_on_class(self, hardware_class: str, shas: Sequence[str], inputs_npz: bytes,
                               device_id: str = "", candidates: Sequence[fleet_pb2.Candidate] = (),
                               inputs_are_feed: bool = False) -> tuple[str, fleet_pb2.CommandAck]:
        """For `edgefleet compile`: uploaded candidates timed on a (given, or any) online device of the class.

        ``candidates`` describe each build with its runtime (an OpenVINO IR names its weights too);
        without them each of ``shas`` is one onnxruntime model, as older CLIs send."""
        if device_id:
            record = self.store.get_device(device_id)
            if record is None or record.hardware_class != hardware_class or not self.presence.presence(record).online:
                raise FailedPrecondition(f"device {device_id} is not an online device of class {hardware_class}")
        else:
            device_id = self.online_device(hardware_class) or ""
        if not device_id:
            raise FailedPrecondition(f"no online device of class {hardware_class}; latencies can only be estimated")
        if not candidates:
            spec = measure_spec([(sha, self._size(sha)) for sha in shas], inputs_npz)
        else:
            spec = fleet_pb2.MeasureCandidates(warmup=3, runs=MEASURE_RUNS, rounds=7, inputs_are_feed=inputs_are_feed)
            for index, given in enumerate(candidates):
                candidate = spec.candidates.add()
                candidate.CopyFrom(given)
                candidate.name, candidate.inputs_npz = f"c{index}", inputs_npz
                candidate.size = self._size(given.sha256)
                if given.weights_sha256:
                    candidate.weights_size = self._size(given.weights_sha256)
        return device_id, await self.run(device_id, spec)

    def _size(self, sha: str) -> int:
        if not self.artifacts.path(sha).exists():
            raise NotFound(f"no artifact {sha}; upload the candidate first")
        return self.artifacts.size(sha)

    def measurer_factory(self) -> Any:
        """For compile_model(device_measurers=...): a DeviceMeasurer for an online device of the class."""
        from edgefleet.controller.compiler.measure import DeviceMeasurer

        def factory(target: Any) -> Any:
            device = self.online_device(target.hardware_class)
            record = self.store.get_device(device) if device else None
            if record is None:
                return None
            return DeviceMeasurer(record.device_id, self.submit,
                                  times_threads=record.capability_version >= CANDIDATE_THREADS)

        return factory
