"""Knowledge distillation: a pruned or smaller network learns to give the source model's outputs.

No labels: the targets are the fp32 source's own outputs on the user's data (calibration samples
plus any --retrain-data), so the student learns the function the gate will compare it with. When
labels came with the data (--eval-labels), a cross-entropy term on them joins the loss.

With the source converted to PyTorch (``teacher``), each batch is also mixed (mixup: a random
blend of two samples, the same blend for every input) and the teacher labels the blend on the
spot: a few hundred unlabeled samples then teach far more than their own outputs, which is what
lets a pruned network recover on the little data a user has. Without it (a --student for a model
the converter cannot read), the targets are the source's outputs, computed once by onnxruntime.

The loss is the mean squared error of each output, divided by that output's variance over the
teacher's outputs: scale-free, so logits, probability maps and CTC frames weigh alike. An output
that is a probability distribution (a softmax: non-negative, summing to one along an axis) is
compared as one instead, by KL divergence: squared errors of saturated probabilities have almost
no gradient, and a pruned classifier would not learn back.

Training is seeded (weights' shuffles, batch order) and stops at the time budget or at
``max_epochs``, whichever comes first; the weights kept are those with the lowest loss on a held-out
slice of the training data, measured before training too, so fine-tuning never leaves a network
worse than it started.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefleet.controller.compiler.retrain.convert import as_tuple
from edgefleet.controller.compiler.retrain.torch_env import load_torch

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TrainSettings:
    budget_s: float
    max_epochs: int = 30
    batch_size: int = 32
    mixup: float = 0.4  # Beta(a, a) blend weights; 0 turns mixing off
    lr: float = 1e-3
    seed: int = 0
    val_fraction: float = 0.15
    label_weight: float = 0.5


@dataclass
class TrainResult:
    epochs: float = 0.0  # whole epochs done, plus the share of the one the budget cut
    train_s: float = 0.0
    stopped: str = ""  # "budget" | "max_epochs"
    # Held-out distillation loss: index 0 before training, then after each epoch.
    val_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0

    @property
    def best_loss(self) -> float:
        return min(self.val_loss) if self.val_loss else math.nan


def distill(
    module: Any,
    inputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    settings: TrainSettings,
    *,
    labels: np.ndarray | None = None,
    teacher: Any = None,
    name: str = "student",
    progress: Progress | None = None,
) -> TrainResult:
    """Train ``module`` in place towards ``targets`` (the teacher's outputs, samples on axis 0)."""
    torch, _, _ = load_torch()
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    n = int(inputs[0].shape[0])
    order = rng.permutation(n)
    n_val = max(1, round(n * settings.val_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]
    xs = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
    ts = [torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32)) for t in targets]
    scale = [float(t[train_idx].var()) + 1e-8 for t in ts]
    simplex = [_distribution_axis(t.numpy()) for t in ts]

    def term(out: Any, want: Any, s: float, axis: int | None) -> Any:
        if axis is None:
            return ((out - want) ** 2).mean() / s
        eps = 1e-7
        kl = want * (torch.log(want.clamp_min(eps)) - torch.log(out.clamp_min(eps)))
        return kl.sum(dim=axis).mean()
    ys = torch.from_numpy(labels.astype(np.int64)) if labels is not None else None
    mixing = teacher is not None and settings.mixup > 0 and all(x.dtype.is_floating_point for x in xs)
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    def loss_of(idx: np.ndarray, mix: bool = False) -> Any:
        index = torch.from_numpy(idx)
        batch = [x[index] for x in xs]
        wanted = [t[index] for t in ts]
        if mix:
            lam = float(rng.beta(settings.mixup, settings.mixup))
            other = torch.from_numpy(rng.permutation(len(idx)))
            batch = [lam * b + (1 - lam) * b[other] for b in batch]
            with torch.no_grad():
                wanted = list(as_tuple(teacher(*batch)))
        outs = as_tuple(module(*batch))
        loss = sum(term(o, t, s, a) for o, t, s, a in zip(outs, wanted, scale, simplex, strict=True))
        if ys is not None and not mix and outs[0].ndim == 2 and ys.ndim == 1:
            loss = loss + settings.label_weight * torch.nn.functional.cross_entropy(outs[0], ys[index])
        return loss

    def val_loss() -> float:
        module.eval()
        with torch.no_grad():
            total = sum(float(loss_of(val_idx[i : i + 64])) * len(val_idx[i : i + 64])
                        for i in range(0, len(val_idx), 64))
        return total / len(val_idx)

    result = TrainResult()
    result.val_loss.append(round(val_loss(), 6))
    best_state = copy.deepcopy(module.state_dict())
    optimizer = torch.optim.Adam(module.parameters(), lr=settings.lr)
    batches = max(1, math.ceil(len(train_idx) / settings.batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.max_epochs * batches)
    started = time.monotonic()
    deadline = started + settings.budget_s
    result.stopped = "max_epochs"
    for epoch in range(1, settings.max_epochs + 1):
        module.train()
        shuffled = rng.permutation(train_idx)
        done, running = 0, 0.0
        for b in range(batches):
            idx = shuffled[b * settings.batch_size : (b + 1) * settings.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on one sample
                continue
            optimizer.zero_grad()
            # Half the batches are mixed, half are the samples as they are (their labels, if any, count).
            loss = loss_of(idx, mix=mixing and b % 2 == 1)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += float(loss.detach())
            done += 1
            if time.monotonic() >= deadline:
                result.stopped = "budget"
                break
        result.epochs = epoch - 1 + done / batches
        result.train_loss.append(round(running / max(done, 1), 6))
        result.val_loss.append(round(val_loss(), 6))
        if result.val_loss[-1] < min(result.val_loss[:-1]):
            best_state = copy.deepcopy(module.state_dict())
            result.best_epoch = epoch
        elapsed = time.monotonic() - started
        if progress is not None:
            progress(_bar(name, epoch, settings.max_epochs, elapsed, deadline - time.monotonic(),
                          result.val_loss[-1], result.best_loss))
        if result.stopped == "budget":
            break
    module.load_state_dict(best_state)
    module.eval()
    result.train_s = round(time.monotonic() - started, 2)
    return result


def _distribution_axis(values: np.ndarray) -> int | None:
    """The axis along which every sample's output is a probability distribution, if one is."""
    if values.ndim < 2 or values.size == 0 or float(values.min()) < 0:
        return None
    for axis in (1, values.ndim - 1):
        if values.shape[axis] > 1 and np.allclose(values.sum(axis=axis), 1.0, atol=1e-3):
            return axis
    return None


def _bar(name: str, epoch: int, epochs: int, elapsed: float, left_s: float, loss: float, best: float) -> str:
    """One progress line per epoch: a bar, the loss, and the ETA (epochs left at this pace, or the
    budget, whichever ends first)."""
    eta = min(elapsed / epoch * (epochs - epoch), max(left_s, 0.0))
    width = 20
    filled = round(width * epoch / epochs)
    return (f"    retrain {name} [{'#' * filled}{'.' * (width - filled)}] epoch {epoch}/{epochs} "
            f"loss {loss:.5f} (best {best:.5f}) {elapsed:.0f}s, eta {eta:.0f}s")
