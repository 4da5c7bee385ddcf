"""`edgefleet demo --duration S` shows a live fleet and stops by itself, leaving no process."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

pytestmark = pytest.mark.integration


@pytest.mark.long
def test_demo_runs_and_cleans_up(tmp_path):
    state = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.controller.cli", "demo", "--duration", "2s", "--agents", "3",
         "--state-dir", str(state)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "3 agents enrolled and online" in out
    assert out.count("online") >= 4  # the table lists each device online
    assert "trained digits:1" in out and "state COMPLETED" in out  # compiled and rolled out
    assert "measured on device:" in out  # timed on a device of the class, not estimated
    watch = out.split("live telemetry from the fleet", 1)[1].split("where to look next", 1)[0]
    rows = [line for line in watch.splitlines() if line.startswith("dev-")]
    assert len(rows) == 3 and all("digits:1" in row for row in rows)  # live latency of the new model
    assert "where to look next" in out
    assert "dashboard: http://" in out and "operator-token" in out  # where to log in, and with what
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(state) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
