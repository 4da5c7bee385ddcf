"""`edgefleet models`: register models (checked against their calibration data) and list them."""

from __future__ import annotations

from pathlib import Path

import click

from edgefleet.controller.cli.base import Context, cli, remote_options
from edgefleet.controller.cli.output import ago, emit_json, table, to_dict
from edgefleet.controller.client import UserError, upload_artifact
from edgefleet.protos.v1 import control_pb2


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
@click.option("--eval-data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Held-out gate data (.npz like --calib); default: a held-out part of --calib.")
@click.option("--eval-labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Labels (.npz, one integer array) for --eval-data, or for --calib without it.")
@click.option("--metric", default="", metavar="METRIC",
              help="What the rollout's gate measures, as `edgefleet compile --metric` (default: cosine).")
@click.option("--budget", default=None, type=click.FloatRange(0, 1),
              help="The lowest metric score allowed (default 0.99); for --metric accuracy the largest drop "
                   "(default 0.01, one point).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def models_add(obj: Context, model_file: Path, name: str, version: int, calib: Path | None, eval_data: Path | None,
               eval_labels: Path | None, metric: str, budget: float | None, as_json: bool) -> None:
    """Register MODEL_FILE (ONNX or TFLite) as NAME:VERSION; stored content-addressed."""
    fmt = {".onnx": "onnx", ".tflite": "tflite"}.get(model_file.suffix.lower())
    if fmt is None:
        raise UserError(f"{model_file} is neither .onnx nor .tflite; export the model to one of them")
    check_model_file(model_file, fmt)
    if budget is None:
        budget = 0.01 if metric.partition("@")[0] == "accuracy" else 0.99
    if calib or eval_data or eval_labels or metric:
        check_gate_files(model_file, calib=calib, eval_data=eval_data, eval_labels=eval_labels,
                         metric=metric or "cosine", budget=budget)
    client = obj.client()
    sha = upload_artifact(client, model_file)
    calib_sha, eval_sha, labels_sha = (upload_artifact(client, p) if p else "" for p in (calib, eval_data, eval_labels))
    info = client.call("AddModel", control_pb2.AddModelRequest(
        name=name, version=version, sha256=sha, format=fmt, calib_sha256=calib_sha, budget=budget,
        eval_sha256=eval_sha, eval_labels_sha256=labels_sha, metric=metric))
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


def check_gate_files(model: Path, *, calib: Path | None, eval_data: Path | None, eval_labels: Path | None,
                     metric: str, budget: float) -> None:
    """Refuse gate data the model cannot be compiled with, before anything is uploaded, with the checks
    a compile makes (metric and labels, names, dtypes, shapes and layouts, NaN/Inf, sample counts)."""
    from edgefleet.controller.compiler.api import check_compile_data
    from edgefleet.controller.compiler.errors import CompileError
    from edgefleet.controller.compiler.model_io import load_source

    try:
        load_source(model)
    except CompileError as exc:
        if isinstance(exc.__cause__, ImportError):  # no LiteRT on this machine: the controller checks
            return
        raise UserError(str(exc)) from None
    try:
        check_compile_data(model, calib=calib, eval_data=eval_data, eval_labels=eval_labels, metric=metric,
                           budget=budget)
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
    rows = [[m.name, str(m.version), m.format, m.sha256[:12], "yes" if m.calib_sha256 else "no",
             "yes" if m.eval_sha256 else "no", m.metric or "cosine", f"{m.budget:g}", ago(m.created_at_unix_ms)]
            for m in reply.models]
    click.echo(table(rows, ["NAME", "VERSION", "FORMAT", "SHA256", "CALIB", "EVAL", "METRIC", "BUDGET", "ADDED"]))
