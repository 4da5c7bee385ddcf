"""Crash-safe file primitives every persisted piece of device state goes through.

A power cut or SIGKILL may stop us between any two syscalls. Each helper here leaves either the
old bytes or the new bytes on disk, never a mix: write a temp file in the same directory, fsync
it, rename it over the target (atomic on POSIX), then fsync the directory so the rename itself
survives a power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename, create or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file written through another handle (e.g. by a copy) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # a temp file left by a crash keeps its old mode otherwise
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, document: dict[str, Any], *, mode: int = 0o644) -> None:
    """Persist a JSON document atomically (sorted keys, so diffs of device state stay readable)."""
    atomic_write_bytes(path, (json.dumps(document, sort_keys=True, indent=1) + "\n").encode(), mode=mode)


def read_json(path: Path) -> dict[str, Any] | None:
    """Read a document written by :func:`atomic_write_json`; ``None`` when it was never written."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    document = json.loads(data)
    if not isinstance(document, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return document


def atomic_symlink(target: str, link: Path) -> None:
    """Point ``link`` at ``target`` in one rename: readers see the old target or the new one."""
    tmp = link.with_name(f".{link.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def remove_tree(path: Path) -> None:
    """Delete a directory tree, tolerating a previous crash that already removed part of it."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    for child in path.iterdir():
        remove_tree(child)
    path.rmdir()
