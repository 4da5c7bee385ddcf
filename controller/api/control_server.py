"""The Control port's own gRPC server, on a thread and event loop of its own (issue 18).

Measured (bench_store_reads part 2, 1,000 Session streams at 80% of the ingest ceiling): the store
answers ListRollouts in 2-5 ms, but the event loop that also carries every device stream lags
120-150 ms at p95 (up to seconds), and a unary call needs a few turns of that loop, so the call
took 287 ms at p95. The lag is the ingest itself (every turn holds hundreds of stream reads and
acks), not a slow callback to fix, so Control gets a loop where no device stream runs.

That needs a port of its own: with TLS, devices stream on --device-grpc and --grpc carries only
Control, Enroll and the certificate renewal of secret-only devices, so --grpc is served here. Under
--insecure devices stream on --grpc itself and everything stays on one server and one loop.

What a Control handler changes in objects that live on the fleet loop (presence, the command
dispatcher's outboxes, the rollout engine, on-device measurement) it does there, through
`on_fleet_loop` (controller/api/control_grpc.py); store reads and writes are thread-safe and run here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc

log = logging.getLogger("edgefleet.controller.control")

Options = Sequence[tuple[str, Any]]


class ControlServer:
    """A grpc.aio server run on its own thread: `start` returns once it serves or failed to bind."""

    def __init__(self, interceptors: Sequence[grpc.aio.ServerInterceptor], options: Options,
                 setup: Callable[[grpc.aio.Server], int]) -> None:
        """`setup` registers the servicers and binds the port, on the new loop; it returns the port
        (or raises, e.g. BindError, which `start` raises in the caller)."""
        self._interceptors = list(interceptors)
        self._options = list(options)
        self._setup = setup
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stop_requested: asyncio.Event | None = None  # made on the server's loop
        self._grace_s = 0.0
        self._stopped = threading.Event()

    def start(self, timeout_s: float = 30.0) -> int:
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="control-grpc", daemon=True)
        self._thread.start()
        return ready.result(timeout_s)

    def _run(self, ready: concurrent.futures.Future[int]) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(ready))
        except BaseException as exc:  # a failure before serving goes to the caller of `start`
            if not ready.done():
                ready.set_exception(exc)
            else:
                log.exception("control server failed")
        finally:
            loop.close()
            self._stopped.set()

    async def _serve(self, ready: concurrent.futures.Future[int]) -> None:
        server = grpc.aio.server(interceptors=self._interceptors, options=self._options)
        try:
            port = self._setup(server)
        except BaseException:
            await server.stop(None)
            raise
        await server.start()
        self._server = server
        stop = self._stop_requested = asyncio.Event()
        ready.set_result(port)
        # Stopped by this task on this loop: a `server.stop` handed here with run_coroutine_threadsafe
        # never finished (seen with grpcio 1.85: SIGTERM then hung past the 2 s promised).
        await stop.wait()
        await server.stop(self._grace_s)

    async def stop(self, grace_s: float) -> None:
        """Stop serving (open calls get `grace_s`) and wait for the thread; from any other loop."""
        if self.loop is None or self._stop_requested is None or self._stopped.is_set():
            return
        self._grace_s = grace_s
        self.loop.call_soon_threadsafe(self._stop_requested.set)
        await asyncio.to_thread(self._stopped.wait, grace_s + 2.0)
