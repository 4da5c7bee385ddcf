"""Ed25519 keys for signing bundles (controller) and pinning trusted signers (agent).

The controller holds one signing key; an agent pins one or more public keys at enrollment.
Keeping several trusted keys at once is what lets the controller rotate: sign with the new key
only after every agent trusts it, then retire the old one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_ID_PREFIX = "ed25519:"


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable fingerprint: sha256 of the raw 32-byte key, so operators can compare keys."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_ID_PREFIX + hashlib.sha256(raw).hexdigest()[:32]


def save_signing_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write the private key as PKCS#8 PEM, readable by its owner only (0600, never overwritten)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key; create one with `edgefleet bundle keygen`")
    return key


def save_public_key(key: Ed25519PublicKey, path: Path) -> None:
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    Path(path).write_bytes(pem)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a trusted key; a private-key PEM is accepted too (its public half is used)."""
    data = Path(path).read_bytes()
    if b"PRIVATE KEY" in data:
        return load_signing_key(path).public_key()
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


TrustedKeys = Mapping[str, Ed25519PublicKey]


def trusted_keys(keys: Iterable[Ed25519PublicKey] | TrustedKeys) -> dict[str, Ed25519PublicKey]:
    """Index public keys by key id, the form verification looks them up in."""
    if isinstance(keys, Mapping):
        return dict(keys)
    return {key_id(key): key for key in keys}


TRUSTED_KEYS_DIR = "trusted_keys"


def public_key_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def pin_public_keys(state_dir: Path, pems: Iterable[str]) -> list[str]:
    """Pin the controller's signing keys on the device (at enrollment); returns their key ids."""
    from edgefleet.common.durable_files import atomic_write_bytes

    directory = Path(state_dir) / TRUSTED_KEYS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    ids = []
    for pem in pems:
        key = serialization.load_pem_public_key(pem.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the controller sent a signing key that is not Ed25519")
        kid = key_id(key)
        atomic_write_bytes(directory / f"{kid.split(':', 1)[1]}.pem", public_key_pem(key).encode())
        ids.append(kid)
    return ids


def pinned_keys(state_dir: Path) -> list[Ed25519PublicKey]:
    """The keys pinned in ``<state_dir>/trusted_keys/*.pem`` (empty when none are)."""
    directory = Path(state_dir) / TRUSTED_KEYS_DIR
    return [load_public_key(p) for p in sorted(directory.glob("*.pem"))] if directory.is_dir() else []
