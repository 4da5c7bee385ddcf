"""The accuracy gate: a candidate ships only if it stays within budget of the fp32 reference.

Default: the minimum over outputs of the mean per-sample cosine similarity to fp32 (one bad output
head must not hide behind a good one). With a user eval function, the task-score drop decides.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from edgefleet.controller.compiler.errors import CompileError

EvalFn = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], float]


def fidelity(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> float:
    """min over outputs of mean per-sample cosine; integer outputs count exact agreement instead."""
    scores = []
    if set(candidate) != set(reference) and len(candidate) == len(reference):
        # Converters rename outputs (TFLite's StatefulPartitionedCall:0); order is what they keep.
        candidate = dict(zip(reference, candidate.values(), strict=True))
    for name, ref in reference.items():
        got = candidate.get(name)
        if got is None:
            return 0.0
        ref_a, got_a = np.asarray(ref), np.asarray(got)
        if ref_a.shape != got_a.shape:
            return 0.0
        if ref_a.dtype.kind in "iub":
            scores.append(float(np.mean(ref_a == got_a)) if ref_a.size else 1.0)
            continue
        n = ref_a.shape[0] if ref_a.ndim > 1 else 1
        r = ref_a.reshape(n, -1).astype(np.float64)
        c = got_a.reshape(n, -1).astype(np.float64)
        if not np.all(np.isfinite(c)):
            return 0.0
        nr, nc = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
        both_zero = (nr == 0) & (nc == 0)
        denom = np.where(nr * nc == 0, 1.0, nr * nc)
        cos = np.where(both_zero, 1.0, np.sum(r * c, axis=1) / denom)
        scores.append(float(np.mean(cos)))
    return min(scores) if scores else 1.0


def load_eval_fn(spec: str) -> EvalFn:
    """``pkg.mod:fn`` -> callable(outputs, data) -> float (higher is better)."""
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise CompileError(f"--eval '{spec}' is not MODULE:FUNCTION; write it like mypkg.metrics:top1")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise CompileError(
            f"--eval module '{mod_name}' cannot be imported ({exc}); make it importable "
            "(install it or add its folder to PYTHONPATH)"
        ) from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise CompileError(
            f"--eval module '{mod_name}' has no function '{fn_name}'; define {fn_name}(outputs, data) -> float"
        )
    return fn


@dataclass(frozen=True)
class Gate:
    """Cosine budget, or a task-score eval function with a maximum drop."""

    budget: float = 0.99
    eval_fn: EvalFn | None = None
    max_drop: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise CompileError(f"--budget {self.budget} is outside (0, 1]; pass a cosine similarity such as 0.99")
        if self.max_drop < 0:
            raise CompileError(f"--max-drop {self.max_drop} is negative; pass the allowed score drop, such as 0.01")

    def describe(self) -> dict[str, object]:
        if self.eval_fn is not None:
            return {
                "kind": "task-score",
                "max_drop": self.max_drop,
                "budget": self.budget,
                "eval": f"{getattr(self.eval_fn, '__module__', '?')}:{getattr(self.eval_fn, '__name__', '?')}",
            }
        return {"kind": "cosine", "budget": self.budget}

    def score(self, outputs: Mapping[str, np.ndarray], data: Mapping[str, np.ndarray]) -> float | None:
        if self.eval_fn is None:
            return None
        try:
            return float(self.eval_fn(outputs, data))
        except Exception as exc:
            raise CompileError(
                f"--eval function failed ({type(exc).__name__}: {str(exc)[:120]}); fix it so "
                "it takes (outputs, data) and returns a float"
            ) from exc

    def passes(self, fid: float, score: float | None, ref_score: float | None) -> bool:
        if self.eval_fn is not None and score is not None and ref_score is not None:
            return (ref_score - score) <= self.max_drop + 1e-12
        return fid >= self.budget
