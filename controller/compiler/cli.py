"""``edgefleet compile``: builds a CompileSpec from flags and calls compile_model, nothing more.

The lead registers it with ``cli.add_command(compile_command, "compile")``. With ``--json`` the report
is the only thing on stdout; progress goes to stderr. Bad input exits 2 with a one-line fix.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import get_args

import click

from edgefleet.controller.compiler.api import CompileSpec, MeasureMode, compile_model
from edgefleet.controller.compiler.controller_measure import controller_device_measurers
from edgefleet.controller.compiler.errors import CompileError
from edgefleet.controller.compiler.model_io import parse_input_shapes


class CompileUsageError(click.ClickException):
    """A CompileError as the CLI shows it: ``Error: <one line>`` and exit code 2."""

    exit_code = 2


@click.command("compile")
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--target",
    default="local",
    show_default=True,
    help="'local' (profile and time this machine), a hardware class such as x86_64-avx512vnni, "
    "or a device profile JSON.",
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path, dir_okay=False),
    help="NPZ with one array per model input (samples on axis 0): calibration, and the gate set "
    "when --eval-data is absent (a held-out part).",
)
@click.option(
    "--eval-data",
    type=click.Path(path_type=Path, dir_okay=False),
    help="NPZ gate set: model inputs plus any keys your --eval function reads (labels).",
)
@click.option(
    "--budget",
    type=float,
    default=0.99,
    show_default=True,
    help="Minimum over outputs of the mean cosine similarity to the fp32 reference.",
)
@click.option(
    "--eval",
    "eval_fn",
    metavar="PKG.MOD:FN",
    help="Task metric fn(outputs, data) -> float; replaces the cosine gate with --max-drop.",
)
@click.option(
    "--max-drop",
    type=float,
    default=0.01,
    show_default=True,
    help="Largest allowed drop of the --eval score against fp32.",
)
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME=D0,D1,...",
    help="Fix an input's shape, e.g. images=1,3,224,224 (repeatable).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Output folder for the artifact, manifest.json and report.json [default: ./<model>-<class>].",
)
@click.option("--recipes", metavar="A,B", help="Only try these recipes (the fp32 baseline is always built).")
@click.option(
    "--measure",
    type=click.Choice(list(get_args(MeasureMode))),
    default="auto",
    show_default=True,
    help="Where latencies come from: auto = this machine for --target local, an online device "
    "of the class when the controller has one, else estimated.",
)
@click.option("--no-cache", is_flag=True, help="Compile again even if this exact compile is cached.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (the only stdout).")
def compile_command(
    model: Path,
    target: str,
    calib: Path | None,
    eval_data: Path | None,
    budget: float,
    eval_fn: str | None,
    max_drop: float,
    input_shapes: tuple[str, ...],
    out: Path | None,
    recipes: str | None,
    measure: MeasureMode,
    no_cache: bool,
    as_json: bool,
) -> None:
    """Compile MODEL (.onnx or .tflite) into the fastest build for a hardware class within the accuracy
    budget; every latency in the report is measured, or marked estimated."""

    def progress(message: str) -> None:
        click.echo(message, err=True)

    try:
        spec = CompileSpec(
            model=model,
            target=target,
            calib=calib,
            eval_data=eval_data,
            budget=budget,
            eval_fn=eval_fn,
            max_drop=max_drop,
            input_shapes=parse_input_shapes(input_shapes),
            out=out,
            recipes=tuple(r.strip() for r in recipes.split(",") if r.strip()) if recipes else None,
            use_cache=not no_cache,
            measure=measure,
        )
        report = compile_model(spec, progress=progress, device_measurers=controller_device_measurers(progress))
    except CompileError as exc:
        raise CompileUsageError(str(exc)) from exc
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        return
    base, res = report.baseline, report.result
    kind = "estimated" if report.latency.get("estimated") else "measured"
    click.echo(f"chosen: {report.chosen}  ({report.why})")
    click.echo(
        f"latency ({kind}): {base['latency_ms']:.3f} ms -> {res['latency_ms']:.3f} ms  speedup {report.speedup:.2f}x"
    )
    click.echo(f"size: {base['size_bytes']} -> {res['size_bytes']} bytes  ({report.size_ratio:.2f}x smaller)")
    click.echo(
        f"fidelity: {res['fidelity']}   artifact: {report.artifact}" + ("   (from cache)" if report.cached else "")
    )


def main() -> None:  # pragma: no cover - convenience for running the command without the main CLI
    compile_command()


if __name__ == "__main__":  # pragma: no cover
    main()
