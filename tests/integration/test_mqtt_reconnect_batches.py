"""A broker restart under a real mosquitto: the controller's MQTT bridge restores the sessions of
devices whose retained state did not change without a single store write, handles the burst of
re-delivered states in bounded batches per event-loop turn, and writes only what did change."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from edgefleet.common.mqtt import topic
from edgefleet.controller.api.mqtt_bridge import MqttBridge, MqttOptions
from edgefleet.controller.fleet.commands import CommandDispatcher
from edgefleet.controller.fleet.enrollment import Enrollment
from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.fleet.sessions import DeviceSessions
from edgefleet.controller.store.artifacts import ArtifactStore
from edgefleet.controller.store.base import CommandRecord, DeviceRecord, EnrollmentTokenRecord
from edgefleet.controller.store.sqlite import SQLiteStore
from edgefleet.controller.telemetry.ingest import TelemetryIngest, TelemetryMetrics
from edgefleet.protos.capability import CAPABILITY_VERSION
from edgefleet.protos.v1 import mqtt_pb2, profile_pb2
from mqtt_harness import ADMIN_PASSWORD, ADMIN_USER, Broker, TestClient

pytestmark = pytest.mark.integration

DEVICES = 60
BATCH = 20


class CountingStore(SQLiteStore):
    """Counts the per-device writes a session open, update or close makes."""

    WRITES = ("update_device_session", "open_device_sessions", "set_device_model", "open_commands",
              "close_device_sessions")

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writes: dict[str, int] = dict.fromkeys(self.WRITES, 0)

    def update_device_session(self, device_id: str, **fields: Any) -> None:
        self.writes["update_device_session"] += 1
        super().update_device_session(device_id, **fields)

    def open_device_sessions(self, opens: Any, owner: str) -> None:
        self.writes["open_device_sessions"] += len(opens)  # devices, in batches (presence.py)
        super().open_device_sessions(opens, owner)

    def set_device_model(self, device_id: str, model: str, version: int) -> None:
        self.writes["set_device_model"] += 1
        super().set_device_model(device_id, model, version)

    def open_commands(self, device_id: str, now_ms: int) -> list[CommandRecord]:
        self.writes["open_commands"] += 1  # a write: it expires what is past its deadline
        return super().open_commands(device_id, now_ms)

    def close_device_sessions(self, closed: Any, owner: str = "") -> None:
        self.writes["close_device_sessions"] += 1
        super().close_device_sessions(closed, owner)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path).start()
    yield broker
    broker.stop(signal.SIGKILL)


def state(model_version: int = 1, online: bool = True) -> bytes:
    profile = profile_pb2.HardwareProfile(hardware_class="arm64-sim", os=profile_pb2.OsInfo(hostname="sim"))
    return mqtt_pb2.DeviceState(online=online, agent_version="sim", capability_version=CAPABILITY_VERSION,
                                profile=profile, model="det", model_version=model_version).SerializeToString()


async def until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_broker_restart_restores_unchanged_sessions_without_writes_in_bounded_batches(
        tmp_path: Path, broker: Broker) -> None:
    store = CountingStore(tmp_path / "c.db")
    store.create_enrollment_token(EnrollmentTokenRecord("t", "h", DEVICES, DEVICES, 0, 2**50, {}))
    names = [f"dev-{i:02d}" for i in range(DEVICES)]
    for name in names:
        store.enroll_device("h", 0, DeviceRecord(name, "s", {}, 0, hardware_class="arm64-sim"))
    admin = TestClient(broker.admin_url, ADMIN_USER, ADMIN_PASSWORD)

    async def scenario() -> None:
        presence = PresenceTracker(store, heartbeat_interval_s=1.0, owner="ctrl")
        sessions = DeviceSessions(store, Enrollment(store), presence,
                                  TelemetryIngest(store, TelemetryMetrics(CollectorRegistry())),
                                  CommandDispatcher(store, presence), ArtifactStore(tmp_path / "artifacts"),
                                  heartbeat_interval_s=1.0)
        bridge = MqttBridge(broker.admin_url, MqttOptions(auth_dir=broker.auth_dir), sessions=sessions,
                            auth=broker.auth(), default_client_id="ctrl-under-test")
        bridge.reopen_batch = BATCH
        await bridge.start()
        try:
            await asyncio.to_thread(admin.connect)
            for name in names:  # what each device's agent leaves retained on its state topic
                await asyncio.to_thread(admin.publish, topic(name, "state"), state(), retain=True)
            await until(lambda: presence.online_count() == DEVICES, 20, "every device online")
            await until(lambda: store.writes["open_device_sessions"] == DEVICES, 5, "the first opens written")
            store.writes = dict.fromkeys(store.WRITES, 0)

            await asyncio.to_thread(broker.restart, signal.SIGTERM, 0.3)
            await until(lambda: bridge.connected and bridge.reconnect.restored == DEVICES, 30,
                        "every session restored from its retained state")
            assert store.writes == dict.fromkeys(store.WRITES, 0), "an unchanged device was written"
            assert bridge.reconnect.suspended == DEVICES and bridge.reconnect.reopened == 0
            assert bridge.reconnect.batches >= DEVICES // BATCH  # the burst was split across loop turns
            assert all(presence.presence(d).online for d in store.device_briefs())

            # After the burst, only what changes is written: one device's model, one going offline.
            await asyncio.to_thread(admin.close)
            admin.connack = None
            await asyncio.to_thread(admin.connect)
            await asyncio.to_thread(admin.publish, topic(names[0], "state"), state(model_version=2), retain=True)
            await asyncio.to_thread(admin.publish, topic(names[1], "state"), state(online=False), retain=True)
            await until(lambda: presence.online_count() == DEVICES - 1 and store.writes["set_device_model"] == 1
                        and store.writes["close_device_sessions"] == 1, 10, "the two changes written")
            assert store.writes["update_device_session"] == 0 and store.writes["open_commands"] == 0
            device = store.get_device(names[0])
            assert device is not None and device.model_version == 2
        finally:
            await bridge.stop()
            await asyncio.to_thread(admin.close)

    try:
        asyncio.run(scenario())
    finally:
        store.close()
