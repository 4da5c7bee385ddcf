"""Models whose inputs are not all "samples on axis 0": what real exports look like.

``silero_like`` has the I/O of the Silero VAD model (``input`` [batch, 512] float, ``state``
[2, batch, 128] float with its batch on axis 1, ``sr`` a scalar int64) without the LSTM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def silero_like(path: Path, seed: int = 0) -> Path:
    """output = sigmoid((input @ W + sum(state, axis 0)) @ V) * sr / 16000; new state = state + input @ W."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((512, 128)) * 0.05).astype(np.float32), "W")
    v = numpy_helper.from_array((rng.standard_normal((128, 1)) * 0.2).astype(np.float32), "V")
    axes0 = numpy_helper.from_array(np.array([0], np.int64), "axes0")
    rate = numpy_helper.from_array(np.array(16000.0, np.float32), "rate")
    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["h"]),
        helper.make_node("ReduceSum", ["state", "axes0"], ["state_sum"], keepdims=0),
        helper.make_node("Add", ["h", "state_sum"], ["mixed"]),
        helper.make_node("MatMul", ["mixed", "V"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["prob"]),
        helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["sr_f", "rate"], ["scale"]),
        helper.make_node("Mul", ["prob", "scale"], ["output"]),
        helper.make_node("Unsqueeze", ["h", "axes0"], ["h1"]),
        helper.make_node("Add", ["state", "h1"], ["stateN"]),
    ]
    graph = helper.make_graph(
        nodes,
        "silero_like",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 512]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 128]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", 128]),
        ],
        [w, v, axes0, rate],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def silero_samples(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    """``n`` samples, each in the model's own shapes: input [1,512], state [2,1,128], sr []."""
    rng = np.random.default_rng(seed)
    return {
        "input": rng.standard_normal((n, 1, 512)).astype(np.float32),
        "state": rng.standard_normal((n, 2, 1, 128)).astype(np.float32),
        "sr": rng.choice(np.array([8000, 16000], np.int64), n),
    }


def two_dynamic(path: Path) -> Path:
    """ids [batch, seq] int64 and mask [batch, seq] float: two dynamic dims on every input."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ids_f", "mask"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "two_dynamic",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def state_only(path: Path) -> Path:
    """state [2, batch, 128] alone: a batch of 2 on axis 0 and a batch on axis 1 both fit it."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["state"], ["y"])],
        "state_only",
        [helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "batch", 128])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
