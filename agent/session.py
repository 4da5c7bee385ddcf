"""The agent's link to the controller: enroll once, then keep one Session stream open.

A lost connection is retried with jittered exponential backoff (tenacity's
wait_random_exponential); the backoff starts over after every session that was accepted, so a
controller restart is followed by a quick reconnect instead of an ever-growing wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from edgefleet.agent import __version__
from edgefleet.agent.certificates import csr_pem, new_key, save_bundle, save_device_tls
from edgefleet.agent.commands import GrpcArtifactSource
from edgefleet.agent.endpoint import DEVICE_ID_HEADER, DEVICE_SECRET_HEADER, ControllerEndpoint, plaintext
from edgefleet.agent.identity import Identity, save_identity
from edgefleet.agent.link import DEFAULT_ACK_TIMEOUT_S, CommandHandler, ControllerDispatch, Serving, TelemetryPump
from edgefleet.agent.outbox import TelemetryOutbox
from edgefleet.agent.renewal import CertificateRenewer, RenewalRefused
from edgefleet.protos.capability import CAPABILITY_VERSION
from edgefleet.protos.v1 import fleet_pb2, fleet_pb2_grpc, profile_pb2

log = logging.getLogger("edgefleet.agent.session")

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
]
_PERMANENT = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
}


class Refused(Exception):
    """The controller said no for good (bad token, unknown identity): retrying cannot help."""


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() not in _PERMANENT
    return isinstance(exc, (asyncio.TimeoutError, ConnectionError, SessionLost))


class SessionLost(Exception):
    pass


def _raise_refused(exc: grpc.aio.AioRpcError, what: str) -> None:
    if exc.code() in _PERMANENT:
        raise Refused(f"{what} refused by the controller: {exc.details()}") from None


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning(
        "controller unreachable, retrying",
        extra={"attempt": state.attempt_number, "retry_in_s": round(wait, 2), "error": detail},
    )


def backoff(base_s: float, max_s: float) -> AsyncRetrying:
    return AsyncRetrying(
        wait=wait_random_exponential(multiplier=base_s, max=max_s),
        retry=retry_if_exception(_transient),
        before_sleep=_log_retry,
        reraise=True,
    )


async def enroll(
    controller: str,
    token: str,
    profile: profile_pb2.HardwareProfile,
    labels: dict[str, str],
    *,
    backoff_base_s: float = 0.5,
    backoff_max_s: float = 30.0,
    ca_pem: bytes | None = None,
    state_dir: Path | None = None,
) -> tuple[Identity, fleet_pb2.EnrollResponse]:
    """Trade the token for an identity. Network failures are retried; a refusal is final.

    `ca_pem` (TLS): the controller CA, given out of band, that the channel is verified against;
    the agent sends a CSR of a key made here and keeps key, certificate and bundle in `state_dir`
    (before the identity, so an identity on disk means a certificate on disk). None: plaintext."""
    key = new_key() if ca_pem is not None else None
    request = fleet_pb2.EnrollRequest(
        token=token,
        capability_version=CAPABILITY_VERSION,
        agent_version=__version__,
        profile=profile,
        labels=labels,
        csr_pem=csr_pem(key, profile.os.hostname) if key is not None else "",
    )
    async for attempt in backoff(backoff_base_s, backoff_max_s):
        with attempt:
            channel = (
                grpc.aio.secure_channel(controller, grpc.ssl_channel_credentials(ca_pem), options=CHANNEL_OPTIONS)
                if ca_pem is not None else grpc.aio.insecure_channel(controller, options=CHANNEL_OPTIONS))
            async with channel:
                try:
                    reply = await fleet_pb2_grpc.FleetStub(channel).Enroll(request, timeout=15)
                except grpc.aio.AioRpcError as exc:
                    _raise_refused(exc, "enrollment")
                    raise
    identity = Identity(
        device_id=reply.device_id,
        device_secret=reply.device_secret,
        controller=controller,
        labels=dict(reply.labels),
        enrolled_at_unix_ms=int(time.time() * 1000),
        device_port=reply.certificate.device_port,
    )
    if key is not None:
        if not reply.certificate.certificate_pem:
            raise Refused("the controller sent no certificate for the CSR; it predates device certificates: "
                          "upgrade it, or run both sides with --insecure")
        assert state_dir is not None
        save_device_tls(state_dir, key, reply.certificate.certificate_pem, reply.certificate.ca_bundle_pem)
    return identity, reply


async def move_to_certificate(identity: Identity, controller: str, ca_pem: bytes, state_dir: Path) -> Identity:
    """A device enrolled before certificates (a secret only): trade the secret, once, over
    server-authenticated TLS, for a certificate of a key made here. Mutual TLS from then on."""
    key = new_key()
    async with grpc.aio.secure_channel(controller, grpc.ssl_channel_credentials(ca_pem),
                                       options=CHANNEL_OPTIONS) as channel:
        try:
            reply = await fleet_pb2_grpc.FleetStub(channel).RenewCertificate(
                fleet_pb2.RenewCertificateRequest(csr_pem=csr_pem(key)), timeout=15,
                metadata=((DEVICE_ID_HEADER, identity.device_id), (DEVICE_SECRET_HEADER, identity.device_secret)))
        except grpc.aio.AioRpcError as exc:
            _raise_refused(exc, f"moving {identity.device_id} to a certificate")
            raise
    save_device_tls(state_dir, key, reply.certificate_pem, reply.ca_bundle_pem)
    moved = dataclasses.replace(identity, device_port=reply.device_port)
    save_identity(state_dir, moved)
    log.info("device moved from its secret to a certificate",
             extra={"device": identity.device_id, "device_port": reply.device_port})
    return moved


class AgentSession:
    """The gRPC ControllerLink (agent/link.py): one Session stream, reopened with backoff."""

    def __init__(
        self,
        controller: str,
        identity: Identity,
        profile: Callable[[], profile_pb2.HardwareProfile],
        *,
        outbox: TelemetryOutbox | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        connect_timeout_s: float = 15.0,
        telemetry_window: int = 64,
        ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
        endpoint: ControllerEndpoint | None = None,
    ) -> None:
        self.controller = controller
        self.endpoint = endpoint or plaintext(controller)
        self.renewer = CertificateRenewer(self.endpoint, identity.device_id, channel_options=CHANNEL_OPTIONS,
                                          timeout_s=connect_timeout_s)
        self.identity = identity
        self.device_id = identity.device_id
        self.profile = profile
        self.outbox = outbox
        self.telemetry_ready = asyncio.Event()
        self.pump = None if outbox is None else TelemetryPump(
            outbox, self.telemetry_ready, device_id=identity.device_id, window=telemetry_window,
            ack_timeout_s=ack_timeout_s)
        self.dispatch = ControllerDispatch(self, self.pump)
        self.on_command: CommandHandler | None = None
        self.serving: Serving | None = None  # (model, version) now served
        self._acks: asyncio.Queue[fleet_pb2.CommandAck] = asyncio.Queue()
        self._write_lock = asyncio.Lock()
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.connect_timeout_s = connect_timeout_s
        self.connected = False
        self.sessions_opened = 0
        self.last_rtt_ms: float | None = None
        self.heartbeats_sent = 0
        self._started = time.monotonic()
        self._last_write = self._started

    async def run(self) -> None:
        """Stay connected until cancelled; raises Refused when the controller rejects this identity."""
        tasks = [asyncio.create_task(self._stay_connected())]
        if not self.endpoint.insecure:
            tasks.append(asyncio.create_task(self.renewer.run()))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                try:
                    task.result()
                except RenewalRefused as exc:
                    raise Refused(str(exc)) from None
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _stay_connected(self) -> None:
        while True:
            async for attempt in backoff(self.backoff_base_s, self.backoff_max_s):
                with attempt:
                    await self._connect_and_serve()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return self.endpoint.metadata(self.identity.device_id, self.identity.device_secret)

    def _accepted(self, accepted: fleet_pb2.SessionAccepted) -> None:
        """Over TLS the controller hands the CAs to trust now (they change with a rotation)."""
        if self.endpoint.insecure:
            return
        if accepted.ca_bundle_pem and self.endpoint.state_dir is not None:
            save_bundle(self.endpoint.state_dir, accepted.ca_bundle_pem)
            self.endpoint.reload()
        if accepted.renew_certificate:
            log.info("controller asks for a certificate from its new CA", extra={"device": self.device_id})
            self.renewer.renew_now.set()

    async def _connect_and_serve(self) -> None:
        """Raises on a failure before the session is accepted; returns once an accepted session ends."""
        async with self.endpoint.aio_device_channel(CHANNEL_OPTIONS) as channel:
            call: Any = fleet_pb2_grpc.FleetStub(channel).Session(metadata=self._metadata())
            try:
                accepted = await self._handshake(call)
            except grpc.aio.AioRpcError as exc:
                _raise_refused(exc, f"session for {self.identity.device_id}")
                raise
            interval_s = max(0.05, accepted.heartbeat_interval_ms / 1000)
            await asyncio.to_thread(self._accepted, accepted)
            self.connected = True
            self.sessions_opened += 1
            log.info(
                "session open",
                extra={"device": self.identity.device_id, "controller": self.controller,
                       "heartbeat_s": interval_s, "capability": accepted.capability_version},
            )
            senders = [asyncio.create_task(self._heartbeat_loop(call, interval_s)),
                       asyncio.create_task(self._ack_loop(call))]
            if self.pump is not None:
                senders.append(asyncio.create_task(self.pump.run(lambda message: self._sent(call, message))))
            try:
                await self._read_loop(call)
            except grpc.aio.AioRpcError as exc:
                _raise_refused(exc, f"session for {self.identity.device_id}")
                log.warning("session lost", extra={"device": self.identity.device_id, "error": exc.details()})
            finally:
                self.connected = False
                for task in senders:
                    task.cancel()
                for task in senders:
                    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        await task
                call.cancel()

    async def _handshake(self, call: Any) -> fleet_pb2.SessionAccepted:
        hello = fleet_pb2.Hello(
            capability_version=CAPABILITY_VERSION, agent_version=__version__, profile=self.profile()
        )
        if self.serving is not None:
            hello.model, hello.model_version = self.serving()
        await call.write(fleet_pb2.AgentMessage(hello=hello))
        first = await asyncio.wait_for(call.read(), timeout=self.connect_timeout_s)
        if first is grpc.aio.EOF or first.WhichOneof("body") != "accepted":
            code = await call.code()
            raise SessionLost(f"controller ended the session before accepting it ({code})")
        accepted: fleet_pb2.SessionAccepted = first.accepted
        return accepted

    async def _send(self, call: Any, message: fleet_pb2.AgentMessage) -> None:
        async with self._write_lock:  # one write at a time on a stream
            await call.write(message)
            self._last_write = time.monotonic()

    async def _sent(self, call: Any, message: fleet_pb2.AgentMessage) -> bool:
        await self._send(call, message)  # a broken stream raises, which ends the session
        return True

    async def _heartbeat_loop(self, call: Any, interval_s: float) -> None:
        """Heartbeat ticks every interval; a tick sends one only if nothing else went out since the last.

        The controller counts any message as a sign of life, so a device whose telemetry already
        goes out every interval sends no heartbeats at all: half the messages a large fleet sends
        at the default settings (telemetry and heartbeat both every 5 s). The ticks keep a fixed
        grid rather than following the last write, so two equal periods cannot race each other
        into a heartbeat just before every batch. The longest silence is two intervals; the
        controller waits three.
        """
        next_tick = time.monotonic() + interval_s
        quiet_since = next_tick - interval_s
        while True:
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            if self._last_write <= quiet_since:
                await self._send(call, fleet_pb2.AgentMessage(
                    heartbeat=fleet_pb2.Heartbeat(
                        sent_at_unix_ms=int(time.time() * 1000), uptime_s=time.monotonic() - self._started
                    )
                ))
                self.heartbeats_sent += 1
            quiet_since = next_tick
            next_tick += interval_s
            if next_tick < time.monotonic():  # the loop was held up: skip the ticks missed
                next_tick = time.monotonic() + interval_s

    def send_ack(self, ack: fleet_pb2.CommandAck) -> None:
        """Queue a command ack; it goes out on this session or the next one."""
        self._acks.put_nowait(ack)

    async def _ack_loop(self, call: Any) -> None:
        while True:
            ack = await self._acks.get()
            try:
                await self._send(call, fleet_pb2.AgentMessage(command_ack=ack))
            except BaseException:
                if ack.final:
                    self._acks.put_nowait(ack)  # keep it for the next session
                raise

    async def _read_loop(self, call: Any) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                log.warning("session closed by the controller", extra={"device": self.identity.device_id})
                return
            self.dispatch.handle(message)

    def artifact_source(self, sha256: str, size: int) -> GrpcArtifactSource:
        """Bundles come over FetchArtifact, on a channel of their own, resumable from any offset."""
        return GrpcArtifactSource(self.controller, self.identity, sha256, size, self.endpoint)
