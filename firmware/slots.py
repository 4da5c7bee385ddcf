"""The A/B slots on disk and the one pointer that says which of them serves.

Layout under the state directory::

    slots/a/, slots/b/     a slot: manifest.json, manifest.sig, payload/..., staged.json
                           (while downloading it holds only bundle-<install>.part)
    active -> slots/a      the serving slot; swapped with one rename, so readers never see a mix
    committed.json         the committed model: slot, version, manifest digest, the previous one
    bad_bundles.json       manifests that failed their self-test or crash-looped

The staging slot is always the one the committed model is *not* in, so nothing an install writes
can touch what is serving until the self-tested pointer swap.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.common.durable_files import atomic_symlink, atomic_write_json, fsync_dir, read_json, remove_tree
from edgefleet.firmware.manifest import Manifest

SLOT_NAMES = ("a", "b")
STORE_FORMAT = 1
STAGED_MARKER = "staged.json"
PAYLOAD_DIR = "payload"


@dataclass(frozen=True)
class ActiveModel:
    """What the runtime should serve: resolve once, then read everything through ``slot_dir``."""

    slot: str
    slot_dir: Path
    model_path: Path
    manifest: Manifest
    committed: bool  # False while the model is on probation


class SlotStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.active_link = state_dir / "active"
        self.committed_path = state_dir / "committed.json"
        self.bad_path = state_dir / "bad_bundles.json"

    def ensure_layout(self) -> None:
        for name in SLOT_NAMES:
            self.slot_dir(name).mkdir(parents=True, exist_ok=True)

    def slot_dir(self, name: str) -> Path:
        if name not in SLOT_NAMES:
            raise ValueError(f"unknown slot {name!r}")
        return self.state_dir / "slots" / name

    @staticmethod
    def other(name: str | None) -> str:
        return "b" if name == "a" else "a"

    # -- the active pointer ----------------------------------------------------------------------

    def active_slot(self) -> str | None:
        try:
            target = os.readlink(self.active_link)
        except FileNotFoundError:
            return None
        return Path(target).name

    def point_active(self, slot: str | None) -> None:
        """Swap the serving slot atomically (``None``: serve nothing, for a device with no model)."""
        if slot is None:
            if self.active_link.is_symlink():
                self.active_link.unlink()
                fsync_dir(self.state_dir)
            return
        if self.active_slot() != slot:
            atomic_symlink(f"slots/{slot}", self.active_link)

    # -- the committed record --------------------------------------------------------------------

    def committed(self) -> dict[str, Any] | None:
        document = read_json(self.committed_path)
        if document is not None and document.get("format") != STORE_FORMAT:
            raise ValueError(f"{self.committed_path} has format {document.get('format')}, this agent reads 1")
        return document

    def write_committed(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.committed_path, {"format": STORE_FORMAT, **record})

    # -- bundles marked bad ----------------------------------------------------------------------

    def bad_bundles(self) -> dict[str, Any]:
        document = read_json(self.bad_path) or {"format": STORE_FORMAT, "bundles": {}}
        return dict(document["bundles"])

    def mark_bad(self, manifest_sha256: str, info: dict[str, Any]) -> None:
        bundles = self.bad_bundles()
        bundles[manifest_sha256] = info
        atomic_write_json(self.bad_path, {"format": STORE_FORMAT, "bundles": bundles})

    # -- slot contents ---------------------------------------------------------------------------

    def clear_slot(self, name: str, *, keep: str | None = None) -> None:
        """Empty a slot (never the serving one), keeping at most the named file (a partial download)."""
        if name == self.active_slot():
            raise RuntimeError(f"refusing to clear slot {name}: it is serving")
        slot = self.slot_dir(name)
        slot.mkdir(parents=True, exist_ok=True)
        for child in slot.iterdir():
            if child.name != keep:
                remove_tree(child)
        fsync_dir(slot)

    def slot_usage(self, name: str) -> int:
        total = 0
        for root, _dirs, files in os.walk(self.slot_dir(name)):
            for f in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(root, f)).st_size
        return total

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.state_dir).free

    def read_slot_manifest(self, name: str) -> Manifest:
        return Manifest.from_bytes((self.slot_dir(name) / "manifest.json").read_bytes())


def manifest_digest(manifest_bytes: bytes) -> str:
    return hashlib.sha256(manifest_bytes).hexdigest()


def active_model(state_dir: Path) -> ActiveModel | None:
    """The model this device serves now, or ``None`` before the first install.

    The runtime calls this at start and after every install; it resolves the pointer once so a swap
    that happens while it loads cannot mix files of two models.
    """
    slots = SlotStore(Path(state_dir))
    slot = slots.active_slot()
    if slot is None:
        return None
    slot_dir = slots.slot_dir(slot)
    manifest = slots.read_slot_manifest(slot)
    committed = slots.committed()
    is_committed = bool(
        committed
        and committed.get("slot") == slot
        and committed.get("manifest_sha256") == manifest_digest((slot_dir / "manifest.json").read_bytes())
    )
    return ActiveModel(
        slot=slot,
        slot_dir=slot_dir,
        model_path=slot_dir / PAYLOAD_DIR / manifest.model_file,
        manifest=manifest,
        committed=is_committed,
    )
