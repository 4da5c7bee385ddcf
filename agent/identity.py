"""The device's identity: id (and, before certificates or with --insecure, secret) from enrollment,
persisted 0600 so restarts never re-enroll. Its TLS key and certificate live beside it
(agent/certificates.py). Format 2 added `device_port`; format 1 files are still read."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from edgefleet.common.durable_files import atomic_write_json

IDENTITY_FILE = "identity.json"
IDENTITY_FORMAT = 2
READABLE_FORMATS = (1, 2)


class IdentityError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Identity:
    device_id: str
    device_secret: str
    controller: str
    labels: dict[str, str]
    enrolled_at_unix_ms: int
    device_port: int = 0  # the controller's mutual-TLS port; 0: none known (plaintext, or not moved over yet)


def load_identity(state_dir: Path) -> Identity | None:
    path = state_dir / IDENTITY_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") not in READABLE_FORMATS:
            raise IdentityError(f"{path} has format {data.get('format')!r}; this agent reads "
                                f"{', '.join(map(str, READABLE_FORMATS))}")
        return Identity(
            device_id=data["device_id"],
            device_secret=data["device_secret"],
            controller=data.get("controller", ""),
            labels=dict(data.get("labels", {})),
            enrolled_at_unix_ms=int(data.get("enrolled_at_unix_ms", 0)),
            device_port=int(data.get("device_port", 0)),
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
