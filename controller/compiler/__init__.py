"""The model compiler: per-hardware-class compression with an accuracy gate and measured selection.

Library entry point: ``compile_model(CompileSpec(...))``; the ``edgefleet compile`` command builds the
same spec. Importing this package is cheap: onnx/onnxruntime load when a compile runs.
"""

from __future__ import annotations

from edgefleet.controller.compiler.api import CompileReport, CompileSpec, compile_model
from edgefleet.controller.compiler.errors import CompileError, MissingExtraError
from edgefleet.controller.compiler.measure import (
    DeviceMeasurer,
    EstimatedMeasurer,
    LatencyStats,
    LocalMeasurer,
    Measurer,
)
from edgefleet.controller.compiler.target import TargetSpec

__all__ = [
    "CompileError",
    "CompileReport",
    "CompileSpec",
    "DeviceMeasurer",
    "EstimatedMeasurer",
    "LatencyStats",
    "LocalMeasurer",
    "Measurer",
    "MissingExtraError",
    "TargetSpec",
    "compile_model",
]
