"""The device's identity: id and secret from enrollment, persisted 0600 so restarts never re-enroll."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from edgefleet.common.durable_files import atomic_write_json

IDENTITY_FILE = "identity.json"
IDENTITY_FORMAT = 1


class IdentityError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Identity:
    device_id: str
    device_secret: str
    controller: str
    labels: dict[str, str]
    enrolled_at_unix_ms: int


def load_identity(state_dir: Path) -> Identity | None:
    path = state_dir / IDENTITY_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != IDENTITY_FORMAT:
            raise IdentityError(f"{path} has format {data.get('format')!r}; this agent reads {IDENTITY_FORMAT}")
        return Identity(
            device_id=data["device_id"],
            device_secret=data["device_secret"],
            controller=data.get("controller", ""),
            labels=dict(data.get("labels", {})),
            enrolled_at_unix_ms=int(data.get("enrolled_at_unix_ms", 0)),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IdentityError(
            f"cannot read {path}: {exc}; restore it from a backup, or delete it and enroll again with --token"
        ) from None


def save_identity(state_dir: Path, identity: Identity) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    atomic_write_json(
        state_dir / IDENTITY_FILE, {"format": IDENTITY_FORMAT, **dataclasses.asdict(identity)}, mode=0o600
    )
