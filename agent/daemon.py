"""The agent daemon: identity, session, serving, telemetry and the local API, wired together."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from edgefleet.agent.certificates import BUNDLE_FILE, CertificateFilesError, load_device_tls
from edgefleet.agent.commands import CommandRunner, GrpcArtifactSource
from edgefleet.agent.device_stats import DeviceSampler
from edgefleet.agent.endpoint import ControllerEndpoint
from edgefleet.agent.identity import Identity, load_identity, save_identity
from edgefleet.agent.link import ControllerLink
from edgefleet.agent.local_api import socket_address, start_local_api
from edgefleet.agent.mqtt_link import MqttLink, keep_mqtt_login, link_for_agent  # issue 7
from edgefleet.agent.outbox import DEFAULT_CAP, TelemetryOutbox
from edgefleet.agent.power import PowerMeter, load_power_models, power_model_for
from edgefleet.agent.renewal import CertificateRenewer
from edgefleet.agent.runtime import load_model
from edgefleet.agent.serving import InferenceService
from edgefleet.agent.session import CHANNEL_OPTIONS, AgentSession, enroll, move_to_certificate
from edgefleet.agent.telemetry import TelemetryCollector
from edgefleet.firmware.installer import Installer, InstallPolicy
from edgefleet.firmware.keys import pin_public_keys, pinned_keys
from edgefleet.firmware.sources import ControllerArtifact
from edgefleet.protos.v1 import fleet_pb2, local_pb2, mqtt_pb2, profile_pb2

log = logging.getLogger("edgefleet.agent")

CONVERGE_AFTER_S = 10.0  # how long a desired model waits for its install command
CUT_WAIT_S = 0.5  # at stop, how long a telemetry cut already in its thread is waited for
LOCAL_API_GRACE_S = 0.5  # at stop, how long local inference calls in flight get to finish
_WORKLOAD_RE = re.compile(r"^golden:(\d+(?:\.\d+)?)/s$")


class ConfigError(ValueError):
    """A setting the operator must fix; shown as one line."""


def parse_workload(text: str | None) -> float | None:
    """'golden:20/s' -> 20.0 requests per second with the bundle's golden input."""
    if not text:
        return None
    match = _WORKLOAD_RE.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--workload {text!r} is not understood; use golden:RATE/s, e.g. golden:20/s")
    return float(match.group(1))


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    controller: str | None = None
    token: str = ""
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    hardware_class: str | None = None
    microbench: bool = True
    backoff_max_s: float = 30.0
    telemetry_interval_s: float = 5.0
    telemetry_queue_cap: int = DEFAULT_CAP
    local_api: str = "unix"
    workload_rate: float | None = None
    power_model: Path | None = None
    model_disk_limit: int | None = None
    transport: str = "grpc"  # issue 7: grpc | mqtt (enrollment is always one gRPC call)
    mqtt_url: str | None = None  # overrides the broker URL the controller gave at enrollment
    insecure: bool = False  # plaintext with the device secret; only against a controller run --insecure
    ca_cert: Path | None = None  # the controller CA, given out of band, for the first TLS connection


class Agent:
    def __init__(self, config: AgentConfig, profile: profile_pb2.HardwareProfile) -> None:
        self.config = config
        self.profile = profile
        self.identity: Identity | None = None
        self.session: ControllerLink | None = None
        self.outbox = TelemetryOutbox(config.state_dir / "telemetry.db", config.telemetry_queue_cap)
        models = load_power_models(config.power_model)
        power = PowerMeter(profile.power_sensors, power_model_for(profile.hardware_class, models))
        self.collector = TelemetryCollector(self.outbox, power, DeviceSampler())
        self.service = InferenceService(self.collector)
        self.threads = int(profile.cpu.physical_cores or 0)
        self._after_install: list[Callable[[], None]] = []
        self._cutting: asyncio.Future[object] | None = None

    def load_active_model(self) -> None:
        from edgefleet.firmware.slots import active_model

        active = active_model(self.config.state_dir)
        if active is None:
            log.info("no model installed yet")
            self.service.swap(None)
            return
        self.service.swap(load_model(active.model_path, active.manifest, self.threads))

    def _schedule_converge(self, runner: CommandRunner, desired: mqtt_pb2.DesiredModel) -> None:
        """Give the install command that set `desired` time to arrive; install it ourselves if not."""

        def check() -> None:
            if self.serving() != (desired.model, int(desired.version)):
                runner.converge(fleet_pb2.InstallBundle(sha256=desired.bundle_sha256, size=desired.bundle_size,
                                                        name=desired.model, version=desired.version))

        asyncio.get_running_loop().call_later(CONVERGE_AFTER_S, check)

    def installed(self) -> None:
        self.load_active_model()
        for hook in self._after_install:
            hook()

    def serving(self) -> tuple[str, int]:
        model = self.service.model
        return (model.name, int(model.version)) if model else ("", 0)

    def status(self) -> local_pb2.AgentStatus:
        model = self.service.model
        return local_pb2.AgentStatus(
            device_id=self.identity.device_id if self.identity else "",
            connected=bool(self.session and self.session.connected),
            model=model.name if model else "",
            version=model.version if model else "",
            runtime=model.runtime if model else "",
            fallback=model.fallback if model else "",
            telemetry_queued=len(self.outbox),
            telemetry_dropped=self.outbox.dropped_total,
            hardware_class=self.profile.hardware_class,
            input_names=[t.name for t in model.io.inputs] if model else [],
        )

    async def _enroll_if_needed(self) -> Identity:
        identity = load_identity(self.config.state_dir)
        if identity is not None:
            if self.config.token:
                log.info("already enrolled; ignoring --token", extra={"device": identity.device_id})
            return identity
        if not self.config.token:
            raise ConfigError(
                f"this device is not enrolled ({self.config.state_dir}/identity.json is missing); "
                "pass --token from `edgefleet token create`"
            )
        if not self.config.controller:
            raise ConfigError("pass --controller HOST:PORT for the first enrollment")
        identity, reply = await enroll(self.config.controller, self.config.token, self.profile,
                                       self.config.labels, backoff_max_s=self.config.backoff_max_s,
                                       ca_pem=self._ca_pem("enroll"), state_dir=self.config.state_dir)
        # Pin the signing keys before the identity is saved: an identity on disk means keys are pinned.
        pin_public_keys(self.config.state_dir, reply.trusted_public_keys_pem)
        if self.config.transport == "mqtt":  # issue 7
            keep_mqtt_login(self.config.state_dir, reply.mqtt, self.config.controller)
        save_identity(self.config.state_dir, identity)
        log.info("enrolled", extra={"device": identity.device_id, "controller": self.config.controller})
        return identity

    def _ca_pem(self, what: str) -> bytes | None:
        """The CA to verify the controller with before this device has one of its own (None: --insecure)."""
        if self.config.insecure:
            return None
        path = self.config.ca_cert or self.config.state_dir / BUNDLE_FILE
        try:
            return path.read_bytes()
        except OSError:
            raise ConfigError(
                f"to {what} over TLS the agent needs the controller's CA: pass --ca-cert with a copy of the "
                "controller's STATE_DIR/ca.pem (check its fingerprint with `edgefleet ca show`), or --insecure "
                "against a controller run with --insecure"
            ) from None

    async def _endpoint(self, controller: str) -> ControllerEndpoint:
        """Plaintext, or TLS with this device's certificate; a device enrolled before certificates
        (identity.json with a secret, no device.pem) is moved over once, by its secret."""
        assert self.identity is not None
        if self.config.insecure:
            return ControllerEndpoint(controller, insecure=True)
        try:
            tls = load_device_tls(self.config.state_dir)
        except CertificateFilesError as exc:
            raise ConfigError(str(exc)) from None
        if tls is None and self.config.transport == "mqtt":  # issue 7: it logs in to the broker, not to us
            log.info("no device certificate; MQTT uses the broker login", extra={"device": self.identity.device_id})
            return ControllerEndpoint(controller, insecure=True)
        if tls is None:
            ca_pem = self._ca_pem("move this device from its secret to a certificate")
            assert ca_pem is not None
            self.identity = await move_to_certificate(self.identity, controller, ca_pem, self.config.state_dir)
            tls = load_device_tls(self.config.state_dir)
        return ControllerEndpoint(controller, insecure=False, state_dir=self.config.state_dir, tls=tls,
                                  device_port=self.identity.device_port)

    async def _telemetry_loop(self) -> None:
        interval = self.config.telemetry_interval_s
        next_cut = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, next_cut - time.monotonic()))
            next_cut += interval
            # Shielded: cancelled at stop, the cut goes on in its thread, and `run` waits for it
            # before the last cut and closing the outbox, so no interval is taken and then not stored.
            cutting: asyncio.Future[object] = asyncio.ensure_future(asyncio.to_thread(self.collector.cut))
            self._cutting = cutting
            await asyncio.shield(cutting)
            if self.session is not None:
                self.session.telemetry_ready.set()

    async def _workload_loop(self, rate: float) -> None:
        """Open-loop load at a fixed rate with the golden input, through the serving path."""
        from edgefleet.firmware.slots import active_model

        period = 1.0 / rate
        outstanding: set[asyncio.Task[object]] = set()
        next_at = time.monotonic()
        golden: dict[str, object] | None = None
        golden_for: tuple[str, str] | None = None
        while True:
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            model = self.service.model
            if model is None:
                continue
            if golden_for != (model.name, model.version):
                active = active_model(self.config.state_dir)
                if active is None:
                    continue
                golden = {k: v.to_array() for k, v in active.manifest.self_test.inputs.items()}
                golden_for = (model.name, model.version)
            if len(outstanding) >= 64:
                continue  # the device cannot keep up; shedding keeps the agent alive
            task = asyncio.ensure_future(self.service.infer(golden))  # type: ignore[arg-type]
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def _installer(self, identity: Identity, controller: str, endpoint: ControllerEndpoint) -> Installer:
        def reopen(ref: str) -> GrpcArtifactSource | None:
            # After a restart an interrupted download resumes from the controller it came from.
            if not ref.startswith("sha256:"):
                return None
            state = self.installer_record_size()
            return GrpcArtifactSource(controller, identity, ref.split(":", 1)[1], state, endpoint) if state else None

        return Installer(
            self.config.state_dir, pinned_keys(self.config.state_dir), hardware_class=self.profile.hardware_class,
            open_source=reopen, device_id=identity.device_id,
            policy=InstallPolicy(slot_capacity_bytes=self.config.model_disk_limit),
        )

    def installer_record_size(self) -> int:
        from edgefleet.firmware.install_state import StateStore

        return int(StateStore(self.config.state_dir).load().total_size or 0)

    async def run(self) -> None:
        self.identity = await self._enroll_if_needed()
        controller = self.config.controller or self.identity.controller
        endpoint = await self._endpoint(controller)
        installer = self._installer(self.identity, controller, endpoint)
        outcome = await asyncio.to_thread(installer.resume)
        if outcome.result != "idle":
            log.info("install resumed at start", extra={"result": outcome.result, "reason": outcome.reason})
        self.load_active_model()
        try:
            address = socket_address(self.config.local_api, self.config.state_dir)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:
            local_api = start_local_api(self.service, self.status, address)
        except (OSError, RuntimeError) as exc:
            raise ConfigError(
                f"cannot serve the local API on {address}: {exc}; choose another with --local-api"
            ) from None
        link: ControllerLink = AgentSession(
            controller, self.identity, lambda: self.profile,
            outbox=self.outbox, backoff_max_s=self.config.backoff_max_s, endpoint=endpoint,
        )
        renewer: CertificateRenewer | None = None
        if self.config.transport == "mqtt":  # issue 7: after enrollment the device speaks only MQTT
            mqtt_link = link_for_agent(self.config.state_dir, self.identity, self.outbox, profile=lambda: self.profile,
                                       url=self.config.mqtt_url, backoff_max_s=self.config.backoff_max_s)
            if not endpoint.insecure:  # its certificate is renewed over the device port all the same
                renewer = CertificateRenewer(endpoint, self.identity.device_id, channel_options=CHANNEL_OPTIONS)
                renewer.on_renewed.append(mqtt_link.reload_certificate)
            link = mqtt_link
        self.session = link

        def source_for(spec: fleet_pb2.InstallBundle) -> ControllerArtifact:
            # Bundles come over the link's own transport: a device that speaks only MQTT fetches over MQTT.
            return link.artifact_source(spec.sha256, spec.size)

        runner = CommandRunner(
            self.config.state_dir, installer,
            source_for=source_for,
            send_ack=link.send_ack,
            on_installed=self.installed,
            threads=self.threads,
        )
        link.on_command = runner.submit
        link.serving = self.serving
        if isinstance(link, MqttLink):
            link.on_desired = lambda desired: self._schedule_converge(runner, desired)
            self._after_install.append(link.publish_state)
        tasks = [
            asyncio.create_task(link.run()),
            asyncio.create_task(runner.run()),
            asyncio.create_task(self._telemetry_loop()),
        ]
        if renewer is not None:
            tasks.append(asyncio.create_task(renewer.run()))
        if self.config.workload_rate:
            tasks.append(asyncio.create_task(self._workload_loop(self.config.workload_rate)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await task
            await asyncio.to_thread(local_api.stop(LOCAL_API_GRACE_S).wait)
            self.service.close()
            if self._cutting is not None and not self._cutting.done():
                await asyncio.wait([self._cutting], timeout=CUT_WAIT_S)
            # The interval in progress is cut and kept, so a restart does not lose it.
            with contextlib.suppress(Exception):
                self.collector.cut()
            self.outbox.close()
