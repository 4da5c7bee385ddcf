"""The onnxruntime options every ONNX build is served and timed with bound the spin-wait after a run.

onnxruntime's default intra-op pool keeps spinning for tens of milliseconds after each run returns.
On a device that is CPU time and power spent on nothing; in the compiler's interleaved timing it is a
core taken from the next candidate. Measured here as the process CPU time burnt while it sleeps.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.firmware.selftest import ORT_SPIN_SETTLE_S, ort_serving_options

ort = pytest.importorskip("onnxruntime")


def _matmul_chain(path: Path) -> Path:
    """Four 512x512 MatMuls: big enough that the intra-op pool splits each one over its threads."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(4):
        inits.append(numpy_helper.from_array(rng.standard_normal((512, 512)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 512])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [64, 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _cpu_ms_while_idle(session: ort.InferenceSession, after_s: float = 0.0) -> float:
    """CPU milliseconds the process burns in the 150 ms that start ``after_s`` after a run returns."""
    feed = {"x": np.ones((64, 512), np.float32)}
    for _ in range(5):
        session.run(None, feed)
    burnt = []
    for _ in range(3):
        session.run(None, feed)
        time.sleep(after_s)
        c0 = time.process_time()
        time.sleep(0.15)
        burnt.append((time.process_time() - c0) * 1000.0)
    return min(burnt)


def test_serving_options_spin_briefly_after_a_run(tmp_path: Path) -> None:
    path = _matmul_chain(tmp_path / "chain.onnx")
    served = ort.InferenceSession(str(path), ort_serving_options(2), providers=["CPUExecutionProvider"])
    assert served.run(None, {"x": np.ones((64, 512), np.float32)})[0].shape == (64, 512)
    assert _cpu_ms_while_idle(served) < 5.0
    # What interleaved timing waits after a serving session is enough for its pool to be asleep.
    assert _cpu_ms_while_idle(served, after_s=ORT_SPIN_SETTLE_S) < 2.0


def test_default_options_do_spin_after_a_run(tmp_path: Path) -> None:
    """The other side: what the serving options turn off is there to turn off (so the check above can fail)."""
    path = _matmul_chain(tmp_path / "chain.onnx")
    default = ort.InferenceSession(str(path), ort_serving_options(2, ort_defaults=True),
                                   providers=["CPUExecutionProvider"])
    assert _cpu_ms_while_idle(default) > 5.0
