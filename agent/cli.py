"""`edgefleet-agent`: the device daemon and its local commands."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path

import click

from edgefleet.agent import __version__
from edgefleet.agent.identity import IdentityError, load_identity
from edgefleet.common.logs import setup_logging
from edgefleet.common.units import parse_duration, parse_labels

log = logging.getLogger("edgefleet.agent")


class UserError(click.ClickException):
    """A mistake the user can fix: one line on stderr, exit code 2, no traceback."""

    exit_code = 2


def default_state_dir() -> Path:
    return Path("/var/lib/edgefleet-agent")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgefleet-agent")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def cli(log_level: str) -> None:
    """The EdgeFleet device agent."""
    setup_logging(log_level)


def state_dir_option(fn):
    return click.option(
        "--state-dir", type=click.Path(path_type=Path), envvar="EDGEFLEET_AGENT_STATE_DIR",
        default=default_state_dir, show_default="/var/lib/edgefleet-agent", help="Where the agent keeps its state.",
    )(fn)


@cli.command("run")
@click.option("--controller", envvar="EDGEFLEET_CONTROLLER", metavar="HOST:PORT",
              help="Controller gRPC address; defaults to the one this device enrolled with.")
@click.option("--token", envvar="EDGEFLEET_ENROLL_TOKEN", default="",
              help="Enrollment token; needed only the first time.")
@state_dir_option
@click.option("--labels", default="", metavar="k=v,...", help="Labels to ask for at enrollment.")
@click.option("--hardware-class", default=None, help="Pin the hardware class instead of deriving it.")
@click.option("--no-microbench", is_flag=True, help="Skip the profile's micro-benchmark.")
@click.option("--backoff-max", default=30.0, show_default=True, help="Longest wait between reconnects (s).")
@click.option("--telemetry-interval", default="5s", show_default=True, help="How often a telemetry batch is cut.")
@click.option("--telemetry-queue", default=20_000, show_default=True, type=click.IntRange(10),
              help="Batches kept on disk while offline; the oldest are dropped (and counted) beyond it.")
@click.option("--local-api", default="unix", show_default=True, metavar="unix[:PATH]|HOST:PORT",
              help="Where applications reach the local inference API.")
@click.option("--workload", default=None, metavar="golden:RATE/s",
              help="Drive the installed model with its golden input at a fixed rate.")
@click.option("--power-model", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="JSON overriding the per-class power estimates.")
@click.option("--model-disk-limit", type=click.IntRange(1), default=None, metavar="BYTES",
              help="Most disk one model slot may use (default: the free space).")
@click.option("--transport", type=click.Choice(["grpc", "mqtt"]), default="grpc", show_default=True,
              help="How to reach the controller after enrolling (enrollment itself is one gRPC call).")  # issue 7
@click.option("--mqtt", "mqtt_url", default=None, metavar="mqtt[s]://HOST:PORT",
              help="Broker URL, when it differs from the one the controller gave at enrollment.")
@click.option("--ca-cert", type=click.Path(path_type=Path, dir_okay=False), envvar="EDGEFLEET_CA_CERT", default=None,
              help="The controller's CA (a copy of its STATE_DIR/ca.pem): needed to enroll over TLS, or to move a "
                   "device enrolled before certificates over to one.")
@click.option("--insecure", is_flag=True,
              help="Plaintext with the device secret, against a controller run with --insecure (development only).")
def run(controller: str | None, token: str, state_dir: Path, labels: str, hardware_class: str | None,
        no_microbench: bool, backoff_max: float, telemetry_interval: str, telemetry_queue: int, local_api: str,
        workload: str | None, power_model: Path | None, model_disk_limit: int | None, transport: str,
        mqtt_url: str | None, ca_cert: Path | None, insecure: bool) -> None:
    """Enroll (once), then stay connected: heartbeats, serving, telemetry."""
    from edgefleet.agent.daemon import Agent, AgentConfig, ConfigError, parse_workload
    from edgefleet.agent.renewal import RenewalRefused
    from edgefleet.agent.session import Refused

    try:
        label_map = parse_labels(labels)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--labels") from None
    try:
        interval = parse_duration(telemetry_interval)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--telemetry-interval") from None
    try:
        config = AgentConfig(
            state_dir=state_dir, controller=controller, token=token, labels=label_map,
            hardware_class=hardware_class, microbench=not no_microbench, backoff_max_s=backoff_max,
            telemetry_interval_s=max(0.05, interval), telemetry_queue_cap=telemetry_queue, local_api=local_api,
            workload_rate=parse_workload(workload), power_model=power_model, model_disk_limit=model_disk_limit,
            transport=transport, mqtt_url=mqtt_url,  # issue 7
            insecure=insecure, ca_cert=ca_cert,
        )
        state_dir.mkdir(parents=True, exist_ok=True)
        profile = collect_profile_for_agent(state_dir, microbench=config.microbench, hardware_class=hardware_class)
        agent = Agent(config, profile)
        _run_until_signal(agent.run())
    except (ConfigError, IdentityError, Refused, RenewalRefused) as exc:
        raise UserError(str(exc)) from None
    except ValueError as exc:  # e.g. an unreadable power model file
        raise UserError(str(exc)) from None


def _run_until_signal(coro) -> None:
    """Run the coroutine; SIGINT/SIGTERM cancel it so streams close cleanly and state is flushed.

    The agent's own `finally` flushes (last telemetry cut into the outbox, outbox closed); a second
    signal does not cut that short. Work still running in threads afterwards (a bundle download, an
    install) is abandoned rather than waited for: the installer persists each state before acting,
    so it resumes after the restart as it would after a power cut."""
    from edgefleet.common.shutdown import run_until_stopped

    async def wrapper() -> None:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        stopping = False

        def stop(sig: signal.Signals) -> None:
            nonlocal stopping
            if stopping:
                log.info("already stopping", extra={"signal": sig.name})
                return
            stopping = True
            log.info("stopping", extra={"signal": sig.name})
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        try:
            await task
        except asyncio.CancelledError:
            log.info("agent stopped")

    run_until_stopped(wrapper())


def collect_profile_for_agent(state_dir: Path | None, *, microbench: bool, hardware_class: str | None):
    from edgefleet.agent.profiler import collect_profile

    return collect_profile(
        microbench=microbench, cache_dir=state_dir / "cache" if state_dir else None,
        hardware_class_override=hardware_class,
    )


@cli.command("identity")
@state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def identity_cmd(state_dir: Path, as_json: bool) -> None:
    """Show this device's enrolled identity (never its secret)."""
    try:
        identity = load_identity(state_dir)
    except IdentityError as exc:
        raise UserError(str(exc)) from None
    if identity is None:
        raise UserError(f"not enrolled: {state_dir}/identity.json is missing; run `edgefleet-agent run --token ...`")
    from edgefleet.agent.certificates import CertificateFilesError, describe, load_device_tls

    data: dict[str, object] = {"device_id": identity.device_id, "controller": identity.controller,
                               "labels": identity.labels, "enrolled_at_unix_ms": identity.enrolled_at_unix_ms}
    try:
        tls = load_device_tls(state_dir)
    except CertificateFilesError as exc:
        raise UserError(str(exc)) from None
    data["certificate"] = describe(tls) if tls is not None else None
    text = f"{identity.device_id} enrolled with {identity.controller}"
    if tls is not None:
        cert = describe(tls)
        text += f"\ncertificate {cert['serial']} from {cert['issuer']}, valid until {cert['not_after']}"
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


@cli.command("profile")
@click.option("--json", "as_json", is_flag=True, help="Print the full profile as JSON.")
@click.option("--no-microbench", is_flag=True, help="Skip the micro-benchmark.")
@click.option("--hardware-class", default=None, help="Pin the hardware class instead of deriving it.")
@state_dir_option
def profile_cmd(as_json: bool, no_microbench: bool, hardware_class: str | None, state_dir: Path) -> None:
    """Print this machine's hardware profile, as sent on Enroll."""
    from edgefleet.agent.profiler import profile_to_dict

    cache = state_dir if state_dir.exists() and os.access(state_dir, os.W_OK) else None
    profile = collect_profile_for_agent(cache, microbench=not no_microbench, hardware_class=hardware_class)
    if as_json:
        click.echo(json.dumps(profile_to_dict(profile), indent=2, sort_keys=True))
        return
    cpu = profile.cpu
    lines = [
        f"class        {profile.hardware_class}",
        f"cpu          {cpu.arch} {cpu.vendor} {cpu.model} ({cpu.physical_cores}C/{cpu.logical_cores}T, "
        f"{cpu.max_freq_mhz:.0f} MHz)",
        f"isa          {' '.join(cpu.isa_features) or '-'}",
        f"memory       {profile.memory.total_bytes / 2**30:.1f} GiB",
        f"os           {profile.os.distro or profile.os.system}, kernel {profile.os.kernel}",
    ]
    for rt in profile.runtimes:
        lines.append(f"runtime      {rt.name} {rt.version}: {', '.join(rt.loadable_providers) or '-'}")
    for acc in profile.accelerators:
        lines.append(f"accelerator  {acc.kind} {acc.vendor} {acc.model} ({acc.source})")
    for sensor in profile.power_sensors:
        lines.append(f"power        {sensor.kind} {sensor.name} {'readable' if sensor.readable else 'unreadable'}")
    mb = profile.microbench
    if mb.duration_s:
        lines.append(f"microbench   fp32 {mb.fp32_gemm_gflops:.1f} GFLOP/s, int8 {mb.int8_gemm_gops:.1f} GOP/s, "
                     f"memory {mb.memory_bandwidth_gbs:.1f} GB/s{' (cached)' if mb.from_cache else ''}")
    for gap in profile.gaps:
        lines.append(f"unknown      {gap.what}: {gap.reason}")
    click.echo("\n".join(lines))


@cli.command("infer")
@click.option("--input", "inputs", multiple=True, required=True, metavar="[NAME=]FILE.npy",
              help="An input array; NAME may be left out when the model has one input.")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), help="Save the outputs as .npz.")
@click.option("--local-api", default="unix", show_default=True, metavar="unix[:PATH]|HOST:PORT")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@state_dir_option
def infer_cmd(inputs: tuple[str, ...], output: Path | None, local_api: str, as_json: bool, state_dir: Path) -> None:
    """Run one inference through the running agent's local API."""
    import numpy as np

    from edgefleet.agent.client import InferenceError, LocalClient, from_tensor

    address = _local_address(local_api, state_dir)
    with LocalClient(address) as client:
        try:
            names = list(client.status().input_names)
            arrays: dict[str, np.ndarray] = {}
            for item in inputs:
                name, _, path = item.rpartition("=")
                if not name:
                    if len(names) != 1:
                        raise UserError(f"the model has inputs {', '.join(names) or '(none)'}; "
                                        "write --input NAME=FILE.npy")
                    name = names[0]
                try:
                    arrays[name] = np.load(path, allow_pickle=False)
                except (OSError, ValueError) as exc:
                    raise UserError(f"cannot read {path}: {exc}; pass a .npy file written by numpy.save") from None
            reply = client.infer_raw(arrays)
        except InferenceError as exc:
            raise UserError(_unreachable(address, exc)) from None
    outputs = {t.name: from_tensor(t) for t in reply.outputs}
    if output is not None:
        np.savez(output, **outputs)  # type: ignore[arg-type]
    shown = {k: {"dtype": str(v.dtype), "shape": list(v.shape), "argmax": int(v.argmax()) if v.size else None}
             for k, v in outputs.items()}
    if as_json:
        click.echo(json.dumps({"model": reply.model, "version": reply.version, "queue_ms": reply.queue_ms,
                               "compute_ms": reply.compute_ms, "outputs": shown}, indent=2, sort_keys=True))
        return
    click.echo(f"{reply.model} v{reply.version}: compute {reply.compute_ms:.2f} ms, queue {reply.queue_ms:.2f} ms")
    for k, v in shown.items():
        click.echo(f"  {k}: {v['dtype']}{v['shape']} argmax={v['argmax']}")


def _local_address(local_api: str, state_dir: Path) -> str:
    from edgefleet.agent.local_api import socket_address

    try:
        return socket_address(local_api, state_dir)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _unreachable(address: str, exc: Exception) -> str:
    import grpc

    if getattr(exc, "code", None) == grpc.StatusCode.UNAVAILABLE:
        return f"no agent is serving at {address}; start it with `edgefleet-agent run` or pass --local-api"
    return str(exc)


@cli.command("status")
@click.option("--local-api", default="unix", show_default=True, metavar="unix[:PATH]|HOST:PORT")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@state_dir_option
def status_cmd(local_api: str, as_json: bool, state_dir: Path) -> None:
    """What the running agent serves and whether it is connected."""
    from google.protobuf.json_format import MessageToDict

    from edgefleet.agent.client import InferenceError, LocalClient

    address = _local_address(local_api, state_dir)
    with LocalClient(address, timeout_s=5) as client:
        try:
            status = client.status()
        except InferenceError as exc:
            raise UserError(_unreachable(address, exc)) from None
    if as_json:
        click.echo(json.dumps(MessageToDict(status, preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True), indent=2, sort_keys=True))
        return
    click.echo(f"device     {status.device_id} ({'connected' if status.connected else 'disconnected'})")
    click.echo(f"class      {status.hardware_class}")
    click.echo(f"model      {status.model or '-'} {('v' + status.version) if status.version else ''}")
    click.echo(f"runtime    {status.runtime or '-'}{('  FALLBACK: ' + status.fallback) if status.fallback else ''}")
    click.echo(f"telemetry  {status.telemetry_queued} queued, {status.telemetry_dropped} dropped")


def _register_tool_commands() -> None:
    """`install FILE`: the offline (USB, air-gapped) path through the same installer as the network one."""
    from edgefleet.firmware.cli import install_command

    cli.add_command(install_command, "install")


_register_tool_commands()


def main() -> None:
    cli(prog_name="edgefleet-agent")


if __name__ == "__main__":
    main()
