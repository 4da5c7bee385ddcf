"""The accuracy gate: a candidate ships only if it stays within budget of the fp32 reference.

A gate compares a candidate's outputs with the fp32 source's on held-out samples, with a metric that
fits the task. Each agreement metric is the minimum over outputs of a mean over samples (one bad
output head must not hide behind a good one), 1.0 for outputs identical to fp32, and passes at
``--budget`` or above:

- ``cosine`` (the default): per-sample cosine similarity of the output tensor;
- ``top1``: the argmax over the last axis agrees (classification);
- ``seq-argmax``: the argmax sequence over the last axis, with repeats and the blank collapsed (CTC
  text, per-frame labels), read as a string: 1 - edits / reference length over the gate set, i.e.
  1 - CER against fp32's reading. The blank is the class fp32 predicts most often. (Whole-sequence
  agreement would make a 0.99 budget on 32 lines mean "no character may change".)
- ``mask-iou`` (``mask-iou@0.3`` for another threshold than 0.5): IoU of the maps thresholded
  (segmentation and detection probability maps);
- ``rel-l2``: 1 - ||candidate - fp32|| / ||fp32|| per sample (regression, embeddings, states).

``accuracy`` is a labelled metric instead: top-1 accuracy of the first output against
``--eval-labels``, where ``--budget`` is the largest drop allowed (0.01 is one point, as Intel
Neural Compressor and NNCF define it). A user eval function (``--eval``) with ``--max-drop`` works the
same way on any task score it computes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

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


AGREEMENT_METRICS = ("cosine", "top1", "seq-argmax", "mask-iou", "rel-l2")
LABELLED_METRICS = ("accuracy",)
METRICS = AGREEMENT_METRICS + LABELLED_METRICS
LABELS_KEY = "__labels__"  # where --eval-labels sit in a Dataset's extra arrays


def parse_metric(text: str) -> tuple[str, float]:
    """``mask-iou@0.3`` -> ("mask-iou", 0.3); other metrics take no parameter."""
    name, _, arg = text.strip().partition("@")
    if name not in METRICS:
        raise CompileError(f"--metric '{text}' is unknown; pass one of {', '.join(METRICS)} (mask-iou@T sets T)")
    if arg and name != "mask-iou":
        raise CompileError(f"--metric {name} takes no '@' parameter; only mask-iou@THRESHOLD does")
    try:
        threshold = float(arg) if arg else 0.5
    except ValueError:
        raise CompileError(f"--metric '{text}': the threshold after '@' must be a number such as 0.5") from None
    return name, threshold


def _pairs(
    reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    if set(candidate) != set(reference) and len(candidate) == len(reference):
        # Converters rename outputs (TFLite's StatefulPartitionedCall:0); order is what they keep.
        candidate = dict(zip(reference, candidate.values(), strict=True))
    pairs = []
    for name, ref in reference.items():
        got = candidate.get(name)
        if got is None or np.shape(ref) != np.shape(got):
            return None
        pairs.append((np.asarray(ref), np.asarray(got)))
    return pairs


def _per_sample(a: np.ndarray) -> np.ndarray:
    n = a.shape[0] if a.ndim > 1 else 1
    return a.reshape(n, -1)


def _char_agreement(reference: list[tuple[int, ...]], candidate: list[tuple[int, ...]]) -> float:
    """1 - total edit distance / total reference length (1 - CER), clipped to [0, 1]."""
    from rapidfuzz.distance import Levenshtein

    edits = sum(Levenshtein.distance(r, c) for r, c in zip(reference, candidate, strict=True))
    length = sum(len(r) for r in reference)
    if length == 0:
        return 1.0 if edits == 0 else 0.0
    return max(0.0, 1.0 - edits / length)


def _collapse(seq: np.ndarray, blank: int) -> tuple[int, ...]:
    keep = np.ones(seq.shape, dtype=bool)
    keep[1:] = seq[1:] != seq[:-1]
    return tuple(int(v) for v in seq[keep] if v != blank)


def agreement(metric: str, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
              threshold: float = 0.5) -> float:
    """How closely a candidate's outputs follow fp32's under ``metric``: 1.0 is identical."""
    if metric == "cosine":
        return fidelity(reference, candidate)
    pairs = _pairs(reference, candidate)
    if pairs is None:
        return 0.0
    scores = []
    for ref, got in pairs:
        if ref.dtype.kind in "iub" or ref.ndim == 0:
            scores.append(float(np.mean(ref == got)) if ref.size else 1.0)
            continue
        if not np.all(np.isfinite(got)):
            return 0.0
        if metric == "top1":
            scores.append(float(np.mean(np.argmax(ref, axis=-1) == np.argmax(got, axis=-1))))
        elif metric == "seq-argmax":
            r, g = np.argmax(ref, axis=-1), np.argmax(got, axis=-1)
            if r.ndim < 2:  # one sequence per sample is needed; a [N, C] output is top-1 per sample
                scores.append(float(np.mean(r == g)))
                continue
            r, g = r.reshape(r.shape[0], -1), g.reshape(g.shape[0], -1)
            blank = int(np.bincount(r.ravel()).argmax())
            scores.append(_char_agreement([_collapse(a, blank) for a in r], [_collapse(b, blank) for b in g]))
        elif metric == "mask-iou":
            r, g = _per_sample(ref) > threshold, _per_sample(got) > threshold
            inter, union = np.sum(r & g, axis=1), np.sum(r | g, axis=1)
            scores.append(float(np.mean(np.where(union == 0, 1.0, inter / np.maximum(union, 1)))))
        elif metric == "rel-l2":
            r, g = _per_sample(ref).astype(np.float64), _per_sample(got).astype(np.float64)
            norm = np.linalg.norm(r, axis=1)
            err = np.linalg.norm(g - r, axis=1) / np.where(norm == 0, 1.0, norm)
            scores.append(float(np.mean(np.clip(1.0 - err, 0.0, 1.0))))
        else:
            raise CompileError(f"metric '{metric}' does not compare against fp32; use --eval-labels with it")
    return min(scores) if scores else 1.0


def labelled_accuracy(outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy of the first output's argmax over its last axis against integer labels."""
    first = np.asarray(next(iter(outputs.values())))
    predicted = np.argmax(first, axis=-1).reshape(labels.shape[0], -1)
    want = labels.reshape(labels.shape[0], -1)
    if predicted.shape != want.shape:
        raise CompileError(
            f"--eval-labels has shape {tuple(labels.shape)} but the model's first output gives predictions of "
            f"shape {tuple(predicted.shape)}; store one integer class per sample (or per position)"
        )
    return float(np.mean(predicted == want))


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
    """An agreement metric against fp32 with a budget, or a task score (labels, or a user eval function)
    with a maximum drop against fp32's own score."""

    budget: float = 0.99
    eval_fn: EvalFn | None = None
    max_drop: float = 0.01
    metric: str = "cosine"

    def __post_init__(self) -> None:
        name, threshold = parse_metric(self.metric)
        object.__setattr__(self, "metric_name", name)
        object.__setattr__(self, "threshold", threshold)
        if name == "accuracy":
            if not 0.0 <= self.budget < 0.5:
                raise CompileError(
                    f"--budget {self.budget} with --metric accuracy is the largest accuracy drop allowed; "
                    "pass a drop such as 0.01 (one point)"
                )
        elif not 0.0 < self.budget <= 1.0:
            raise CompileError(f"--budget {self.budget} is outside (0, 1]; pass an agreement such as 0.99")
        if self.max_drop < 0:
            raise CompileError(f"--max-drop {self.max_drop} is negative; pass the allowed score drop, such as 0.01")
        if self.eval_fn is not None and name == "accuracy":
            raise CompileError("--eval and --metric accuracy both score the task; pass one of them")

    metric_name: str = field(init=False, default="cosine")  # set from ``metric`` in __post_init__
    threshold: float = field(init=False, default=0.5)

    @property
    def labelled(self) -> bool:
        return self.metric_name in LABELLED_METRICS

    @property
    def allowed_drop(self) -> float:
        """How far the gated score may fall below fp32's: what accuracy-aware search is held to."""
        if self.eval_fn is not None:
            return self.max_drop
        return self.budget if self.labelled else 1.0 - self.budget

    def describe(self) -> dict[str, object]:
        if self.eval_fn is not None:
            return {
                "kind": "task-score",
                "max_drop": self.max_drop,
                "budget": self.budget,
                "eval": f"{getattr(self.eval_fn, '__module__', '?')}:{getattr(self.eval_fn, '__name__', '?')}",
            }
        if self.labelled:
            return {"kind": "labelled", "metric": self.metric, "max_drop": self.budget}
        return {"kind": "agreement", "metric": self.metric, "budget": self.budget}

    def agreement(self, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> float:
        metric = "cosine" if self.labelled else self.metric_name
        return agreement(metric, reference, candidate, self.threshold)

    def score(self, outputs: Mapping[str, np.ndarray], data: Mapping[str, np.ndarray]) -> float | None:
        """The task score, where the gate has one (labels or --eval); None for agreement gates."""
        if self.labelled:
            labels = data.get(LABELS_KEY)
            if labels is None:
                raise CompileError("--metric accuracy needs labels; pass --eval-labels LABELS.npz")
            return labelled_accuracy(outputs, np.asarray(labels))
        if self.eval_fn is None:
            return None
        try:
            return float(self.eval_fn(outputs, data))
        except Exception as exc:
            raise CompileError(
                f"--eval function failed ({type(exc).__name__}: {str(exc)[:120]}); fix it so "
                "it takes (outputs, data) and returns a float"
            ) from exc

    def passes(self, agreement_value: float, score: float | None, ref_score: float | None) -> bool:
        if score is not None and ref_score is not None:
            return (ref_score - score) <= self.allowed_drop + 1e-12
        return agreement_value >= self.budget
