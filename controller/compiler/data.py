"""Calibration and gate data: loading, checking, splitting.

Realistic data decides whether int8 is safe; random data flatters it. So the data is checked hard
(names, shapes, NaN) before any compile work, and a held-out part of it is kept for the gate.

Users store samples the way their model takes them, not always on axis 0: a recurrent state is
``[2, batch, 128]``, a sample rate is a scalar. Each input array is read in one of three layouts
(:class:`InputLayout`) and normalized to "samples on axis 0"; the layout is kept so the model is
still fed in its own shapes (see :func:`model_sample`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from edgefleet.controller.compiler.errors import CompileError
from edgefleet.controller.compiler.model_io import Dim, TensorSpec


@dataclass(frozen=True)
class InputLayout:
    """How one input's samples were stored, and so how one sample is fed back to the model.

    ``batch`` with ``axis`` k: samples lie on the model's batch axis k (k = 0 is the usual layout);
    ``stacked``: every sample is a full model input and samples are stacked on a new leading axis.
    The normalized array has samples on axis 0 in both cases.
    """

    kind: Literal["batch", "stacked"] = "batch"
    axis: int = 0

    @property
    def is_default(self) -> bool:
        """Samples on the model's axis 0: the arrays can be sliced into batches as they are."""
        return self.kind == "batch" and self.axis == 0

    def describe(self) -> str:
        return "stacked" if self.kind == "stacked" else f"batch:{self.axis}"


BATCH0 = InputLayout()


class InputArrays(dict[str, np.ndarray]):
    """A Dataset's input arrays (samples on axis 0) that carry their layouts along.

    Callers that hand only ``dataset.inputs`` to the runner (the gate, measurement) still get the
    model fed in its own shapes; a plain dict means every input is in the usual layout.
    """

    layouts: dict[str, InputLayout]

    def __init__(self, arrays: Mapping[str, np.ndarray], layouts: Mapping[str, InputLayout] | None = None) -> None:
        super().__init__(arrays)
        self.layouts = {k: v for k, v in (layouts or {}).items() if k in arrays and not v.is_default}


@dataclass(frozen=True)
class Dataset:
    """Arrays keyed by name, samples on axis 0; ``extra`` holds non-input arrays such as labels.

    ``layouts`` says, per input, how a sample goes back into the model (absent: batch axis 0).
    """

    inputs: dict[str, np.ndarray]
    extra: dict[str, np.ndarray]
    source: str
    layouts: dict[str, InputLayout] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layouts = {k: v for k, v in self.layouts.items() if k in self.inputs and not v.is_default}
        object.__setattr__(self, "layouts", layouts)
        object.__setattr__(self, "inputs", InputArrays(self.inputs, layouts))

    @property
    def count(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    @property
    def batchable(self) -> bool:
        """Every input has samples on the model's axis 0, so slices of the arrays are model batches."""
        return not self.layouts

    def layout(self, name: str) -> InputLayout:
        return self.layouts.get(name, BATCH0)

    def take(self, index: np.ndarray | slice) -> Dataset:
        return Dataset(
            {k: v[index] for k, v in self.inputs.items()},
            {k: v[index] for k, v in self.extra.items()},
            self.source,
            dict(self.layouts),
        )

    def model_sample(self, index: int = 0) -> dict[str, np.ndarray]:
        """Sample ``index`` in the model's own shapes (batch of one): a golden input, a calibration feed."""
        return model_sample(self.inputs, self.layouts, index)

    def model_feeds(self, batch: int, limit: int | None = None) -> list[dict[str, np.ndarray]]:
        """Up to ``limit`` samples as feeds the model takes (for calibrators): slices of ``batch``
        samples when every input is batched on axis 0, else one sample per feed."""
        n = min(self.count, limit if limit is not None else self.count)
        if self.batchable:
            return [{k: v[start : start + batch] for k, v in self.inputs.items()} for start in range(0, n, batch)]
        return [self.model_sample(i) for i in range(n)]

    def sample_shape(self, name: str) -> tuple[int, ...]:
        """The shape the model sees for one sample of input ``name`` (what to fix dynamic dims to)."""
        return tuple(int(d) for d in model_sample({name: self.inputs[name]}, self.layouts, 0)[name].shape)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for key in sorted(self.inputs) + sorted(self.extra):
            arr = self.inputs.get(key, self.extra.get(key))
            assert arr is not None
            digest.update(key.encode())
            digest.update(str(arr.dtype).encode() + str(arr.shape).encode())
            if key in self.layouts:  # the usual layout hashes as before: existing cache keys stay valid
                digest.update(b"layout:" + self.layouts[key].describe().encode())
            digest.update(np.ascontiguousarray(arr).tobytes())
        return digest.hexdigest()


def layouts_of(
    data: Mapping[str, np.ndarray] | Dataset, layouts: Mapping[str, InputLayout] | None = None
) -> tuple[Mapping[str, np.ndarray], dict[str, InputLayout]]:
    """The arrays and their non-default layouts, from a Dataset, its ``inputs`` or a plain mapping."""
    if isinstance(data, Dataset):
        arrays: Mapping[str, np.ndarray] = data.inputs
        found: Mapping[str, InputLayout] = data.layouts
    else:
        arrays = data
        found = getattr(data, "layouts", None) or {}
    if layouts is not None:
        found = layouts
    return arrays, {k: v for k, v in found.items() if not v.is_default}


def sample_count(arrays: Mapping[str, np.ndarray]) -> int:
    """Samples in normalized arrays (axis 0 of any of them; load_npz made them agree)."""
    return int(next(iter(arrays.values())).shape[0])


def model_sample(
    arrays: Mapping[str, np.ndarray], layouts: Mapping[str, InputLayout], index: int
) -> dict[str, np.ndarray]:
    """One sample of every array, put back into the model's shape: the inverse of :func:`load_npz`."""
    feed: dict[str, np.ndarray] = {}
    for name, arr in arrays.items():
        layout = layouts.get(name, BATCH0)
        if layout.kind == "stacked":
            feed[name] = np.asarray(arr[index])  # a scalar input stays a 0-d array, not a numpy scalar
        else:
            feed[name] = np.moveaxis(arr[index : index + 1], 0, layout.axis)
    return feed


# -- reading an .npz against the model inputs ------------------------------------------------------


@dataclass(frozen=True)
class _Reading:
    """One way an array fits an input: where its samples are and how many there are."""

    layout: InputLayout
    count: int
    text: str
    demoted: bool = False  # a later axis when axis 0 also fits the model's dynamic batch: prefer axis 0


def _fits(got: tuple[int, ...], want: tuple[Dim, ...]) -> int | None:
    """First axis where a fixed model dim disagrees with the array, or None when all agree."""
    for axis, (g, w) in enumerate(zip(got, want, strict=True)):
        if isinstance(w, int) and w > 0 and g != w:
            return axis
    return None


def _dynamic(dim: Dim) -> bool:
    return not (isinstance(dim, int) and dim > 0)


def _readings(shape: tuple[int, ...], want: tuple[Dim, ...], model: tuple[Dim, ...]) -> list[_Reading]:
    """Every layout ``shape`` fits; ``want`` holds the sizes (overrides applied), ``model`` the
    source's dims (a batch axis other than 0 must be dynamic in the model)."""
    rank = len(want)
    out: list[_Reading] = []
    if len(shape) == rank + 1 and _fits(shape[1:], want) is None:
        text = f"{shape[0]} samples stacked on a new axis 0, each {_fmt(shape[1:])}"
        out.append(_Reading(InputLayout("stacked"), shape[0], text))
    if len(shape) == rank and rank >= 1:
        axis0 = _fits(shape[1:], want[1:]) is None
        if axis0:
            out.append(_Reading(BATCH0, shape[0], f"{shape[0]} samples on axis 0"))
        for axis in range(1, rank):
            if not _dynamic(model[axis]):
                continue
            rest = shape[:axis] + shape[axis + 1 :]
            if _fits(rest, want[:axis] + want[axis + 1 :]) is None:
                dim = f"'{model[axis]}'" if model[axis] else "dynamic"
                out.append(
                    _Reading(
                        InputLayout("batch", axis),
                        shape[axis],
                        f"{shape[axis]} samples on axis {axis} (the model's {dim} dim)",
                        demoted=axis0 and _dynamic(model[0]),
                    )
                )
    return out


def _no_fit(flag: str, name: str, shape: tuple[int, ...], want: tuple[Dim, ...]) -> CompileError:
    """The error for an array no layout fits, worded for the layout it came closest to."""
    rank = len(want)
    stacked_fix = f"np.stack(samples) with shape N x {_fmt(want)}"
    if len(shape) == rank and rank >= 1:
        axis = _fits(shape[1:], want[1:])
        assert axis is not None
        return CompileError(
            f"{flag} array '{name}' has sample shape {shape[1:]} but the model input is {_fmt(want)} "
            f"(axis {axis + 1}: {shape[axis + 1]} != {want[axis + 1]}); resize the samples, save them as "
            f"{stacked_fix}, or pass --input-shape {name}=..."
        )
    if len(shape) == rank + 1:
        axis = _fits(shape[1:], want)
        assert axis is not None
        return CompileError(
            f"{flag} array '{name}' has shape {shape} but the input expects rank {rank} ({_fmt(want)} with samples "
            f"on axis 0) or rank {rank + 1} (samples stacked on a new axis 0, each {_fmt(want)}, but axis {axis} of "
            f"a sample is {shape[axis + 1]} != {want[axis]}); resize the samples or pass --input-shape {name}=..."
        )
    if rank == 0:
        return CompileError(
            f"{flag} array '{name}' has shape {shape} but the input is a scalar; save one value per sample "
            f"as shape (N,), e.g. np.full(N, value)"
        )
    return CompileError(
        f"{flag} array '{name}' has shape {shape} but the input expects rank {rank} ({_fmt(want)} with samples "
        f"on axis 0) or rank {rank + 1} (samples stacked on a new axis 0); save samples as N x {_fmt(want[1:])} "
        f"or as {stacked_fix}"
    )


def _choose(flag: str, shapes: dict[str, tuple[int, ...]], readings: dict[str, list[_Reading]],
            wants: dict[str, tuple[Dim, ...]]) -> tuple[int, dict[str, _Reading]]:
    """The one sample count and reading per input that fit together; refuse when two do."""
    common = set.intersection(*({r.count for r in rs} for rs in readings.values()))
    if not common:
        told = "; ".join(
            f"'{name}' " + " or ".join(sorted({r.text for r in rs})) for name, rs in readings.items()
        )
        raise CompileError(
            f"{flag} arrays have different sample counts ({told}); store the same number of samples "
            "for every input"
        )
    solutions: list[tuple[int, int, dict[str, list[_Reading]]]] = []
    for n in sorted(common):
        score, picked = 0, {}
        for name, rs in readings.items():
            fit = [r for r in rs if r.count == n]
            best = min(r.demoted for r in fit)
            score += best
            picked[name] = [r for r in fit if r.demoted == best]
        solutions.append((score, n, picked))
    best_score = min(s for s, _, _ in solutions)
    top = [s for s in solutions if s[0] == best_score]
    if len(top) > 1:  # two sample counts fit every input equally well
        (_, _, first), (_, _, second) = top[:2]
        name = next(k for k in first if first[k][0].layout != second[k][0].layout)
        raise _ambiguous(flag, name, shapes[name], first[name][0], second[name][0], wants[name])
    _, n, picked = top[0]
    for name, rs in picked.items():
        if len(rs) > 1:
            raise _ambiguous(flag, name, shapes[name], rs[0], rs[1], wants[name])
    if n == 0:
        raise CompileError(f"{flag} arrays hold zero samples; store at least one sample for every input")
    return n, {name: rs[0] for name, rs in picked.items()}


def _ambiguous(
    flag: str, name: str, shape: tuple[int, ...], one: _Reading, other: _Reading, want: tuple[Dim, ...]
) -> CompileError:
    return CompileError(
        f"{flag} array '{name}' of shape {shape} reads as {one.text} or as {other.text}; save it as "
        f"np.stack(samples) with shape N x {_fmt(want)} (samples stacked on a new axis 0) to say which"
    )


def _check_one_sample_feed(
    flag: str,
    inputs: tuple[TensorSpec, ...],
    layouts: dict[str, InputLayout],
    shapes: dict[str, tuple[int, ...]],
    wants: dict[str, tuple[Dim, ...]],
) -> None:
    """Refuse readings that fit each input alone but cannot be fed together: a rollout would
    otherwise find out at build time, when the model first runs."""
    one_at_a_time = any(not layout.is_default for layout in layouts.values())
    sample: dict[str, tuple[int, ...]] = {}
    for spec in inputs:
        layout, shape, want = layouts[spec.name], shapes[spec.name], wants[spec.name]
        if layout.kind == "stacked":
            sample[spec.name] = shape[1:]
            continue
        fixed = want[0] if not _dynamic(want[0]) else None
        if one_at_a_time and layout.axis == 0 and fixed not in (None, 1):
            raise CompileError(
                f"{flag} array '{spec.name}' of shape {shape} reads as {shape[0]} samples on axis 0, but the "
                f"model's axis 0 is fixed at {fixed}, so it is not the batch axis; save it as np.stack(samples) "
                f"with shape N x {_fmt(want)} (samples stacked on a new axis 0)"
            )
        sample[spec.name] = (*shape[: layout.axis], 1, *shape[layout.axis + 1 :])
    seen: dict[str, tuple[str, int, int]] = {}  # symbolic dim -> (input, axis, size) first seen
    for spec in inputs:
        if len(spec.shape) != len(sample[spec.name]):
            continue
        for axis, (dim, size) in enumerate(zip(spec.shape, sample[spec.name], strict=True)):
            if not isinstance(dim, str) or not dim or dim == "?" or dim.startswith("unk__"):
                continue  # exporters write '?' or unk__N for a dim with no name: nothing to share
            first = seen.setdefault(dim, (spec.name, axis, size))
            if first[2] != size:
                raise CompileError(
                    f"{flag} arrays disagree on the model's '{dim}' dim: one sample of '{first[0]}' has "
                    f"{first[2]} on axis {first[1]} but one of '{spec.name}' has {size} on axis {axis}; store "
                    f"samples whose '{dim}' sizes match (save them stacked: N x the input's shape)"
                )


def _cast(flag: str, name: str, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The array in the input's dtype; refuse values that the cast would change."""
    if arr.dtype.kind not in "fiub":
        raise CompileError(f"{flag} array '{name}' has dtype {arr.dtype}; store numeric samples")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise CompileError(
            f"{flag} array '{name}' holds {bad} NaN/Inf values; clean the data "
            "(drop or impute those samples) before compiling"
        )
    if dtype.kind in "iub" and arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
        raise CompileError(
            f"{flag} array '{name}' holds non-integral values but the input is {dtype}; store whole numbers "
            f"(e.g. np.round(x).astype(np.{dtype}))"
        )
    if dtype.kind == "b" and arr.dtype.kind != "b" and arr.size and not np.all((arr == 0) | (arr == 1)):
        raise CompileError(f"{flag} array '{name}' holds values other than 0/1 but the input is bool; store 0/1")
    if dtype.kind in "iu" and arr.dtype.kind != "b" and arr.size:
        info = np.iinfo(dtype)
        low, high = arr.min(), arr.max()
        if low < info.min or high > info.max:
            raise CompileError(
                f"{flag} array '{name}' holds values in [{low}, {high}], outside {dtype} [{info.min}, {info.max}]; "
                "store values the input's dtype can hold"
            )
    out = arr.astype(dtype, copy=False)
    if dtype.kind == "f" and arr.dtype.kind == "f" and not np.all(np.isfinite(out)):
        raise CompileError(f"{flag} array '{name}' holds values too large for {dtype}; rescale the data")
    return out


def read_npz(path: Path, flag: str, holding: str, saved_with: str) -> dict[str, np.ndarray]:
    """Every array of an .npz, or a one-line error saying what the file should hold."""
    path = Path(path)
    if not path.is_file():
        raise CompileError(f"{flag} file {path} does not exist; pass an .npz with {holding}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: np.asarray(npz[k]) for k in npz.files}
    except Exception as exc:
        raise CompileError(
            f"cannot read {flag} {path.name} as .npz ({str(exc).splitlines()[0][:120]}); save it with {saved_with}"
        ) from exc


def load_npz(
    path: Path,
    inputs: tuple[TensorSpec, ...],
    *,
    flag: str,
    shape_overrides: dict[str, tuple[int, ...]] | None = None,
) -> Dataset:
    """Load an .npz and check it against the model inputs; every failure names the fix.

    Per input, samples may lie on axis 0 (N x shape[1:]), on another axis the model leaves dynamic
    (a state [2, N, 128]), or be stacked on a new leading axis (N x the full shape; (N,) for a
    scalar). The reading must be unambiguous and give the same N for every input.
    """
    arrays = read_npz(path, flag, "one array per model input", "numpy.savez(path, **{input_name: samples})")
    names = [spec.name for spec in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        found = ", ".join(f"'{k}'" for k in sorted(arrays)) or "none"
        raise CompileError(
            f"{flag} file has no array for input '{missing[0]}' (found: {found}); pass {flag} with keys "
            f"named after the model inputs ({', '.join(repr(n) for n in names)})"
        )
    overrides = shape_overrides or {}
    shapes: dict[str, tuple[int, ...]] = {}
    wants: dict[str, tuple[Dim, ...]] = {}
    readings: dict[str, list[_Reading]] = {}
    for spec in inputs:
        arr = arrays[spec.name]
        if arr.dtype.kind not in "fiub":
            raise CompileError(f"{flag} array '{spec.name}' has dtype {arr.dtype}; store numeric samples")
        want: tuple[Dim, ...] = tuple(overrides.get(spec.name, spec.shape))
        model = spec.shape if len(spec.shape) == len(want) else want
        shape = tuple(int(d) for d in arr.shape)
        found_readings = _readings(shape, want, model)
        if not found_readings:
            raise _no_fit(flag, spec.name, shape, want)
        shapes[spec.name], wants[spec.name], readings[spec.name] = shape, want, found_readings
    if any(all(not r.layout.is_default for r in rs) for rs in readings.values()):
        # Some input can only be fed one sample at a time, so every input is: a fixed axis 0 other
        # than 1 cannot be the sample axis then. Dropping that reading may make the others unambiguous.
        for name, rs in readings.items():
            fixed0 = not _dynamic(wants[name][0]) and wants[name][0] != 1 if wants[name] else False
            kept = [r for r in rs if not (fixed0 and r.layout.is_default)]
            readings[name] = kept or rs  # none left: _check_one_sample_feed names the problem
    n, chosen = _choose(flag, shapes, readings, wants)
    _check_one_sample_feed(flag, inputs, {name: r.layout for name, r in chosen.items()}, shapes, wants)
    ins: dict[str, np.ndarray] = {}
    layouts: dict[str, InputLayout] = {}
    for spec in inputs:
        layout = chosen[spec.name].layout
        arr = arrays[spec.name]
        if layout.kind == "batch" and layout.axis:
            arr = np.ascontiguousarray(np.moveaxis(arr, layout.axis, 0))
        ins[spec.name] = _cast(flag, spec.name, arr, _np_dtype(spec.dtype))
        layouts[spec.name] = layout
    extra = {k: v for k, v in arrays.items() if k not in names and v.ndim >= 1 and v.shape[0] == n}
    return Dataset(ins, extra, f"{flag}:{path.name}", layouts)


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
    """Random inputs, used only when no data was given; the report says the gate is synthetic.

    ``shapes`` are the model's concrete input shapes. A scalar input gets one value per sample
    (stacked); an input whose axis 0 is fixed but a later axis is dynamic gets its samples there.
    """
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    layouts: dict[str, InputLayout] = {}
    for spec in inputs:
        shape = tuple(shapes[spec.name])
        dtype = _np_dtype(spec.dtype)
        layout = BATCH0
        if not spec.shape:  # a scalar: the concrete shape may say (1,), the model takes ()
            layout, shape = InputLayout("stacked"), ()
        elif len(spec.shape) == len(shape) and not _dynamic(spec.shape[0]):
            later = [k for k in range(1, len(shape)) if _dynamic(spec.shape[k])]
            if later:
                layout = InputLayout("batch", later[0])
        kept = shape if layout.kind == "stacked" else shape[: layout.axis] + shape[layout.axis + 1 :]
        per = (count, *kept)
        floats = dtype.kind == "f"
        arrays[spec.name] = (rng.standard_normal(per) if floats else rng.integers(0, 2, per)).astype(dtype)
        layouts[spec.name] = layout
    return Dataset(arrays, {}, "synthetic", layouts)
