"""A gRPC server that does nothing but answer: the transport's own floor, for the agent benchmark.

    python tests/bench/grpc_echo.py unix:///tmp/echo.sock

Serves /bench.Echo/Stream (bidi: every request message is answered by a fixed reply of the
given size) on a thread-pool server, as the agent's local API does, until killed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

ECHO_METHOD = "/bench.Echo/Stream"


def main(address: str, reply_bytes: int) -> None:
    reply = b"\0" * reply_bytes

    def stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in requests:
            yield reply

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Stream": grpc.stream_stream_rpc_method_handler(stream),  # bytes in, bytes out: no protobuf
    })
    server = grpc.server(ThreadPoolExecutor(max_workers=4), handlers=[handler])
    server.add_insecure_port(address)
    server.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 64)
