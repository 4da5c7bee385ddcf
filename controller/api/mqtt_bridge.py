"""The controller's MQTT transport: a thin translation layer, like the gRPC servicers.

Subscriptions (the broker's ACL gives the controller's admin login the whole edgefleet/v1 tree):
  $share/edgefleet/edgefleet/v1/+/telemetry  shared: replicas split the load; -> DeviceSessions.receive,
                                              whose TelemetryAck goes back on the device's `cmd` topic
  $share/edgefleet/edgefleet/v1/+/ack         shared: command acks and artifact acks -> DeviceSessions.receive;
                                              the chunks go out on artifact/<sha>/<n>
  edgefleet/v1/+/state                        every replica: retained DeviceState -> DeviceSessions.open
                                              (the same hello checks as gRPC's); the session's replies
                                              publish to the device's `cmd`

All the domain work (validation, presence, ingest, commands, the artifact cache) is in
controller/fleet/sessions.py, shared with the gRPC Session; this module only maps topics and
payloads to those calls.

The device id always comes from the topic, never from the payload: the broker's ACL lets a
login publish only under its own id, so a device cannot speak for another one.

paho's network loop runs on its own thread. Messages are queued there and handed to the
asyncio loop in batches (one `call_soon_threadsafe` per burst, not per message), so ingest,
presence and the store are only ever touched from the controller's loop.

Losing the broker does not close the device sessions at once: they are suspended (no longer
vouched for, so presence sees them fall silent) for `silence_limit_s`. On reconnect the broker
re-delivers every retained state, 10,000 at once for a large fleet; a device whose state says
what its suspended session said is restored with no store write, and only changed devices are
reopened or closed. The states are handled REOPEN_BATCH at a time per turn of the event loop, so
gRPC sessions, the ingest and the Control API keep being served during the burst. Suspended
sessions nobody re-announced within the grace are closed (in one batched write, by presence).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgefleet.common.mqtt import (
    BrokerAddress,
    connack_refused,
    new_client,
    parse_broker_url,
    session_properties,
    split_topic,
    topic,
)
from edgefleet.controller.errors import FleetError
from edgefleet.controller.fleet.broker_auth import BrokerAuth
from edgefleet.controller.fleet.sessions import DeviceSession, DeviceSessions, Replies, SessionHello
from edgefleet.controller.store.base import CommandRecord
from edgefleet.protos.v1 import fleet_pb2, mqtt_pb2

log = logging.getLogger("edgefleet.controller.mqtt")

SHARE_GROUP = "edgefleet"
TELEMETRY_FILTER = f"$share/{SHARE_GROUP}/edgefleet/v1/+/telemetry"
ACK_FILTER = f"$share/{SHARE_GROUP}/edgefleet/v1/+/ack"
STATE_FILTER = "edgefleet/v1/+/state"
DEFAULT_ADMIN = "edgefleet-controller"
# Which AgentMessage kinds each device topic carries; anything else there is dropped.
TOPIC_KINDS = {"telemetry": {"telemetry"}, "ack": {"command_ack", "artifact_ack"}}
# Device states (session opens) handled per turn of the event loop; the rest wait for the next turn.
REOPEN_BATCH = 200


@dataclasses.dataclass
class ReconnectReport:
    """What the last loss of the broker cost, for the log and tests: sessions suspended when it went,
    and of those, restored unchanged (no write), reopened (state changed), closed (offline or never
    re-announced); `batches`: event-loop turns the state burst was split into."""

    suspended: int = 0
    restored: int = 0
    reopened: int = 0
    closed: int = 0
    batches: int = 0


class MqttConfigError(ValueError):
    """A broker setting the operator must fix; one line, with the fix."""


@dataclasses.dataclass(frozen=True)
class MqttOptions:
    """Everything about the broker except its URL (ControllerConfig.mqtt_url)."""

    ca_file: Path | None = None          # a private CA for mqtts://, also handed to devices
    device_url: str | None = None        # the URL devices use, when it differs from the controller's
    auth_dir: Path | None = None         # the broker's password_file + acl_file (default: state-dir/mqtt)
    broker_pid_file: Path | None = None  # SIGHUP target so new logins take effect at once
    client_id: str | None = None         # stable per replica, so its broker session survives restarts
    session_expiry_s: int = 300
    client_certs: bool = False           # devices log in with their certificate, not a password


def public_url(url: str) -> str:
    """The URL without its user:password, for devices and logs."""
    address = parse_broker_url(url)
    scheme = "mqtts" if address.tls else "mqtt"
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{scheme}://{host}:{address.port}"


def broker_auth(url: str, options: MqttOptions, state_dir: Path) -> BrokerAuth:
    """The credential manager for `url`'s broker; the admin login is the one in the URL."""
    address = parse_broker_url(url)
    if not address.username or not address.password:
        raise MqttConfigError(
            f"--mqtt {public_url(url)} has no login; give the controller's admin login in the URL: "
            f"mqtt://{DEFAULT_ADMIN}:PASSWORD@HOST:PORT"
        )
    ca_pem = ""
    if options.ca_file is not None:
        try:
            ca_pem = options.ca_file.read_text()
        except OSError as exc:
            raise MqttConfigError(
                f"cannot read --mqtt-ca {options.ca_file}: {exc.strerror}; pass the CA's PEM file"
            ) from None
    return BrokerAuth(
        options.auth_dir or state_dir / "mqtt", admin_username=address.username, admin_password=address.password,
        device_url=options.device_url or public_url(url), ca_pem=ca_pem, broker_pid_file=options.broker_pid_file,
        client_certs=options.client_certs,
    )


class MqttBridge:
    def __init__(
        self,
        url: str,
        options: MqttOptions,
        *,
        sessions: DeviceSessions,
        auth: BrokerAuth,
        default_client_id: str = "",
    ) -> None:
        self.sessions = sessions
        self.address: BrokerAddress = parse_broker_url(url)
        self.url = public_url(url)
        self.options = options
        self.auth = auth
        self.client_id = options.client_id or default_client_id or f"edgefleet-controller-{socket.gethostname()}"
        self.connected = False
        self._sessions: dict[str, DeviceSession] = {}
        self._hellos: dict[str, SessionHello] = {}  # what each open session's state said
        # Sessions held when the broker went, awaiting their device's retained state; when to give up.
        self._suspended: dict[str, DeviceSession] = {}
        self._suspended_until = 0.0
        self.reconnect = ReconnectReport()
        self.reopen_batch = REOPEN_BATCH
        self._replies: dict[str, Replies] = {}
        self._inbox: collections.deque[tuple[str, bytes | bytearray]] = collections.deque()
        self._inbox_lock = threading.Lock()
        self._drain_scheduled = False
        self._backlog: collections.deque[tuple[str, bytes | bytearray]] = collections.deque()  # loop side
        self._backlog_scheduled = False
        self._first_connack: asyncio.Future[str | None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._vouch: asyncio.Task[None] | None = None
        ca_file = options.ca_file
        self._client = new_client(self.client_id, self.address, username=self.address.username,
                                  password=self.address.password, ca_file=ca_file, backoff_max_s=10)
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(0)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self, connect_timeout_s: float = 10.0) -> None:
        """Connect and subscribe. A refused login is fatal; an unreachable broker is retried in the background."""
        self._loop = asyncio.get_running_loop()
        self._first_connack = self._loop.create_future()
        await asyncio.to_thread(self.auth.prepare)
        self._client.connect_async(self.address.host, self.address.port, keepalive=30, clean_start=False,
                                   properties=session_properties(self.options.session_expiry_s))
        self._client.loop_start()
        try:
            refused = await asyncio.wait_for(asyncio.shield(self._first_connack), connect_timeout_s)
        except asyncio.TimeoutError:
            log.warning("broker not reachable yet; retrying in the background", extra={"broker": self.url})
        else:
            if refused:
                self._client.loop_stop()
                raise MqttConfigError(
                    f"broker {self.url} refused the controller's login ({refused}); check the user:password "
                    f"in --mqtt and that the broker reads {self.auth.passwd_path} as its password_file"
                )
        self._vouch = asyncio.create_task(self._vouch_loop())

    async def stop(self) -> None:
        if self._vouch is not None:
            self._vouch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._vouch
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        self._close_sessions("controller stopping")
        self._close_suspended("controller stopping")

    # -- outbound helpers (also what the command path uses) ------------------------------------
    def publish(self, device_id: str, message: fleet_pb2.ControllerMessage, *, leaf: str = "cmd",
                retain: bool = False) -> bool:
        """QoS 1 to edgefleet/v1/<device>/<leaf>; the device's persistent session queues it while away."""
        info = self._client.publish(topic(device_id, leaf), message.SerializeToString(), qos=1, retain=retain)
        return info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)  # NO_CONN: paho resends on reconnect

    # -- paho thread ---------------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        refused = connack_refused(reason_code)
        if not refused:
            client.subscribe([(TELEMETRY_FILTER, 1), (ACK_FILTER, 1), (STATE_FILTER, 1)])
        self._call(self._connected, refused)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self._call(self._disconnected, str(reason_code))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._inbox_lock:
            self._inbox.append((message.topic, message.payload))
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        self._call(self._drain)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(fn, *args)

    # -- on the loop ---------------------------------------------------------------------------
    def _connected(self, refused: str | None) -> None:
        if self._first_connack is not None and not self._first_connack.done():
            self._first_connack.set_result(refused)
        if refused:
            log.error("broker refused the controller's login", extra={"broker": self.url, "reason": refused})
            return
        self.connected = True
        if self._suspended:  # the retained states about to arrive decide; give them the grace again
            self._suspended_until = max(self._suspended_until, time.monotonic() + self.sessions.silence_limit_s)
        log.info("mqtt connected", extra={"broker": self.url, "client_id": self.client_id,
                                          "suspended_sessions": len(self._suspended)})

    def _disconnected(self, reason: str) -> None:
        if self.connected:
            log.warning("mqtt connection lost; reconnecting", extra={"broker": self.url, "reason": reason})
        self.connected = False
        # We can no longer vouch for anyone: suspended, the sessions fall silent in presence. The
        # retained states re-delivered on reconnect restore them (unchanged: no write) or reopen them.
        if self._sessions:
            self.reconnect = ReconnectReport(suspended=len(self._sessions) + len(self._suspended))
            self._suspended.update(self._sessions)
            self._sessions = {}
        self._suspended_until = time.monotonic() + self.sessions.silence_limit_s

    def _drain(self) -> None:
        with self._inbox_lock:
            batch, self._inbox = self._inbox, collections.deque()
            self._drain_scheduled = False
        self._backlog.extend(batch)
        if not self._backlog_scheduled:
            self._work_backlog()

    def _work_backlog(self) -> None:
        """Handle queued messages in order, at most `reopen_batch` device states in this turn."""
        self._backlog_scheduled = False
        states = 0
        while self._backlog:
            if states >= self.reopen_batch and self._loop is not None:
                self._backlog_scheduled = True
                self.reconnect.batches += 1
                self._loop.call_soon(self._work_backlog)  # the rest after whatever else is ready
                return
            name, payload = self._backlog.popleft()
            states += name.endswith("/state")
            try:
                self._dispatch(name, payload)
            except Exception:
                log.exception("mqtt message handling failed", extra={"topic": name})
        if states:
            self.reconnect.batches += 1

    def _dispatch(self, name: str, payload: bytes | bytearray) -> None:
        where = split_topic(name)
        if where is None:
            return
        device_id, leaf = where
        if leaf == "state":
            self._on_state(device_id, payload)
            return
        if device_id in self.sessions.presence.revoked:
            log.warning("message of a revoked device dropped", extra={"device": device_id, "topic": leaf})
            return
        try:
            message = fleet_pb2.AgentMessage.FromString(bytes(payload))
        except Exception:
            log.warning("undecodable agent message dropped", extra={"device": device_id, "topic": leaf})
            return
        kind = message.WhichOneof("body")
        if kind not in TOPIC_KINDS.get(leaf, ()):
            log.warning("unexpected message dropped", extra={"device": device_id, "topic": leaf, "kind": kind})
            return
        try:
            self.sessions.receive(device_id, message, self._replies_for(device_id))
        except FleetError as exc:
            log.warning("agent message refused", extra={"device": device_id, "topic": leaf, "kind": kind,
                                                        "reason": str(exc)})

    def _replies_for(self, device_id: str) -> Replies:
        """One per device, kept: the telemetry ingest groups acks by their callback."""
        replies = self._replies.get(device_id)
        if replies is None:
            def send_chunk(sha256: str, n: int, chunk: bytes) -> None:
                self._client.publish(topic(device_id, f"artifact/{sha256}/{n}"), chunk, qos=1)

            replies = self._replies[device_id] = Replies(
                send=lambda message: self._send(device_id, message), send_chunk=send_chunk)
        return replies

    def publish_desired(self, record: CommandRecord, command: fleet_pb2.Command) -> None:
        """Retain the model an install command asks for on the device's `desired` topic."""
        if command.WhichOneof("action") != "install":
            return
        desired = mqtt_pb2.DesiredModel(
            model=command.install.name, version=command.install.version, bundle_sha256=command.install.sha256,
            bundle_size=command.install.size, command_id=command.command_id, set_at_unix_ms=record.created_at_ms)
        self._client.publish(topic(record.device_id, "desired"), desired.SerializeToString(), qos=1, retain=True)

    def _send(self, device_id: str, message: fleet_pb2.ControllerMessage) -> None:
        self.publish(device_id, message)

    def _on_state(self, device_id: str, payload: bytes | bytearray) -> None:
        try:  # an empty payload (a cleared retained state) parses as offline, which is what it means
            state = mqtt_pb2.DeviceState.FromString(bytes(payload))
        except Exception:
            log.warning("undecodable device state dropped", extra={"device": device_id})
            return
        session = self._sessions.get(device_id)
        suspended = self._suspended.pop(device_id, None)
        if suspended is not None and not self._suspended:
            self._loop_call_soon(self._log_settled)  # after this state is handled
        if not state.online:
            for gone in (session, suspended):
                if gone is not None:
                    self._sessions.pop(device_id, None)
                    self._hellos.pop(device_id, None)
                    self.reconnect.closed += gone is suspended
                    self.sessions.close(gone, "mqtt: offline (last will or clean exit)")
            return
        hello = SessionHello(state.agent_version, state.capability_version,
                             state.profile if state.HasField("profile") else None, state.model,
                             int(state.model_version))
        try:
            if suspended is not None and self.sessions.is_current(suspended) and self._hellos.get(device_id) == hello:
                # Re-announced after a broker reconnect, saying what it said before: nothing to write.
                self._sessions[device_id] = suspended
                self.sessions.seen(suspended)
                self.reconnect.restored += 1
                return
            if session is not None and self.sessions.is_current(session):
                # Already online through us; a state published again may say the model changed.
                if self._hellos.get(device_id) != hello:
                    self.sessions.update(session, hello)
                    self._hellos[device_id] = hello
                return
            record = self.sessions.enrolled_device(device_id)
            self._sessions[device_id] = self.sessions.open(record, hello, self._replies_for(device_id), greet=False)
            self._hellos[device_id] = hello
            self.reconnect.reopened += suspended is not None
        except FleetError as exc:
            log.warning("device state refused; the device stays offline until it sends a valid one",
                        extra={"device": device_id, "reason": str(exc)})

    def _loop_call_soon(self, fn: Callable[[], None]) -> None:
        if self._loop is not None:
            self._loop.call_soon(fn)
        else:
            fn()

    def _log_settled(self) -> None:
        log.info("mqtt sessions re-announced after the broker came back",
                 extra={"broker": self.url, **dataclasses.asdict(self.reconnect)})

    def _close_sessions(self, reason: str) -> None:
        sessions, self._sessions = self._sessions, {}
        for device_id, session in sessions.items():
            self._hellos.pop(device_id, None)
            self.sessions.close(session, reason)

    def _close_suspended(self, reason: str) -> None:
        suspended, self._suspended = self._suspended, {}
        for device_id, session in suspended.items():
            self._hellos.pop(device_id, None)
            self.sessions.close(session, reason)
        if suspended:
            self.reconnect.closed += len(suspended)
            log.info("mqtt sessions not re-announced after the broker came back; closed",
                     extra={"broker": self.url, "sessions": len(suspended), "reason": reason})
            self._log_settled()

    async def _vouch_loop(self) -> None:
        """The broker's keepalive and Last Will watch the device's link; while it says online, so do we."""
        while True:
            await asyncio.sleep(max(0.05, self.sessions.heartbeat_interval_ms / 1000))
            if self._suspended and time.monotonic() > self._suspended_until:
                self._close_suspended("controller lost the broker")
            for device_id, session in list(self._sessions.items()):
                if self.sessions.is_current(session):
                    self.sessions.seen(session)
                else:
                    del self._sessions[device_id]  # a gRPC session for the device took over


def replica_client_id(grpc_address: str) -> str:
    """Stable across restarts of one replica (so its broker session survives), distinct between replicas."""
    return f"edgefleet-controller-{socket.gethostname()}-{grpc_address.rpartition(':')[2]}"
