"""The one gate in front of the Control service: who is calling, may their role do this, and the audit log.

Every Control call needs `authorization: Bearer <operator token>`. The interceptor looks the token
up (one indexed read, as before roles), refuses unknown, revoked and expired ones with
UNAUTHENTICATED, then wraps the method's handler so that:
- a role below the method's least role (controller/api/control_roles.py) gets PERMISSION_DENIED
  naming both roles, and the refusal is recorded;
- a mutating call is recorded once it ends, with its outcome: "ok" or the status code and message.
Nothing is checked or recorded per method. Unauthenticated calls are logged, not stored: anyone who
can reach the port could otherwise fill the table.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from edgefleet.controller.api.control_audit import StreamArguments, arguments_json, scrub
from edgefleet.controller.api.control_roles import CONTROL_METHOD_ACCESS, access_refusal
from edgefleet.controller.fleet import credentials as auth
from edgefleet.controller.store.base import AuditRecord, OperatorTokenRecord, Store

log = logging.getLogger("edgefleet.controller.control")

CONTROL_PREFIX = "/edgefleet.v1.Control/"
# The token of the call being served, for handlers that record who did something (created_by).
CURRENT_OPERATOR: contextvars.ContextVar[OperatorTokenRecord | None] = contextvars.ContextVar(
    "edgefleet_current_operator", default=None)


def bearer_token(metadata: Any) -> str:
    header = str(dict(metadata or ()).get("authorization", ""))
    return header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""


class OperatorAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, store: Store) -> None:
        self.store = store

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if not handler_call_details.method.startswith(CONTROL_PREFIX):
            return await continuation(handler_call_details)
        method = handler_call_details.method[len(CONTROL_PREFIX):]
        token = bearer_token(handler_call_details.invocation_metadata)
        caller = self.store.get_operator_token(auth.digest(token)) if token else None
        refusal = auth.operator_token_refusal(caller, int(time.time() * 1000))
        if refusal is not None or caller is None:
            log.warning("control call refused: no valid operator token",
                        extra={"method": method, "token_id": caller.token_id if caller else ""})
            return _abort_handler(grpc.StatusCode.UNAUTHENTICATED, refusal or "")
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # gRPC answers UNIMPLEMENTED
        return CallGuard(self.store, method, caller).wrap(handler)


def _abort_handler(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class CallGuard:
    """One Control call of one caller: the role check and the audit record around its handler."""

    def __init__(self, store: Store, method: str, caller: OperatorTokenRecord) -> None:
        self.store = store
        self.method = method
        self.caller = caller
        self.role = auth.OperatorRole.parse(caller.role)
        access = CONTROL_METHOD_ACCESS.get(method)
        self.mutates = access is None or access.mutates
        self.refusal = access_refusal(method, self.role, caller.token_id)

    def wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        serializers = {"request_deserializer": handler.request_deserializer,
                       "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await self.run(context, lambda: unary(request, context), lambda: scrub(request))

            return grpc.unary_unary_rpc_method_handler(unary_call, **serializers)
        if handler.stream_unary is not None:
            streamed = handler.stream_unary

            async def stream_call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                summary = StreamArguments(requests)
                return await self.run(context, lambda: streamed(summary, context), summary.summary)

            return grpc.stream_unary_rpc_method_handler(stream_call, **serializers)
        # Streamed responses (none in Control today): the role is still checked; the outcome is not audited.
        if self.refusal is not None:
            self.record({}, "PERMISSION_DENIED", self.refusal)
            return _abort_handler(grpc.StatusCode.PERMISSION_DENIED, self.refusal)
        return handler

    async def run(self, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[Any]],
                  arguments: Callable[[], dict[str, Any]]) -> Any:
        if self.refusal is not None:
            self.record(arguments(), "PERMISSION_DENIED", self.refusal)
            log.warning("control call refused: role too low",
                        extra={"method": self.method, "token_id": self.caller.token_id, "role": self.role.value})
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, self.refusal)
        current = CURRENT_OPERATOR.set(self.caller)
        try:
            response = await call()
        except asyncio.CancelledError:
            if self.mutates:
                self.record(arguments(), "CANCELLED", "the client went away before the call finished")
            raise
        except BaseException as exc:
            if self.mutates:
                code = context.code()
                details = context.details()
                self.record(arguments(), _code_name(code) if code is not None else "UNKNOWN",
                            _text(details) or f"{type(exc).__name__}: {exc}")
            raise
        finally:
            CURRENT_OPERATOR.reset(current)
        if self.mutates:
            code = context.code()
            ok = code is None or code == grpc.StatusCode.OK or code == 0
            self.record(arguments(), "ok" if ok else _code_name(code), "" if ok else _text(context.details()))
        return response

    def record(self, arguments: dict[str, Any], outcome: str, message: str) -> None:
        entry = AuditRecord(at_ms=int(time.time() * 1000), token_id=self.caller.token_id, role=self.role.value,
                            method=self.method, arguments=arguments_json(arguments), outcome=outcome,
                            message=message[:1000])
        try:
            self.store.add_audit(entry)
        except Exception as exc:  # the call's effect has happened; losing its record must not hide it
            log.error("audit record not stored", extra={"method": self.method, "token_id": self.caller.token_id,
                                                        "outcome": outcome, "error": str(exc)})


def _code_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    match = next((c for c in grpc.StatusCode if c.value[0] == code), None)
    return match.name if match is not None else str(code)


def _text(details: Any) -> str:
    if isinstance(details, bytes):
        return details.decode(errors="replace")
    return str(details or "")
