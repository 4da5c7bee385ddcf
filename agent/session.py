"""The agent's link to the controller: enroll once, then keep one Session stream open.

A lost connection is retried with jittered exponential backoff (tenacity's
wait_random_exponential); the backoff starts over after every session that was accepted, so a
controller restart is followed by a quick reconnect instead of an ever-growing wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from edgefleet.agent import __version__
from edgefleet.agent.commands import GrpcArtifactSource
from edgefleet.agent.identity import Identity
from edgefleet.agent.link import DEFAULT_ACK_TIMEOUT_S, CommandHandler, ControllerDispatch, Serving, TelemetryPump
from edgefleet.agent.outbox import TelemetryOutbox
from edgefleet.protos.capability import CAPABILITY_VERSION
from edgefleet.protos.v1 import fleet_pb2, fleet_pb2_grpc, profile_pb2

log = logging.getLogger("edgefleet.agent.session")

DEVICE_ID_HEADER = "edgefleet-device-id"
DEVICE_SECRET_HEADER = "edgefleet-device-secret"
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
) -> tuple[Identity, fleet_pb2.EnrollResponse]:
    """Trade the token for an identity. Network failures are retried; a refusal is final."""
    request = fleet_pb2.EnrollRequest(
        token=token,
        capability_version=CAPABILITY_VERSION,
        agent_version=__version__,
        profile=profile,
        labels=labels,
    )
    async for attempt in backoff(backoff_base_s, backoff_max_s):
        with attempt:
            async with grpc.aio.insecure_channel(controller, options=CHANNEL_OPTIONS) as channel:
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
    )
    return identity, reply


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
    ) -> None:
        self.controller = controller
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
        while True:
            async for attempt in backoff(self.backoff_base_s, self.backoff_max_s):
                with attempt:
                    await self._connect_and_serve()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return ((DEVICE_ID_HEADER, self.identity.device_id), (DEVICE_SECRET_HEADER, self.identity.device_secret))

    async def _connect_and_serve(self) -> None:
        """Raises on a failure before the session is accepted; returns once an accepted session ends."""
        async with grpc.aio.insecure_channel(self.controller, options=CHANNEL_OPTIONS) as channel:
            call: Any = fleet_pb2_grpc.FleetStub(channel).Session(metadata=self._metadata())
            try:
                accepted = await self._handshake(call)
            except grpc.aio.AioRpcError as exc:
                _raise_refused(exc, f"session for {self.identity.device_id}")
                raise
            interval_s = max(0.05, accepted.heartbeat_interval_ms / 1000)
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
        return GrpcArtifactSource(self.controller, self.identity, sha256, size)
