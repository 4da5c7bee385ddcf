"""Train and export the compiler benchmark models (torch is used here only, never by the compiler).

Three models of real shape, trained on data scikit-learn ships (its 8x8 digits):

- ``digits_cnn``: a 4-conv classifier on digits upscaled to 32x32, exported at opset 12 with a
  dynamic batch dim, as real exports arrive;
- ``digits_crnn``: a conv + bidirectional-LSTM sequence recognizer trained with CTC on lines of five
  digits rendered side by side with random gaps (a text-line recognizer in miniature);
- ``digits_transformer``: a 2-layer transformer encoder reading each digit (upscaled to 16x16) as 64
  tokens of 2x2-pixel patches.

Each folder gets ``model.onnx``, ``calib.npz`` (training images), ``eval.npz`` (held-out images plus
``labels``) and ``meta.json`` (fp32 task accuracy as trained). Run: python -m tests.models.bench_models DIR
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SEED = 0


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(x))
    train, test = order[:1300], order[1300:]
    return x[train], y[train], x[test], y[test]


def _upscale(images: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(images[:, None])
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False).numpy()


def _fit(
    model: Any, batches: Callable[[], list[tuple[Any, Any]]], epochs: int, lr: float, loss_fn: Callable[[Any, Any], Any]
) -> None:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(batches()))
    model.train()
    for _ in range(epochs):
        for xb, yb in batches():
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def _batches(
    x: np.ndarray,
    y: np.ndarray,
    size: int,
    rng: np.random.Generator,
    augment: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Callable[[], list[tuple[Any, Any]]]:
    import torch

    def gen() -> list[tuple[Any, Any]]:
        order = rng.permutation(len(x))
        out = []
        for i in range(0, len(x), size):
            idx = order[i : i + size]
            xb = x[idx]
            if augment is not None:
                xb = augment(xb)
            out.append((torch.from_numpy(xb), torch.from_numpy(y[idx]) if y.dtype != object else y[idx]))
        return out

    return gen


def _shift(rng: np.random.Generator, pixels: int) -> Callable[[np.ndarray], np.ndarray]:
    def aug(xb: np.ndarray) -> np.ndarray:
        out = np.empty_like(xb)
        for i, img in enumerate(xb):
            dy, dx = rng.integers(-pixels, pixels + 1, 2)
            out[i] = np.roll(img, (int(dy), int(dx)), axis=(-2, -1))
        return out

    return aug


def _export(model: Any, example: Any, path: Path, opset: int, dynamic_batch: bool = True) -> None:
    import torch

    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None,
    )


def _accuracy_onnx(path: Path, x: np.ndarray, fn: Callable[..., float], labels: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = np.concatenate([sess.run(None, {"images": x[i : i + 64]})[0] for i in range(0, len(x), 64)])
    return float(fn({"logits": out}, {"labels": labels}))


def build_cnn(out: Path) -> dict[str, float]:
    import torch
    from torch import nn

    from tests.models.metrics import top1

    torch.manual_seed(SEED)
    xtr, ytr, xte, yte = _digits()
    xtr, xte = _upscale(xtr, 32), _upscale(xte, 32)

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    model = nn.Sequential(
        *block(1, 32),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 128),
        nn.MaxPool2d(2),
        *block(128, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )
    rng = np.random.default_rng(SEED)
    _fit(model, _batches(xtr, ytr, 64, rng, _shift(rng, 2)), 8, 3e-3, nn.CrossEntropyLoss())
    path = out / "model.onnx"
    _export(model, torch.from_numpy(xte[:1]), path, opset=12)
    np.savez(out / "calib.npz", images=xtr[:256])
    np.savez(out / "eval.npz", images=xte, labels=yte)
    return {"fp32_accuracy": _accuracy_onnx(path, xte, top1, yte)}


def _lines(
    images: np.ndarray,
    labels: np.ndarray,
    count: int,
    length: int,
    rng: np.random.Generator,
    size: int = 16,
    width: int = 96,
) -> tuple[np.ndarray, np.ndarray]:
    """Lines of ``length`` digits pasted left to right with random gaps and vertical jitter."""
    up = _upscale(images, size)[:, 0]
    canvas = np.zeros((count, 1, size + 4, width), np.float32)
    seqs = np.zeros((count, length), np.int64)
    for i in range(count):
        idx = rng.integers(0, len(up), length)
        gaps = rng.integers(0, max(1, (width - length * (size - 2)) // length), length)
        x = int(rng.integers(0, 3))
        for j, k in enumerate(idx):
            y = int(rng.integers(0, 5))
            x += int(gaps[j])
            w = min(size, width - x)
            if w <= 0:
                break
            canvas[i, 0, y : y + size, x : x + w] = np.maximum(canvas[i, 0, y : y + size, x : x + w], up[k, :, :w])
            x += size - 2
        seqs[i] = labels[idx] + 1
    return canvas, seqs


def build_crnn(out: Path) -> dict[str, float]:
    import torch
    from torch import nn

    from tests.models.metrics import sequence_accuracy

    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    xtr, ytr, xte, yte = _digits()
    length = 5
    tr_img, tr_seq = _lines(xtr, ytr, 6000, length, rng)
    te_img, te_seq = _lines(xte, yte, 400, length, rng)

    class CRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cnn = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1),
                nn.BatchNorm2d(32),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1),
                nn.BatchNorm2d(64),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(64, 128, 3, padding=1),
                nn.BatchNorm2d(128),
                nn.ReLU(),
                nn.MaxPool2d((5, 1)),
            )
            self.rnn = nn.LSTM(128, 128, batch_first=True, bidirectional=True)
            self.head = nn.Linear(256, 11)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.cnn(x)  # N, 128, 1, W/4
            f = f.squeeze(2).permute(0, 2, 1)  # N, T, 128
            h, _ = self.rnn(f)
            return self.head(h)  # N, T, 11 (0 = CTC blank)

    model = CRNN()
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = logits.log_softmax(-1).permute(1, 0, 2)
        n, t = logits.shape[0], logits.shape[1]
        return ctc(logp, targets, torch.full((n,), t, dtype=torch.long), torch.full((n,), length, dtype=torch.long))

    _fit(model, _batches(tr_img, tr_seq, 64, rng), 6, 3e-3, loss_fn)
    path = out / "model.onnx"
    _export(model, torch.from_numpy(te_img[:1]), path, opset=12)
    np.savez(out / "calib.npz", images=tr_img[:256])
    np.savez(out / "eval.npz", images=te_img, labels=te_seq)
    return {"fp32_accuracy": _accuracy_onnx(path, te_img, sequence_accuracy, te_seq)}


def build_transformer(out: Path) -> dict[str, float]:
    import torch
    from torch import nn

    from tests.models.metrics import top1

    torch.manual_seed(SEED)
    xtr, ytr, xte, yte = _digits()

    def patches(images: np.ndarray) -> np.ndarray:
        """16x16 upscaled digits cut into 64 patches of 2x2 pixels: (N, 64 tokens, 4 features)."""
        up = _upscale(images, 16)[:, 0]
        return up.reshape(-1, 8, 2, 8, 2).transpose(0, 1, 3, 2, 4).reshape(-1, 64, 4).copy()

    xtr, xte = patches(xtr), patches(xte)

    class Encoder(nn.Module):
        def __init__(self, d: int = 128) -> None:
            super().__init__()
            self.embed = nn.Linear(4, d)
            self.pos = nn.Parameter(torch.randn(1, 64, d) * 0.02)
            layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.encoder(self.embed(x) + self.pos)
            return self.head(self.norm(h.mean(dim=1)))

    model = Encoder()
    rng = np.random.default_rng(SEED)
    _fit(model, _batches(xtr, ytr, 64, rng), 40, 1e-3, nn.CrossEntropyLoss())
    path = out / "model.onnx"
    _export(model, torch.from_numpy(xte[:1]), path, opset=14)
    np.savez(out / "calib.npz", images=xtr[:256])
    np.savez(out / "eval.npz", images=xte, labels=yte)
    return {"fp32_accuracy": _accuracy_onnx(path, xte, top1, yte)}


BUILDERS = {"digits_cnn": build_cnn, "digits_crnn": build_crnn, "digits_transformer": build_transformer}


def build_all(root: Path, only: list[str] | None = None) -> dict[str, Path]:
    """Build the models that are not there yet; returns name -> folder."""
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    folders = {}
    for name, builder in BUILDERS.items():
        if only and name not in only:
            continue
        folder = root / name
        if not (folder / "meta.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            meta = builder(folder)
            meta["train_s"] = round(time.monotonic() - t0, 1)
            (folder / "meta.json").write_text(json.dumps(meta, indent=2))
            print(f"{name}: {meta}", file=sys.stderr)
        folders[name] = folder
    return folders


if __name__ == "__main__":
    build_all(Path(sys.argv[1]), sys.argv[2:] or None)
