"""Content-addressed compile cache: the same (source, recipes, tool-chain, class, data, gate) compiles
once. The key is a sha256 over a canonical JSON of those facts, so it can be recomputed and audited."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    env = os.environ.get("EDGEFLEET_CACHE_DIR")
    return Path(env) / "compile" if env else Path.home() / ".cache" / "edgefleet" / "compile"


def toolchain_versions() -> dict[str, str]:
    """Versions of everything that can change a compiled artifact's bytes or numerics."""
    versions = {"python": platform.python_version()}
    for dist in (
        "edgefleet",
        "onnx",
        "onnxruntime",
        "numpy",
        "onnxslim",
        "ai-edge-quantizer",
        "ai-edge-litert",
        "onnx2tf",
        "tensorflow",
        "openvino",
        "nncf",
    ):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def cache_key(facts: dict[str, Any]) -> str:
    blob = json.dumps(facts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def lookup(cache_dir: Path, key: str) -> Path | None:
    entry = cache_dir / key[:2] / key
    if (entry / "report.json").is_file() and (entry / "manifest.json").is_file():
        return entry
    return None


def store(cache_dir: Path, key: str, folder: Path) -> None:
    """Copy a finished output folder into the cache; concurrent writers race harmlessly (rename)."""
    entry = cache_dir / key[:2] / key
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key[:8]}-"))
    try:
        for item in folder.iterdir():
            shutil.copy2(item, tmp / item.name)
        try:
            tmp.rename(entry)
        except OSError:  # another compile stored it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
