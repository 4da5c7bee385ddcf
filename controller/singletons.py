"""The singletons: what exactly one process of a controller runs, elected by a lease in the store.

A controller may be several worker processes (`controller serve --workers N`), and several
replicas may share one PostgreSQL store. Each of them serves device streams and operators, but the
rollout engine and the periodic telemetry maintenance (rollups, retention) must run once: two
engines would race each other's waves, two rollup jobs would do the same work twice. So whoever
holds the store's lease "singletons" runs them, renewing it every LEASE_RENEW_S; it lapses
LEASE_TTL_S after its holder stops renewing (killed, hung, cut off from the store), and the next
process to ask takes it over. A holder that cannot renew in time stops its singletons first, so two
never run at once for longer than a renewal takes. A clean stop releases the lease, so another
process takes it at its next renewal instead of at expiry.

The holder's name is its replica id (host, gRPC port, worker index), stable across restarts: a
process restarted in the place of a dead holder takes its lease back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from edgefleet.controller.store.base import Store

log = logging.getLogger("edgefleet.controller.singletons")

LEASE_NAME = "singletons"
LEASE_TTL_S = 3.0
LEASE_RENEW_S = 1.0


class SingletonLease:
    """Holds (or waits for) the lease and runs `singletons` while it is held.

    `singletons` makes the coroutines to run as tasks; each must end soon after `stopping` (the
    Event it is given) is set, or at an await when cancelled."""

    def __init__(self, store: Store, holder: str,
                 singletons: Callable[[asyncio.Event], list[Coroutine[Any, Any, None]]], *,
                 ttl_s: float = LEASE_TTL_S, renew_s: float = LEASE_RENEW_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.holder = holder
        self.singletons = singletons
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self.clock = clock
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._valid_until = 0.0  # time.monotonic() after which the lease may be someone else's

    @property
    def held(self) -> bool:
        return bool(self._tasks)

    async def _try(self) -> bool:
        asked = time.monotonic()
        try:
            got = await asyncio.to_thread(self.store.acquire_lease, LEASE_NAME, self.holder,
                                          int(self.clock() * 1000), int(self.ttl_s * 1000))
        except Exception as exc:  # the store is down: keep what is still valid, take nothing new
            log.warning("lease renewal failed", extra={"holder": self.holder, "error": str(exc).splitlines()[0]})
            return self.held and time.monotonic() < self._valid_until
        if got:
            self._valid_until = asked + self.ttl_s - self.renew_s / 2
        return got

    async def step(self) -> None:
        """One renewal: start the singletons when the lease was just taken, stop them when it was lost."""
        holding = await self._try()
        if holding and not self.held:
            self._stopping = asyncio.Event()
            self._tasks = [asyncio.create_task(c) for c in self.singletons(self._stopping)]
            log.info("took the singleton lease: running the rollout engine and periodic jobs",
                     extra={"holder": self.holder})
        elif not holding and self.held:
            log.warning("lost the singleton lease: stopping the rollout engine and periodic jobs",
                        extra={"holder": self.holder})
            await self.stop_singletons(0.5)

    async def run(self, stopping: asyncio.Event) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.renew_s)
            if stopping.is_set():
                return
            await self.step()

    async def stop_singletons(self, timeout_s: float) -> None:
        """Ask the singletons to end, wait `timeout_s`, then cancel what is left."""
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        self._stopping.set()
        _, stuck = await asyncio.wait(tasks, timeout=timeout_s)
        for task in stuck:
            task.cancel()
        if stuck:
            await asyncio.wait(stuck, timeout=timeout_s)

    async def release(self, timeout_s: float) -> None:
        """At a clean stop, after `stop_singletons`: hand the lease on without waiting for expiry."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.to_thread(self.store.release_lease, LEASE_NAME, self.holder), timeout_s)
