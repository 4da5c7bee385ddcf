"""`edgefleet-agent`: the device daemon and its local commands."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

import click

from edgefleet.agent import __version__
from edgefleet.agent.identity import IdentityError, load_identity, save_identity
from edgefleet.agent.logs import setup_logging
from edgefleet.agent.units import parse_labels

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


@cli.command("run")
@click.option("--controller", envvar="EDGEFLEET_CONTROLLER", metavar="HOST:PORT",
              help="Controller gRPC address; defaults to the one this device enrolled with.")
@click.option("--token", envvar="EDGEFLEET_ENROLL_TOKEN", default="",
              help="Enrollment token; needed only the first time.")
@click.option("--state-dir", type=click.Path(path_type=Path), envvar="EDGEFLEET_AGENT_STATE_DIR",
              default=default_state_dir, show_default="/var/lib/edgefleet-agent")
@click.option("--labels", default="", metavar="k=v,...", help="Labels to ask for at enrollment.")
@click.option("--hardware-class", default=None, help="Pin the hardware class instead of deriving it.")
@click.option("--no-microbench", is_flag=True, help="Skip the profile's micro-benchmark.")
@click.option("--backoff-max", default=30.0, show_default=True, help="Longest wait between reconnects (s).")
def run(controller: str | None, token: str, state_dir: Path, labels: str, hardware_class: str | None,
        no_microbench: bool, backoff_max: float) -> None:
    """Enroll (once), then stay connected: heartbeats, commands, telemetry."""
    from edgefleet.agent.session import AgentSession, Refused, enroll

    try:
        label_map = parse_labels(labels)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--labels") from None
    try:
        identity = load_identity(state_dir)
    except IdentityError as exc:
        raise UserError(str(exc)) from None

    def profile():  # type: ignore[no-untyped-def]
        return collect_profile_for_agent(state_dir, microbench=not no_microbench, hardware_class=hardware_class)

    async def main() -> None:
        nonlocal identity
        if identity is None:
            if not token:
                raise UserError(
                    f"this device is not enrolled ({state_dir}/identity.json is missing); "
                    "pass --token from `edgefleet token create`"
                )
            if not controller:
                raise UserError("pass --controller HOST:PORT for the first enrollment")
            identity = await enroll(controller, token, profile(), label_map, backoff_max_s=backoff_max)
            save_identity(state_dir, identity)
            log.info("enrolled", extra={"device": identity.device_id, "controller": controller})
        elif token:
            log.info("already enrolled; ignoring --token", extra={"device": identity.device_id})
        session = AgentSession(controller or identity.controller, identity, profile, backoff_max_s=backoff_max)
        await session.run()

    try:
        _run_until_signal(main())
    except Refused as exc:
        raise UserError(str(exc)) from None


def _run_until_signal(coro) -> None:  # type: ignore[no-untyped-def]
    """Run the coroutine; SIGINT/SIGTERM cancel it so streams close cleanly."""

    async def wrapper() -> None:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            log.info("agent stopped")

    asyncio.run(wrapper())


def collect_profile_for_agent(state_dir: Path, *, microbench: bool, hardware_class: str | None):  # type: ignore[no-untyped-def]
    from edgefleet.agent.profiler import collect_profile

    return collect_profile(
        microbench=microbench, cache_dir=state_dir / "cache", hardware_class_override=hardware_class
    )


@cli.command("identity")
@click.option("--state-dir", type=click.Path(path_type=Path), envvar="EDGEFLEET_AGENT_STATE_DIR",
              default=default_state_dir, show_default="/var/lib/edgefleet-agent")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def identity_cmd(state_dir: Path, as_json: bool) -> None:
    """Show this device's enrolled identity (never its secret)."""
    try:
        identity = load_identity(state_dir)
    except IdentityError as exc:
        raise UserError(str(exc)) from None
    if identity is None:
        raise UserError(f"not enrolled: {state_dir}/identity.json is missing; run `edgefleet-agent run --token ...`")
    data = {"device_id": identity.device_id, "controller": identity.controller, "labels": identity.labels,
            "enrolled_at_unix_ms": identity.enrolled_at_unix_ms}
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else
               f"{identity.device_id} enrolled with {identity.controller}")


def main() -> None:
    cli(prog_name="edgefleet-agent")


if __name__ == "__main__":
    sys.exit(main())
