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

from edgefleet.common.units import parse_duration
from edgefleet.controller.cli.output import ratio_phrase
from edgefleet.controller.compiler.api import CompileReport, CompileSpec, MeasureMode, compile_model
from edgefleet.controller.compiler.controller_measure import controller_device_measurers
from edgefleet.controller.compiler.errors import CompileError
from edgefleet.controller.compiler.gate import METRICS
from edgefleet.controller.compiler.model_io import parse_input_shapes
from edgefleet.controller.compiler.retrain import DEFAULT_RATIOS, RetrainSpec


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
    "--metric",
    default="cosine",
    show_default=True,
    metavar="|".join(METRICS),
    help="What the gate measures against fp32: cosine, top1 (classification), seq-argmax (CTC text, "
    "per-frame labels: 1 - CER), mask-iou[@T] (probability maps), rel-l2; or accuracy against --eval-labels.",
)
@click.option(
    "--budget",
    type=float,
    default=None,
    help="Agreement metrics: the lowest score allowed (default 0.99). --metric accuracy: the largest "
    "accuracy drop allowed (default 0.01, one point).",
)
@click.option(
    "--eval-labels",
    type=click.Path(path_type=Path, dir_okay=False),
    help="NPZ with one integer array: the class of each --eval-data sample (or --calib sample), for "
    "--metric accuracy.",
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
@click.option(
    "--retrain",
    is_flag=True,
    help="Also try structurally pruned networks, distilled against the model on your --calib (and "
    "--retrain-data) samples, through the usual candidates. Controller only: needs the train extra.",
)
@click.option(
    "--retrain-budget",
    default="10m",
    show_default=True,
    metavar="DURATION",
    help="Training time for all retrained networks together, e.g. 90s, 10m; the best weights so far are kept.",
)
@click.option(
    "--retrain-ratios",
    default=",".join(str(r) for r in DEFAULT_RATIOS),
    show_default=True,
    metavar="R1,R2",
    help="Share of channels --retrain removes, one pruned network per ratio.",
)
@click.option(
    "--student",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A smaller ONNX model with the same inputs and outputs (random or pre-trained weights), "
    "distilled to match MODEL, then compiled like the others.",
)
@click.option(
    "--retrain-data",
    type=click.Path(path_type=Path, dir_okay=False),
    help="NPZ of extra unlabeled samples (one array per model input) to distill on, beside --calib.",
)
@click.option(
    "--no-thread-search",
    is_flag=True,
    help="Time builds only on one thread per core of the target, not also on fewer threads (tried only "
    "where candidates are really timed: here, or on a device whose agent can).",
)
@click.option("--no-cache", is_flag=True, help="Compile again even if this exact compile is cached.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (the only stdout).")
def compile_command(
    model: Path,
    target: str,
    calib: Path | None,
    eval_data: Path | None,
    metric: str,
    budget: float | None,
    eval_labels: Path | None,
    eval_fn: str | None,
    max_drop: float,
    input_shapes: tuple[str, ...],
    out: Path | None,
    recipes: str | None,
    measure: MeasureMode,
    retrain: bool,
    retrain_budget: str,
    retrain_ratios: str,
    student: Path | None,
    retrain_data: Path | None,
    no_thread_search: bool,
    no_cache: bool,
    as_json: bool,
) -> None:
    """Compile MODEL (.onnx or .tflite) into the fastest build for a hardware class within the accuracy
    budget; every latency in the report is measured, or marked estimated."""

    def progress(message: str) -> None:
        click.echo(message, err=True)

    try:
        retrain_spec = _retrain_spec(retrain, retrain_budget, retrain_ratios, student, retrain_data)
        spec = CompileSpec(
            model=model,
            target=target,
            calib=calib,
            eval_data=eval_data,
            budget=budget if budget is not None else (0.01 if metric == "accuracy" else 0.99),
            metric=metric,
            eval_labels=eval_labels,
            eval_fn=eval_fn,
            max_drop=max_drop,
            input_shapes=parse_input_shapes(input_shapes),
            out=out,
            recipes=tuple(r.strip() for r in recipes.split(",") if r.strip()) if recipes else None,
            use_cache=not no_cache,
            measure=measure,
            retrain=retrain_spec,
            thread_search=not no_thread_search,
        )
        report = compile_model(spec, progress=progress, device_measurers=controller_device_measurers(progress))
    except CompileError as exc:
        raise CompileUsageError(str(exc)) from exc
    click.echo(candidate_table(report), err=as_json)
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        return
    base, res = report.baseline, report.result
    kind = "estimated" if report.latency.get("estimated") else "measured"
    runtime = report.result.get("runtime", "")
    click.echo(f"chosen: {report.chosen} on {runtime}  ({report.why})")
    kind += ", timed again side by side" if res.get("timed_again") else ""
    click.echo(
        f"latency ({kind}): {base['latency_ms']:.3f} ms -> {res['latency_ms']:.3f} ms  speedup {report.speedup:.2f}x"
    )
    size = ratio_phrase(report.size_ratio, "smaller", "bigger", "the same size")
    click.echo(f"size: {base['size_bytes']} -> {res['size_bytes']} bytes  ({size})")
    click.echo(
        f"fidelity: {res['fidelity']}   artifact: {report.artifact}" + ("   (from cache)" if report.cached else "")
    )
    for line in retrain_lines(report):
        click.echo(line)


def _retrain_spec(
    retrain: bool, budget: str, ratios: str, student: Path | None, data: Path | None
) -> RetrainSpec | None:
    if not retrain and student is None:
        if data is not None:
            raise CompileError("--retrain-data is read by --retrain or --student; pass one of them")
        return None
    try:
        budget_s = parse_duration(budget)
    except ValueError as exc:
        raise CompileError(f"--retrain-budget: {exc}") from exc
    try:
        parsed = tuple(float(r) for r in ratios.split(",") if r.strip()) if retrain else ()
    except ValueError as exc:
        raise CompileError(f"--retrain-ratios {ratios!r} is not a list of numbers; pass e.g. 0.25,0.5") from exc
    return RetrainSpec(ratios=parsed, student=student, budget_s=budget_s, data=data)


def retrain_lines(report: CompileReport) -> list[str]:
    """One line per retrained network: what it removed, how long it trained, its best candidate."""
    lines = []
    for model in report.retrain.get("models", []):
        if model.get("error"):
            lines.append(f"retrain {model['tag']}: {model['error']}")
            continue
        passed = [c for c in model.get("candidates", []) if c.get("passed_gate") and c.get("latency_ms") is not None]
        best = min(passed, key=lambda c: c["latency_ms"]) if passed else None
        removed = model.get("macs_removed")
        lines.append(
            f"retrain {model['tag']}: MACs {model.get('macs_before')} -> {model.get('macs_after')}"
            + (f" ({removed:.0%} removed)" if removed is not None else "")
            + f", {model.get('epochs')} epochs in {model.get('train_s')}s; "
            + (f"best {best['recipe']} {best['latency_ms']:.3f} ms" if best else "no candidate passed the gate")
            + (f"; loss curve {model['loss_curve_png']}" if model.get("loss_curve_png") else "")
        )
    return lines


def candidate_table(report: CompileReport) -> str:
    """The candidates at a glance: recipe, runtime, gate metric, latency, size and why one was not chosen."""
    metric = str(report.gate.get("metric") or report.gate.get("kind") or "score")
    rows = [["recipe", "runtime", metric, "latency ms", "size", "result"]]
    for row in report.candidates:
        score = row.get("task_score") if row.get("task_score") is not None else row.get("metric_score")
        latency = row.get("latency_ms")
        if row.get("error"):
            verdict = str(row["error"])
        elif not row.get("passed_gate"):
            verdict = "failed the gate"
        elif row["recipe"] == report.chosen:
            verdict = "CHOSEN"
        elif latency is None:
            verdict = "; ".join(n for n in row.get("notes", []) if n.startswith("not measured")) or "not measured"
        elif again := next((n for n in row.get("notes", []) if n.startswith("timed again")), None):
            verdict = f"sent back, {again}"  # the close-call check (compiler _confirm) found it slower
        else:
            verdict = "slower"
        rows.append([
            str(row["recipe"]),
            str(row.get("runtime") or ""),
            "" if score is None else f"{score:.4f}",
            "" if latency is None else f"{latency:.3f}" + ("~" if row.get("estimated") else ""),
            "" if row.get("size_bytes") is None else _size(int(row["size_bytes"])),
            verdict[:90],
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def main() -> None:  # pragma: no cover - convenience for running the command without the main CLI
    compile_command()


if __name__ == "__main__":  # pragma: no cover
    main()
