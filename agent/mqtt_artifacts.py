"""Artifacts over MQTT, for devices that only reach a broker: numbered chunks, acked in windows.

The device acks what it has and asks for the next window (ArtifactAck on its `ack` topic); the
controller publishes those chunks to edgefleet/v1/<device>/artifact/<sha>/<n>. A break of any
kind (broker restart, lost link, chunks dropped) shows up as silence; the source then raises
SourceInterrupted, the installer keeps the bytes it has, and the next read resumes by acking them.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Protocol

from edgefleet.firmware.sources import ControllerArtifact, SourceInterrupted
from edgefleet.protos.v1 import fleet_pb2

log = logging.getLogger("edgefleet.agent.mqtt_artifacts")

CHUNK_SIZE = 256 * 1024
WINDOW = 16
SILENCE_S = 5.0


class ChunkLink(Protocol):
    """What the source needs from the MQTT link."""

    device_id: str

    def publish(self, leaf: str, message: fleet_pb2.AgentMessage, *, qos: int = 1) -> bool: ...


class ChunkRouter:
    """Hands incoming artifact/<sha>/<n> messages to the source reading that artifact (thread-safe)."""

    def __init__(self) -> None:
        self._queues: dict[str, queue.Queue[tuple[int, fleet_pb2.ArtifactChunk]]] = {}
        self._lock = threading.Lock()

    def open(self, sha256: str) -> queue.Queue[tuple[int, fleet_pb2.ArtifactChunk]]:
        with self._lock:
            q = self._queues[sha256] = queue.Queue()
            return q

    def close(self, sha256: str) -> None:
        with self._lock:
            self._queues.pop(sha256, None)

    def deliver(self, leaf: str, payload: bytes) -> None:
        """`leaf` is 'artifact/<sha>/<n>'; chunks of an artifact nobody reads are dropped."""
        parts = leaf.split("/")
        if len(parts) != 3 or not parts[2].isdigit():
            return
        with self._lock:
            q = self._queues.get(parts[1])
        if q is not None:
            q.put((int(parts[2]), fleet_pb2.ArtifactChunk.FromString(payload)))


class MqttArtifactSource(ControllerArtifact):
    """An ArtifactSource (see firmware/sources.py) that fetches over the device's MQTT link."""

    def __init__(self, link: ChunkLink, router: ChunkRouter, sha256: str, size: int, *,
                 chunk_size: int = CHUNK_SIZE, window: int = WINDOW, silence_s: float = SILENCE_S) -> None:
        super().__init__(sha256, size)
        self.link = link
        self.router = router
        self.chunk_size = chunk_size
        self.window = window
        self.silence_s = silence_s

    def _ask(self, next_chunk: int) -> None:
        ack = fleet_pb2.ArtifactAck(sha256=self.sha256, next_chunk=next_chunk, window=self.window,
                                    chunk_size=self.chunk_size)
        if not self.link.publish("ack", fleet_pb2.AgentMessage(artifact_ack=ack)):
            raise SourceInterrupted("not connected to the broker")

    def read(self, offset: int) -> Iterator[bytes]:
        chunks = -(-self.total_size // self.chunk_size)
        next_chunk, skip = divmod(offset, self.chunk_size)
        log.info("fetching artifact over mqtt", extra={"device": self.link.device_id, "sha256": self.sha256[:12],
                                                       "from_chunk": next_chunk, "chunks": chunks})
        arrivals = self.router.open(self.sha256)
        held: dict[int, bytes] = {}
        try:
            window_end = next_chunk + self.window
            self._ask(next_chunk)
            while next_chunk < chunks:
                try:
                    n, chunk = arrivals.get(timeout=self.silence_s)
                except queue.Empty:
                    raise SourceInterrupted(
                        f"no artifact chunk for {self.silence_s:g}s at chunk {next_chunk} of {chunks}"
                    ) from None
                if n < next_chunk or chunk.offset != n * self.chunk_size:
                    continue  # a duplicate from an earlier window, or not ours
                held[n] = chunk.data
                while next_chunk in held:
                    data = held.pop(next_chunk)
                    yield data[skip:]
                    skip = 0
                    next_chunk += 1
                if next_chunk >= window_end and next_chunk < chunks:
                    window_end = next_chunk + self.window
                    self._ask(next_chunk)  # acks everything so far and asks for the next window
        finally:
            self.router.close(self.sha256)
