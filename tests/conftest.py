"""Shared fixtures: real controller and agent processes that are always cleaned up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_harness import AgentProc, ControllerProc, Proc


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `long` (minutes of mostly waiting) start first, so that with several workers
    (`pytest -n`) they overlap the rest of the suite instead of running alone at its end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Every process a test registers here is stopped at teardown, whatever happened."""
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop(timeout_s=5)
        if isinstance(proc, ControllerProc):
            proc.close_channel()


@pytest.fixture
def controller(tmp_path: Path, procs: list[Proc]) -> ControllerProc:
    proc = ControllerProc(tmp_path)
    procs.append(proc)
    return proc.start()


@pytest.fixture
def start_agent(tmp_path: Path, procs: list[Proc], controller: ControllerProc):  # type: ignore[no-untyped-def]
    def start(name: str, token: str = "", extra_args: list[str] | None = None) -> AgentProc:
        agent = AgentProc(tmp_path, name, controller, token, extra_args)
        procs.append(agent)
        return agent.start()  # type: ignore[return-value]

    return start
