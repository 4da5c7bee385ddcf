"""The model registry: what may be registered, checked against its calibration data before it is stored."""

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
    for field, sha in (("sha256", request.sha256), ("calib_sha256", request.calib_sha256)):
        if sha and not artifacts.path(sha).exists():
            raise NotFound(f"field '{field}': no artifact {sha}; upload it first")
    record = ModelRecord(name=request.name, version=int(request.version), sha256=request.sha256,
                         format=request.format, calib_sha256=request.calib_sha256,
                         budget=request.budget or 0.99, created_at_ms=int(time.time() * 1000))
    try:
        store.add_model(record)
    except StoreError as exc:
        raise FailedPrecondition(str(exc)) from None
    return store.get_model(record.name, record.version) or record


def check_model_data(artifacts: ArtifactStore, request: control_pb2.AddModelRequest) -> None:
    """Refuse calibration data the model cannot be compiled with, at registration, with the same
    checks a compile makes: a rollout must not be the first to find out, at build time.

    Missing artifacts and bad fields are left to :func:`register_model`, which names them.
    """
    import tempfile
    from pathlib import Path

    from edgefleet.controller.compiler.data import load_npz
    from edgefleet.controller.compiler.errors import CompileError
    from edgefleet.controller.compiler.model_io import load_source

    if not request.calib_sha256 or request.format not in ("onnx", "tflite"):
        return
    model, calib = artifacts.path(request.sha256), artifacts.path(request.calib_sha256)
    if not model.is_file() or not calib.is_file():
        return
    with tempfile.TemporaryDirectory(prefix="edgefleet-add-model-") as tmp:
        named = Path(tmp) / f"model.{request.format}"  # load_source reads the format from the suffix
        named.symlink_to(model)
        try:
            source = load_source(named)
        except CompileError as exc:
            if isinstance(exc.__cause__, ImportError):  # no LiteRT here: the build will say so
                return
            raise InvalidArgument(f"model {request.name}: {exc}") from None
        try:
            load_npz(calib, source.inputs, flag="--calib")
        except CompileError as exc:
            raise InvalidArgument(str(exc)) from None
