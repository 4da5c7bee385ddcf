"""The demo's model: a small MLP classifier trained on scikit-learn's digits, exported to ONNX.

Training takes about a second, and nothing is downloaded: the digits data ships with
scikit-learn (a dev dependency, which `make demo` installs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def build_digits_model(out_dir: Path, seed: int = 0) -> tuple[Path, Path, float]:
    """(model.onnx, calib.npz, held-out accuracy) for an 8x8-digit classifier with a free batch axis."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.neural_network import MLPClassifier
    except ImportError:
        raise RuntimeError("the demo trains its model with scikit-learn; pip install scikit-learn") from None
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:1400], order[1400:]
    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=300, random_state=seed)
    clf.fit(x[train], y[train])
    accuracy = float(clf.score(x[test], y[test]))
    (w0, w1), (b0, b1) = clf.coefs_, clf.intercepts_
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             ((w0, "w0"), (b0, "b0"), (w1, "w1"), (b1, "b1"))]
    nodes = [
        helper.make_node("MatMul", ["pixels", "w0"], ["h"]), helper.make_node("Add", ["h", "b0"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w1"], ["o"]),
        helper.make_node("Add", ["o", "b1"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "digits-mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path, calib_path = out_dir / "digits.onnx", out_dir / "digits-calib.npz"
    onnx.save(model, model_path)
    np.savez(calib_path, pixels=x[test][:128])
    return model_path, calib_path, accuracy
