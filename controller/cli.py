"""`edgefleet`: the operator and controller command line.

Every command that talks to a running controller goes through the Control gRPC service,
the same API any other client would use.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import click
from google.protobuf.json_format import MessageToDict

from edgefleet.agent.logs import setup_logging
from edgefleet.agent.units import format_duration, parse_duration, parse_labels
from edgefleet.controller import __version__
from edgefleet.controller.client import Connection, ControlClient, UserError, default_state_dir
from edgefleet.protos.v1 import control_pb2


def to_dict(message: Any) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def ago(unix_ms: int) -> str:
    if not unix_ms:
        return "never"
    return format_duration(max(0.0, time.time() - unix_ms / 1000)) + " ago"


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def duration_option(value: str, name: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=name) from None


class Context:
    def __init__(self, controller: str | None, state_dir: Path | None) -> None:
        self.controller = controller
        self.state_dir = state_dir

    def client(self) -> ControlClient:
        return Connection.resolve(self.controller, self.state_dir).control()


def remote_options(fn: Any) -> Any:
    """--controller / --state-dir on each command too, so they may follow the subcommand."""

    def remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            setattr(ctx.find_object(Context), param.name or "", value)
        return value

    fn = click.option(
        "--controller", metavar="HOST:PORT", expose_value=False, callback=remember,
        help="Controller address (default: EDGEFLEET_CONTROLLER, config file, local state dir).",
    )(fn)
    fn = click.option(
        "--state-dir", type=click.Path(path_type=Path), expose_value=False, callback=remember,
        help="A local controller's state dir, to find its address and operator token.",
    )(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgefleet")
@click.option("--controller", envvar="EDGEFLEET_CONTROLLER", metavar="HOST:PORT", help="Controller address.")
@click.option("--state-dir", type=click.Path(path_type=Path), envvar="EDGEFLEET_STATE_DIR",
              help="Controller state dir (default ~/.local/state/edgefleet/controller).")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.pass_context
def cli(ctx: click.Context, controller: str | None, state_dir: Path | None, log_level: str) -> None:
    """EdgeFleet: enroll devices, build per-hardware models, roll them out, watch them run."""
    setup_logging(log_level)
    ctx.obj = Context(controller, state_dir)


# -- controller --------------------------------------------------------------------------------
@cli.group("controller")
def controller_group() -> None:
    """Run the controller."""


@controller_group.command("serve")
@click.option("--state-dir", type=click.Path(path_type=Path), help="Where the store, tokens and artifacts live.")
@click.option("--grpc", "grpc_address", default="127.0.0.1:50051", show_default=True, metavar="HOST:PORT")
@click.option("--http", "http_address", default="127.0.0.1:8480", show_default=True, metavar="HOST:PORT|off",
              help="Health and Prometheus /metrics; 'off' disables it.")
@click.option("--heartbeat-interval", default="5s", show_default=True, help="How often agents heartbeat.")
@click.pass_obj
def controller_serve(obj: Context, state_dir: Path | None, grpc_address: str, http_address: str,
                     heartbeat_interval: str) -> None:
    """Serve agents (Fleet) and operators (Control) until SIGINT/SIGTERM."""
    from edgefleet.controller.server import BindError, ControllerConfig, serve, split_address

    for name, address in (("--grpc", grpc_address), ("--http", http_address)):
        if address != "off":
            try:
                split_address(address)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=name) from None
    interval = duration_option(heartbeat_interval, "--heartbeat-interval")
    if interval < 0.05:
        raise click.BadParameter("must be at least 50ms", param_hint="--heartbeat-interval")
    config = ControllerConfig(
        state_dir=state_dir or obj.state_dir or default_state_dir(),
        grpc_address=grpc_address,
        http_address=None if http_address == "off" else http_address,
        heartbeat_interval_s=interval,
    )
    try:
        asyncio.run(serve(config))
    except BindError as exc:
        raise UserError(str(exc)) from None


# -- enrollment tokens -------------------------------------------------------------------------
@cli.group("token")
def token_group() -> None:
    """Enrollment tokens: bounded, expiring, stored hashed."""


@token_group.command("create")
@click.option("--uses", default=1, show_default=True, type=click.IntRange(1, 100_000),
              help="How many devices may enroll with it.")
@click.option("--ttl", default="24h", show_default=True, help="Lifetime, e.g. 30m, 24h, 7d.")
@click.option("--labels", default="", metavar="k=v,...", help="Labels given to every device that uses it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def token_create(obj: Context, uses: int, ttl: str, labels: str, as_json: bool) -> None:
    """Create an enrollment token (shown once)."""
    ttl_s = duration_option(ttl, "--ttl")
    try:
        label_map = parse_labels(labels)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--labels") from None
    reply = obj.client().call(
        "CreateEnrollmentToken",
        control_pb2.CreateEnrollmentTokenRequest(uses=uses, ttl_s=max(1, int(ttl_s)), labels=label_map),
    )
    if as_json:
        emit_json({"token": reply.token, **to_dict(reply.info)})
        return
    click.echo(reply.token)
    expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(reply.info.expires_at_unix_ms / 1000))
    click.echo(f"token {reply.info.token_id}: {uses} use(s), expires {expires}", err=True)


@token_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def token_list(obj: Context, as_json: bool) -> None:
    """List enrollment tokens (never their secrets)."""
    reply = obj.client().call("ListEnrollmentTokens", control_pb2.ListEnrollmentTokensRequest())
    if as_json:
        emit_json({"tokens": [to_dict(t) for t in reply.tokens]})
        return
    now_ms = time.time() * 1000
    rows = []
    for t in reply.tokens:
        state = "revoked" if t.revoked else "expired" if t.expires_at_unix_ms <= now_ms else (
            "used up" if t.uses_left == 0 else "active")
        labels = ",".join(f"{k}={v}" for k, v in sorted(t.labels.items()))
        rows.append([t.token_id, state, f"{t.uses_left}/{t.uses_total}",
                     time.strftime("%Y-%m-%d %H:%M", time.gmtime(t.expires_at_unix_ms / 1000)), labels])
    click.echo(table(rows, ["TOKEN", "STATE", "USES LEFT", "EXPIRES (UTC)", "LABELS"]))


@token_group.command("revoke")
@click.argument("token_id")
@remote_options
@click.pass_obj
def token_revoke(obj: Context, token_id: str) -> None:
    """Revoke a token so no further device can enroll with it."""
    obj.client().call("RevokeEnrollmentToken", control_pb2.RevokeEnrollmentTokenRequest(token_id=token_id))
    click.echo(f"revoked {token_id}")


# -- devices -----------------------------------------------------------------------------------
@cli.group("devices")
def devices_group() -> None:
    """Enrolled devices and their presence."""


@devices_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with hardware profiles).")
@remote_options
@click.pass_obj
def devices_list(obj: Context, as_json: bool) -> None:
    """List devices: online/offline, last seen, class, labels."""
    reply = obj.client().call("ListDevices", control_pb2.ListDevicesRequest(include_profile=as_json))
    if as_json:
        emit_json({"devices": [to_dict(d) for d in reply.devices]})
        return
    rows = [
        [d.device_id, "online" if d.online else "offline", ago(d.last_seen_unix_ms), d.hardware_class or "-",
         d.hostname or "-", ",".join(f"{k}={v}" for k, v in sorted(d.labels.items())) or "-"]
        for d in reply.devices
    ]
    click.echo(table(rows, ["DEVICE", "STATE", "LAST SEEN", "CLASS", "HOST", "LABELS"]))


@devices_group.command("show")
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def devices_show(obj: Context, device_id: str, as_json: bool) -> None:
    """One device in full, with its hardware profile."""
    device = obj.client().call("GetDevice", control_pb2.GetDeviceRequest(device_id=device_id))
    if as_json:
        emit_json(to_dict(device))
        return
    p = device.profile
    lines = [
        f"device       {device.device_id}",
        f"state        {device.presence}",
        f"last seen    {ago(device.last_seen_unix_ms)}",
        f"enrolled     {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(device.enrolled_at_unix_ms / 1000))}",
        f"class        {device.hardware_class or '-'}",
        f"host         {device.hostname or '-'}",
        f"agent        {device.agent_version or '-'} (capability {device.capability_version})",
        f"labels       {', '.join(f'{k}={v}' for k, v in sorted(device.labels.items())) or '-'}",
        f"cpu          {p.cpu.arch} {p.cpu.model} ({p.cpu.physical_cores}C/{p.cpu.logical_cores}T)",
        f"isa          {' '.join(p.cpu.isa_features) or '-'}",
        f"memory       {p.memory.total_bytes / 2**30:.1f} GiB",
        f"os           {p.os.distro or p.os.system} (kernel {p.os.kernel}, python {p.os.python_version})",
    ]
    for rt in p.runtimes:
        lines.append(f"runtime      {rt.name} {rt.version}: {', '.join(rt.loadable_providers) or '-'}")
    for acc in p.accelerators:
        lines.append(f"accelerator  {acc.kind} {acc.vendor} {acc.model} ({acc.source})")
    for gap in p.gaps:
        lines.append(f"unknown      {gap.what}: {gap.reason}")
    click.echo("\n".join(lines))


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
@click.option("--rollups", is_flag=True, help="Use 1-minute rollups instead of raw batches.")
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


# -- demo --------------------------------------------------------------------------------------
@cli.command("demo")
@click.option("--duration", default=None, help="Stop by itself after this long (e.g. 20s); default: until Ctrl-C.")
@click.option("--agents", default=3, show_default=True, type=click.IntRange(1, 50))
@click.option("--state-dir", type=click.Path(path_type=Path), help="Keep the demo's state here (default: a temp dir).")
def demo(duration: str | None, agents: int, state_dir: Path | None) -> None:
    """Start a controller and agents as real processes on this machine and show the fleet."""
    from edgefleet.controller.demo import run_demo

    seconds = duration_option(duration, "--duration") if duration else None
    sys.exit(run_demo(agents=agents, duration_s=seconds, state_dir=state_dir))


def main() -> None:
    cli(prog_name="edgefleet")


if __name__ == "__main__":
    main()
