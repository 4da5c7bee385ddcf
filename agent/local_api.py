"""The agent's local gRPC API (LocalInference) on a Unix socket or a localhost port.

This is a thread-pool gRPC server rather than one on the agent's event loop: each request's
worker thread runs the model itself (`InferenceService.infer_blocking`), so an inference costs
no extra hop between the loop and a worker thread. Concurrent requests are batched by the
service. An open InferStream holds one worker thread for its lifetime, so open streams are
capped below the pool size: unary calls and Status always find a thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import grpc

from edgefleet.agent.client import from_tensor, to_tensor
from edgefleet.agent.serving import InferenceService, InputMismatch, NoModel
from edgefleet.protos.v1 import local_pb2, local_pb2_grpc

log = logging.getLogger("edgefleet.agent.local_api")

MAX_REQUEST_BYTES = 64 * 1024 * 1024
MAX_STREAMS = 16
WORKER_THREADS = 2 * MAX_STREAMS


class LocalInferenceServicer(local_pb2_grpc.LocalInferenceServicer):
    def __init__(self, service: InferenceService, status: Callable[[], local_pb2.AgentStatus],
                 max_streams: int = MAX_STREAMS) -> None:
        self.service = service
        self.status = status
        self.max_streams = max_streams
        self._streams = 0
        self._streams_lock = threading.Lock()

    def _infer(self, request: local_pb2.InferRequest, context: grpc.ServicerContext) -> local_pb2.InferResponse:
        try:
            inputs = {t.name: from_tensor(t, copy=False) for t in request.inputs}
            result = self.service.infer_blocking(inputs)
        except (ValueError, InputMismatch) as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except NoModel as exc:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:
            _abort(context, grpc.StatusCode.INTERNAL, f"inference failed: {exc}")
        return local_pb2.InferResponse(
            outputs=[to_tensor(k, v) for k, v in result.outputs.items()],
            model=result.model,
            version=result.version,
            queue_ms=result.queue_s * 1000,
            compute_ms=result.compute_s * 1000,
            batched_with=result.batched_with,
        )

    def Infer(self, request: local_pb2.InferRequest, context: grpc.ServicerContext) -> local_pb2.InferResponse:
        return self._infer(request, context)

    def InferStream(self, request_iterator: Iterator[local_pb2.InferRequest],
                    context: grpc.ServicerContext) -> Iterator[local_pb2.InferResponse]:
        with self._streams_lock:
            if self._streams >= self.max_streams:
                _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"{self.max_streams} inference streams are open already; use Infer")
            self._streams += 1
        try:
            for request in request_iterator:
                yield self._infer(request, context)
        finally:
            with self._streams_lock:
                self._streams -= 1

    def Status(self, request: local_pb2.StatusRequest, context: grpc.ServicerContext) -> local_pb2.AgentStatus:
        return self.status()


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: abort raises")


def socket_address(value: str, state_dir: Path) -> str:
    """'unix' (default: <state dir>/agent.sock), 'unix:PATH', or 'HOST:PORT' (localhost only)."""
    if value in ("", "unix"):
        return f"unix://{(state_dir / 'agent.sock').resolve()}"
    if value.startswith("unix:"):
        path = value[len("unix:"):].removeprefix("//")
        return f"unix://{Path(path).resolve()}"
    host = value.rpartition(":")[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"--local-api {value!r}: the local API listens on localhost or a Unix socket only")
    return value


def start_local_api(
    service: InferenceService, status: Callable[[], local_pb2.AgentStatus], address: str
) -> Any:
    """Start serving on `address`; returns the grpc.Server (stop it with `.stop(grace)`)."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="local-api"),
        options=[
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=WORKER_THREADS,  # beyond that RESOURCE_EXHAUSTED, never a silent queue
    )
    local_pb2_grpc.add_LocalInferenceServicer_to_server(LocalInferenceServicer(service, status), server)
    if address.startswith("unix://"):
        path = Path(address[len("unix://"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a stale socket from a killed agent
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if not bound:
        raise OSError(f"cannot listen on {address}")
    server.start()
    log.info("local API listening", extra={"address": address})
    return server
