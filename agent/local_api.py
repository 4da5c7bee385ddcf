"""The agent's local gRPC API (LocalInference) on a Unix socket or a localhost port."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import grpc

from edgefleet.agent.client import from_tensor, to_tensor
from edgefleet.agent.serving import InferenceService, InputMismatch, NoModel
from edgefleet.protos.v1 import local_pb2, local_pb2_grpc

log = logging.getLogger("edgefleet.agent.local_api")

MAX_REQUEST_BYTES = 64 * 1024 * 1024


class LocalInferenceServicer(local_pb2_grpc.LocalInferenceServicer):
    def __init__(self, service: InferenceService, status: Callable[[], local_pb2.AgentStatus]) -> None:
        self.service = service
        self.status = status

    async def Infer(
        self, request: local_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> local_pb2.InferResponse:
        try:
            inputs = {t.name: from_tensor(t) for t in request.inputs}
            result = await self.service.infer(inputs)
        except (ValueError, InputMismatch) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except NoModel as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"inference failed: {exc}")
        return local_pb2.InferResponse(
            outputs=[to_tensor(k, v) for k, v in result.outputs.items()],
            model=result.model,
            version=result.version,
            queue_ms=result.queue_s * 1000,
            compute_ms=result.compute_s * 1000,
            batched_with=result.batched_with,
        )

    async def Status(
        self, request: local_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> local_pb2.AgentStatus:
        return self.status()


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


async def start_local_api(
    service: InferenceService, status: Callable[[], local_pb2.AgentStatus], address: str
) -> grpc.aio.Server:
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
        ("grpc.so_reuseport", 0),
    ])
    local_pb2_grpc.add_LocalInferenceServicer_to_server(LocalInferenceServicer(service, status), server)
    if address.startswith("unix://"):
        path = Path(address[len("unix://"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a stale socket from a killed agent
    if not server.add_insecure_port(address):
        raise OSError(f"cannot listen on {address}")
    await server.start()
    log.info("local API listening", extra={"address": address})
    return server
