"""The controller's bundle-signing key, and the public keys agents pin at enrollment.

The key lives in `<state dir>/signing-key.pem` (0600), created on first start. To rotate: move
the old key's public half into `<state dir>/retired-keys/` (it stays trusted by newly enrolled
agents), let every agent re-pin, then drop it.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.firmware.keys import (
    generate_signing_key,
    load_public_key,
    load_signing_key,
    public_key_pem,
    save_signing_key,
)

SIGNING_KEY_FILE = "signing-key.pem"
RETIRED_KEYS_DIR = "retired-keys"


def ensure_signing_key(state_dir: Path) -> Ed25519PrivateKey:
    path = state_dir / SIGNING_KEY_FILE
    if not path.exists():
        save_signing_key(generate_signing_key(), path)
    return load_signing_key(path)


def trusted_public_pems(state_dir: Path, key: Ed25519PrivateKey) -> list[str]:
    pems = [public_key_pem(key.public_key())]
    retired = state_dir / RETIRED_KEYS_DIR
    if retired.is_dir():
        pems += [public_key_pem(load_public_key(p)) for p in sorted(retired.glob("*.pem"))]
    return pems
