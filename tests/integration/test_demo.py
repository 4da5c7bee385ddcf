"""`edgefleet demo --duration S` shows a live fleet and stops by itself, leaving no process."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

pytestmark = pytest.mark.integration


def test_demo_runs_and_cleans_up(tmp_path):
    state = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.controller.cli", "demo", "--duration", "2s", "--agents", "3",
         "--state-dir", str(state)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 agents enrolled and online" in result.stdout
    assert result.stdout.count("online") >= 4  # the table lists each device online
    assert "where to look next" in result.stdout
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(state) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
