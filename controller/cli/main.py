"""`edgefleet`: the operator and controller command line.

Every command that talks to a running controller goes through the Control gRPC service,
the same API any other client would use.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgefleet.controller.cli import (  # noqa: F401  (registers the groups)
    ca,
    controller,
    devices,
    models,
    operators,
    rollouts,
    telemetry,
    tokens,
)
from edgefleet.controller.cli.base import cli
from edgefleet.controller.cli.output import duration_option


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
    from edgefleet.controller.cli.compile import compile_command
    from edgefleet.firmware.cli import bundle_group

    cli.add_command(bundle_group, "bundle")
    cli.add_command(compile_command, "compile")


_register_tool_commands()


def main() -> None:
    cli(prog_name="edgefleet")


if __name__ == "__main__":
    main()
