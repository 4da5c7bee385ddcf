"""Calibration and gate data: loading, checking, splitting.

Realistic data decides whether int8 is safe; random data flatters it. So the data is checked hard
(names, shapes, NaN) before any compile work, and a held-out part of it is kept for the gate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.controller.compiler.errors import CompileError
from edgefleet.controller.compiler.model_io import TensorSpec


@dataclass(frozen=True)
class Dataset:
    """Arrays keyed by name, samples on axis 0; ``extra`` holds non-input arrays such as labels."""

    inputs: dict[str, np.ndarray]
    extra: dict[str, np.ndarray]
    source: str

    @property
    def count(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, index: np.ndarray | slice) -> Dataset:
        return Dataset(
            {k: v[index] for k, v in self.inputs.items()},
            {k: v[index] for k, v in self.extra.items()},
            self.source,
        )

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for key in sorted(self.inputs) + sorted(self.extra):
            arr = self.inputs.get(key, self.extra.get(key))
            assert arr is not None
            digest.update(key.encode())
            digest.update(str(arr.dtype).encode() + str(arr.shape).encode())
            digest.update(np.ascontiguousarray(arr).tobytes())
        return digest.hexdigest()


def load_npz(
    path: Path,
    inputs: tuple[TensorSpec, ...],
    *,
    flag: str,
    shape_overrides: dict[str, tuple[int, ...]] | None = None,
) -> Dataset:
    """Load an .npz and check it against the model inputs; every failure names the fix."""
    path = Path(path)
    if not path.is_file():
        raise CompileError(f"{flag} file {path} does not exist; pass an .npz with one array per model input")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in npz.files}
    except Exception as exc:
        raise CompileError(
            f"cannot read {flag} {path.name} as .npz ({str(exc).splitlines()[0][:120]}); "
            "save it with numpy.savez(path, **{input_name: samples})"
        ) from exc
    names = [spec.name for spec in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        found = ", ".join(f"'{k}'" for k in sorted(arrays)) or "none"
        raise CompileError(
            f"{flag} file has no array for input '{missing[0]}' (found: {found}); pass {flag} with keys "
            f"named after the model inputs ({', '.join(repr(n) for n in names)})"
        )
    overrides = shape_overrides or {}
    counts = set()
    for spec in inputs:
        arr = arrays[spec.name]
        want = overrides.get(spec.name, spec.shape)
        if arr.ndim != len(want):
            raise CompileError(
                f"{flag} array '{spec.name}' has shape {tuple(arr.shape)} but the input expects rank "
                f"{len(want)} ({_fmt(want)} with samples on axis 0); save samples as N x {_fmt(want[1:])}"
            )
        for axis, (got, exp) in enumerate(zip(arr.shape[1:], want[1:], strict=True), start=1):
            if isinstance(exp, int) and exp > 0 and got != exp:
                raise CompileError(
                    f"{flag} array '{spec.name}' has sample shape {tuple(arr.shape[1:])} but the model input "
                    f"is {_fmt(want)} (axis {axis}: {got} != {exp}); resize the samples or pass "
                    f"--input-shape {spec.name}=..."
                )
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise CompileError(
                f"{flag} array '{spec.name}' holds {bad} NaN/Inf values; clean the data "
                "(drop or impute those samples) before compiling"
            )
        if arr.dtype.kind not in "fiub":
            raise CompileError(f"{flag} array '{spec.name}' has dtype {arr.dtype}; store numeric samples")
        counts.add(arr.shape[0])
    if len(counts) != 1 or 0 in counts:
        raise CompileError(
            f"{flag} arrays have different or zero sample counts {sorted(counts)}; "
            "store the same number of samples (axis 0) for every input"
        )
    n = counts.pop()
    extra = {k: v for k, v in arrays.items() if k not in names and v.ndim >= 1 and v.shape[0] == n}
    ins = {spec.name: arrays[spec.name].astype(_np_dtype(spec.dtype), copy=False) for spec in inputs}
    return Dataset(ins, extra, f"{flag}:{path.name}")


def _np_dtype(dtype: str) -> np.dtype:
    try:
        return np.dtype(dtype)
    except TypeError:
        return np.dtype(np.float32)


def _fmt(shape: tuple[object, ...]) -> str:
    return "[" + ",".join(str(d) if isinstance(d, int) else str(d or "?") for d in shape) + "]"


def split_holdout(data: Dataset, fraction: float = 0.25, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Calibration part and held-out gate part of one data set (shuffled, deterministic)."""
    n = data.count
    if n < 2:
        raise CompileError(
            f"{data.source} holds {n} sample; the gate needs held-out samples: pass at least "
            "8 calibration samples or a separate --eval-data"
        )
    order = np.random.default_rng(seed).permutation(n)
    n_gate = max(1, round(n * fraction))
    return data.take(np.sort(order[n_gate:])), data.take(np.sort(order[:n_gate]))


def synthetic(inputs: tuple[TensorSpec, ...], shapes: dict[str, tuple[int, ...]], count: int, seed: int = 0) -> Dataset:
    """Random inputs, used only when no data was given; the report says the gate is synthetic."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = shapes[spec.name]
        dtype = _np_dtype(spec.dtype)
        if dtype.kind == "f":
            arr = rng.standard_normal((count, *shape[1:])).astype(dtype)
        else:
            arr = rng.integers(0, 2, (count, *shape[1:])).astype(dtype)
        arrays[spec.name] = arr
    return Dataset(arrays, {}, "synthetic")
