"""The model registry: what may be registered, checked against its gate data before it is stored.

A model is registered with what its rollouts compile under: calibration data, held-out evaluation
data and labels, the gate's metric and budget. All of it is checked against the model here, with the
checks a compile makes, so a rollout never fails at build time on data a check could have caught.
"""

from __future__ import annotations

import re
import time

from edgefleet.controller.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from edgefleet.controller.store.artifacts import ArtifactStore
from edgefleet.controller.store.base import (
    ModelRecord,
    Store,
)
from edgefleet.protos.v1 import control_pb2


def register_model(store: Store, artifacts: ArtifactStore, request: control_pb2.AddModelRequest) -> ModelRecord:

    from edgefleet.controller.store.base import StoreError

    if not request.name or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", request.name):
        raise InvalidArgument(f"model name {request.name!r} is invalid; use letters, digits, '.', '_', '-'")
    if request.version < 1:
        raise InvalidArgument("--version must be a positive integer (versions only go up on devices)")
    if request.format not in ("onnx", "tflite"):
        raise InvalidArgument(f"model format {request.format!r} is not supported; give an .onnx or .tflite file")
    for field, sha in (("sha256", request.sha256), ("calib_sha256", request.calib_sha256),
                       ("eval_sha256", request.eval_sha256), ("eval_labels_sha256", request.eval_labels_sha256)):
        if sha and not artifacts.path(sha).exists():
            raise NotFound(f"field '{field}': no artifact {sha}; upload it first")
    _check_metric(request)
    record = ModelRecord(name=request.name, version=int(request.version), sha256=request.sha256,
                         format=request.format, calib_sha256=request.calib_sha256,
                         budget=request.budget or 0.99, created_at_ms=int(time.time() * 1000),
                         eval_sha256=request.eval_sha256, eval_labels_sha256=request.eval_labels_sha256,
                         metric=request.metric)
    try:
        store.add_model(record)
    except StoreError as exc:
        raise FailedPrecondition(str(exc)) from None
    return store.get_model(record.name, record.version) or record


def _check_metric(request: control_pb2.AddModelRequest) -> None:
    if not request.metric:
        return
    from edgefleet.controller.compiler.errors import CompileError
    from edgefleet.controller.compiler.gate import parse_metric

    try:
        parse_metric(request.metric)
    except CompileError as exc:
        raise InvalidArgument(str(exc)) from None


def check_model_data(artifacts: ArtifactStore, request: control_pb2.AddModelRequest) -> None:
    """Refuse gate data the model cannot be compiled with, at registration, with the same checks a
    compile makes (:func:`check_compile_data`): a rollout must not be the first to find out.

    Missing artifacts and bad fields are left to :func:`register_model`, which names them.
    """
    import tempfile
    from pathlib import Path

    from edgefleet.controller.compiler.api import check_compile_data
    from edgefleet.controller.compiler.errors import CompileError
    from edgefleet.controller.compiler.model_io import load_source

    if request.format not in ("onnx", "tflite"):
        return
    data = {"calib": request.calib_sha256, "eval_data": request.eval_sha256, "eval_labels": request.eval_labels_sha256}
    if not any(data.values()) and not request.metric:
        return
    paths = [artifacts.path(sha) for sha in (request.sha256, *data.values()) if sha]
    if not all(p.is_file() for p in paths):
        return
    _check_metric(request)
    with tempfile.TemporaryDirectory(prefix="edgefleet-add-model-") as tmp:
        named = Path(tmp) / f"model.{request.format}"  # load_source reads the format from the suffix
        named.symlink_to(artifacts.path(request.sha256))
        try:
            load_source(named)
        except CompileError as exc:
            if isinstance(exc.__cause__, ImportError):  # no LiteRT here: the build will say so
                return
            raise InvalidArgument(f"model {request.name}: {exc}") from None
        try:
            check_compile_data(named, metric=request.metric or "cosine", budget=request.budget or 0.99,
                               **{k: artifacts.path(v) if v else None for k, v in data.items()})
        except CompileError as exc:
            raise InvalidArgument(str(exc)) from None
