"""Run a daemon's event loop so that, once its main coroutine has returned, the process exits promptly.

`asyncio.run` joins every thread of the loop's default executor before it returns, and the
interpreter then joins every `concurrent.futures` worker at exit. A cancelled `asyncio.to_thread`
call does not stop its thread, so a compile, a bundle download or a store write stuck on a dead
database would hold a stopped daemon for as long as it runs: minutes, where a supervisor waits a
few seconds before SIGKILL. Here the loop ends without that join, and if the interpreter's exit
has not finished `linger_s` later (it is joining a busy thread), the process ends with `os._exit`,
which does not wait for it.
That is only safe because the daemons flush their own state before main returns, and because
whatever such a thread writes is written the crash-safe way (temp file, fsync, rename; one
transaction per store write), as a SIGKILL could cut it anywhere just the same.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("edgefleet.shutdown")

LINGER_S = 0.3


def busy_threads() -> list[threading.Thread]:
    """Live non-daemon threads other than this one: what the interpreter would wait for at exit."""
    me = threading.current_thread()
    return [t for t in threading.enumerate() if t is not me and not t.daemon and t.is_alive()]


def run_until_stopped(main: Coroutine[Any, Any, None], *, linger_s: float = LINGER_S) -> None:
    """Run `main` to completion on a fresh loop; once it has returned, the process is gone within
    `linger_s` of the caller returning too, whatever threads are still busy.

    When `main` raises, the error propagates as from `asyncio.run` and no watchdog is armed: the
    caller turns the error into a message and an exit code, which an `os._exit(0)` would hide."""
    loop = asyncio.new_event_loop()
    executor = ThreadPoolExecutor(thread_name_prefix="asyncio")
    loop.set_default_executor(executor)
    try:
        loop.run_until_complete(main)
    finally:
        try:
            _cancel_remaining(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            executor.shutdown(wait=False, cancel_futures=True)  # queued work is dropped, running work left
            loop.close()
    # Idle pool threads end at once when the interpreter exits; a busy one would be joined for as
    # long as it runs. The watchdog is a daemon thread, which still runs while the exit joins them.
    watchdog = threading.Timer(linger_s, _abandon_busy_threads)
    watchdog.daemon = True
    watchdog.start()


def _abandon_busy_threads() -> None:
    left = busy_threads()
    log.warning("exiting with work in progress abandoned", extra={"threads": ",".join(sorted(t.name for t in left))})
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks main left behind (e.g. an engine's compile task) and let them unwind."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.wait(tasks, timeout=LINGER_S))
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.warning("task failed while stopping", extra={"task": task.get_name(), "error": task.exception()})
