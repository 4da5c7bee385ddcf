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
        online = [d.device_id for d in devices if d.online and d.hardware_class == target.hardware_class]
        if not online:
            say(f"no online {target.hardware_class} device at the controller: latencies will be estimated")
            return None
        say(f"timing candidates on device {online[0]} through the controller at {connection.address}")
        return DeviceMeasurer(online[0], _submitter(connection, target.hardware_class))

    return factory


def _submitter(connection: Any, hardware_class: str) -> Any:
    def submit(device_id: str, paths: Sequence[Path], inputs: Mapping[str, np.ndarray],
               runtimes: Mapping[Path, Any] | None = None) -> dict[str, Any]:
        from edgefleet.controller.client import ControlClient, upload_artifact
        from edgefleet.controller.fleet.device_measure import MEASURE_RUNS, sample_npz, summarize
        from edgefleet.protos.v1 import control_pb2

        # MeasureOnDevice names candidates by one artifact each and times them on onnxruntime; other
        # runtimes' builds are timed when a rollout compiles (DeviceMeasure.submit), so they are left
        # out here and the report says they were not measured.
        runtimes = runtimes or {}
        paths = [p for p in paths if getattr(runtimes.get(Path(p)), "name", "onnxruntime") == "onnxruntime"]
        client = ControlClient(connection, timeout_s=600)
        shas = [upload_artifact(client, Path(p)) for p in paths]
        reply = client.call("MeasureOnDevice", control_pb2.MeasureOnDeviceRequest(
            hardware_class=hardware_class, candidate_sha256=shas, inputs_npz=sample_npz(inputs), device_id=device_id))
        timings = zip(paths, reply.timings, strict=True)
        return {str(path): summarize(device_id, timing, MEASURE_RUNS) for path, timing in timings}

    return submit
