"""The Fleet gRPC service, for agents: Enroll, the Session stream and FetchArtifact.

It only translates: protobuf in, a call into the fleet domain (enrollment, and the device
sessions of controller/fleet/sessions.py, which the MQTT bridge calls too), protobuf out, and
domain errors mapped to status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from edgefleet.controller.api.grpc_common import (
    claimed_device_id,
    device_credentials,
    maps_errors,
    peer_certificate,
    status_for,
)
from edgefleet.controller.errors import (
    FailedPrecondition,
    FleetError,
    InvalidArgument,
    Unauthenticated,
)
from edgefleet.controller.fleet.device_identity import DeviceCertificateIssued, DeviceIdentities, PeerDevice
from edgefleet.controller.fleet.enrollment import Enrollment
from edgefleet.controller.fleet.sessions import DeviceSessions, Replies, SessionHello
from edgefleet.controller.store.base import DeviceRecord
from edgefleet.protos.capability import CAPABILITY_VERSION, DEVICE_CERTIFICATES, negotiate
from edgefleet.protos.v1 import fleet_pb2, fleet_pb2_grpc

log = logging.getLogger("edgefleet.controller.grpc")


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
    """`identities` None: the controller runs --insecure and devices authenticate with their secret.
    Otherwise a device is the CN of its verified client certificate (the device port, `device_port`),
    never what its metadata or messages say."""

    def __init__(
        self,
        enrollment: Enrollment,
        sessions: DeviceSessions,
        trusted_public_keys_pem: list[str],
        identities: DeviceIdentities | None = None,
        device_port: int = 0,
    ) -> None:
        self.enrollment = enrollment
        self.sessions = sessions
        self.trusted_public_keys_pem = trusted_public_keys_pem
        self.identities = identities
        self.device_port = device_port

    def _peer(self, context: grpc.aio.ServicerContext, what: str) -> PeerDevice | None:
        """The device calling, from its client certificate; None under --insecure."""
        if self.identities is None:
            return None
        cert = peer_certificate(context)
        if cert is None:
            raise Unauthenticated(f"{what} needs a client certificate from this controller's CA; connect to the "
                                  f"device port {self.device_port} with the certificate the agent got at enrollment")
        return self.identities.peer_device(cert, claimed_device_id(context))

    def _device(self, context: grpc.aio.ServicerContext, what: str) -> tuple[DeviceRecord, PeerDevice | None]:
        peer = self._peer(context, what)
        if peer is not None:
            return peer.record, peer
        return self.sessions.authenticate(*device_credentials(context)), None

    def _certificate(self, issued: DeviceCertificateIssued) -> fleet_pb2.DeviceCertificate:
        return fleet_pb2.DeviceCertificate(certificate_pem=issued.pem, ca_bundle_pem=issued.bundle_pem,
                                           not_after_unix_ms=issued.not_after_ms, device_port=self.device_port)

    @maps_errors
    async def RenewCertificate(
        self, request: fleet_pb2.RenewCertificateRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.DeviceCertificate:
        if self.identities is None:
            raise FailedPrecondition("this controller runs --insecure and issues no certificates")
        if peer_certificate(context) is not None:
            record = self._peer(context, "RenewCertificate")
            assert record is not None
            device = record.record
        else:  # a device enrolled before certificates: its secret, once, over server-authenticated TLS
            device = self.sessions.authenticate(*device_credentials(context))
            if device.cert_serial:
                raise Unauthenticated(f"device {device.device_id} already has a certificate; renew with it "
                                      "on the device port (its secret no longer authenticates it)")
            log.info("device moves from its secret to a certificate", extra={"device": device.device_id})
        return self._certificate(self.identities.issue(device, request.csr_pem, known_device=True))

    @maps_errors
    async def Enroll(
        self, request: fleet_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.EnrollResponse:
        if self.identities is not None and not request.csr_pem \
                and negotiate(request.capability_version) >= DEVICE_CERTIFICATES:
            raise InvalidArgument("this controller serves TLS: send a CSR with the enrollment (csr_pem)")
        if self.identities is not None and request.csr_pem:
            self.identities.check_csr(request.csr_pem)  # before the token is spent on a device record
        enrolled = self.enrollment.enroll(
            request.token,
            capability_version=request.capability_version,
            agent_version=request.agent_version,
            profile=request.profile,
            labels=dict(request.labels),
        )
        certificate = None
        if self.identities is not None and request.csr_pem:
            certificate = self._certificate(self.identities.issue(enrolled.record, request.csr_pem))
        return fleet_pb2.EnrollResponse(
            device_id=enrolled.record.device_id,
            device_secret="" if certificate is not None else enrolled.secret,
            certificate=certificate,
            heartbeat_interval_ms=self.sessions.heartbeat_interval_ms,
            capability_version=CAPABILITY_VERSION,
            labels=enrolled.record.labels,
            trusted_public_keys_pem=self.trusted_public_keys_pem,
            mqtt=enrolled.mqtt.to_proto() if enrolled.mqtt else None,  # issue 7
        )

    async def Session(
        self, request_iterator: AsyncIterator[fleet_pb2.AgentMessage], context: grpc.aio.ServicerContext
    ) -> None:
        outbox: asyncio.Queue[fleet_pb2.ControllerMessage] = asyncio.Queue()
        replies = Replies(send=outbox.put_nowait)
        handler = asyncio.current_task()
        assert handler is not None
        try:
            device, peer = self._device(context, "Session")
            hello = await self._read_hello(context)
            # end_silent: called by PresenceTracker.expire_silent and end_revoked; the read below
            # turns it into an abort.
            session = self.sessions.open(
                device, SessionHello.from_grpc(hello), replies, greet=True, end_silent=handler.cancel,
                ca_bundle_pem=self.identities.ca.bundle_pem() if self.identities is not None else "",
                renew_certificate=peer is not None and not peer.from_active_ca,
            )
        except FleetError as exc:
            await context.abort(status_for(exc), str(exc))
            return
        writer = asyncio.create_task(self._write_loop(context, outbox))
        reason = "stream closed"
        try:
            while True:
                try:
                    message = await context.read()
                except asyncio.CancelledError:
                    if session.live.revoked:
                        handler.uncancel()
                        reason = "revoked"
                        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                            f"device {device.device_id} was revoked by an operator")
                    if not session.silent:
                        raise  # the server is stopping
                    handler.uncancel()  # this cancellation was ours, and it is handled here
                    limit = self.sessions.silence_limit_s
                    reason = f"silent for {limit:g}s"
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED, f"no message for {limit:g}s; reconnect"
                    )
                if message is grpc.aio.EOF:
                    break
                if not self.sessions.is_current(session):
                    reason = "superseded"
                    await context.abort(grpc.StatusCode.ABORTED, "a newer session for this device replaced this one")
                self.sessions.seen(session)
                try:
                    self.sessions.receive(device.device_id, message, replies)
                except FleetError as exc:
                    reason = str(exc)
                    await context.abort(status_for(exc), str(exc))
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            self.sessions.close(session, reason)

    async def _read_hello(self, context: grpc.aio.ServicerContext) -> fleet_pb2.Hello:
        try:
            first = await asyncio.wait_for(context.read(), timeout=self.sessions.silence_limit_s)
        except asyncio.TimeoutError:
            raise InvalidArgument("no 'hello' received; the first Session message must be 'hello'") from None
        if first is grpc.aio.EOF or first.WhichOneof("body") != "hello":
            raise InvalidArgument("the first Session message must be 'hello'")
        hello: fleet_pb2.Hello = first.hello
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
            self._device(context, "FetchArtifact")
            for message in self.sessions.artifact_chunks(request.sha256, request.offset, request.chunk_size):
                yield message
        except FleetError as exc:
            await context.abort(status_for(exc), str(exc))
