"""The Control gRPC service, for operators and the CLI, and the operator-token check in front of it.

Translation only: each method validates nothing itself beyond the wire, calls the domain
(enrollment, commands, rollouts, the model registry, telemetry) and converts records to protobuf.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import grpc

from edgefleet.controller.api.control_access import CURRENT_OPERATOR, OperatorAuthInterceptor
from edgefleet.controller.api.grpc_common import (
    maps_errors,
    status_for,
)
from edgefleet.controller.errors import (
    FailedPrecondition,
    FleetError,
    InvalidArgument,
    NotFound,
)
from edgefleet.controller.fleet import credentials as auth
from edgefleet.controller.fleet.certificates import fingerprint
from edgefleet.controller.fleet.commands import CommandDispatcher
from edgefleet.controller.fleet.device_identity import DeviceIdentities, revoke_device
from edgefleet.controller.fleet.device_measure import DeviceMeasure, DeviceMeasurementFailed
from edgefleet.controller.fleet.enrollment import Enrollment
from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.rollouts.builds import bundle_install_action
from edgefleet.controller.rollouts.engine import RolloutEngine, RolloutRequest
from edgefleet.controller.rollouts.models import check_model_data, register_model
from edgefleet.controller.store.artifacts import ArtifactStore
from edgefleet.controller.store.base import (
    AuditRecord,
    CommandRecord,
    DeviceRecord,
    EnrollmentTokenRecord,
    ModelRecord,
    OperatorTokenRecord,
    RolloutRecord,
    Store,
)
from edgefleet.controller.telemetry import ingest as telemetry
from edgefleet.controller.telemetry.summary import summary_rows
from edgefleet.protos.v1 import control_pb2, control_pb2_grpc, profile_pb2

__all__ = ["ControlServicer", "OperatorAuthInterceptor"]  # the interceptor lives in control_access.py

T = TypeVar("T")


class FleetLoopCalls:
    """How a Control handler reaches the objects that live on the fleet loop (presence, the command
    dispatcher's outboxes, the rollout engine, on-device measurement). With TLS, Control is served
    on a loop of its own (controller/api/control_server.py) and these calls hop to the fleet loop;
    otherwise both are one loop and they run in place."""

    fleet_loop: asyncio.AbstractEventLoop | None

    def _hops(self) -> asyncio.AbstractEventLoop | None:
        loop = self.fleet_loop
        return None if loop is None or loop is asyncio.get_running_loop() else loop

    async def on_fleet_loop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = self._hops()
        if loop is None:
            return fn(*args, **kwargs)

        async def call() -> T:
            return fn(*args, **kwargs)

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), loop))

    async def awaited_on_fleet_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        loop = self._hops()
        if loop is None:
            return await coroutine
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, loop))


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
        rows = await asyncio.to_thread(
            summary_rows, self.store, self.presence, request.device_id, request.hardware_class, request.model)
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


class CommandControl(FleetLoopCalls):
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
            device_id, ack = await self.awaited_on_fleet_loop(self.device_measure.measure_on_class(
                request.hardware_class, list(request.candidate_sha256), request.inputs_npz, request.device_id,
                candidates=list(request.candidates), inputs_are_feed=request.inputs_are_feed))
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
        record = await self.on_fleet_loop(self.commands.issue, request.device_id, install=install,
                                          ttl_s=request.ttl_s or 3600)
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


class RolloutControl(FleetLoopCalls):
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
        record = await self.on_fleet_loop(self.rollouts.create, dataclasses.replace(
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
        rollouts = self.store.list_rollouts()
        waves = self.store.rollout_wave_counts()  # two reads, not one per rollout
        return control_pb2.ListRolloutsResponse(rollouts=[rollout_summary(r, waves) for r in rollouts])

    @maps_errors
    async def ChangeRollout(
        self, request: control_pb2.ChangeRolloutRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.RolloutInfo:
        record = await self.on_fleet_loop(self.rollouts.set_state, request.rollout_id, request.action)
        return rollout_to_proto(self.store, record)


def model_to_proto(record: ModelRecord) -> control_pb2.ModelInfo:
    return control_pb2.ModelInfo(name=record.name, version=record.version, sha256=record.sha256,
                                 format=record.format, calib_sha256=record.calib_sha256, budget=record.budget,
                                 created_at_unix_ms=record.created_at_ms, eval_sha256=record.eval_sha256,
                                 eval_labels_sha256=record.eval_labels_sha256, metric=record.metric)


def rollout_summary(record: RolloutRecord, wave_counts: dict[str, int]) -> control_pb2.RolloutInfo:
    """A rollout without its devices and builds (ListRollouts): no read per rollout."""
    return control_pb2.RolloutInfo(
        rollout_id=record.rollout_id, model=record.model, version=record.version, selector=record.selector,
        waves=record.waves, soak_s=record.soak_s, max_failures=record.max_failures,
        gates=json.loads(record.gates), device_timeout_s=record.device_timeout_s,
        auto_rollback=record.auto_rollback, state=record.state, wave=record.wave,
        waves_total=wave_counts.get(record.rollout_id, 0), reason=record.reason,
        created_at_unix_ms=record.created_at_ms, updated_at_unix_ms=record.updated_at_ms,
        soak_until_unix_ms=record.soak_until_ms,
    )


def rollout_to_proto(store: Store, record: RolloutRecord, with_devices: bool = True) -> control_pb2.RolloutInfo:
    rows = store.rollout_devices(record.rollout_id)
    info = rollout_summary(record, {record.rollout_id: len({r.wave for r in rows})})
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


def operator_token_to_proto(record: OperatorTokenRecord) -> control_pb2.OperatorToken:
    return control_pb2.OperatorToken(
        token_id=record.token_id, role=record.role, name=record.name, created_at_unix_ms=record.created_at_ms,
        expires_at_unix_ms=record.expires_at_ms, revoked_at_unix_ms=record.revoked_at_ms,
        created_by=record.created_by,
    )


def audit_to_proto(record: AuditRecord) -> control_pb2.AuditEntry:
    return control_pb2.AuditEntry(unix_ms=record.at_ms, token_id=record.token_id, role=record.role,
                                  method=record.method, arguments_json=record.arguments, outcome=record.outcome,
                                  message=record.message)


MAX_AUDIT_ENTRIES = 10_000


class AccessControl:
    """Operator tokens and the audit log (mixed into ControlServicer). Who may call these is decided
    before they run, by the interceptor (controller/api/control_access.py), like every other method."""

    store: Store

    @maps_errors
    async def CreateOperatorToken(
        self, request: control_pb2.CreateOperatorTokenRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.CreateOperatorTokenResponse:
        try:
            role = auth.OperatorRole.parse(request.role)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if len(request.name) > 200:
            raise InvalidArgument(f"'name' has {len(request.name)} characters; keep it under 200")
        caller = CURRENT_OPERATOR.get()
        now_ms = int(time.time() * 1000)
        secret = auth.new_operator_token()
        for _ in range(3):  # a token id collision (32 random bits) is retried, never silently dropped
            record = OperatorTokenRecord(
                token_id=auth.new_operator_token_id(), token_hash=auth.digest(secret), role=role.value,
                created_at_ms=now_ms, name=request.name,
                expires_at_ms=now_ms + int(request.ttl_s) * 1000 if request.ttl_s else 0,
                created_by=caller.token_id if caller else "",
            )
            if self.store.add_operator_token(record):
                return control_pb2.CreateOperatorTokenResponse(token=secret, info=operator_token_to_proto(record))
        raise FailedPrecondition("could not allocate an operator token id; try again")

    @maps_errors
    async def ListOperatorTokens(
        self, request: control_pb2.ListOperatorTokensRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ListOperatorTokensResponse:
        return control_pb2.ListOperatorTokensResponse(
            tokens=[operator_token_to_proto(t) for t in self.store.list_operator_tokens()])

    @maps_errors
    async def RevokeOperatorToken(
        self, request: control_pb2.RevokeOperatorTokenRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.OperatorToken:
        now_ms = int(time.time() * 1000)
        tokens = self.store.list_operator_tokens()
        target = next((t for t in tokens if t.token_id == request.token_id), None)
        if target is None:
            raise NotFound(f"no operator token {request.token_id!r}; see `edgefleet operator-token list`")
        usable_admins = [t for t in tokens if t.role == auth.OperatorRole.ADMIN.value
                         and auth.operator_token_refusal(t, now_ms) is None]
        if usable_admins == [target]:
            raise FailedPrecondition(
                f"{target.token_id} is the last usable admin token; create another admin token first "
                "(`edgefleet operator-token create --role admin`) so the fleet stays manageable")
        revoked = self.store.revoke_operator_token(request.token_id, now_ms)
        if revoked is None:
            raise NotFound(f"no operator token {request.token_id!r}; see `edgefleet operator-token list`")
        return operator_token_to_proto(revoked)

    @maps_errors
    async def ListAudit(
        self, request: control_pb2.ListAuditRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ListAuditResponse:
        limit = min(int(request.limit or 100), MAX_AUDIT_ENTRIES)
        entries = await asyncio.to_thread(self.store.list_audit, since_ms=int(request.since_unix_ms), limit=limit)
        return control_pb2.ListAuditResponse(entries=[audit_to_proto(e) for e in entries])


class ControlServicer(TelemetryControl, CommandControl, RolloutControl, AccessControl,
                      control_pb2_grpc.ControlServicer):
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
        identities: DeviceIdentities | None = None,  # None: the controller runs --insecure
        fleet_loop: asyncio.AbstractEventLoop | None = None,  # None: Control is served on the fleet loop
    ) -> None:
        self.fleet_loop = fleet_loop
        self.identities = identities
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
            revoked=record.revoked,
            revoked_at_unix_ms=record.revoked_at_ms,
            cert_not_after_unix_ms=record.cert_not_after_ms,
        )
        if record.revoked:
            device.presence = "revoked"
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
    async def RevokeDevice(
        self, request: control_pb2.RevokeDeviceRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.Device:
        record = await self.on_fleet_loop(revoke_device, self.store, self.presence, self.enrollment.mqtt_logins,
                                          request.device_id, int(time.time() * 1000))
        return self._device(record, include_profile=False)

    def _ca_identities(self) -> DeviceIdentities:
        if self.identities is None:
            raise FailedPrecondition("this controller runs --insecure: it has no CA; restart it without --insecure")
        return self.identities

    def _ca_info(self) -> control_pb2.CertificateAuthority:
        ca = self._ca_identities().ca
        return control_pb2.CertificateAuthority(
            cas=[control_pb2.CaCertificate(subject=c.subject.rfc4514_string(), sha256_fingerprint=fingerprint(c),
                                           not_after_unix_ms=int(c.not_valid_after_utc.timestamp() * 1000),
                                           active=i == 0) for i, c in enumerate(ca.cas())],
            bundle_pem=ca.bundle_pem(),
        )

    @maps_errors
    async def GetCertificateAuthority(
        self, request: control_pb2.GetCertificateAuthorityRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.CertificateAuthority:
        return self._ca_info()

    @maps_errors
    async def RotateCertificateAuthority(
        self, request: control_pb2.RotateCertificateAuthorityRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.CertificateAuthority:
        await self.on_fleet_loop(self._ca_identities().rotate)  # sessions there read the bundle
        return self._ca_info()

    @maps_errors
    async def RetireOldCertificateAuthority(
        self, request: control_pb2.RetireOldCertificateAuthorityRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.CertificateAuthority:
        await self.on_fleet_loop(self._ca_identities().retire_old)
        return self._ca_info()

    @maps_errors
    async def GetDevice(
        self, request: control_pb2.GetDeviceRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.Device:
        record = self.store.get_device(request.device_id)
        if record is None:
            raise NotFound(f"no device {request.device_id!r}; see `edgefleet devices list`")
        return self._device(record, include_profile=True)
