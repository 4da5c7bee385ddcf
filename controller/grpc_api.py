"""gRPC servicers for Fleet (agents) and Control (operators).

They only translate: protobuf in, a call into the handler layer, protobuf out, and domain
errors mapped to status codes. The logic lives in enrollment.py, presence.py and friends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from edgefleet.controller import auth, telemetry, validation
from edgefleet.controller.artifacts import ArtifactStore
from edgefleet.controller.enrollment import Enrollment
from edgefleet.controller.errors import (
    FailedPrecondition,
    FleetError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from edgefleet.controller.presence import PresenceTracker
from edgefleet.controller.store.base import DeviceRecord, EnrollmentTokenRecord, Store
from edgefleet.controller.telemetry import TelemetryIngest
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


class FleetServicer(fleet_pb2_grpc.FleetServicer):
    def __init__(
        self,
        enrollment: Enrollment,
        presence: PresenceTracker,
        artifacts: ArtifactStore,
        ingest: TelemetryIngest,
        heartbeat_interval_s: float,
    ) -> None:
        self.enrollment = enrollment
        self.presence = presence
        self.artifacts = artifacts
        self.ingest = ingest
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
        )

    async def Session(  # type: ignore[override]
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
        )
        outbox: asyncio.Queue[fleet_pb2.ControllerMessage] = asyncio.Queue()
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
            limit = self.presence.silence_limit_s
            while True:
                try:
                    message = await asyncio.wait_for(context.read(), timeout=limit)
                except asyncio.TimeoutError:
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
                if kind == "heartbeat":
                    outbox.put_nowait(
                        fleet_pb2.ControllerMessage(
                            heartbeat_ack=fleet_pb2.HeartbeatAck(
                                sent_at_unix_ms=message.heartbeat.sent_at_unix_ms,
                                controller_time_unix_ms=int(time.time() * 1000),
                            )
                        )
                    )
                elif kind == "telemetry":
                    self.ingest.submit(
                        device.device_id,
                        message.telemetry,
                        lambda ack: outbox.put_nowait(fleet_pb2.ControllerMessage(telemetry_ack=ack)),
                    )
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

    async def FetchArtifact(  # type: ignore[override]
        self, request: fleet_pb2.FetchArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fleet_pb2.ArtifactChunk]:
        try:
            self.enrollment.authenticate_device(*device_credentials(context))
            chunks = self.artifacts.read_chunks(request.sha256, request.offset, request.chunk_size)
            for offset, data, total in chunks:
                yield fleet_pb2.ArtifactChunk(offset=offset, data=data, total_size=total)
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


class ControlServicer(TelemetryControl, control_pb2_grpc.ControlServicer):
    def __init__(
        self, store: Store, enrollment: Enrollment, presence: PresenceTracker, info: control_pb2.ControllerInfo
    ) -> None:
        self.store = store
        self.enrollment = enrollment
        self.presence = presence
        self.info = info

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
            md = dict(handler_call_details.invocation_metadata or ())  # type: ignore[attr-defined]
            header = str(md.get("authorization", ""))
            token = header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""
            if not token or not self.store.is_operator_token(auth.digest(token)):
                return self._deny
        return await continuation(handler_call_details)
