"""The device imports edgefleet.firmware: it must never pull in onnx or the controller tool-chain."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import edgefleet.firmware.cli, edgefleet.firmware.installer, edgefleet.firmware.bundle, edgefleet.firmware.slots
bad = sorted(m for m in sys.modules if m == "onnx" or m.startswith(("onnx.", "edgefleet.controller", "torch")))
lazy = sorted(m for m in ("onnxruntime", "numpy") if m in sys.modules)
print(bad, lazy)
"""


def test_firmware_imports_stay_on_the_device_side():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"  # onnxruntime and numpy load only when a self-test runs
