"""Structured (channel) pruning with Torch-Pruning's dependency graph.

Unlike magnitude sparsity (passes/prune.py), removing whole channels shrinks every dense kernel,
so CPU runtimes do less work. The dependency graph prunes coupled layers together (a conv's
outputs with the next conv's inputs, both sides of a residual add, the channels of a concat), so
the pruned network stays valid; it is run once after pruning to prove it.

The layers that produce the model's outputs keep their channels: a classifier keeps its classes,
a detector its maps. They are found by walking back from the graph's outputs through
parameter-free nodes to the first conv or linear layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet.controller.compiler.retrain.convert import ConversionError, check_runs
from edgefleet.controller.compiler.retrain.torch_env import load_torch


@dataclass(frozen=True)
class Footprint:
    params: int
    macs: int


def footprint(module: Any, example: Sequence[Any]) -> Footprint:
    """Parameters and multiply-accumulates of one forward pass on ``example`` (batch as given)."""
    torch, _, tp = load_torch()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(module, tuple(example))
    first: Any = example[0] if example else None
    batch = int(first.shape[0]) if first is not None and len(getattr(first, "shape", ())) else 1
    return Footprint(int(params), round(float(macs) / max(batch, 1)))


def output_layers(module: Any) -> list[Any]:
    """The conv / linear layers whose channels are the model's outputs (never pruned)."""
    torch, _, _ = load_torch()
    weighted = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear,
                torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d)
    graph = getattr(module, "graph", None)
    if graph is None:  # not an fx module: protect the last weighted layer
        layers = [m for m in module.modules() if isinstance(m, weighted)]
        return layers[-1:]
    modules = dict(module.named_modules())
    found: list[Any] = []
    seen: set[Any] = set()
    stack = [arg for node in graph.nodes if node.op == "output" for arg in _node_args(node)]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        target = modules.get(str(node.target)) if node.op == "call_module" else None
        if target is not None and isinstance(target, weighted):
            if target not in found:
                found.append(target)
            continue
        stack.extend(_node_args(node))
    return found


def _node_args(node: Any) -> list[Any]:
    out: list[Any] = []

    def visit(value: Any) -> None:
        if hasattr(value, "op") and hasattr(value, "target"):
            out.append(value)
        elif isinstance(value, (tuple, list)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    visit(node.args)
    visit(node.kwargs)
    return out


def prune_channels(module: Any, example: Sequence[Any], ratio: float, expected: Sequence[tuple[int, ...]]) -> Any:
    """Remove ``ratio`` of the channels of every prunable layer (L2-magnitude importance, one shot),
    in place; returns the module. Raises ConversionError when the result would not be valid."""
    torch, _, tp = load_torch()
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruning ratio {ratio} is outside (0, 1)")
    module.eval()
    try:
        pruner = tp.pruner.MetaPruner(
            module,
            tuple(example),
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=output_layers(module),
            round_to=4,  # channel counts that vector kernels like
        )
        with torch.no_grad():
            pruner.step()
    except Exception as exc:  # Torch-Pruning cannot trace some graphs (data-dependent reshapes)
        raise ConversionError(f"Torch-Pruning cannot prune this graph: {str(exc).strip()[:200]}") from exc
    check_runs(module, example, expected, f"the {ratio:.0%}-pruned network")
    return module
