"""Small ONNX models for the compiler unit tests, built with onnx.helper (no torch, seconds to make).

- ``digits_mlp``: an MLP trained with scikit-learn on its bundled digits, exported by hand (real data,
  real accuracy, so the gate and --eval paths see realistic numbers);
- ``conv_net``: a small conv net with seeded weights and an exporter-style dynamic batch dim
  (``p2o.DynamicDimension.0``), optionally at opset 11 as real exports arrive;
- ``outlier_mlp``: int8-hostile on purpose (one huge activation channel squeezes the others to zero),
  so full int8 fails a tight gate and mixed precision has something to find.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(graph: onnx.GraphProto, path: Path, opset: int) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgefleet-tests")
    model.ir_version = 8 if opset >= 13 else 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def digits_data(image_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits scaled to [0, 1] (N x 64) with labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def digits_mlp(path: Path, hidden: int = 32, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """Train an MLP on digits; returns the model and a split {x_calib, x_test, y_test}."""
    from sklearn.neural_network import MLPClassifier

    x, y = digits_data()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    train, test = order[:1200], order[1200:]
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=80, random_state=seed)
    with warnings.catch_warnings():  # 80 epochs reach ~95% test accuracy; full convergence is not the point
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x[train], y[train])
    w1, w2 = (w.astype(np.float32) for w in clf.coefs_)
    b1, b2 = (b.astype(np.float32) for b in clf.intercepts_)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    _save(graph, path, 13)
    return path, {"x_train": x[train], "x_test": x[test], "y_test": y[test]}


def conv_net(
    path: Path, *, opset: int = 13, size: int = 16, seed: int = 0, channels: tuple[int, int] = (8, 16)
) -> Path:
    """Conv-BN-Relu x2, global pool, Gemm; batch dim named like a Paddle export. ``channels``: a
    narrower one is a --student for the default."""
    rng = np.random.default_rng(seed)
    c1, c2 = channels

    def w(*shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    inits = {
        "c1_w": w(c1, 1, 3, 3),
        "c1_b": np.zeros(c1, np.float32),
        "bn_scale": (1 + 0.1 * rng.standard_normal(c1)).astype(np.float32),
        "bn_bias": (0.1 * rng.standard_normal(c1)).astype(np.float32),
        "bn_mean": (0.1 * rng.standard_normal(c1)).astype(np.float32),
        "bn_var": (1 + 0.1 * rng.random(c1)).astype(np.float32),
        "c2_w": w(c2, c1, 3, 3),
        "c2_b": np.zeros(c2, np.float32),
        "fc_w": w(c2, 10),
        "fc_b": np.zeros(10, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "c1_w", "c1_b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn1"]),
        helper.make_node("Relu", ["bn1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2_w", "c2_b"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["p2o.DynamicDimension.0", 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["p2o.DynamicDimension.0", 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return _save(graph, path, opset)


def conv_inputs(count: int, size: int = 16, seed: int = 1) -> np.ndarray:
    """Image-like inputs (smooth blobs, not white noise) for conv_net."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = []
    for _ in range(count):
        cx, cy, s = rng.random(3)
        imgs.append(np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.02 + 0.1 * s)))
    return np.asarray(imgs, np.float32)[:, None] + 0.05 * rng.standard_normal((count, 1, size, size)).astype(np.float32)


def outlier_mlp(path: Path, seed: int = 0) -> Path:
    """x -> MatMul (one output channel x1000) -> MatMul that ignores that channel.

    Quantizing the middle activation (always per-tensor) spends the whole int8 range on the outlier and rounds
    the useful channels to zero: fidelity collapses unless ``fc2`` stays in float.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w1[:, 0] *= 1000.0
    w2 = rng.standard_normal((32, 8)).astype(np.float32)
    w2[0, :] = 0.0
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "outlier_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return _save(graph, path, 13)


def transformer_block(path: Path, seq: int = 16, dim: int = 64, seed: int = 0) -> Path:
    """One self-attention + MLP block written out in MatMuls (what exporters emit for small encoders)."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    inits = {
        "wq": w(dim, dim),
        "wk": w(dim, dim),
        "wv": w(dim, dim),
        "wo": w(dim, dim),
        "w1": w(dim, 4 * dim),
        "w2": w(4 * dim, dim),
        "scale": np.array(1.0 / np.sqrt(dim), np.float32),
        "perm_shape": np.array([0, 2, 1], np.int64),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["a"]),
        helper.make_node("MatMul", ["a", "wo"], ["o"]),
        helper.make_node("Add", ["x", "o"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w1"], ["m1"]),
        helper.make_node("Relu", ["m1"], ["m1r"]),
        helper.make_node("MatMul", ["m1r", "w2"], ["m2"]),
        helper.make_node("Add", ["r1", "m2"], ["y"]),
    ]
    inits.pop("perm_shape")
    graph = helper.make_graph(
        nodes,
        "transformer_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, dim])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return _save(graph, path, 13)


def tflite_mlp(path: Path, seed: int = 0, din: int = 64, dhidden: int = 64, dout: int = 10) -> Path:
    """Two FULLY_CONNECTED layers (+ReLU) written straight into the TFLite flatbuffer schema, so TFLite
    input can be tested without TensorFlow."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((dhidden, din)) / np.sqrt(din)).astype(np.float32)
    b1 = np.zeros(dhidden, np.float32)
    w2 = (rng.standard_normal((dout, dhidden)) / np.sqrt(dhidden)).astype(np.float32)
    b2 = np.zeros(dout, np.float32)
    buffers = [s.BufferT()]  # buffer 0 is the empty sentinel
    for arr in (w1, b1, w2, b2):
        buf = s.BufferT()
        buf.data = np.frombuffer(arr.tobytes(), np.uint8).tolist()
        buffers.append(buf)

    def tensor(name: str, shape: list[int], buffer: int = 0) -> object:
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name, shape, s.TensorType.FLOAT32, buffer
        return t

    tensors = [
        tensor("x", [1, din]),
        tensor("w1", [dhidden, din], 1),
        tensor("b1", [dhidden], 2),
        tensor("h", [1, dhidden]),
        tensor("w2", [dout, dhidden], 3),
        tensor("b2", [dout], 4),
        tensor("logits", [1, dout]),
    ]
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.FULLY_CONNECTED
    code.version = 1

    def fc(inputs: list[int], output: int, relu: bool) -> object:
        op = s.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = 0, inputs, [output]
        op.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
        opts = s.FullyConnectedOptionsT()
        opts.fusedActivationFunction = s.ActivationFunctionType.RELU if relu else s.ActivationFunctionType.NONE
        op.builtinOptions = opts
        return op

    sub = s.SubGraphT()
    sub.tensors, sub.inputs, sub.outputs = tensors, [0], [6]
    sub.operators = [fc([0, 1, 2], 3, True), fc([3, 4, 5], 6, False)]
    sub.name = "main"
    sig = s.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = "serving_default", 0
    sig_in, sig_out = s.TensorMapT(), s.TensorMapT()
    sig_in.name, sig_in.tensorIndex = "x", 0
    sig_out.name, sig_out.tensorIndex = "logits", 6
    sig.inputs, sig.outputs = [sig_in], [sig_out]
    model = s.ModelT()
    model.version, model.description = 3, "edgefleet test mlp"
    model.operatorCodes, model.subgraphs, model.buffers, model.signatureDefs = [code], [sub], buffers, [sig]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return path
