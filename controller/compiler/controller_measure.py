"""Device-in-the-loop for `edgefleet compile`: time candidates on an online device through the controller.

The compile runs on the operator's machine; the controller (found the way every operator command
finds it) forwards the candidates to an online device of the target class, which times them with
its serving settings. With no reachable controller or no online device, the compile falls back
to estimates, and the report says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.controller.compiler.measure import DeviceMeasurer, DeviceMeasurerFactory, Measurer
from edgefleet.controller.compiler.target import TargetSpec


def controller_device_measurers(say: Callable[[str], None]) -> DeviceMeasurerFactory:
    def factory(target: TargetSpec) -> Measurer | None:
        from edgefleet.controller.client import Connection, ControlClient, UserError
        from edgefleet.protos.capability import CANDIDATE_THREADS
        from edgefleet.protos.v1 import control_pb2

        try:
            connection = Connection.resolve(None, None)
            if not connection.token:
                say("no operator token found: latencies for this class will be estimated")
                return None
            client = ControlClient(connection, timeout_s=10)
            devices = client.call("ListDevices", control_pb2.ListDevicesRequest()).devices
        except UserError as exc:
            say(f"controller not reachable ({exc.message}): latencies for this class will be estimated")
            return None
        online = [d for d in devices if d.online and d.hardware_class == target.hardware_class]
        if not online:
            say(f"no online {target.hardware_class} device at the controller: latencies will be estimated")
            return None
        device = online[0]
        say(f"timing candidates on device {device.device_id} through the controller at {connection.address}")
        return DeviceMeasurer(device.device_id, _submitter(connection, target.hardware_class, say),
                              times_threads=device.capability_version >= CANDIDATE_THREADS)

    return factory


def _submitter(connection: Any, hardware_class: str, say: Callable[[str], None]) -> Any:
    def submit(device_id: str, paths: Sequence[Path], inputs: Mapping[str, np.ndarray],
               runtimes: Mapping[Path, Any] | None = None) -> dict[str, Any]:
        from edgefleet.controller.client import ControlClient, upload_artifact
        from edgefleet.controller.compiler.runner import RuntimeChoice, build_files
        from edgefleet.controller.fleet.device_measure import (
            MEASURE_RUNS,
            feeds_model_shapes,
            sample_npz,
            summarize,
            with_runtime,
        )
        from edgefleet.protos.v1 import control_pb2, fleet_pb2

        # Every build goes with the runtime that times it; an OpenVINO IR is two artifacts.
        client = ControlClient(connection, timeout_s=600)
        candidates = []
        for path in paths:
            choice = (runtimes or {}).get(Path(path)) or RuntimeChoice.for_file(Path(path))
            files = build_files(Path(path))
            candidate = with_runtime(fleet_pb2.Candidate(sha256=upload_artifact(client, files[0])), choice)
            if choice.name == "openvino" and len(files) > 1:  # an IR's weights
                candidate.weights_sha256 = upload_artifact(client, files[1])
            candidates.append(candidate)
        reply = client.call("MeasureOnDevice", control_pb2.MeasureOnDeviceRequest(
            hardware_class=hardware_class, candidate_sha256=[c.sha256 for c in candidates],
            inputs_npz=sample_npz(inputs), device_id=device_id, candidates=candidates,
            inputs_are_feed=feeds_model_shapes(inputs)))
        out: dict[str, Any] = {}
        for index, (path, timing) in enumerate(zip(paths, reply.timings, strict=True)):
            if timing.error and index > 0:
                say(f"device {device_id} could not time {Path(path).name}: {timing.error}")
                continue  # a build this device cannot run (no OpenVINO there): left out, and said
            out[str(path)] = summarize(device_id, timing, MEASURE_RUNS)
        return out

    return submit
