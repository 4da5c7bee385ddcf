"""The agent's MQTT link: telemetry up, presence via a retained state and a Last Will, commands down.

Used instead of the gRPC session with `edgefleet-agent run --transport mqtt`. Enrollment still
goes through the controller's gRPC Enroll (one call, with the one-time token): the broker never
sees a token, and the reply carries this device's own broker login, kept 0600 in mqtt.json
(`keep_mqtt_login`).
After that the device speaks only MQTT, so it works from behind NAT with one outbound link.

Topics (all under edgefleet/v1/<device id>/, which the broker's ACL limits this login to):
  telemetry  up,   QoS 1, AgentMessage{telemetry}; deleted from the outbox only on a TelemetryAck
  state      up,   QoS 1 retained DeviceState; the Last Will sets online = false
  ack        up,   QoS 1, AgentMessage{command_ack}
  cmd        down, QoS 1, ControllerMessage (telemetry acks, commands); a persistent session
                   (clean_start false + session expiry) keeps what arrives while we are away

paho runs its network loop on its own thread; every callback hops onto the asyncio loop with
`call_soon_threadsafe`, so the outbox and the handlers are only touched from the loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgefleet.agent import __version__
from edgefleet.agent.certificates import CERT_FILE, KEY_FILE
from edgefleet.agent.identity import Identity
from edgefleet.agent.link import DEFAULT_ACK_TIMEOUT_S, CommandHandler, ControllerDispatch, Serving, TelemetryPump
from edgefleet.agent.mqtt_artifacts import ChunkRouter, MqttArtifactSource
from edgefleet.agent.outbox import TelemetryOutbox
from edgefleet.agent.session import Refused
from edgefleet.common.durable_files import atomic_write_json, read_json
from edgefleet.common.mqtt import (
    DEFAULT_SESSION_EXPIRY_S,
    connack_refused,
    new_client,
    parse_broker_url,
    session_properties,
    tls_context,
    topic,
)
from edgefleet.protos.capability import CAPABILITY_VERSION
from edgefleet.protos.v1 import fleet_pb2, mqtt_pb2, profile_pb2

log = logging.getLogger("edgefleet.agent.mqtt")

MQTT_LOGIN_FILE = "mqtt.json"
MQTT_LOGIN_FORMAT = 1


# -- enrollment (over gRPC) and the stored login ------------------------------------------------
def save_mqtt_login(state_dir: Path, login: fleet_pb2.MqttCredentials) -> None:
    atomic_write_json(state_dir / MQTT_LOGIN_FILE, {
        "format": MQTT_LOGIN_FORMAT, "url": login.url, "username": login.username,
        "password": login.password, "ca_pem": login.ca_pem,
    }, mode=0o600)


def load_mqtt_login(state_dir: Path) -> fleet_pb2.MqttCredentials | None:
    data = read_json(state_dir / MQTT_LOGIN_FILE)
    if data is None:
        return None
    if data.get("format") != MQTT_LOGIN_FORMAT:
        raise ValueError(f"{state_dir / MQTT_LOGIN_FILE} has format {data.get('format')!r}; "
                         f"this agent reads {MQTT_LOGIN_FORMAT}; re-enroll the device")
    return fleet_pb2.MqttCredentials(url=data["url"], username=data["username"], password=data["password"],
                                     ca_pem=data.get("ca_pem", ""))


def keep_mqtt_login(state_dir: Path, login: fleet_pb2.MqttCredentials, controller: str) -> None:
    """Save the broker login an EnrollResponse carried; without one an MQTT-only device is stuck."""
    if not login.username:
        raise Refused(f"controller {controller} issued no MQTT login (it runs without a broker); start it with "
                      "`edgefleet controller serve --mqtt URL` or run the agent with --transport grpc")
    state_dir.mkdir(parents=True, exist_ok=True)
    save_mqtt_login(state_dir, login)


# -- the link ----------------------------------------------------------------------------------
class MqttLink:
    """The MQTT ControllerLink (agent/link.py): keeps one broker connection, with a persistent session."""

    def __init__(
        self,
        identity: Identity,
        login: fleet_pb2.MqttCredentials,
        *,
        url: str | None = None,
        outbox: TelemetryOutbox | None = None,
        profile: Callable[[], profile_pb2.HardwareProfile],
        telemetry_window: int = 64,
        ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
        keepalive_s: int = 30,
        backoff_max_s: float = 30.0,
        on_command: CommandHandler | None = None,
        client_cert: tuple[Path, Path] | None = None,  # (certificate, key) files: the broker login
    ) -> None:
        self.client_cert = client_cert
        self._tls_context: ssl.SSLContext | None = None
        self.identity = identity
        self.device_id = identity.device_id
        self.login = login
        self.address = parse_broker_url(url or login.url)
        self.outbox = outbox
        self.profile = profile
        self.session_expiry_s = session_expiry_s
        self.keepalive_s = keepalive_s
        self.backoff_max_s = backoff_max_s
        self.on_command = on_command
        self.serving: Serving | None = None  # (model, version) now served
        self.desired: mqtt_pb2.DesiredModel | None = None
        self.on_desired: Callable[[mqtt_pb2.DesiredModel], None] | None = None
        self.telemetry_ready = asyncio.Event()
        self.pump = None if outbox is None else TelemetryPump(
            outbox, self.telemetry_ready, device_id=identity.device_id, window=telemetry_window,
            ack_timeout_s=ack_timeout_s)
        self.dispatch = ControllerDispatch(self, self.pump)
        self.telemetry_window = telemetry_window
        self.connected = False
        self.connections = 0
        self.last_refusal: str | None = None
        self.last_rtt_ms: float | None = None  # MQTT has no heartbeat acks: the broker's keepalive watches the link
        self._pumping: asyncio.Task[None] | None = None
        self._acks: collections.deque[fleet_pb2.CommandAck] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self.artifacts = ChunkRouter()

    # paho thread -> loop
    def _hop(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is shutting down
                self._loop.call_soon_threadsafe(fn, *args)

    def _state(self, online: bool) -> bytes:
        state = mqtt_pb2.DeviceState(online=online, changed_at_unix_ms=int(time.time() * 1000),
                                     agent_version=__version__, capability_version=CAPABILITY_VERSION)
        if online and self.serving is not None:  # what Hello carries on gRPC: rollouts compare against it
            state.model, state.model_version = self.serving()
        if online:  # capability 6: the profile on every connect, so a changed hardware class is seen
            state.profile.CopyFrom(self.profile())
        return state.SerializeToString()

    def _tls(self) -> ssl.SSLContext | None:
        """With a login that has no password, the device's certificate is its broker login."""
        if self.client_cert is None:
            return None
        context = tls_context(self.login.ca_pem)
        context.load_cert_chain(*self.client_cert)
        self._tls_context = context
        return context

    def reload_certificate(self, _: object = None) -> None:
        """After a renewal: the next (re)connect presents the new certificate."""
        if self._tls_context is not None and self.client_cert is not None:
            self._tls_context.load_cert_chain(*self.client_cert)
            log.info("mqtt client certificate reloaded", extra={"device": self.device_id})

    def _build_client(self) -> mqtt.Client:
        client = new_client(self.device_id, self.address, username=self.login.username,
                            password=self.login.password, ca_pem=self.login.ca_pem, backoff_max_s=self.backoff_max_s,
                            context=self._tls())
        client.will_set(topic(self.device_id, "state"), self._state(False), qos=1, retain=True)
        client.max_inflight_messages_set(max(20, self.telemetry_window))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        refused = connack_refused(reason_code)
        if refused:
            self._hop(self._refused, refused)
            return
        # Subscribing again is harmless when the broker kept our session, and needed when it did not.
        client.subscribe([(topic(self.device_id, "cmd"), 1), (topic(self.device_id, "artifact/#"), 1),
                          (topic(self.device_id, "desired"), 1)])
        client.publish(topic(self.device_id, "state"), self._state(True), qos=1, retain=True)
        self._hop(self._connected, bool(getattr(flags, "session_present", False)))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self._hop(self._disconnected, str(reason_code))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if "/artifact/" in message.topic:  # chunks go straight to the reading thread, not via the loop
            self.artifacts.deliver(message.topic.split("/", 3)[-1], bytes(message.payload))
            return
        self._hop(self._received, message.topic, message.payload)

    # on the loop
    def _refused(self, reason: str) -> None:
        self.last_refusal = reason
        log.error("broker refused this device's login; paho keeps retrying. If it persists the login was "
                  "revoked: re-enroll (delete identity.json and mqtt.json, pass --token)",
                  extra={"device": self.device_id, "reason": reason})

    def _connected(self, session_present: bool) -> None:
        self.connected = True
        self.connections += 1
        self.last_refusal = None
        self._stop_pump()
        if self.pump is not None:  # starts over from the oldest batch on disk; the controller de-duplicates
            self._pumping = asyncio.get_running_loop().create_task(self.pump.run(self._publish_telemetry))
            self._pumping.add_done_callback(self._pump_ended)
        self._flush_acks()
        log.info("mqtt connected", extra={"device": self.device_id, "broker": f"{self.address.host}:"
                                           f"{self.address.port}", "session_present": session_present})

    def _disconnected(self, reason: str) -> None:
        if self.connected:
            log.warning("mqtt connection lost", extra={"device": self.device_id, "reason": reason})
        self.connected = False
        self._stop_pump()

    def _stop_pump(self) -> None:
        if self._pumping is not None:
            self._pumping.cancel()
            self._pumping = None

    def _pump_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("telemetry pump failed; telemetry stays on disk until the next connect",
                      exc_info=task.exception(), extra={"device": self.device_id})

    async def _publish_telemetry(self, message: fleet_pb2.AgentMessage) -> bool:
        return self.publish("telemetry", message)

    def _received(self, name: str, payload: bytes) -> None:
        if name.endswith("/desired"):
            self._on_desired(payload)
            return
        try:
            message = fleet_pb2.ControllerMessage.FromString(payload)
        except Exception:
            log.warning("undecodable controller message dropped", extra={"device": self.device_id, "topic": name})
            return
        self.dispatch.handle(message)

    def _on_desired(self, payload: bytes) -> None:
        try:
            desired = mqtt_pb2.DesiredModel.FromString(payload)
        except Exception:
            log.warning("undecodable desired model dropped", extra={"device": self.device_id})
            return
        self.desired = desired if desired.model else None
        if self.desired is not None and self.on_desired is not None:
            self.on_desired(self.desired)

    def publish_state(self) -> None:
        """Say again what this device serves (after an install), on the retained state topic."""
        if self._client is not None and self.connected:
            self._client.publish(topic(self.device_id, "state"), self._state(True), qos=1, retain=True)

    def _flush_acks(self) -> None:
        while self._acks and self.publish("ack", fleet_pb2.AgentMessage(command_ack=self._acks[0])):
            self._acks.popleft()

    # API
    def send_ack(self, ack: fleet_pb2.CommandAck) -> None:
        """Queue a command ack (as AgentSession.send_ack); it goes out now or right after the next connect."""
        self._acks.append(ack)
        self._flush_acks()

    def artifact_source(self, sha256: str, size: int) -> MqttArtifactSource:
        """Where an install or a measurement reads a bundle when the device speaks only MQTT."""
        return MqttArtifactSource(self, self.artifacts, sha256, size)

    def publish(self, leaf: str, message: fleet_pb2.AgentMessage, *, qos: int = 1) -> bool:
        """Publish to this device's own `leaf` topic; False while disconnected (the caller keeps it)."""
        if self._client is None or not self.connected:
            return False
        info = self._client.publish(topic(self.device_id, leaf), message.SerializeToString(), qos=qos)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    async def run(self) -> None:
        """Stay connected until cancelled; then publish offline and disconnect cleanly."""
        self._loop = asyncio.get_running_loop()
        client = self._client = self._build_client()
        client.connect_async(self.address.host, self.address.port, keepalive=self.keepalive_s,
                             clean_start=False, properties=session_properties(self.session_expiry_s))
        client.loop_start()
        try:
            await asyncio.Event().wait()  # the work happens in paho's callbacks and the telemetry pump
        finally:
            self._stop_pump()
            if self.connected:
                # A clean DISCONNECT does not fire the Last Will, so say offline ourselves.
                info = client.publish(topic(self.device_id, "state"), self._state(False), qos=1, retain=True)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(info.wait_for_publish, 2.0)
            client.disconnect()
            client.loop_stop()
            self.connected = False


def link_for_agent(
    state_dir: Path,
    identity: Identity,
    outbox: TelemetryOutbox,
    *,
    url: str | None,
    backoff_max_s: float,
    profile: Callable[[], profile_pb2.HardwareProfile],
    on_command: CommandHandler | None = None,
) -> MqttLink:
    """The daemon's MQTT link, from the login kept at enrollment; errors say how to fix them."""
    login = load_mqtt_login(state_dir)
    if login is None:
        raise ValueError(f"{state_dir / MQTT_LOGIN_FILE} is missing: this device enrolled without an MQTT login; "
                         "re-enroll with --transport mqtt against a controller started with --mqtt URL")
    client_cert = None
    if not login.password:  # the broker takes the device's certificate (require_certificate)
        cert, key = state_dir / CERT_FILE, state_dir / KEY_FILE
        if not cert.exists() or not key.exists():
            raise ValueError(f"the broker login in {state_dir / MQTT_LOGIN_FILE} is the device certificate, but "
                             f"{cert} is missing; start the agent once with --ca-cert to get one")
        client_cert = (cert, key)
    return MqttLink(identity, login, url=url, outbox=outbox, backoff_max_s=backoff_max_s, on_command=on_command,
                    profile=profile, client_cert=client_cert)
