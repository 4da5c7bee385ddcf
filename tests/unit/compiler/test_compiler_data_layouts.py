"""Calibration data in the shapes users have: batch on axis 0, on a later axis, or stacked samples.

Each layout is loaded by load_npz, fed by the runner and compared against onnxruntime run by hand,
one sample at a time, in the model's own shapes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgefleet.controller.compiler import CompileSpec, compile_model
from edgefleet.controller.compiler.data import Dataset, InputLayout, load_npz, split_holdout, synthetic
from edgefleet.controller.compiler.errors import CompileError
from edgefleet.controller.compiler.model_io import load_source
from edgefleet.controller.compiler.runner import ModelRunner
from tests.models import layout_models

N = 12


@pytest.fixture(scope="session")
def silero(models_dir: Path) -> Path:
    return layout_models.silero_like(models_dir / "silero_like.onnx")


def by_hand(model: Path, samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """onnxruntime on each sample as the model takes it; outputs stacked on a new axis 0."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    runs = [sess.run(names, s) for s in samples]
    return {name: np.stack([r[i] for r in runs]) for i, name in enumerate(names)}


def load(model: Path, path: Path, **arrays: np.ndarray) -> Dataset:
    np.savez(path, **arrays)
    return load_npz(path, load_source(model).inputs, flag="--calib")


STATE_LAYOUTS = {
    "stacked": (lambda s: s, InputLayout("stacked")),  # N x 2 x 1 x 128
    "batch-axis-1": (lambda s: np.concatenate(list(s), axis=1), InputLayout("batch", 1)),  # 2 x N x 128
}


@pytest.mark.parametrize("state_layout", sorted(STATE_LAYOUTS))
@pytest.mark.parametrize("input_layout", ["batch-axis-0", "stacked"])
def test_silero_layouts_are_fed_in_the_models_shapes(
    tmp_path: Path, silero: Path, state_layout: str, input_layout: str
) -> None:
    samples = layout_models.silero_samples(N)
    store_state, want_layout = STATE_LAYOUTS[state_layout]
    stored_input = samples["input"][:, 0] if input_layout == "batch-axis-0" else samples["input"]
    data = load(silero, tmp_path / "c.npz", input=stored_input, state=store_state(samples["state"]), sr=samples["sr"])

    assert data.count == N
    assert data.layout("state") == want_layout and data.layout("sr") == InputLayout("stacked")
    assert data.layout("input") == (InputLayout() if input_layout == "batch-axis-0" else InputLayout("stacked"))
    for name, arr in data.inputs.items():
        assert arr.shape[0] == N, name
    assert data.sample_shape("state") == (2, 1, 128) and data.sample_shape("sr") == ()
    np.testing.assert_array_equal(data.model_sample(3)["state"], samples["state"][3])
    feeds = data.model_feeds(8, limit=5)
    assert len(feeds) == 5 and all(f["state"].shape == (2, 1, 128) and f["sr"].shape == () for f in feeds)

    expected = by_hand(silero, [{k: np.asarray(v[i]) for k, v in samples.items()} for i in range(N)])
    runner = ModelRunner(silero)
    for outs in (runner.run_dataset(data), runner.run_dataset(data.inputs), runner.run_dataset(
            dict(data.inputs), layouts=data.layouts)):
        assert set(outs) == {"output", "stateN"}
        assert outs["output"].shape == (N, 1, 1) and outs["stateN"].shape == (N, 2, 1, 128)
        for name in expected:
            np.testing.assert_allclose(outs[name], expected[name], rtol=1e-5, atol=1e-6)

    feed = runner.sample_feed(data, 5)
    assert {k: v.shape for k, v in feed.items()} == {"input": (1, 512), "state": (2, 1, 128), "sr": ()}
    assert feed["sr"].dtype == np.int64 and int(feed["sr"]) == int(samples["sr"][5])
    assert runner.sample_feed(data.inputs, 5)["state"].shape == (2, 1, 128)


def test_batch_axis_zero_keeps_the_batched_path(tmp_path: Path, mlp: dict[str, Path]) -> None:
    x = np.random.default_rng(0).random((40, 64)).astype(np.float32)
    data = load(mlp["model"], tmp_path / "c.npz", x=x)
    assert data.layouts == {} and data.batchable and data.inputs.layouts == {}
    outs = ModelRunner(mlp["model"]).run_dataset(data, max_batch=16)
    sess = ort.InferenceSession(str(mlp["model"]), providers=["CPUExecutionProvider"])
    name = sess.get_outputs()[0].name
    np.testing.assert_allclose(outs[name], sess.run([name], {"x": x})[0], rtol=1e-5, atol=1e-6)
    assert {k: v.shape for k, v in ModelRunner(mlp["model"]).sample_feed(data).items()} == {"x": (1, 64)}


def test_two_dynamic_dims_still_read_samples_on_axis_0(tmp_path: Path) -> None:
    model = layout_models.two_dynamic(tmp_path / "m.onnx")
    ids = np.arange(6 * 10).reshape(6, 10)
    data = load(model, tmp_path / "c.npz", ids=ids, mask=np.ones((6, 10), np.float32))
    assert data.count == 6 and data.layouts == {}


def test_state_with_as_many_samples_as_its_fixed_axis_is_read_unambiguously(tmp_path: Path, silero: Path) -> None:
    # (2, 2, 128) alone could be 2 samples on axis 0 or on axis 1, but sr is a scalar, so samples are fed
    # one at a time and the fixed axis 0 (size 2) cannot be the sample axis: axis 1 is the only reading.
    samples = layout_models.silero_samples(2)
    state = np.concatenate(list(samples["state"]), axis=1)
    data = load(silero, tmp_path / "c.npz", input=samples["input"][:, 0], state=state, sr=samples["sr"])
    assert data.layout("state") == InputLayout("batch", 1)
    np.testing.assert_array_equal(data.model_sample(1)["state"], samples["state"][1])


def test_ambiguous_readings_are_refused_naming_both(tmp_path: Path) -> None:
    model = layout_models.state_only(tmp_path / "m.onnx")
    with pytest.raises(CompileError) as err:
        load(model, tmp_path / "c.npz", state=np.zeros((2, 5, 128), np.float32))
    message = str(err.value)
    assert "'state' of shape (2, 5, 128) reads as 2 samples on axis 0 or as 5 samples on axis 1 (the model's " \
        "'batch' dim)" in message
    assert "N x [2,batch,128] (samples stacked on a new axis 0)" in message and "\n" not in message
    with pytest.raises(CompileError, match=r"reads as 2 samples on axis 0 or as 2 samples on axis 1"):
        load(model, tmp_path / "c.npz", state=np.zeros((2, 2, 128), np.float32))
    # Stacked samples say which: accepted.
    assert load(model, tmp_path / "c.npz", state=np.zeros((5, 2, 3, 128), np.float32)).count == 5


def test_sample_counts_must_agree(tmp_path: Path, silero: Path) -> None:
    samples = layout_models.silero_samples(8)
    counts = r"different sample counts .*'input' 8 samples on axis 0; 'state' 6 samples on axis 1"
    with pytest.raises(CompileError, match=counts):
        load(silero, tmp_path / "c.npz", input=samples["input"][:, 0], state=np.zeros((2, 6, 128), np.float32),
             sr=samples["sr"])


def test_scalar_needs_one_value_per_sample(tmp_path: Path, silero: Path) -> None:
    samples = layout_models.silero_samples(8)
    with pytest.raises(CompileError, match=r"'sr' has shape \(\) but the input is a scalar.*np.full\(N, value\)"):
        load(silero, tmp_path / "c.npz", input=samples["input"], state=samples["state"], sr=np.array(16000))


def test_dtypes(tmp_path: Path, silero: Path) -> None:
    samples = layout_models.silero_samples(8)
    base = {"input": samples["input"], "state": samples["state"]}
    as_float = load(silero, tmp_path / "c.npz", **base, sr=samples["sr"].astype(np.float32))
    assert as_float.inputs["sr"].dtype == np.int64
    np.testing.assert_array_equal(as_float.inputs["sr"], samples["sr"])
    for bad, needle in [
        (np.full(8, 16000.5), "non-integral values but the input is int64"),
        (np.array(["16k"] * 8), "has dtype <U3; store numeric samples"),
        (np.full(8, 2.0**70), "outside int64"),
    ]:
        with pytest.raises(CompileError, match=needle):
            load(silero, tmp_path / "c.npz", **base, sr=bad)
    state = samples["state"].copy()
    state[1, 0, 0, 3] = np.inf
    with pytest.raises(CompileError, match="'state' holds 1 NaN/Inf values"):
        load(silero, tmp_path / "c.npz", input=samples["input"], state=state, sr=samples["sr"])


def test_no_layout_fits(tmp_path: Path, silero: Path) -> None:
    samples = layout_models.silero_samples(8)
    with pytest.raises(CompileError, match=r"'state' has shape \(8, 3, 1, 128\).*axis 0 of a sample is 3 != 2"):
        load(silero, tmp_path / "c.npz", input=samples["input"], state=np.zeros((8, 3, 1, 128), np.float32),
             sr=samples["sr"])
    with pytest.raises(CompileError, match=r"'state' of shape \(8, 3, 128\) reads as 8 samples on axis 0, but "
                       r"the model's axis 0 is fixed at 2"):
        load(silero, tmp_path / "c.npz", input=samples["input"], state=np.zeros((8, 3, 128), np.float32),
             sr=samples["sr"])
    with pytest.raises(CompileError, match=r"'state' has sample shape \(3, 64\)"):
        load(silero, tmp_path / "c.npz", input=samples["input"], state=np.zeros((8, 3, 64), np.float32),
             sr=samples["sr"])


def test_samples_must_agree_on_the_batch_dim(tmp_path: Path, silero: Path) -> None:
    samples = layout_models.silero_samples(8)
    with pytest.raises(CompileError, match=r"disagree on the model's 'batch' dim: one sample of 'input' has 1 on "
                       r"axis 0 but one of 'state' has 3 on axis 1"):
        load(silero, tmp_path / "c.npz", input=samples["input"], state=np.zeros((8, 2, 3, 128), np.float32),
             sr=samples["sr"])


def test_layout_survives_take_split_and_hash(tmp_path: Path, silero: Path) -> None:
    samples = layout_models.silero_samples(N)
    stacked = load(silero, tmp_path / "a.npz", **samples)
    calib, gate = split_holdout(stacked)
    assert calib.count + gate.count == N
    for part in (calib, gate, stacked.take(slice(0, 4))):
        assert part.layouts == stacked.layouts and part.inputs.layouts == stacked.layouts  # type: ignore[attr-defined]
    same_arrays = Dataset(dict(stacked.inputs), {}, stacked.source)
    assert same_arrays.layouts == {} and same_arrays.sha256() != stacked.sha256()
    assert stacked.sha256() == load(silero, tmp_path / "b.npz", **samples).sha256()


def test_synthetic_feeds_a_scalar_and_a_later_batch_axis(silero: Path) -> None:
    source = load_source(silero)
    data = synthetic(source.inputs, {"input": (1, 512), "state": (2, 1, 128), "sr": (1,)}, 4)
    assert data.layout("sr") == InputLayout("stacked") and data.layout("state") == InputLayout("batch", 1)
    outs = ModelRunner(silero).run_dataset(data)
    assert outs["output"].shape == (4, 1, 1)


def test_silero_like_compiles_end_to_end(tmp_path: Path, silero: Path) -> None:
    samples = layout_models.silero_samples(24)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=samples["input"][:, 0], state=np.concatenate(list(samples["state"]), axis=1),
             sr=samples["sr"])
    report = compile_model(
        CompileSpec(model=silero, target="local", calib=calib, out=tmp_path / "out", measure_rounds=3,
                    measure_round_ms=5.0)
    )
    assert Path(report.artifact).is_file()
    assert report.gate["samples"] == 6 and report.gate["calibration_samples"] == 18
    baseline = next(c for c in report.candidates if c["recipe"] == "fp32-optimized")
    assert baseline["error"] is None and baseline["fidelity"] > 0.9999 and baseline["passed_gate"]


def test_dims_exporters_leave_unnamed_are_not_one_shared_dim(tmp_path: Path) -> None:
    """PaddleOCR's exports name every free dim '?': a 48 x 192 image must not read as disagreeing."""
    import onnx
    from onnx import TensorProto, helper

    from edgefleet.controller.compiler.data import load_npz
    from edgefleet.controller.compiler.model_io import load_source

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["?", 3, "?", "?"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["?", 3, "?", "?"])],
    )
    path = tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 3, 48, 192), np.float32))
    data = load_npz(tmp_path / "c.npz", load_source(path).inputs, flag="--calib")
    assert data.count == 4 and data.batchable
