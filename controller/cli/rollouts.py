"""`edgefleet rollout`: create, watch, pause, resume, abort and roll back rollouts."""

from __future__ import annotations

import json
import sys
import time

import click

from edgefleet.controller.cli.base import Context, cli, remote_options
from edgefleet.controller.cli.output import ago, duration_option, emit_json, speed_and_size, table, to_dict
from edgefleet.controller.client import ControlClient
from edgefleet.controller.rollouts.states import ACTIVE_ROLLOUT_STATES, SETTLED_DEVICE_STATES, RolloutEvent
from edgefleet.protos.v1 import control_pb2


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
            f"{build.chosen} on {build.runtime or 'onnxruntime'}, {speed_and_size(build.speedup, build.size_ratio)}, "
            f"measured on {build.measured_on or '-'}"
            + (" (cached)" if build.cached else "") if build.state == "ready" else "")
        lines.append(f"  build {build.hardware_class:<20} {build.state:<9} {detail}")
    for wave in sorted({d.wave for d in info.devices}):
        members = [d for d in info.devices if d.wave == wave]
        done = sum(d.state in SETTLED_DEVICE_STATES for d in members)
        marker = ">" if wave == info.wave and info.state in ACTIVE_ROLLOUT_STATES else " "
        lines.append(f"{marker} wave {wave + 1:<2} {_bar(done, len(members))}")
        for hardware_class in sorted({d.hardware_class for d in members}):
            group = [d for d in members if d.hardware_class == hardware_class]
            counts: dict[str, int] = {}
            for d in group:
                counts[d.state] = counts.get(d.state, 0) + 1
            summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
            settled = sum(d.state in SETTLED_DEVICE_STATES for d in group)
            lines.append(f"      {hardware_class:<20} {_bar(settled, len(group), 10)}  {summary}")
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
            if info.state not in ACTIVE_ROLLOUT_STATES:
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


# One command per operator action of the rollout state table; the controller refuses an action the
# rollout's state does not allow, and says from which states it is allowed.
_ROLLOUT_ACTIONS = {
    RolloutEvent.PAUSE.value: "Stop starting new installs; in-flight installs finish.",
    RolloutEvent.RESUME.value: "Continue a paused rollout from its current wave.",
    RolloutEvent.ABORT.value: "Stop the rollout for good; devices keep what they have.",
    RolloutEvent.ROLLBACK.value: "Return every device this rollout updated to its previous model.",
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
