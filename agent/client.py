"""A small client for the agent's local inference API (a Unix socket by default).

    from edgefleet.agent.client import LocalClient
    with LocalClient("unix:///var/lib/edgefleet-agent/agent.sock") as client:
        outputs = client.infer({"input": image})
"""

from __future__ import annotations

import functools
import math
import queue
import threading
import time
from typing import Any

import grpc
import numpy as np

from edgefleet.protos.v1 import local_pb2, local_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_END = object()


class InferenceError(Exception):
    """The agent refused or failed the request; the message says why (e.g. the expected input spec)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def to_tensor(name: str, array: np.ndarray) -> local_pb2.Tensor:
    little = np.ascontiguousarray(array)
    if little.dtype.byteorder == ">":
        little = little.astype(little.dtype.newbyteorder("<"))
    return local_pb2.Tensor(name=name, dtype=little.dtype.name, shape=list(little.shape), data=little.tobytes())


@functools.lru_cache(maxsize=64)
def _wire_dtype(name: str) -> np.dtype:
    """The little-endian dtype a tensor's bytes are in; ValueError for a name numpy does not know."""
    try:
        return np.dtype(name).newbyteorder("<")
    except TypeError:
        raise ValueError(name) from None


def from_tensor(tensor: local_pb2.Tensor, copy: bool = True) -> np.ndarray:
    """Decode; raises ValueError naming the tensor when dtype, shape and size disagree.

    With copy=False the array is a read-only view of the message's bytes (what the runtime needs)."""
    try:
        dtype = _wire_dtype(tensor.dtype)
    except ValueError:
        raise ValueError(f"tensor '{tensor.name}' has unknown dtype {tensor.dtype!r}") from None
    shape = tuple(tensor.shape)
    data = tensor.data
    if any(d < 0 for d in shape) or math.prod(shape) * dtype.itemsize != len(data):
        raise ValueError(
            f"tensor '{tensor.name}' has {len(data)} bytes but {tensor.dtype}{list(shape)} "
            f"needs {math.prod(shape) * dtype.itemsize}"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    if not dtype.isnative:
        return array.astype(dtype.newbyteorder("="))
    return array.copy() if copy else array


class _Stream:
    """One open InferStream: requests go in through a queue, responses come back in order.

    gRPC offers no deadline per message on a stream, only one for the whole stream. So a stream
    is opened with a deadline of twice the client's timeout and used only during the first half:
    every request sent on it has at least the client's timeout to be answered, and none waits
    longer than twice that.
    """

    def __init__(self, stub: local_pb2_grpc.LocalInferenceStub, timeout_s: float) -> None:
        self.requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.fresh_until = time.monotonic() + timeout_s
        self.call = stub.InferStream(iter(self.requests.get, _END), timeout=2 * timeout_s)

    def exchange(self, request: local_pb2.InferRequest) -> local_pb2.InferResponse:
        self.requests.put(request)
        return next(self.call)

    def close(self) -> None:
        self.requests.put(_END)
        self.call.cancel()


class LocalClient:
    """Calls the agent's local API. Thread-safe.

    Repeated `infer` calls from one thread share one InferStream, which saves a call setup per
    inference; calls made while another thread uses the stream go as separate Infer calls, so
    concurrent requests still reach the agent together (and can be batched there).
    """

    def __init__(self, address: str, timeout_s: float = 30.0, stream: bool = True) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.use_stream = stream
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ])
        self._stub = local_pb2_grpc.LocalInferenceStub(self._channel)
        self._stream: _Stream | None = None
        self._stream_lock = threading.Lock()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {t.name: from_tensor(t) for t in self.infer_raw(inputs).outputs}

    def infer_raw(self, inputs: dict[str, np.ndarray]) -> local_pb2.InferResponse:
        request = local_pb2.InferRequest(inputs=[to_tensor(k, v) for k, v in inputs.items()])
        if self.use_stream and self._stream_lock.acquire(blocking=False):
            try:
                return self._on_stream(request)
            finally:
                self._stream_lock.release()
        return self._unary(request)

    def _on_stream(self, request: local_pb2.InferRequest) -> local_pb2.InferResponse:
        if self._stream is not None and time.monotonic() > self._stream.fresh_until:
            self._stream.close()
            self._stream = None
        if self._stream is None:
            self._stream = _Stream(self._stub, self.timeout_s)
        try:
            return self._stream.exchange(request)
        except grpc.RpcError as exc:
            # The stream ended (a rejected request, or the agent restarted): the next call opens another.
            self._stream = None
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # the agent's streams are all taken
                self.use_stream = False
                return self._unary(request)
            raise InferenceError(exc.code(), exc.details()) from None
        except StopIteration:
            self._stream = None
            raise InferenceError(grpc.StatusCode.UNAVAILABLE, "the agent closed the inference stream") from None

    def _unary(self, request: local_pb2.InferRequest) -> local_pb2.InferResponse:
        try:
            return self._stub.Infer(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise InferenceError(exc.code(), exc.details()) from None

    def status(self) -> local_pb2.AgentStatus:
        try:
            return self._stub.Status(local_pb2.StatusRequest(), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise InferenceError(exc.code(), exc.details()) from None

    def close(self) -> None:
        with self._stream_lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
        self._channel.close()

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
