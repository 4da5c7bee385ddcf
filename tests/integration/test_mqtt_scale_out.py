"""Scale-out: two controller processes, one SQLite store file, one broker, a `$share` subscription.

Every batch must be stored exactly once, and the broker must split the stream between them.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.protos.v1.fleet_pb2 import ControllerMessage
from fleet_harness import ControllerProc, Proc, wait_until
from mqtt_harness import Broker, TestClient, enroll, metric, mqtt_controller, stored_seqs, telemetry_batch

pytestmark = pytest.mark.integration

DEVICES = 4
BATCHES = 150
STORED = 'result="stored"'


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path).start()
    yield broker
    broker.stop(signal.SIGKILL)


def test_two_controllers_split_the_stream_and_store_it_once(
    tmp_path: Path, broker: Broker, procs: list[Proc]
) -> None:
    shared = tmp_path / "shared-state"
    controllers: list[ControllerProc] = []
    for name in ("c1", "c2"):
        proc = mqtt_controller(tmp_path, broker, state_dir=shared, name=name)
        procs.append(proc)
        controllers.append(proc.start())
    c1, c2 = controllers
    token = c1.create_token(uses=DEVICES)
    devices = [enroll(c1 if i % 2 else c2, token, f"sim{i}") for i in range(DEVICES)]

    clients = []
    for device in devices:
        client = TestClient(device.mqtt.url, device.mqtt.username, device.mqtt.password)
        client.connect()
        client.subscribe(f"edgefleet/v1/{device.device_id}/cmd")
        clients.append(client)
    infos = []
    for seq in range(1, BATCHES + 1):
        for device, client in zip(devices, clients, strict=True):
            payload = telemetry_batch(seq).SerializeToString()
            infos.append(client.client.publish(f"edgefleet/v1/{device.device_id}/telemetry", payload, qos=1))
    for info in infos:
        info.wait_for_publish(10)

    wait_until(lambda: len(stored_seqs(shared)) >= DEVICES * BATCHES, 30, "every batch to be stored")
    rows = stored_seqs(shared)
    assert len(rows) == len(set(rows)) == DEVICES * BATCHES
    assert set(rows) == {(d.device_id, s) for d in devices for s in range(1, BATCHES + 1)}

    def per_controller() -> list[float]:
        return [metric(c.http_address, "edgefleet_telemetry_batches_total", STORED) for c in controllers]

    wait_until(lambda: sum(per_controller()) >= DEVICES * BATCHES, 10, "both controllers' counters")
    counts = per_controller()
    assert sum(counts) == DEVICES * BATCHES, f"stored {counts}: a batch was stored twice or not at all"
    assert min(counts) >= 0.2 * DEVICES * BATCHES, f"the stream was not split between the replicas: {counts}"
    print("stored per controller:", counts)

    # Each device gets an ack for every batch, whichever replica stored it (on its own cmd topic).
    def acked(client: TestClient) -> set[int]:
        with client.lock:
            messages = list(client.messages)
        return {s for m in messages for s in ControllerMessage.FromString(m.payload).telemetry_ack.seqs}

    for client in clients:
        wait_until(lambda c=client: acked(c) == set(range(1, BATCHES + 1)), 10, "every batch to be acked")
        client.close()
