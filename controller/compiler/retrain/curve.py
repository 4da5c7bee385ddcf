"""The distillation loss curve as a small PNG next to report.json (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_loss_curve(path: Path, name: str, val_loss: Sequence[float], train_loss: Sequence[float]) -> Path | None:
    """Writes ``path``; None when matplotlib is missing (the numbers are in the report either way)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(4, 2.6), dpi=80)
    try:
        ax.plot(range(len(val_loss)), val_loss, marker="o", markersize=3, label="held-out")
        if train_loss:
            ax.plot(range(1, len(train_loss) + 1), train_loss, linestyle="--", label="train")
        ax.set_xlabel("epoch")
        ax.set_ylabel("distillation loss")
        ax.set_title(name, fontsize=9)
        if min([*val_loss, *train_loss], default=1.0) > 0:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.partial")
        fig.savefig(tmp, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
    return path
