"""A small client for the agent's local inference API (a Unix socket by default).

    from edgefleet.agent.client import LocalClient
    with LocalClient("unix:///var/lib/edgefleet-agent/agent.sock") as client:
        outputs = client.infer({"input": image})
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from edgefleet.protos.v1 import local_pb2, local_pb2_grpc


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


def from_tensor(tensor: local_pb2.Tensor) -> np.ndarray:
    """Decode; raises ValueError naming the tensor when dtype, shape and size disagree."""
    try:
        dtype = np.dtype(tensor.dtype).newbyteorder("<")
    except TypeError:
        raise ValueError(f"tensor '{tensor.name}' has unknown dtype {tensor.dtype!r}") from None
    expected = int(np.prod(tensor.shape, dtype=np.int64)) * dtype.itemsize
    if any(d < 0 for d in tensor.shape) or expected != len(tensor.data):
        raise ValueError(
            f"tensor '{tensor.name}' has {len(tensor.data)} bytes but {tensor.dtype}{list(tensor.shape)} "
            f"needs {expected}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape)).astype(dtype.newbyteorder("="))


class LocalClient:
    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address)
        self._stub = local_pb2_grpc.LocalInferenceStub(self._channel)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {t.name: from_tensor(t) for t in self.infer_raw(inputs).outputs}

    def infer_raw(self, inputs: dict[str, np.ndarray]) -> local_pb2.InferResponse:
        request = local_pb2.InferRequest(inputs=[to_tensor(k, v) for k, v in inputs.items()])
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
        self._channel.close()

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
