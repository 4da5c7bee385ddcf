"""The root `edgefleet` group and what every remote command shares (--controller, --state-dir)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgefleet.common.logs import setup_logging
from edgefleet.controller import __version__
from edgefleet.controller.client import Connection, ControlClient


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
