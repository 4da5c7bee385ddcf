"""What both gRPC services share: domain errors mapped to status codes, device credentials in metadata."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from edgefleet.controller.errors import (
    FailedPrecondition,
    FleetError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)

DEVICE_ID_HEADER = "edgefleet-device-id"
DEVICE_SECRET_HEADER = "edgefleet-device-secret"

_STATUS = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}

R = TypeVar("R")


def status_for(exc: FleetError) -> grpc.StatusCode:
    return next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)


def maps_errors(
    fn: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await fn(self, request, context)
        except FleetError as exc:
            await context.abort(status_for(exc), str(exc))
            raise  # unreachable: abort raises

    return wrapper


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def device_credentials(context: grpc.aio.ServicerContext) -> tuple[str, str]:
    md = _metadata(context)
    return md.get(DEVICE_ID_HEADER, ""), md.get(DEVICE_SECRET_HEADER, "")


def peer_certificate(context: grpc.aio.ServicerContext) -> bytes | None:
    """The client certificate the TLS handshake verified (PEM), or None on a connection without one."""
    values = (context.auth_context() or {}).get("x509_pem_cert") or []
    return bytes(values[0]) if values else None


def claimed_device_id(context: grpc.aio.ServicerContext) -> str:
    return _metadata(context).get(DEVICE_ID_HEADER, "")
