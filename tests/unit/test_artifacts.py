"""The artifact store and the cache of serialized FetchArtifact chunks shared by a rollout's devices."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgefleet.controller.errors import InvalidArgument, NotFound
from edgefleet.controller.store.artifacts import ArtifactStore, ChunkCache
from edgefleet.protos.v1 import fleet_pb2


def decode(messages: list[bytes]) -> list[fleet_pb2.ArtifactChunk]:
    return [fleet_pb2.ArtifactChunk.FromString(m) for m in messages]


@pytest.fixture
def stored(tmp_path: Path) -> tuple[ArtifactStore, str, bytes]:
    store = ArtifactStore(tmp_path / "artifacts")
    data = os.urandom(10 * 1000 + 7)
    return store, store.put_bytes(data), data


def test_chunks_cover_the_artifact_in_order(stored: tuple[ArtifactStore, str, bytes]) -> None:
    store, sha, data = stored
    chunks = decode(list(ChunkCache(store).messages(sha, 0, 1000)))
    assert [c.offset for c in chunks] == list(range(0, len(data), 1000))
    assert {c.total_size for c in chunks} == {len(data)}
    assert b"".join(c.data for c in chunks) == data
    assert len(chunks[-1].data) == 7


def test_a_second_device_is_served_from_the_cache(stored: tuple[ArtifactStore, str, bytes]) -> None:
    store, sha, _ = stored
    cache = ChunkCache(store)
    first = list(cache.messages(sha, 0, 1000))
    assert (cache.hits, cache.misses) == (0, 11)
    second = list(cache.messages(sha, 0, 1000))
    assert second == first
    assert (cache.hits, cache.misses) == (11, 11)


def test_a_resumed_fetch_at_an_odd_offset_is_read_from_disk(stored: tuple[ArtifactStore, str, bytes]) -> None:
    store, sha, data = stored
    cache = ChunkCache(store)
    list(cache.messages(sha, 0, 1000))
    chunks = decode(list(cache.messages(sha, 4321, 1000)))
    assert chunks[0].offset == 4321
    assert b"".join(c.data for c in chunks) == data[4321:]
    assert list(cache.messages(sha, len(data), 1000)) == []


def test_the_cache_stays_within_its_byte_budget(stored: tuple[ArtifactStore, str, bytes]) -> None:
    store, sha, data = stored
    cache = ChunkCache(store, max_bytes=3000)
    chunks = decode(list(cache.messages(sha, 0, 1000)))
    assert b"".join(c.data for c in chunks) == data
    assert cache._cache.currsize <= 3000
    list(cache.messages(sha, 0, 1000))
    assert cache.hits <= 2  # only the newest chunks stayed


def test_bad_requests(stored: tuple[ArtifactStore, str, bytes]) -> None:
    store, sha, data = stored
    cache = ChunkCache(store)
    with pytest.raises(InvalidArgument, match="past the artifact's end"):
        list(cache.messages(sha, len(data) + 1, 1000))
    with pytest.raises(NotFound):
        list(cache.messages("0" * 64, 0, 1000))
    with pytest.raises(InvalidArgument, match="64 lowercase hex"):
        list(cache.messages("../etc/passwd", 0, 1000))
