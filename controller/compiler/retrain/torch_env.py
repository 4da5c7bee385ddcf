"""Importing the training tool-chain (the ``train`` extra) only when a compile asks to retrain.

Nothing on a device, and no compile without ``--retrain``/``--student``, imports torch: every
import of it goes through :func:`load_torch` inside a function.

onnx2torch imports torchvision at module level for its NMS and RoiAlign converters only. The
torchvision wheel that pip pairs with the CPU build of torch fails to import there ("operator
torchvision::nms does not exist"), so when the real one does not import, a stand-in whose ops
raise is put in its place: a model with NMS or RoiAlign then fails conversion and its retrained
candidates are skipped with that reason, while every conv net converts as it should.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

from edgefleet.controller.compiler.errors import CompileError

# Module name -> distribution, in the order a missing one is reported.
TRAIN_MODULES = (("torch", "torch"), ("onnx2torch", "onnx2torch"), ("torch_pruning", "torch-pruning"))
EXTRA_HINT = "pip install 'edgefleet[train]'"


def check_train_extra(flag: str) -> None:
    """Fail before any work, in one line naming the extra, when the training packages are absent."""
    missing = [dist for module, dist in TRAIN_MODULES if importlib.util.find_spec(module) is None]
    if missing:
        raise CompileError(
            f"{flag} needs the 'train' extra ({', '.join(missing)} not installed); {EXTRA_HINT}"
        )


def _torchvision_stand_in() -> None:
    if "torchvision" in sys.modules:
        return
    try:
        importlib.import_module("torchvision")
        return
    except Exception:  # a broken torchvision raises RuntimeError, not ImportError
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]

    def unavailable(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("torchvision ops (NMS, RoiAlign) are not available with the CPU build of torch")

    vision = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    for op in ("nms", "batched_nms", "box_convert", "roi_align"):
        setattr(ops, op, unavailable)
    vision.ops = ops  # type: ignore[attr-defined]
    sys.modules["torchvision"] = vision
    sys.modules["torchvision.ops"] = ops


def load_torch() -> tuple[Any, Any, Any]:
    """(torch, onnx2torch, torch_pruning), imported on first use."""
    check_train_extra("--retrain")
    import torch

    _torchvision_stand_in()
    import onnx2torch
    import torch_pruning

    return torch, onnx2torch, torch_pruning
