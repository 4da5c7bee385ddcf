"""Device sessions: the one handler layer both transports call (gRPC Session and the MQTT bridge).

A transport turns its own framing into these calls and their replies back into its own:
  open        a gRPC Hello, or an MQTT DeviceState that says online: the same limits on both
              (an over-long field is refused, never truncated), the same device record written
              (agent version, negotiated capability, profile, hardware class, model), and the
              device's open commands delivered
  receive     one AgentMessage: heartbeat -> HeartbeatAck, telemetry -> TelemetryIngest with a
              TelemetryAck back, command ack -> CommandDispatcher, artifact ack -> a window of chunks
  chunks      artifact bytes for FetchArtifact (gRPC) and for artifact acks (MQTT), both from one
              ChunkCache, so a wave of devices on either transport reads and encodes a chunk once
  close       the stream ended, the Last Will fired, or the link to the broker was lost

Errors are FleetErrors with a one-line message; the gRPC servicer maps them to status codes, the
MQTT bridge logs them (it has no channel back for a refusal).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Generator, Iterator
from typing import cast

from edgefleet.controller.errors import InvalidArgument, NotFound
from edgefleet.controller.fleet import validation
from edgefleet.controller.fleet.commands import CommandDispatcher
from edgefleet.controller.fleet.enrollment import Enrollment
from edgefleet.controller.fleet.presence import LiveSession, PresenceTracker
from edgefleet.controller.store.artifacts import ArtifactStore, ChunkCache
from edgefleet.controller.store.base import DeviceRecord, Store
from edgefleet.controller.telemetry.ingest import TelemetryIngest
from edgefleet.protos.capability import DEVICE_CERTIFICATES, PROFILE_ON_MQTT, negotiate
from edgefleet.protos.v1 import fleet_pb2, profile_pb2

log = logging.getLogger("edgefleet.controller.fleet.sessions")

MAX_AGENT_VERSION = 64
MAX_HARDWARE_CLASS = 64
MAX_MODEL_NAME = 128
MAX_HOSTNAME = 255
# Artifact acks (MQTT): the chunk size and window a device may ask for.
MIN_WINDOW_CHUNK = 4096
MAX_WINDOW_CHUNK = 1024 * 1024
MAX_WINDOW = 64

Send = Callable[[fleet_pb2.ControllerMessage], None]
SendChunk = Callable[[str, int, bytes], None]  # (sha256, chunk number, serialized ArtifactChunk)


@dataclasses.dataclass(frozen=True)
class SessionHello:
    """What a device says when a session opens, whichever transport carried it.

    `profile` is None only from an MQTT device that predates capability 6 (its DeviceState had
    no profile): the enrollment-time profile is kept for it, and said so in the log."""

    agent_version: str
    capability_version: int
    profile: profile_pb2.HardwareProfile | None
    model: str = ""
    model_version: int = 0

    @classmethod
    def from_grpc(cls, hello: fleet_pb2.Hello) -> SessionHello:
        return cls(hello.agent_version, hello.capability_version, hello.profile, hello.model,
                   int(hello.model_version))


@dataclasses.dataclass
class Replies:
    """Where answers to one device go: the transport's outbox, and (MQTT only) its chunk topic.

    One object per session (gRPC) or per device (MQTT), kept for as long: the telemetry ingest
    groups acks by callback, so a stable acker gives a device one TelemetryAck per stored group."""

    send: Send
    send_chunk: SendChunk | None = None
    _acker: Callable[[fleet_pb2.TelemetryAck], None] | None = None

    def telemetry_acker(self) -> Callable[[fleet_pb2.TelemetryAck], None]:
        if self._acker is None:
            send = self.send

            def acker(ack: fleet_pb2.TelemetryAck) -> None:
                send(fleet_pb2.ControllerMessage(telemetry_ack=ack))

            self._acker = acker
        return self._acker


@dataclasses.dataclass
class DeviceSession:
    """One open session of one device, on one transport."""

    device_id: str
    capability_version: int
    live: LiveSession
    replies: Replies

    @property
    def silent(self) -> bool:
        return self.live.silent


class DeviceSessions:
    def __init__(
        self,
        store: Store,
        enrollment: Enrollment,
        presence: PresenceTracker,
        ingest: TelemetryIngest,
        commands: CommandDispatcher,
        artifacts: ArtifactStore,
        heartbeat_interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.enrollment = enrollment
        self.presence = presence
        self.ingest = ingest
        self.commands = commands
        self.chunks = ChunkCache(artifacts)
        self.heartbeat_interval_ms = int(heartbeat_interval_s * 1000)
        self.clock = clock

    # -- opening and closing -------------------------------------------------------------------
    def authenticate(self, device_id: str, secret: str) -> DeviceRecord:
        return self.enrollment.authenticate_device(device_id, secret)

    def enrolled_device(self, device_id: str) -> DeviceRecord:
        """For a transport whose broker already checked the login (MQTT): the device's record."""
        record = self.store.get_device(device_id)
        if record is None:
            raise NotFound(f"device {device_id!r} is not enrolled; enroll it with a token first")
        if record.revoked:
            from edgefleet.controller.fleet.device_identity import revoked_refusal

            raise revoked_refusal(record)
        return record

    def check_hello(self, hello: SessionHello) -> None:
        """Refuse (InvalidArgument, naming the field and its limit) what the store would otherwise cut."""
        validation.check_string("hello.agent_version", hello.agent_version, MAX_AGENT_VERSION)
        validation.check_string("hello.model", hello.model, MAX_MODEL_NAME)
        if hello.profile is not None:
            validation.check_bytes("hello.profile", hello.profile.ByteSize(), validation.MAX_PROFILE_BYTES)
            validation.check_string("hello.profile.hardware_class", hello.profile.hardware_class, MAX_HARDWARE_CLASS)
            validation.check_string("hello.profile.os.hostname", hello.profile.os.hostname, MAX_HOSTNAME)
        elif negotiate(hello.capability_version) >= PROFILE_ON_MQTT:
            raise InvalidArgument(
                f"the session opening has no hardware profile; capability version {PROFILE_ON_MQTT} and later "
                "send it on every connect"
            )

    def open(
        self,
        device: DeviceRecord,
        hello: SessionHello,
        replies: Replies,
        *,
        greet: bool,
        end_silent: Callable[[], object] | None = None,
        ca_bundle_pem: str = "",
        renew_certificate: bool = False,
    ) -> DeviceSession:
        """Validate the hello, record the session and deliver the device's open commands.

        `greet`: answer with SessionAccepted first (the gRPC stream's handshake; on MQTT the
        broker's CONNACK already said yes). `end_silent`: how the transport ends a stream that
        falls silent, or of a revoked device; None where the transport watches silence itself (MQTT
        keepalive). `ca_bundle_pem`, `renew_certificate`: over TLS, the CAs the device should trust
        now and whether its certificate is from a CA being retired (capability 7)."""
        self.check_hello(hello)
        version = negotiate(hello.capability_version)
        if hello.profile is not None:
            profile_bytes = hello.profile.SerializeToString()
            hardware_class, hostname = hello.profile.hardware_class, hello.profile.os.hostname
        else:
            log.info("device predates the profile on connect; keeping its enrollment-time profile",
                     extra={"device": device.device_id, "capability": version})
            profile_bytes, hardware_class, hostname = device.profile, device.hardware_class, device.hostname
        if hardware_class != device.hardware_class:
            log.info("hardware class changed", extra={"device": device.device_id, "was": device.hardware_class,
                                                      "now": hardware_class})
        live = self.presence.session_opened(
            device.device_id, agent_version=hello.agent_version, capability_version=version,
            hardware_class=hardware_class, profile=profile_bytes, hostname=hostname,
            model=(hello.model, hello.model_version), previous=device,
        )
        live.send = replies.send  # presence.sender() finds it: how commands reach the device
        live.end_silent = end_silent
        session = DeviceSession(device.device_id, version, live, replies)
        if greet:
            accepted = fleet_pb2.SessionAccepted(
                capability_version=version, heartbeat_interval_ms=self.heartbeat_interval_ms,
                device_id=device.device_id,
            )
            if version >= DEVICE_CERTIFICATES:
                accepted.ca_bundle_pem, accepted.renew_certificate = ca_bundle_pem, renew_certificate
            replies.send(fleet_pb2.ControllerMessage(accepted=accepted))
        self.commands.deliver_open(device.device_id)
        return session

    def update(self, session: DeviceSession, hello: SessionHello) -> None:
        """A device said again what it serves (MQTT: its retained state, re-published after an install)."""
        self.check_hello(hello)
        self.presence.record_model(session.device_id, hello.model, hello.model_version)

    def is_current(self, session: DeviceSession) -> bool:
        """False once a newer session of the same device (on either transport) replaced this one."""
        return self.presence.is_current(session.live)

    def seen(self, session: DeviceSession) -> None:
        self.presence.seen(session.live)

    def close(self, session: DeviceSession, reason: str) -> None:
        self.presence.session_closed(session.live, reason)

    @property
    def silence_limit_s(self) -> float:
        return self.presence.silence_limit_s

    # -- messages ------------------------------------------------------------------------------
    def receive(self, device_id: str, message: fleet_pb2.AgentMessage, replies: Replies) -> None:
        """Handle one message of an authenticated device; a message it may not send is refused."""
        kind = message.WhichOneof("body")
        if kind == "telemetry":
            self.ingest.submit(device_id, message.telemetry, replies.telemetry_acker())
        elif kind == "heartbeat":
            replies.send(fleet_pb2.ControllerMessage(heartbeat_ack=fleet_pb2.HeartbeatAck(
                sent_at_unix_ms=message.heartbeat.sent_at_unix_ms,
                controller_time_unix_ms=int(self.clock() * 1000),
            )))
        elif kind == "command_ack":
            self.commands.on_ack(device_id, message.command_ack)
        elif kind == "artifact_ack":
            if replies.send_chunk is None:
                raise InvalidArgument("'artifact_ack' is for MQTT; over gRPC fetch artifacts with FetchArtifact")
            self.serve_window(device_id, message.artifact_ack, replies.send_chunk)
        elif kind == "hello":
            raise InvalidArgument("'hello' may be sent once per session")
        else:
            raise InvalidArgument(f"unknown Session message {kind!r}; upgrade the controller")

    # -- artifacts -----------------------------------------------------------------------------
    def artifact_chunks(self, sha256: str, offset: int, chunk_size: int) -> Iterator[bytes]:
        """Serialized ArtifactChunk messages from `offset` to the end (FetchArtifact)."""
        return self.chunks.messages(sha256, offset, chunk_size)

    def serve_window(self, device_id: str, ack: fleet_pb2.ArtifactAck, send_chunk: SendChunk) -> int:
        """Send the window of chunks a device asked for (it has everything before it); returns how many.

        Chunk n starts at n * chunk_size, so the same ChunkCache entries serve every device of a
        wave that asks with the same chunk size, and the gRPC fetches that use it too."""
        chunk_size = min(max(ack.chunk_size, MIN_WINDOW_CHUNK), MAX_WINDOW_CHUNK)
        window = min(max(ack.window, 1), MAX_WINDOW)
        sent = 0
        # A generator: closing it closes the artifact file it holds open between chunks.
        chunks = cast("Generator[bytes, None, None]",
                      self.chunks.messages(ack.sha256, ack.next_chunk * chunk_size, chunk_size))
        with contextlib.closing(chunks):
            for n, message in zip(itertools.count(ack.next_chunk), itertools.islice(chunks, window)):
                send_chunk(ack.sha256, n, message)
                sent += 1
        log.debug("artifact window served", extra={"device": device_id, "sha256": ack.sha256[:12],
                                                  "from_chunk": ack.next_chunk, "chunks": sent})
        return sent

