"""The singleton lease (controller/singletons.py): one holder runs the singletons; a dead holder's
lease is taken over once it expires, and a holder that finds it lost stops its singletons."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from edgefleet.controller.singletons import SingletonLease
from edgefleet.controller.store.sqlite import SQLiteStore

TTL_S = 0.4
RENEW_S = 0.1


def lease(store: SQLiteStore, holder: str, running: dict[str, int]) -> SingletonLease:
    async def job(stopping: asyncio.Event) -> None:
        running[holder] = running.get(holder, 0) + 1
        try:
            await stopping.wait()
        finally:
            running[holder] -= 1

    return SingletonLease(store, holder, lambda stopping: [job(stopping)], ttl_s=TTL_S, renew_s=RENEW_S)


def test_one_holder_then_a_takeover_when_it_dies(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "store.db")
    running: dict[str, int] = {}

    async def scenario() -> None:
        a, b = lease(store, "w0", running), lease(store, "w1", running)
        await a.step()
        await b.step()
        await asyncio.sleep(0)
        assert a.held and not b.held and running == {"w0": 1}
        stop_b = asyncio.Event()
        b_task = asyncio.create_task(b.run(stop_b))
        # w0 dies: it stops renewing (nothing released); w1 takes over once the lease expires.
        died = time.monotonic()
        while not b.held:
            await asyncio.sleep(0.02)
            assert time.monotonic() - died < TTL_S + 4 * RENEW_S, "no takeover"
        await asyncio.sleep(0)
        assert running["w1"] == 1
        # w0 comes back (a hang, not a death): its next renewal finds the lease lost and stops its job.
        await a.step()
        assert not a.held and running["w0"] == 0
        # A clean stop releases: w0 gets it at its next renewal, not at expiry.
        stop_b.set()
        await b_task
        await b.stop_singletons(1.0)
        await b.release(1.0)
        await a.step()
        await asyncio.sleep(0)
        assert a.held and running == {"w0": 1, "w1": 0}
        await a.stop_singletons(1.0)

    try:
        asyncio.run(scenario())
    finally:
        store.close()
