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


def mqtt_serve_options(fn: Any) -> Any:
    """`controller serve` options for the MQTT transport (issue 7)."""
    options = [
        click.option("--mqtt", "mqtt_url", envvar="EDGEFLEET_MQTT_URL", metavar="mqtt[s]://ADMIN:PASSWORD@HOST:PORT",
                     help="Also serve devices over this MQTT broker, logged in as its admin user."),
        click.option("--mqtt-ca", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="CA (PEM) that signed the broker's certificate; also handed to devices."),
        click.option("--mqtt-device-url", default=None, metavar="URL",
                     help="Broker URL given to devices at enrollment (default: --mqtt without the login)."),
        click.option("--mqtt-auth-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
                     help="Where the broker's password_file and acl_file are kept (default: STATE_DIR/mqtt)."),
        click.option("--mqtt-broker-pid", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="The broker's pid_file: it is sent SIGHUP to load new device logins."),
        click.option("--mqtt-client-id", default=None, help="This replica's MQTT client id (stable across restarts)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def mqtt_settings(values: dict[str, Any]) -> dict[str, Any]:
    from edgefleet.agent.mqtt_link import parse_broker_url
    from edgefleet.controller.mqtt_bridge import MqttOptions

    url = values.get("mqtt_url")
    for name, value in (("--mqtt", url), ("--mqtt-device-url", values.get("mqtt_device_url"))):
        if value:
            try:
                parse_broker_url(value)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=name) from None
    if not url:
        return {}
    return {"mqtt_url": url, "mqtt": MqttOptions(
        ca_file=values.get("mqtt_ca"), device_url=values.get("mqtt_device_url"), auth_dir=values.get("mqtt_auth_dir"),
        broker_pid_file=values.get("mqtt_broker_pid"), client_id=values.get("mqtt_client_id"),
    )}


@controller_group.command("serve")
@click.option("--state-dir", type=click.Path(path_type=Path), help="Where the store, tokens and artifacts live.")
@click.option("--grpc", "grpc_address", default="127.0.0.1:50051", show_default=True, metavar="HOST:PORT")
@click.option("--http", "http_address", default="127.0.0.1:8480", show_default=True, metavar="HOST:PORT|off",
              help="Health and Prometheus /metrics; 'off' disables it.")
@click.option("--heartbeat-interval", default="5s", show_default=True,
              help="How often an otherwise silent agent heartbeats; a stream silent for 3 intervals is ended.")
@click.option("--store", "store_url", envvar="EDGEFLEET_STORE", metavar="postgresql://USER@HOST:PORT/DB",
              help="Shared PostgreSQL store for several replicas (default: SQLite in the state dir).")
@mqtt_serve_options  # issue 7
@click.pass_obj
def controller_serve(obj: Context, state_dir: Path | None, grpc_address: str, http_address: str,
                     heartbeat_interval: str, store_url: str | None, **mqtt: Any) -> None:
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
        store_url=store_url or None,
        **mqtt_settings(mqtt),  # issue 7
    )
    from edgefleet.controller.mqtt_bridge import MqttConfigError  # issue 7
    from edgefleet.controller.store import StoreUnavailable

    try:
        asyncio.run(serve(config))
    except (BindError, MqttConfigError, StoreUnavailable) as exc:
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


@devices_group.command("install")
@click.argument("device_id")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the device's outcome.")
@click.option("--timeout", default="10m", show_default=True, help="How long to wait.")
@click.option("--ttl", default="1h", show_default=True, help="The command expires after this long.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def devices_install(obj: Context, device_id: str, bundle: Path, wait: bool, timeout: str, ttl: str,
                    as_json: bool) -> None:
    """Upload a signed bundle and install it on one device (A/B slot, self-test, rollback on failure)."""
    timeout_s = duration_option(timeout, "--timeout")
    ttl_s = duration_option(ttl, "--ttl")
    client = obj.client()
    sha = upload_artifact(client, bundle)
    info = client.call("InstallOnDevice", control_pb2.InstallOnDeviceRequest(
        device_id=device_id, bundle_sha256=sha, ttl_s=max(1, int(ttl_s))))
    if wait:
        deadline = time.monotonic() + timeout_s
        while info.state not in ("done", "expired") and time.monotonic() < deadline:
            time.sleep(0.5)
            info = client.call("GetCommand", control_pb2.GetCommandRequest(command_id=info.command_id))
    if as_json:
        emit_json(to_dict(info))
    else:
        outcome = info.result or info.state
        click.echo(f"{info.command_id} on {device_id}: {outcome}"
                   + (f" ({info.reason}: {info.message})" if info.reason else ""))
    if wait and info.result not in ("committed", "already_installed"):
        sys.exit(1)


def upload_artifact(client: ControlClient, path: Path, chunk: int = 1024 * 1024) -> str:
    """Stream a file into the controller's artifact store; returns its sha256."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    sha, size = digest.hexdigest(), path.stat().st_size

    def messages():
        yield control_pb2.ArtifactUpload(sha256=sha, size=size)
        with open(path, "rb") as f:
            while block := f.read(chunk):
                yield control_pb2.ArtifactUpload(data=block)

    return str(client.call("UploadArtifact", messages()).sha256)


@cli.group("commands")
def commands_group() -> None:
    """Commands sent to devices and their outcomes."""


@commands_group.command("list")
@click.option("--device", "device_id", default="", help="Only this device.")
@click.option("--rollout", "rollout_id", default="", help="Only this rollout.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def commands_list(obj: Context, device_id: str, rollout_id: str, as_json: bool) -> None:
    """List commands, newest last."""
    reply = obj.client().call("ListCommands", control_pb2.ListCommandsRequest(device_id=device_id,
                                                                              rollout_id=rollout_id))
    if as_json:
        emit_json({"commands": [to_dict(c) for c in reply.commands]})
        return
    rows = [[c.command_id, c.device_id, c.kind, c.state, c.result or "-", c.reason or "-",
             ago(c.created_at_unix_ms)] for c in reply.commands]
    click.echo(table(rows, ["COMMAND", "DEVICE", "KIND", "STATE", "RESULT", "REASON", "CREATED"]))


# -- models and rollouts ------------------------------------------------------------------------
@cli.group("models")
def models_group() -> None:
    """Registered models: the sources rollouts compile per hardware class."""


@models_group.command("add")
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name, e.g. det.")
@click.option("--version", "version", required=True, type=click.IntRange(1), help="A positive integer.")
@click.option("--calib", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Calibration/gate data: .npz with one array per model input, samples on the batch axis "
                   "or stacked on a new axis 0; checked against the model before upload.")
@click.option("--budget", default=0.99, show_default=True, type=click.FloatRange(0, 1),
              help="Minimum output cosine similarity to the fp32 model.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def models_add(obj: Context, model_file: Path, name: str, version: int, calib: Path | None, budget: float,
               as_json: bool) -> None:
    """Register MODEL_FILE (ONNX or TFLite) as NAME:VERSION; stored content-addressed."""
    fmt = {".onnx": "onnx", ".tflite": "tflite"}.get(model_file.suffix.lower())
    if fmt is None:
        raise UserError(f"{model_file} is neither .onnx nor .tflite; export the model to one of them")
    check_model_file(model_file, fmt)
    if calib is not None:
        check_calib_file(model_file, calib)
    client = obj.client()
    sha = upload_artifact(client, model_file)
    calib_sha = upload_artifact(client, calib) if calib else ""
    info = client.call("AddModel", control_pb2.AddModelRequest(name=name, version=version, sha256=sha, format=fmt,
                                                               calib_sha256=calib_sha, budget=budget))
    if as_json:
        emit_json(to_dict(info))
    else:
        click.echo(f"{info.name}:{info.version} registered ({fmt}, sha256 {info.sha256[:12]})")


def check_model_file(path: Path, fmt: str) -> None:
    """Refuse a file that is not a model before anything is uploaded."""
    if fmt == "onnx":
        import onnx

        try:
            onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError, ValueError, ... for a broken file
            raise UserError(f"{path} is not a readable ONNX model ({type(exc).__name__}); re-export it") from None
    elif path.read_bytes()[4:8] != b"TFL3":
        raise UserError(f"{path} is not a TFLite flatbuffer (no TFL3 identifier); re-export it")


def check_calib_file(model: Path, calib: Path) -> None:
    """Refuse calibration data the model cannot be compiled with, before anything is uploaded, with
    the checks a compile makes (names, dtypes, shapes and layouts, NaN/Inf, sample counts)."""
    from edgefleet.controller.compiler.data import load_npz
    from edgefleet.controller.compiler.errors import CompileError
    from edgefleet.controller.compiler.model_io import load_source

    try:
        source = load_source(model)
    except CompileError as exc:
        if isinstance(exc.__cause__, ImportError):  # no LiteRT on this machine: the controller checks
            return
        raise UserError(str(exc)) from None
    try:
        load_npz(calib, source.inputs, flag="--calib")
    except CompileError as exc:
        raise UserError(str(exc)) from None


@models_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def models_list(obj: Context, as_json: bool) -> None:
    """List registered models."""
    reply = obj.client().call("ListModels", control_pb2.ListModelsRequest())
    if as_json:
        emit_json({"models": [to_dict(m) for m in reply.models]})
        return
    rows = [[m.name, str(m.version), m.format, m.sha256[:12], "yes" if m.calib_sha256 else "no", f"{m.budget:g}",
             ago(m.created_at_unix_ms)] for m in reply.models]
    click.echo(table(rows, ["NAME", "VERSION", "FORMAT", "SHA256", "CALIB", "BUDGET", "ADDED"]))


@cli.group("rollout")
def rollout_group() -> None:
    """Roll a model out: compile once per class, canary, waves, gates, automatic rollback."""


def _percent(value: str, name: str) -> float:
    try:
        return float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a percentage like 10%", param_hint=name) from None


@rollout_group.command("create")
@click.argument("model_ref", metavar="NAME:VERSION")
@click.option("--to", "selector", default="all", show_default=True,
              help="all | class=CLASS | 'label k=v' | 'devices a,b'")
@click.option("--waves", default="1,10%,50%,100%", show_default=True,
              help="The canary (devices per class), then cumulative shares of each class.")
@click.option("--soak", default="60s", show_default=True, help="How long each wave runs before its gates are read.")
@click.option("--max-failures", default="10%", show_default=True, help="Failed installs a wave may have.")
@click.option("--gate", "gates", multiple=True, metavar="METRIC<=LIMIT[x]",
              help="Repeatable; default p95_ms<=1.2x and error_rate<=0.01. x = times the device's previous model.")
@click.option("--device-timeout", default="10m", show_default=True,
              help="After this an unresponsive device is marked TIMED_OUT and the rollout goes on.")
@click.option("--auto-rollback", type=click.Choice(["on", "off"]), default="on", show_default=True)
@click.option("--watch", is_flag=True, help="Follow progress until the rollout stops.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def rollout_create(obj: Context, model_ref: str, selector: str, waves: str, soak: str, max_failures: str,
                   gates: tuple[str, ...], device_timeout: str, auto_rollback: str, watch: bool,
                   as_json: bool) -> None:
    """Start rolling NAME:VERSION out to the devices --to selects."""
    name, _, version = model_ref.rpartition(":")
    if not name or not version.isdigit():
        raise click.BadParameter(f"{model_ref!r} is not NAME:VERSION, e.g. det:4", param_hint="NAME:VERSION")
    client = obj.client()
    info = client.call("CreateRollout", control_pb2.CreateRolloutRequest(
        model=name, version=int(version), to=selector, waves=waves, soak_s=duration_option(soak, "--soak"),
        max_failures=_percent(max_failures, "--max-failures"), gates=list(gates),
        device_timeout_s=duration_option(device_timeout, "--device-timeout"), auto_rollback=auto_rollback == "on",
    ))
    if watch:
        _watch_rollout(client, info.rollout_id, as_json)
        return
    if as_json:
        emit_json(to_dict(info))
    else:
        click.echo(f"{info.rollout_id}: {name}:{version} to {len(info.devices)} device(s) in "
                   f"{info.waves_total} wave(s); follow with `edgefleet rollout status {info.rollout_id} --watch`")


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def render_rollout(info: control_pb2.RolloutInfo) -> str:
    lines = [f"rollout {info.rollout_id}  {info.model}:{info.version}  to {info.selector}  state {info.state.upper()}"
             f"  wave {info.wave + 1}/{max(info.waves_total, 1)}"]
    if info.reason:
        lines.append(f"reason: {info.reason}")
    for build in info.builds:
        detail = build.error or (
            f"{build.chosen} on {build.runtime or 'onnxruntime'}, {build.speedup:.2f}x faster, "
            f"{build.size_ratio:.2f}x smaller, measured on {build.measured_on or '-'}"
            + (" (cached)" if build.cached else "") if build.state == "ready" else "")
        lines.append(f"  build {build.hardware_class:<20} {build.state:<9} {detail}")
    final = ("committed", "failed", "timed_out", "rolled_back", "superseded", "rollback_failed")
    for wave in sorted({d.wave for d in info.devices}):
        members = [d for d in info.devices if d.wave == wave]
        done = sum(d.state in final for d in members)
        marker = ">" if wave == info.wave and info.state in ("running", "planning") else " "
        lines.append(f"{marker} wave {wave + 1:<2} {_bar(done, len(members))}")
        for hardware_class in sorted({d.hardware_class for d in members}):
            group = [d for d in members if d.hardware_class == hardware_class]
            counts: dict[str, int] = {}
            for d in group:
                counts[d.state] = counts.get(d.state, 0) + 1
            summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
            lines.append(f"      {hardware_class:<20} {_bar(sum(d.state in final for d in group), len(group), 10)}"
                         f"  {summary}")
    return "\n".join(lines)


def _watch_rollout(client: ControlClient, rollout_id: str, as_json: bool = False) -> None:
    """Redraw the status every second until the rollout stops; with as_json, one JSON object per
    line per refresh instead."""
    redraw = sys.stdout.isatty() and not as_json
    try:
        while True:
            info = client.call("GetRollout", control_pb2.GetRolloutRequest(rollout_id=rollout_id))
            if redraw:
                click.echo("\x1b[H\x1b[2J", nl=False)
            click.echo(json.dumps(to_dict(info), sort_keys=True) if as_json else render_rollout(info))
            if info.state not in ("planning", "running"):
                return
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass


@rollout_group.command("status")
@click.argument("rollout_id")
@click.option("--watch", is_flag=True, help="Refresh until the rollout stops (with --json: a JSON line per refresh).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def rollout_status(obj: Context, rollout_id: str, watch: bool, as_json: bool) -> None:
    """Progress per wave and per class, builds, and the reason for any pause."""
    client = obj.client()
    if watch:
        _watch_rollout(client, rollout_id, as_json)
        return
    info = client.call("GetRollout", control_pb2.GetRolloutRequest(rollout_id=rollout_id))
    click.echo(json.dumps(to_dict(info), indent=2, sort_keys=True) if as_json else render_rollout(info))


@rollout_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def rollout_list(obj: Context, as_json: bool) -> None:
    """All rollouts, oldest first."""
    reply = obj.client().call("ListRollouts", control_pb2.ListRolloutsRequest())
    if as_json:
        emit_json({"rollouts": [to_dict(r) for r in reply.rollouts]})
        return
    rows = [[r.rollout_id, f"{r.model}:{r.version}", r.selector, r.state, f"{r.wave + 1}/{max(r.waves_total, 1)}",
             ago(r.created_at_unix_ms), r.reason[:60] or "-"] for r in reply.rollouts]
    click.echo(table(rows, ["ROLLOUT", "MODEL", "TO", "STATE", "WAVE", "CREATED", "REASON"]))


_ROLLOUT_ACTIONS = {
    "pause": "Stop starting new installs; in-flight installs finish.",
    "resume": "Continue a paused rollout from its current wave.",
    "abort": "Stop the rollout for good; devices keep what they have.",
    "rollback": "Return every device this rollout updated to its previous model.",
}


def _rollout_action(action: str) -> None:
    @rollout_group.command(action, help=_ROLLOUT_ACTIONS[action])
    @click.argument("rollout_id")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @remote_options
    @click.pass_obj
    def command(obj: Context, rollout_id: str, as_json: bool) -> None:
        info = obj.client().call("ChangeRollout", control_pb2.ChangeRolloutRequest(rollout_id=rollout_id,
                                                                                   action=action))
        click.echo(json.dumps(to_dict(info), indent=2, sort_keys=True) if as_json else
                   f"{info.rollout_id}: {info.state}")


for _action in _ROLLOUT_ACTIONS:
    _rollout_action(_action)


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


def _register_tool_commands() -> None:
    """Commands that live with the code they drive (the bundle format lives in firmware/)."""
    from edgefleet.controller.compiler.cli import compile_command
    from edgefleet.firmware.cli import bundle_group

    cli.add_command(bundle_group, "bundle")
    cli.add_command(compile_command, "compile")


_register_tool_commands()


def main() -> None:
    cli(prog_name="edgefleet")


if __name__ == "__main__":
    main()
