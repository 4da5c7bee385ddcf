"""A bare drain for bench_ingest.py: the transport's own ceiling, with no controller work behind it.

It serves edgefleet.v1.Fleet/Session as the controller does on the wire (grpc.aio, one
bidirectional stream per device, every AgentMessage parsed), answers Hello with SessionAccepted
and acks every TelemetryBatch at once: no validation, no histogram decoding, no store, no
presence. It exposes the two series bench_ingest.py scrapes under the controller's names
(edgefleet_telemetry_batches_total{result="stored"} and edgefleet_telemetry_ingest_lag_seconds),
so the same measurement runs against it; the ratio of its figures to the controller's is what
the controller's own work costs.

Run: python tests/bench/bench_drain.py --grpc 127.0.0.1:PORT --http 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import AsyncIterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from edgefleet.protos.v1 import fleet_pb2, fleet_pb2_grpc

LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600)  # as controller/telemetry/ingest.py


class DrainFleet(fleet_pb2_grpc.FleetServicer):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.stored = Counter("edgefleet_telemetry_batches", "Telemetry batches by outcome", ["result"],
                              registry=registry).labels("stored")
        self.lag = Histogram("edgefleet_telemetry_ingest_lag_seconds", "Batch end to ack", buckets=LAG_BUCKETS,
                             registry=registry)

    async def Session(self, request_iterator: AsyncIterator[fleet_pb2.AgentMessage],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[fleet_pb2.ControllerMessage]:
        async for message in request_iterator:
            kind = message.WhichOneof("body")
            if kind == "hello":
                yield fleet_pb2.ControllerMessage(accepted=fleet_pb2.SessionAccepted())
            elif kind == "telemetry":
                self.stored.inc()
                self.lag.observe(max(0.0, time.time() - message.telemetry.end_unix_ms / 1000))
                yield fleet_pb2.ControllerMessage(telemetry_ack=fleet_pb2.TelemetryAck(seqs=[message.telemetry.seq]))


async def serve(grpc_address: str, http_address: str) -> None:
    registry = CollectorRegistry()
    host, _, port = http_address.rpartition(":")
    start_http_server(int(port), host, registry=registry)
    server = grpc.aio.server(options=[("grpc.keepalive_permit_without_calls", 1),
                                      ("grpc.http2.min_ping_interval_without_data_ms", 5_000)])
    fleet_pb2_grpc.add_FleetServicer_to_server(DrainFleet(registry), server)
    server.add_insecure_port(grpc_address)
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print("drain listening", grpc_address, http_address, flush=True)
    await stop.wait()
    await server.stop(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--http", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.grpc, args.http))


if __name__ == "__main__":
    main()
