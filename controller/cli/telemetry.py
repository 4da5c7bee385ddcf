"""`edgefleet telemetry`: query a device's series and watch the fleet live."""

from __future__ import annotations

import sys
import time

import click

from edgefleet.controller.cli.base import Context, cli, remote_options
from edgefleet.controller.cli.output import ago, duration_option, emit_json, table, to_dict
from edgefleet.protos.v1 import control_pb2


# -- telemetry ---------------------------------------------------------------------------------
@cli.group("telemetry")
def telemetry_group() -> None:
    """Live and stored device telemetry: latency, throughput, power, energy."""


@telemetry_group.command("query")
@click.option("--device", "device_id", required=True, help="Device id.")
@click.option("--metric", default="p95_ms", show_default=True,
              help="p50_ms p95_ms p99_ms max_ms count errors error_rate throughput energy_mj watts cpu_percent "
                   "rss_bytes temperature_c memory_available_bytes")
@click.option("--since", default="10m", show_default=True, help="How far back, e.g. 10m, 2h.")
@click.option("--model", default="", help="Only this model (default: all models merged).")
@click.option("--rollups", is_flag=True,
              help="Use 1-minute rollups instead of raw batches (kept longer; a minute is rolled up "
                   "10-20 s after it ends, so the current one is not in them yet).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def telemetry_query(obj: Context, device_id: str, metric: str, since: str, model: str, rollups: bool,
                    as_json: bool) -> None:
    """A metric's time series for one device."""
    since_s = duration_option(since, "--since")
    reply = obj.client().call("QueryTelemetry", control_pb2.QueryTelemetryRequest(
        device_id=device_id, metric=metric, since_unix_ms=int((time.time() - since_s) * 1000), model=model,
        rollups=rollups,
    ))
    if as_json:
        emit_json(to_dict(reply))
        return
    rows = [[time.strftime("%H:%M:%S", time.localtime(s.unix_ms / 1000)), f"{s.value:.4g}",
             str(s.seq or "-"), s.source or "-"] for s in reply.samples]
    click.echo(table(rows, ["TIME", metric.upper(), "SEQ", "SOURCE"]) if rows else f"no {metric} samples since {since}")


def _watch_table(rows: list[control_pb2.DeviceTelemetryRow]) -> str:
    body = []
    for r in rows:
        temperature = f"{r.temperature_c:.0f}" if r.HasField("temperature_c") else "-"
        body.append([
            r.device_id, "up" if r.online else "down", r.hardware_class or "-",
            f"{r.model}:{r.version}" if r.model else "-", f"{r.throughput:.1f}" if r.model else "-",
            f"{r.p50_ms:.2f}" if r.model else "-", f"{r.p95_ms:.2f}" if r.model else "-",
            f"{r.p99_ms:.2f}" if r.model else "-", str(r.errors) if r.model else "-",
            f"{r.watts:.1f} {r.power_source.split(':')[0][:4]}" if r.power_source else "-",
            f"{r.energy_mj:.2f} {r.energy_source.split(':')[0][:4]}" if r.energy_source else "-",
            f"{r.cpu_percent:.0f}", temperature, ago(r.last_batch_unix_ms),
        ])
    return table(body, ["DEVICE", "LINK", "CLASS", "MODEL", "INF/S", "P50MS", "P95MS", "P99MS", "ERR",
                        "WATTS", "MJ/INF", "CPU%", "TEMP", "LAST BATCH"])


@telemetry_group.command("watch")
@click.option("--device", "device_id", default="", help="Only this device.")
@click.option("--class", "hardware_class", default="", help="Only devices of this hardware class.")
@click.option("--model", default="", help="Only this model.")
@click.option("--interval", default="2s", show_default=True, help="Refresh period.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON snapshot and exit.")
@remote_options
@click.pass_obj
def telemetry_watch(obj: Context, device_id: str, hardware_class: str, model: str, interval: str, once: bool,
                    as_json: bool) -> None:
    """A live view of the fleet, refreshed in place (meas = measured, esti = estimated)."""
    period = duration_option(interval, "--interval")
    client = obj.client()
    request = control_pb2.TelemetrySummaryRequest(device_id=device_id, hardware_class=hardware_class, model=model)
    refresh = not (once or as_json)
    redraw = refresh and sys.stdout.isatty()
    try:
        while True:
            rows = list(client.call("TelemetrySummary", request).rows)
            if as_json:
                emit_json({"rows": [to_dict(r) for r in rows]})
                return
            text = _watch_table(rows)
            stamp = time.strftime("%H:%M:%S")
            if redraw:
                click.echo("\x1b[H\x1b[2J", nl=False)  # home + clear: redraw in place
            click.echo(f"edgefleet telemetry  {stamp}  {len(rows)} row(s)  (Ctrl-C to stop)\n{text}")
            if not refresh:
                return
            time.sleep(period)
    except KeyboardInterrupt:
        pass
