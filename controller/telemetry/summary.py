"""The fleet's latest telemetry, one row per device and model: what `telemetry watch` shows."""

from __future__ import annotations

from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.store.base import Store
from edgefleet.protos.v1 import control_pb2


def summary_rows(store: Store, presence: PresenceTracker, device_id: str = "", hardware_class: str = "",
                 model: str = "") -> list[control_pb2.DeviceTelemetryRow]:
    """Each device's newest batch, split per model; devices with no batch yet appear with no figures
    (unless a model is asked for). Empty filters match everything."""
    latest = store.latest_telemetry()
    rows = []
    for record in store.list_devices():
        if device_id and record.device_id != device_id:
            continue
        if hardware_class and record.hardware_class != hardware_class:
            continue
        point = latest.get(record.device_id)
        online = presence.presence(record).online
        base = control_pb2.DeviceTelemetryRow(device_id=record.device_id, online=online,
                                              hardware_class=record.hardware_class)
        if point is None:
            if not model:
                rows.append(base)
            continue
        base.watts, base.power_source = point.watts, point.power_source
        base.cpu_percent, base.rss_bytes = point.cpu_system, point.rss_bytes
        base.last_batch_unix_ms, base.dropped_batches = point.end_ms, point.dropped_batches
        if point.temperature_c is not None:
            base.temperature_c = point.temperature_c
        models = [m for m in point.models if not model or m.model == model]
        if not models and not model:
            rows.append(base)
        seconds = max(1e-3, (point.end_ms - point.start_ms) / 1000)
        for m in models:
            row = control_pb2.DeviceTelemetryRow()
            row.CopyFrom(base)
            row.model, row.version, row.runtime = m.model, m.version, m.runtime
            row.throughput, row.errors = m.count / seconds, m.errors
            row.p50_ms, row.p95_ms, row.p99_ms = m.p50_ms, m.p95_ms, m.p99_ms
            row.energy_mj, row.energy_source = m.energy_mj, m.energy_source
            rows.append(row)
    return rows
