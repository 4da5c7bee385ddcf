"""run_until_stopped: a daemon whose main has returned exits promptly, even with a thread still busy."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

PROGRAM = textwrap.dedent("""
    import asyncio, sys, time
    from edgefleet.common.shutdown import run_until_stopped

    async def main():
        if sys.argv[1] == "raise":
            raise SystemExit(3)
        # What a cancelled to_thread leaves behind: a compile or a download that goes on in its thread.
        task = asyncio.ensure_future(asyncio.to_thread(time.sleep, 60))
        await asyncio.sleep(0.05)
        task.cancel()
        print("flushed", flush=True)

    run_until_stopped(main(), linger_s=0.2)
""")


def run(mode: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=30)
    return result, time.monotonic() - started


def test_busy_thread_is_abandoned_not_joined():
    result, elapsed = run("return")
    assert result.returncode == 0, result.stderr
    assert "flushed" in result.stdout
    # asyncio.run would have joined the sleeping thread for 60 s.
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert "work in progress abandoned" in result.stderr


def test_an_error_from_main_keeps_its_exit_code():
    result, _ = run("raise")
    assert result.returncode == 3, result.stderr
