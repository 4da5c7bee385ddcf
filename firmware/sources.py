"""Where a bundle's bytes come from: one small interface so gRPC, MQTT and a USB stick look alike.

The installer only ever asks for "the bytes from offset N onwards". That is exactly what
``FetchArtifact(sha256, offset)`` streams, what an MQTT artifact topic can serve in numbered
chunks, and what a local file gives with a seek, so resume works the same on every transport.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

DEFAULT_CHUNK = 1024 * 1024


class SourceInterrupted(Exception):
    """The transfer stopped for a reason that may go away (link down, controller restarting).

    The installer keeps what it has and stays in DOWNLOADING; the next attempt resumes.
    Transports map their transient errors to this (gRPC UNAVAILABLE / DEADLINE_EXCEEDED, an MQTT
    disconnect); ``ConnectionError`` and ``TimeoutError`` are treated the same way.
    """


@runtime_checkable
class ArtifactSource(Protocol):
    """A bundle that can be read from any offset.

    ``ref`` is a stable name for the artifact (``sha256:<hex>`` for the controller's
    content-addressed store, ``file:<path>`` for a local file). It is persisted with the install so
    that after a restart the installer can tell "the same bundle, resume" from "a new bundle".
    ``total_size`` must be known before the first byte (the free-space check needs it): for gRPC
    take it from the install command or the first ``ArtifactChunk.total_size``.
    ``read(offset)`` yields consecutive chunks starting at ``offset`` up to the end. The installer may
    stop iterating early (it reads just the head to check the manifest first), so a transport should
    cancel its call when the generator is closed.
    """

    @property
    def ref(self) -> str: ...

    @property
    def total_size(self) -> int: ...

    def read(self, offset: int) -> Iterator[bytes]: ...


class FileSource:
    """A bundle on a local disk or USB stick: the offline path, the same installer code."""

    def __init__(self, path: Path, *, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.path = Path(path).resolve()
        self.chunk_size = chunk_size
        self._size = os.stat(self.path).st_size

    @property
    def ref(self) -> str:
        return f"file:{self.path}"

    @property
    def total_size(self) -> int:
        return self._size

    def read(self, offset: int) -> Iterator[bytes]:
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(offset)
            while chunk := fh.read(self.chunk_size):
                yield chunk

    @classmethod
    def from_ref(cls, ref: str) -> FileSource | None:
        """Re-open a file source after a restart, if it is still there."""
        if not ref.startswith("file:"):
            return None
        path = Path(ref[len("file:") :])
        return cls(path) if path.is_file() else None


class ControllerArtifact:
    """Base of the transports' sources for an artifact in the controller's content-addressed
    store: the ref is its sha256 and the size comes with the command, before the first byte."""

    def __init__(self, sha256: str, size: int) -> None:
        self.sha256 = sha256
        self._size = size

    @property
    def ref(self) -> str:
        return f"sha256:{self.sha256}"

    @property
    def total_size(self) -> int:
        return self._size
