"""Task metrics for ``edgefleet compile --eval``: fn(outputs, data) -> float, higher is better."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def top1(outputs: Mapping[str, np.ndarray], data: Mapping[str, np.ndarray]) -> float:
    """Classification accuracy of the first output against ``data['labels']``."""
    logits = next(iter(outputs.values()))
    return float(np.mean(np.argmax(logits, axis=-1) == data["labels"]))


def ctc_greedy(logits: np.ndarray, blank: int = 0) -> list[list[int]]:
    """Greedy CTC decode of (N, T, C) scores: best class per step, merge repeats, drop blanks."""
    best = np.argmax(logits, axis=-1)
    out = []
    for row in best:
        seq, prev = [], -1
        for c in row:
            if c != prev and c != blank:
                seq.append(int(c))
            prev = c
        out.append(seq)
    return out


def sequence_accuracy(outputs: Mapping[str, np.ndarray], data: Mapping[str, np.ndarray]) -> float:
    """Share of images whose whole digit string is read exactly (labels are digits + 1; 0 is blank)."""
    logits = next(iter(outputs.values()))
    decoded = ctc_greedy(logits)
    return float(np.mean([d == list(lab) for d, lab in zip(decoded, data["labels"], strict=True)]))
