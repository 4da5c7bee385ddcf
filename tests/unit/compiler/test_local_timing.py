"""Local timing assumes an idle machine: when other processes take the CPU, the figures say so."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet.controller.compiler.measure import BUSY_SHARE, LocalMeasurer, _others_cpu_s

Times = namedtuple("Times", "user nice system idle iowait irq softirq steal guest guest_nice")


def test_others_cpu_counts_busy_time_and_steal_but_not_our_own_or_iowait() -> None:
    before = Times(10.0, 0.0, 5.0, 100.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    # +5 busy (1 of it guest time, which Linux counts in user too), +2 steal, +8 iowait, +1 idle
    after = Times(14.0, 0.0, 6.0, 101.0, 9.0, 0.0, 0.0, 2.0, 1.0, 0.0)
    assert _others_cpu_s(before, after, own_s=3.0) == 4.0
    assert _others_cpu_s(before, after, own_s=99.0) == 0.0, "never below zero (clock granularity)"


def test_timing_beside_cpu_hogs_says_the_figures_may_be_wrong(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.eye(64, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])], [w],
    )
    path = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.3)
        measurer = LocalMeasurer(threads=1, rounds=5, round_ms=20.0)
        stats = measurer.measure([path], {"x": np.ones((2, 64), np.float32)})
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert measurer.busy_share > BUSY_SHARE, measurer.busy_share
    assert "other processes used" in stats[path].method and "compile on an idle machine" in stats[path].method
