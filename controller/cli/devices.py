"""`edgefleet devices` and `edgefleet commands`: the enrolled fleet and what was sent to it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from edgefleet.controller.cli.base import Context, cli, remote_options
from edgefleet.controller.cli.output import ago, duration_option, emit_json, table, to_dict
from edgefleet.controller.client import upload_artifact
from edgefleet.protos.v1 import control_pb2


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
        [d.device_id, "revoked" if d.revoked else "online" if d.online else "offline", ago(d.last_seen_unix_ms),
         d.hardware_class or "-",
         d.hostname or "-", ",".join(f"{k}={v}" for k, v in sorted(d.labels.items())) or "-"]
        for d in reply.devices
    ]
    click.echo(table(rows, ["DEVICE", "STATE", "LAST SEEN", "CLASS", "HOST", "LABELS"]))


@devices_group.command("revoke")
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def devices_revoke(obj: Context, device_id: str, as_json: bool) -> None:
    """Revoke a device: its stream ends, its certificate and MQTT login stop working, for good."""
    device = obj.client().call("RevokeDevice", control_pb2.RevokeDeviceRequest(device_id=device_id))
    if as_json:
        emit_json(to_dict(device))
        return
    click.echo(f"{device.device_id} revoked; to bring it back, enroll it again with a new token")


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
