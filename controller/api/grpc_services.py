"""gRPC servicers for Fleet (agents) and Control (operators).

They only translate: protobuf in, a call into the handler layer, protobuf out, and domain
errors mapped to status codes. The logic lives in enrollment.py, presence.py and friends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from edgefleet.controller.errors import (
    FailedPrecondition,
    FleetError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from edgefleet.controller.fleet import credentials as auth
from edgefleet.controller.fleet import validation
from edgefleet.controller.fleet.commands import CommandDispatcher
from edgefleet.controller.fleet.device_measure import DeviceMeasure, DeviceMeasurementFailed
from edgefleet.controller.fleet.enrollment import Enrollment
from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.rollouts.engine import RolloutEngine, RolloutRequest
from edgefleet.controller.store.artifacts import ArtifactStore, ChunkCache
from edgefleet.controller.store.base import (
    CommandRecord,
    DeviceRecord,
    EnrollmentTokenRecord,
    ModelRecord,
    RolloutRecord,
    Store,
)
from edgefleet.controller.telemetry import ingest as telemetry
from edgefleet.controller.telemetry.ingest import TelemetryIngest
from edgefleet.protos.capability import CAPABILITY_VERSION, negotiate
from edgefleet.protos.v1 import control_pb2, control_pb2_grpc, fleet_pb2, fleet_pb2_grpc, profile_pb2

log = logging.getLogger("edgefleet.controller.grpc")

DEVICE_ID_HEADER = "edgefleet-device-id"
DEVICE_SECRET_HEADER = "edgefleet-device-secret"

_STATUS = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}

R = TypeVar("R")


def status_for(exc: FleetError) -> grpc.StatusCode:
    return next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)


def maps_errors(
    fn: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await fn(self, request, context)
        except FleetError as exc:
            await context.abort(status_for(exc), str(exc))
            raise  # unreachable: abort raises

    return wrapper


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def device_credentials(context: grpc.aio.ServicerContext) -> tuple[str, str]:
    md = _metadata(context)
    return md.get(DEVICE_ID_HEADER, ""), md.get(DEVICE_SECRET_HEADER, "")


def _chunk_or_message(message: Any) -> bytes:
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())


class _PreSerializedReplies:
    """A server seen through `add_FleetServicer_to_server`: FetchArtifact's handler gets a response
    serializer that passes already-serialized bytes through, so the ChunkCache's encodings go to
    the wire as they are. Every other method keeps protoc's generated handler untouched."""

    def __init__(self, server: grpc.aio.Server, methods: set[str]) -> None:
        self._server = server
        self._methods = methods

    def _patch(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if method.rsplit("/", 1)[-1] in self._methods and handler is not None:
            return handler._replace(response_serializer=_chunk_or_message)
        return handler

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: self._patch(name, handler) for name, handler in handlers.items()})

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        patch = self._patch

        class Patched(grpc.GenericRpcHandler):
            def __init__(self, inner: grpc.GenericRpcHandler) -> None:
                self.inner = inner

            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
                handler = self.inner.service(details)
                return patch(details.method, handler) if handler is not None else None

        self._server.add_generic_rpc_handlers(tuple(Patched(h) for h in handlers))


def add_fleet_servicer(servicer: FleetServicer, server: grpc.aio.Server) -> None:
    fleet_pb2_grpc.add_FleetServicer_to_server(servicer, _PreSerializedReplies(server, {"FetchArtifact"}))


class FleetServicer(fleet_pb2_grpc.FleetServicer):
    def __init__(
        self,
        enrollment: Enrollment,
        presence: PresenceTracker,
        artifacts: ArtifactStore,
        ingest: TelemetryIngest,
        commands: CommandDispatcher,
        heartbeat_interval_s: float,
        trusted_public_keys_pem: list[str],
    ) -> None:
        self.enrollment = enrollment
        self.presence = presence
        self.artifacts = artifacts
        self.chunks = ChunkCache(artifacts)
        self.ingest = ingest
        self.commands = commands
        self.trusted_public_keys_pem = trusted_public_keys_pem
        self.heartbeat_interval_ms = int(heartbeat_interval_s * 1000)

    @maps_errors
    async def Enroll(
        self, request: fleet_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.EnrollResponse:
        enrolled = self.enrollment.enroll(
            request.token,
            capability_version=request.capability_version,
            agent_version=request.agent_version,
            profile=request.profile,
            labels=dict(request.labels),
        )
        return fleet_pb2.EnrollResponse(
            device_id=enrolled.record.device_id,
            device_secret=enrolled.secret,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            capability_version=CAPABILITY_VERSION,
            labels=enrolled.record.labels,
            trusted_public_keys_pem=self.trusted_public_keys_pem,
            mqtt=enrolled.mqtt.to_proto() if enrolled.mqtt else None,  # issue 7
        )

    async def Session(
        self, request_iterator: AsyncIterator[fleet_pb2.AgentMessage], context: grpc.aio.ServicerContext
    ) -> None:
        try:
            device = self.enrollment.authenticate_device(*device_credentials(context))
            hello = await self._read_hello(context)
        except FleetError as exc:
            await context.abort(status_for(exc), str(exc))
            return
        session = self.presence.session_opened(
            device.device_id,
            agent_version=hello.agent_version,
            capability_version=negotiate(hello.capability_version),
            hardware_class=hello.profile.hardware_class,
            profile=hello.profile.SerializeToString(),
            hostname=hello.profile.os.hostname[:255],
            model=(hello.model[:128], int(hello.model_version)),
        )
        outbox: asyncio.Queue[fleet_pb2.ControllerMessage] = asyncio.Queue()
        session.send = outbox.put_nowait
        writer = asyncio.create_task(self._write_loop(context, outbox))
        reason = "stream closed"
        try:
            outbox.put_nowait(
                fleet_pb2.ControllerMessage(
                    accepted=fleet_pb2.SessionAccepted(
                        capability_version=negotiate(hello.capability_version),
                        heartbeat_interval_ms=self.heartbeat_interval_ms,
                        device_id=device.device_id,
                    )
                )
            )
            self.commands.deliver_open(device.device_id)
            handler = asyncio.current_task()
            assert handler is not None
            session.end_silent = handler.cancel  # called by PresenceTracker.expire_silent
            while True:
                try:
                    message = await context.read()
                except asyncio.CancelledError:
                    if not session.silent:
                        raise  # the server is stopping
                    handler.uncancel()  # this cancellation was ours, and it is handled here
                    limit = self.presence.silence_limit_s
                    reason = f"silent for {limit:g}s"
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED, f"no message for {limit:g}s; reconnect"
                    )
                if message is grpc.aio.EOF:
                    break
                if not self.presence.is_current(session):
                    reason = "superseded"
                    await context.abort(grpc.StatusCode.ABORTED, "a newer session for this device replaced this one")
                self.presence.seen(session)
                kind = message.WhichOneof("body")
                if kind == "telemetry":
                    self.ingest.submit(
                        device.device_id,
                        message.telemetry,
                        lambda ack: outbox.put_nowait(fleet_pb2.ControllerMessage(telemetry_ack=ack)),
                    )
                elif kind == "heartbeat":
                    outbox.put_nowait(
                        fleet_pb2.ControllerMessage(
                            heartbeat_ack=fleet_pb2.HeartbeatAck(
                                sent_at_unix_ms=message.heartbeat.sent_at_unix_ms,
                                controller_time_unix_ms=int(time.time() * 1000),
                            )
                        )
                    )
                elif kind == "command_ack":
                    self.commands.on_ack(device.device_id, message.command_ack)
                elif kind == "hello":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "'hello' may be sent once per session")
                else:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"unknown Session message {kind!r}; upgrade the controller",
                    )
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            self.presence.session_closed(session, reason)

    async def _read_hello(self, context: grpc.aio.ServicerContext) -> fleet_pb2.Hello:
        try:
            first = await asyncio.wait_for(context.read(), timeout=self.presence.silence_limit_s)
        except asyncio.TimeoutError:
            raise InvalidArgument("no 'hello' received; the first Session message must be 'hello'") from None
        if first is grpc.aio.EOF or first.WhichOneof("body") != "hello":
            raise InvalidArgument("the first Session message must be 'hello'")
        hello: fleet_pb2.Hello = first.hello
        validation.check_string("hello.agent_version", hello.agent_version, 64)
        validation.check_bytes("hello.profile", hello.profile.ByteSize(), validation.MAX_PROFILE_BYTES)
        validation.check_string("hello.profile.hardware_class", hello.profile.hardware_class, 64)
        return hello

    @staticmethod
    async def _write_loop(
        context: grpc.aio.ServicerContext, outbox: asyncio.Queue[fleet_pb2.ControllerMessage]
    ) -> None:
        while True:
            await context.write(await outbox.get())

    async def FetchArtifact(
        self, request: fleet_pb2.FetchArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """ArtifactChunk messages, already serialized by the ChunkCache (see `add_fleet_servicer`)."""
        try:
            self.enrollment.authenticate_device(*device_credentials(context))
            for message in self.chunks.messages(request.sha256, request.offset, request.chunk_size):
                yield message
        except FleetError as exc:
            await context.abort(status_for(exc), str(exc))


class TelemetryControl:
    """The telemetry half of the Control service (mixed into ControlServicer)."""

    store: Store
    presence: PresenceTracker

    @maps_errors
    async def QueryTelemetry(
        self, request: control_pb2.QueryTelemetryRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.QueryTelemetryResponse:
        if self.store.get_device(request.device_id) is None:
            raise NotFound(f"no device {request.device_id!r}; see `edgefleet devices list`")
        try:
            samples = await asyncio.to_thread(
                telemetry.query, self.store, request.device_id, request.metric, request.since_unix_ms,
                request.model or None, request.rollups,
            )
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        return control_pb2.QueryTelemetryResponse(
            device_id=request.device_id,
            metric=request.metric,
            samples=[control_pb2.TelemetrySample(unix_ms=s.unix_ms, value=s.value, seq=s.seq, source=s.source)
                     for s in samples],
        )

    @maps_errors
    async def TelemetrySummary(
        self, request: control_pb2.TelemetrySummaryRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.TelemetrySummaryResponse:
        latest = await asyncio.to_thread(self.store.latest_telemetry)
        rows = []
        for record in self.store.list_devices():
            if request.device_id and record.device_id != request.device_id:
                continue
            if request.hardware_class and record.hardware_class != request.hardware_class:
                continue
            point = latest.get(record.device_id)
            online = self.presence.presence(record).online
            base = control_pb2.DeviceTelemetryRow(device_id=record.device_id, online=online,
                                                  hardware_class=record.hardware_class)
            if point is None:
                if not request.model:
                    rows.append(base)
                continue
            base.watts, base.power_source = point.watts, point.power_source
            base.cpu_percent, base.rss_bytes = point.cpu_system, point.rss_bytes
            base.last_batch_unix_ms, base.dropped_batches = point.end_ms, point.dropped_batches
            if point.temperature_c is not None:
                base.temperature_c = point.temperature_c
            models = [m for m in point.models if not request.model or m.model == request.model]
            if not models and not request.model:
                rows.append(base)
            seconds = max(1e-3, (point.end_ms - point.start_ms) / 1000)
            for m in models:
                row = control_pb2.DeviceTelemetryRow()
                row.CopyFrom(base)
                row.model, row.version, row.runtime = m.model, m.version, m.runtime
                row.throughput, row.errors = m.count / seconds, m.errors
                row.p50_ms, row.p95_ms, row.p99_ms = m.p50_ms, m.p95_ms, m.p99_ms
                row.energy_mj, row.energy_source = m.energy_mj, m.energy_source
                rows.append(row)
        return control_pb2.TelemetrySummaryResponse(rows=rows)


def command_to_proto(record: CommandRecord) -> control_pb2.CommandInfo:
    info = control_pb2.CommandInfo(
        command_id=record.command_id, device_id=record.device_id, kind=record.kind, state=record.state,
        result=record.result, reason=record.reason, message=record.message,
        created_at_unix_ms=record.created_at_ms, expires_at_unix_ms=record.expires_at_ms,
        rollout_id=record.rollout_id,
    )
    if record.ack:
        info.ack.ParseFromString(record.ack)
    return info


class CommandControl:
    """Artifacts and device commands: the part of Control that moves models (mixed into ControlServicer)."""

    store: Store
    artifacts: ArtifactStore
    commands: CommandDispatcher
    device_measure: DeviceMeasure

    @maps_errors
    async def MeasureOnDevice(
        self, request: control_pb2.MeasureOnDeviceRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.MeasureOnDeviceResponse:
        try:
            device_id, ack = await self.device_measure.measure_on_class(
                request.hardware_class, list(request.candidate_sha256), request.inputs_npz, request.device_id)
        except DeviceMeasurementFailed as exc:
            raise FailedPrecondition(str(exc)) from None
        return control_pb2.MeasureOnDeviceResponse(device_id=device_id, timings=ack.timings)

    async def UploadArtifact(
        self, request_iterator: AsyncIterator[control_pb2.ArtifactUpload], context: grpc.aio.ServicerContext
    ) -> control_pb2.ArtifactInfo:
        try:
            sha, size = await self.artifacts.receive(request_iterator)
        except FleetError as exc:
            await context.abort(status_for(exc), str(exc))
            raise
        return control_pb2.ArtifactInfo(sha256=sha, size=size)

    @maps_errors
    async def InstallOnDevice(
        self, request: control_pb2.InstallOnDeviceRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.CommandInfo:
        install = bundle_install_action(self.artifacts, request.bundle_sha256)
        record = self.commands.issue(request.device_id, install=install, ttl_s=request.ttl_s or 3600)
        return command_to_proto(record)

    @maps_errors
    async def GetCommand(
        self, request: control_pb2.GetCommandRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.CommandInfo:
        record = self.store.get_command(request.command_id)
        if record is None:
            raise NotFound(f"no command {request.command_id!r}")
        return command_to_proto(record)

    @maps_errors
    async def ListCommands(
        self, request: control_pb2.ListCommandsRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ListCommandsResponse:
        records = self.store.list_commands(device_id=request.device_id or None, rollout_id=request.rollout_id or None)
        return control_pb2.ListCommandsResponse(commands=[command_to_proto(r) for r in records])


def bundle_install_action(artifacts: ArtifactStore, sha256: str) -> fleet_pb2.InstallBundle:
    """The install action for an uploaded bundle, with name and version read from its manifest."""
    from edgefleet.firmware.bundle import read_manifest
    from edgefleet.firmware.rejections import BundleRejected

    path = artifacts.path(sha256)
    if not path.exists():
        raise NotFound(f"no artifact {sha256}; upload the bundle first")
    try:
        manifest = read_manifest(path)
    except BundleRejected as exc:
        raise InvalidArgument(f"artifact {sha256[:12]} is not a readable bundle: {exc.message}") from None
    return fleet_pb2.InstallBundle(sha256=sha256, size=path.stat().st_size, name=manifest.name,
                                   version=manifest.version)


class RolloutControl:
    """Models and rollouts (mixed into ControlServicer)."""

    store: Store
    artifacts: ArtifactStore
    rollouts: RolloutEngine

    @maps_errors
    async def AddModel(
        self, request: control_pb2.AddModelRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ModelInfo:
        # Loading the model and the data takes a while for a big model: off the event loop.
        await asyncio.to_thread(check_model_data, self.artifacts, request)
        record = register_model(self.store, self.artifacts, request)
        return model_to_proto(record)

    @maps_errors
    async def ListModels(
        self, request: control_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ListModelsResponse:
        return control_pb2.ListModelsResponse(models=[model_to_proto(m) for m in self.store.list_models()])

    @maps_errors
    async def CreateRollout(
        self, request: control_pb2.CreateRolloutRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.RolloutInfo:
        defaults = RolloutRequest(model=request.model, version=int(request.version))
        record = self.rollouts.create(dataclasses.replace(
            defaults,
            selector=request.to or defaults.selector,
            waves=request.waves or defaults.waves,
            soak_s=request.soak_s,
            max_failures=request.max_failures,
            gates=tuple(request.gates) or defaults.gates,
            device_timeout_s=request.device_timeout_s or defaults.device_timeout_s,
            auto_rollback=request.auto_rollback,
        ))
        return rollout_to_proto(self.store, record)

    @maps_errors
    async def GetRollout(
        self, request: control_pb2.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.RolloutInfo:
        record = self.store.get_rollout(request.rollout_id)
        if record is None:
            raise NotFound(f"no rollout {request.rollout_id!r}; see `edgefleet rollout list`")
        return rollout_to_proto(self.store, record)

    @maps_errors
    async def ListRollouts(
        self, request: control_pb2.ListRolloutsRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ListRolloutsResponse:
        return control_pb2.ListRolloutsResponse(
            rollouts=[rollout_to_proto(self.store, r, with_devices=False) for r in self.store.list_rollouts()])

    @maps_errors
    async def ChangeRollout(
        self, request: control_pb2.ChangeRolloutRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.RolloutInfo:
        return rollout_to_proto(self.store, self.rollouts.set_state(request.rollout_id, request.action))


def register_model(store: Store, artifacts: ArtifactStore, request: control_pb2.AddModelRequest) -> ModelRecord:
    import time

    from edgefleet.controller.store.base import StoreError

    if not request.name or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", request.name):
        raise InvalidArgument(f"model name {request.name!r} is invalid; use letters, digits, '.', '_', '-'")
    if request.version < 1:
        raise InvalidArgument("--version must be a positive integer (versions only go up on devices)")
    if request.format not in ("onnx", "tflite"):
        raise InvalidArgument(f"model format {request.format!r} is not supported; give an .onnx or .tflite file")
    for field, sha in (("sha256", request.sha256), ("calib_sha256", request.calib_sha256)):
        if sha and not artifacts.path(sha).exists():
            raise NotFound(f"field '{field}': no artifact {sha}; upload it first")
    record = ModelRecord(name=request.name, version=int(request.version), sha256=request.sha256,
                         format=request.format, calib_sha256=request.calib_sha256,
                         budget=request.budget or 0.99, created_at_ms=int(time.time() * 1000))
    try:
        store.add_model(record)
    except StoreError as exc:
        raise FailedPrecondition(str(exc)) from None
    return store.get_model(record.name, record.version) or record


def check_model_data(artifacts: ArtifactStore, request: control_pb2.AddModelRequest) -> None:
    """Refuse calibration data the model cannot be compiled with, at registration, with the same
    checks a compile makes: a rollout must not be the first to find out, at build time.

    Missing artifacts and bad fields are left to :func:`register_model`, which names them.
    """
    import tempfile
    from pathlib import Path

    from edgefleet.controller.compiler.data import load_npz
    from edgefleet.controller.compiler.errors import CompileError
    from edgefleet.controller.compiler.model_io import load_source

    if not request.calib_sha256 or request.format not in ("onnx", "tflite"):
        return
    model, calib = artifacts.path(request.sha256), artifacts.path(request.calib_sha256)
    if not model.is_file() or not calib.is_file():
        return
    with tempfile.TemporaryDirectory(prefix="edgefleet-add-model-") as tmp:
        named = Path(tmp) / f"model.{request.format}"  # load_source reads the format from the suffix
        named.symlink_to(model)
        try:
            source = load_source(named)
        except CompileError as exc:
            if isinstance(exc.__cause__, ImportError):  # no LiteRT here: the build will say so
                return
            raise InvalidArgument(f"model {request.name}: {exc}") from None
        try:
            load_npz(calib, source.inputs, flag="--calib")
        except CompileError as exc:
            raise InvalidArgument(str(exc)) from None


def model_to_proto(record: ModelRecord) -> control_pb2.ModelInfo:
    return control_pb2.ModelInfo(name=record.name, version=record.version, sha256=record.sha256,
                                 format=record.format, calib_sha256=record.calib_sha256, budget=record.budget,
                                 created_at_unix_ms=record.created_at_ms)


def rollout_to_proto(store: Store, record: RolloutRecord, with_devices: bool = True) -> control_pb2.RolloutInfo:
    rows = store.rollout_devices(record.rollout_id)
    info = control_pb2.RolloutInfo(
        rollout_id=record.rollout_id, model=record.model, version=record.version, selector=record.selector,
        waves=record.waves, soak_s=record.soak_s, max_failures=record.max_failures,
        gates=json.loads(record.gates), device_timeout_s=record.device_timeout_s,
        auto_rollback=record.auto_rollback, state=record.state, wave=record.wave,
        waves_total=len({r.wave for r in rows}), reason=record.reason, created_at_unix_ms=record.created_at_ms,
        updated_at_unix_ms=record.updated_at_ms, soak_until_unix_ms=record.soak_until_ms,
    )
    if with_devices:
        for r in rows:
            info.devices.add(device_id=r.device_id, hardware_class=r.hardware_class, wave=r.wave, state=r.state,
                             command_id=r.command_id, previous_model=r.previous_model,
                             previous_version=r.previous_version, reason=r.reason, baseline_json=r.baseline,
                             dispatched_at_unix_ms=r.dispatched_at_ms, finished_at_unix_ms=r.finished_at_ms)
        for hardware_class in sorted({r.hardware_class for r in rows}):
            build = store.get_build(record.model, record.version, hardware_class)
            if build is None:
                info.builds.add(hardware_class=hardware_class, state="pending")
                continue
            report = json.loads(build.report) if build.report else {}
            info.builds.add(hardware_class=hardware_class, state=build.state, chosen=report.get("chosen", ""),
                            speedup=float(report.get("speedup") or 0.0),
                            measured_on=str(report.get("latency", {}).get("measured_on") or ""),
                            error=build.error, bundle_sha256=build.bundle_sha256,
                            cached=bool(report.get("cached")),
                            runtime=str(report.get("result", {}).get("runtime") or ""),
                            size_ratio=float(report.get("size_ratio") or 0.0))
    return info


def token_to_proto(record: EnrollmentTokenRecord) -> control_pb2.EnrollmentToken:
    return control_pb2.EnrollmentToken(
        token_id=record.token_id,
        uses_total=record.uses_total,
        uses_left=record.uses_left,
        created_at_unix_ms=record.created_at_ms,
        expires_at_unix_ms=record.expires_at_ms,
        labels=record.labels,
        revoked=record.revoked,
    )


class ControlServicer(TelemetryControl, CommandControl, RolloutControl, control_pb2_grpc.ControlServicer):
    def __init__(
        self,
        store: Store,
        enrollment: Enrollment,
        presence: PresenceTracker,
        info: control_pb2.ControllerInfo,
        artifacts: ArtifactStore,
        commands: CommandDispatcher,
        rollouts: RolloutEngine,
        device_measure: DeviceMeasure,
    ) -> None:
        self.store = store
        self.enrollment = enrollment
        self.presence = presence
        self.info = info
        self.artifacts = artifacts
        self.commands = commands
        self.rollouts = rollouts
        self.device_measure = device_measure

    def _device(self, record: DeviceRecord, include_profile: bool) -> control_pb2.Device:
        state = self.presence.presence(record)
        device = control_pb2.Device(
            device_id=record.device_id,
            labels=record.labels,
            online=state.online,
            presence=state.reason,
            last_seen_unix_ms=state.last_seen_ms,
            enrolled_at_unix_ms=record.enrolled_at_ms,
            agent_version=record.agent_version,
            capability_version=record.capability_version,
            hardware_class=record.hardware_class,
            hostname=record.hostname,
        )
        if include_profile and record.profile:
            device.profile.CopyFrom(profile_pb2.HardwareProfile.FromString(record.profile))
        return device

    @maps_errors
    async def GetControllerInfo(
        self, request: control_pb2.GetControllerInfoRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ControllerInfo:
        return self.info

    @maps_errors
    async def CreateEnrollmentToken(
        self, request: control_pb2.CreateEnrollmentTokenRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.CreateEnrollmentTokenResponse:
        secret, record = self.enrollment.create_token(request.uses, request.ttl_s, dict(request.labels))
        return control_pb2.CreateEnrollmentTokenResponse(token=secret, info=token_to_proto(record))

    @maps_errors
    async def ListEnrollmentTokens(
        self, request: control_pb2.ListEnrollmentTokensRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ListEnrollmentTokensResponse:
        return control_pb2.ListEnrollmentTokensResponse(
            tokens=[token_to_proto(t) for t in self.store.list_enrollment_tokens()]
        )

    @maps_errors
    async def RevokeEnrollmentToken(
        self, request: control_pb2.RevokeEnrollmentTokenRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.EnrollmentToken:
        return token_to_proto(self.enrollment.revoke_token(request.token_id))

    @maps_errors
    async def ListDevices(
        self, request: control_pb2.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ListDevicesResponse:
        return control_pb2.ListDevicesResponse(
            devices=[self._device(r, request.include_profile) for r in self.store.list_devices()]
        )

    @maps_errors
    async def GetDevice(
        self, request: control_pb2.GetDeviceRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.Device:
        record = self.store.get_device(request.device_id)
        if record is None:
            raise NotFound(f"no device {request.device_id!r}; see `edgefleet devices list`")
        return self._device(record, include_profile=True)


class OperatorAuthInterceptor(grpc.aio.ServerInterceptor):
    """Every Control call needs `authorization: Bearer <operator token>`; device secrets never pass."""

    def __init__(self, store: Store) -> None:
        self.store = store

        async def deny(request: bytes, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid operator token; set EDGEFLEET_TOKEN or use the controller's "
                "state-dir/operator-token",
            )

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith("/edgefleet.v1.Control/"):
            md = dict(handler_call_details.invocation_metadata or ())
            header = str(md.get("authorization", ""))
            token = header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""
            if not token or not self.store.is_operator_token(auth.digest(token)):
                return self._deny
        return await continuation(handler_call_details)
