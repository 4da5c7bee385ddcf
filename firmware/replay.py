"""Replay protection for install commands: each nonce is accepted once, until its command expires.

A command can arrive twice without anyone attacking us (MQTT QoS 1 redelivers; a retained message
is sent again on reconnect), and an attacker on the path may resend an old one. Every command
carries a nonce and an expiry; we remember a nonce until its command expires, after which the
expiry check alone refuses it, so the store stays small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefleet.common.durable_files import atomic_write_json, read_json
from edgefleet.firmware.rejections import BundleRejected, RejectReason

NONCE_STORE_FORMAT = 1
MAX_COMMAND_LIFETIME_S = 7 * 24 * 3600  # bounds how long a nonce must be remembered


@dataclass(frozen=True)
class InstallCommand:
    """What the controller sends to start an install (the transport authenticates the sender)."""

    nonce: str
    expires_at: float  # unix seconds
    artifact: str = ""  # e.g. "sha256:<hex>", for logs and acks
    rollout_id: str = ""


class NonceStore:
    """Seen nonces, persisted atomically in ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, float]:
        document = read_json(self.path)
        if document is None:
            return {}
        if document.get("format") != NONCE_STORE_FORMAT:
            raise ValueError(f"{self.path} has format {document.get('format')}, this agent reads 1")
        return {str(k): float(v) for k, v in document["nonces"].items()}

    def seen(self, nonce: str) -> bool:
        return nonce in self._load()

    def accept(self, command: InstallCommand, now: float) -> None:
        """Record the nonce, or refuse a replayed or expired command."""
        if not command.nonce:
            raise BundleRejected(RejectReason.REPLAYED, "install command carries no nonce")
        if command.expires_at <= now:
            raise BundleRejected(RejectReason.COMMAND_EXPIRED, "install command has expired; send a new one")
        if command.expires_at > now + MAX_COMMAND_LIFETIME_S:
            raise BundleRejected(
                RejectReason.COMMAND_EXPIRED, "install command expiry is too far ahead (at most 7 days)"
            )
        nonces = self._load()
        if command.nonce in nonces:
            raise BundleRejected(RejectReason.REPLAYED, f"install command nonce {command.nonce!r} was already used")
        nonces = {n: exp for n, exp in nonces.items() if exp > now}
        nonces[command.nonce] = command.expires_at
        atomic_write_json(self.path, {"format": NONCE_STORE_FORMAT, "nonces": nonces})
