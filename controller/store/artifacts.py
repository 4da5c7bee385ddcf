"""Content-addressed artifact storage: bundles and models are stored once, named by sha256."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from cachetools import LRUCache

from edgefleet.controller.errors import InvalidArgument, NotFound
from edgefleet.protos.v1 import fleet_pb2

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_CHUNK = 256 * 1024
MAX_CHUNK = 2 * 1024 * 1024
CHUNK_CACHE_BYTES = 64 * 1024 * 1024


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _SHA_RE.match(sha256):
            raise InvalidArgument(f"field 'sha256' must be 64 lowercase hex characters, got {sha256[:80]!r}")
        return self.root / sha256[:2] / sha256

    def put_file(self, source: Path) -> str:
        """Copy a file in, hashing as it goes; an existing identical artifact is kept as is."""
        hasher = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=".incoming.", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                while block := src.read(1 << 20):
                    hasher.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            sha = hasher.hexdigest()
            target = self.path(sha)
            target.parent.mkdir(exist_ok=True)
            if target.exists():
                os.unlink(tmp)
            else:
                os.replace(tmp, target)
            return sha
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".incoming.", dir=self.root)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        return sha

    async def receive(self, chunks: AsyncIterator[Any]) -> tuple[str, int]:
        """Store a client-streamed upload; the first message declares sha256 and size, which must match."""
        hasher = hashlib.sha256()
        expected_sha, expected_size, received = "", 0, 0
        fd, tmp = tempfile.mkstemp(prefix=".upload.", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    if not expected_sha:
                        expected_sha, expected_size = chunk.sha256, chunk.size
                        self.path(expected_sha)  # validates the form
                    if received + len(chunk.data) > max(expected_size, 0):
                        raise InvalidArgument(f"upload is larger than the declared {expected_size} bytes")
                    hasher.update(chunk.data)
                    out.write(chunk.data)
                    received += len(chunk.data)
                out.flush()
                os.fsync(out.fileno())
            if not expected_sha:
                raise InvalidArgument("empty upload; the first message must carry sha256 and size")
            if received != expected_size or hasher.hexdigest() != expected_sha:
                raise InvalidArgument(
                    f"upload does not match its declaration (got {received} bytes, sha256 {hasher.hexdigest()[:12]}); "
                    "upload again"
                )
            target = self.path(expected_sha)
            target.parent.mkdir(exist_ok=True)
            os.replace(tmp, target)
            return expected_sha, received
        finally:
            Path(tmp).unlink(missing_ok=True)

    def size(self, sha256: str) -> int:
        path = self.path(sha256)
        if not path.exists():
            raise NotFound(f"no artifact {sha256}")
        return path.stat().st_size


class ChunkCache:
    """FetchArtifact replies, serialized once and shared by every device that fetches the same chunk.

    In a rollout hundreds of devices fetch the same bundle with the same chunk size. Keeping each
    chunk's wire encoding (an LRU bounded in bytes) makes a chunk cost one read and one protobuf
    serialization for the whole wave instead of one per device; a resumed fetch starting at an
    odd offset simply misses. Artifacts are content-addressed and never rewritten, so an entry
    can never go stale. Used from the event loop only.
    """

    def __init__(self, store: ArtifactStore, max_bytes: int = CHUNK_CACHE_BYTES) -> None:
        self.store = store
        self._cache: LRUCache[tuple[str, int, int], bytes] = LRUCache(maxsize=max_bytes, getsizeof=len)
        self.hits = 0
        self.misses = 0

    def messages(self, sha256: str, offset: int, chunk_size: int) -> Iterator[bytes]:
        """Serialized ArtifactChunk messages from `offset` to the end of the artifact."""
        path = self.store.path(sha256)
        total = self.store.size(sha256)
        chunk_size = min(chunk_size or DEFAULT_CHUNK, MAX_CHUNK)
        if offset > total:
            raise InvalidArgument(f"field 'offset' is {offset}, past the artifact's end ({total} bytes)")
        source = None
        try:
            while offset < total:
                key = (sha256, offset, chunk_size)
                message = self._cache.get(key)
                if message is None:
                    self.misses += 1
                    if source is None:
                        source = open(path, "rb")  # noqa: SIM115 - closed in finally, across yields
                    source.seek(offset)
                    data = source.read(chunk_size)
                    if not data:
                        raise NotFound(f"artifact {sha256} is shorter than its {total} bytes")
                    message = fleet_pb2.ArtifactChunk(offset=offset, data=data, total_size=total).SerializeToString()
                    if len(message) <= self._cache.maxsize:
                        self._cache[key] = message
                else:
                    self.hits += 1
                yield message
                offset += min(chunk_size, total - offset)
        finally:
            if source is not None:
                source.close()
