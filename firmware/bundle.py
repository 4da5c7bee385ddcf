"""The signed bundle file: one canonical, uncompressed tar that a device can verify in one pass.

Layout, in this exact order (the ``.efb`` file is a valid tar, so ``tar tvf`` lists it)::

    manifest.json        canonical JSON manifest (the signed bytes)
    manifest.sig         canonical JSON {algorithm, key_id, signature}: detached Ed25519 signature
    payload/<path> ...   every payload file, in manifest order
    two zero blocks      end of archive, and nothing after them

Why a tar and not a zip: a zip's index sits at the end, so nothing can be checked until the whole
file has arrived; a tar is read front to back, so the manifest and its signature are checked from
the first few kilobytes (a download can be judged before its payload is fetched) and the payload is
hashed as it streams by. Why uncompressed: model weights barely compress, and a device should not
spend CPU on it. Why canonical: every header is regenerated from the signed manifest and compared
byte for byte, and all padding must be zero, so one flipped byte anywhere in the file is refused
(tar's own header checksum would let padding and many header fields change unnoticed).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import tarfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.firmware.keys import TrustedKeys, key_id, trusted_keys
from edgefleet.firmware.manifest import (
    IOSpec,
    Manifest,
    PayloadFile,
    RuntimeSpec,
    SelfTestSpec,
    canonical_json,
    check_payload_path,
)
from edgefleet.firmware.rejections import BundleRejected, RejectReason

__all__ = [
    "BUNDLE_SUFFIX",
    "BundleRejected",
    "BundleSpec",
    "RejectReason",
    "VerifiedBundle",
    "build_bundle",
    "bundle_size",
    "read_manifest",
    "verify_bundle",
    "verify_stream",
]

BUNDLE_SUFFIX = ".efb"
BLOCK = 512
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
PAYLOAD_PREFIX = "payload/"
SIGNATURE_ALGORITHM = "ed25519"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # golden tensors live inline; an image model's fits easily
MAX_SIGNATURE_BYTES = 4096
CHUNK = 1024 * 1024
_ZERO_BLOCK = bytes(BLOCK)


def _padding(size: int) -> int:
    return -size % BLOCK


@functools.lru_cache(maxsize=256)
def _member_header(name: str, size: int) -> bytes:
    """The one header this format allows for a member: no owner, no mtime, mode 0644."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def bundle_size(manifest_bytes_len: int, signature_len: int, files: Iterable[PayloadFile]) -> int:
    """The exact size of a canonical bundle, known from the manifest alone."""
    total = BLOCK + manifest_bytes_len + _padding(manifest_bytes_len)
    total += BLOCK + signature_len + _padding(signature_len)
    for f in files:
        total += BLOCK + f.size + _padding(f.size)
    return total + 2 * BLOCK


# ----------------------------------------------------------------------------------------------
# Building (controller side)


@dataclass(frozen=True)
class BundleSpec:
    """What to put in a bundle; the CLI builds one of these and calls :func:`build_bundle` too."""

    name: str
    version: int
    hardware_class: str
    model_file: str  # the payload path of the entry-point model
    payload: Mapping[str, Path]  # payload path -> file on disk
    io: IOSpec
    self_test: SelfTestSpec
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    created_at: float | None = None  # default: now
    expires_at: float | None = None
    rollback: bool = False


def _file_digest(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def signature_envelope(manifest_bytes: bytes, signing_key: Ed25519PrivateKey) -> bytes:
    """The detached signature member: names the key so a verifier can say *untrusted* vs *bad*."""
    return canonical_json(
        {
            "algorithm": SIGNATURE_ALGORITHM,
            "key_id": key_id(signing_key.public_key()),
            "signature": base64.b64encode(signing_key.sign(manifest_bytes)).decode("ascii"),
        }
    )


def build_bundle(spec: BundleSpec, signing_key: Ed25519PrivateKey, out_path: Path) -> Path:
    """Hash the payload, sign the manifest and write the bundle atomically to ``out_path``."""
    files = []
    for path in spec.payload:
        check_payload_path(path)
    if spec.model_file not in spec.payload:
        raise ValueError(f"model_file {spec.model_file!r} is not one of the payload paths {list(spec.payload)}")
    for path, source in spec.payload.items():
        sha, size = _file_digest(Path(source))
        files.append(PayloadFile(path=path, sha256=sha, size=size))
    manifest = Manifest(
        name=spec.name,
        version=int(spec.version),
        hardware_class=spec.hardware_class,
        runtime=spec.runtime,
        model_file=spec.model_file,
        io=spec.io,
        files=tuple(files),
        self_test=spec.self_test,
        provenance=dict(spec.provenance),
        created_at=time.time() if spec.created_at is None else spec.created_at,
        expires_at=spec.expires_at,
        rollback=spec.rollback,
    )
    manifest_bytes = manifest.canonical_bytes()
    return write_bundle(
        out_path,
        manifest_bytes,
        signature_envelope(manifest_bytes, signing_key),
        [(f.path, Path(spec.payload[f.path])) for f in files],
    )


def write_bundle(
    out_path: Path,
    manifest_bytes: bytes,
    signature: bytes | None,
    payload: Iterable[tuple[str, Path]],
) -> Path:
    """Lay out the members; ``signature=None`` makes an unsigned bundle (only tests want one)."""
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    with open(tmp, "wb") as out:

        def member(name: str, data: bytes) -> None:
            out.write(_member_header(name, len(data)))
            out.write(data)
            out.write(bytes(_padding(len(data))))

        member(MANIFEST_NAME, manifest_bytes)
        if signature is not None:
            member(SIGNATURE_NAME, signature)
        for path, source in payload:
            size = os.stat(source).st_size
            out.write(_member_header(PAYLOAD_PREFIX + path, size))
            with open(source, "rb") as fh:
                copied = 0
                while chunk := fh.read(CHUNK):
                    out.write(chunk)
                    copied += len(chunk)
            if copied != size:
                raise OSError(f"{source} changed size while it was being bundled")
            out.write(bytes(_padding(size)))
        out.write(bytes(2 * BLOCK))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, out_path)
    return out_path


# ----------------------------------------------------------------------------------------------
# Reading and verifying (device side)


class _StrictReader:
    """Reads exact byte counts from a stream and turns a short read into ``truncated``."""

    def __init__(self, fp: BinaryIO) -> None:
        self._fp = fp
        self.offset = 0

    def exact(self, n: int) -> bytes:
        data = self._fp.read(n)
        while len(data) < n:
            more = self._fp.read(n - len(data))
            if not more:
                raise BundleRejected(
                    RejectReason.TRUNCATED,
                    f"bundle ends at byte {self.offset + len(data)} inside a member; the download is "
                    "incomplete, fetch it again",
                )
            data += more
        self.offset += n
        return data

    def zeros(self, n: int, what: str) -> None:
        if n and self.exact(n) != bytes(n):
            raise BundleRejected(RejectReason.CORRUPT, f"non-zero padding after {what}")

    def at_eof(self) -> bool:
        return not self._fp.read(1)


def _parse_header(block: bytes) -> tarfile.TarInfo | None:
    """``None`` for an all-zero block (end of archive); raises ``corrupt`` for a damaged header."""
    if block == _ZERO_BLOCK:
        return None
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "strict")
    except (tarfile.HeaderError, UnicodeDecodeError) as exc:
        raise BundleRejected(RejectReason.CORRUPT, f"damaged member header: {exc}") from None


def _expect_canonical(block: bytes, info: tarfile.TarInfo) -> None:
    if block != _member_header(info.name, info.size):
        raise BundleRejected(RejectReason.CORRUPT, f"member header of {info.name!r} is not canonical")


@dataclass(frozen=True)
class BundleHead:
    """The manifest and signature members: everything needed to judge a bundle before its payload."""

    manifest_bytes: bytes
    signature: bytes | None
    payload_offset: int  # where the first payload header starts

    @property
    def manifest(self) -> Manifest:
        return Manifest.from_bytes(self.manifest_bytes)


def read_head(fp: BinaryIO) -> BundleHead:
    """Read the manifest and signature members from the start of a bundle stream."""
    reader = _StrictReader(fp)
    return _read_head(reader)


def _read_head(reader: _StrictReader) -> BundleHead:
    block = reader.exact(BLOCK)
    info = _parse_header(block)
    if info is None or info.name != MANIFEST_NAME or not info.isreg():
        raise BundleRejected(RejectReason.CORRUPT, "not an EdgeFleet bundle: the first member is not manifest.json")
    if info.size > MAX_MANIFEST_BYTES:
        raise BundleRejected(RejectReason.CORRUPT, f"manifest of {info.size} bytes is larger than allowed")
    _expect_canonical(block, info)
    manifest_bytes = reader.exact(info.size)
    reader.zeros(_padding(info.size), MANIFEST_NAME)

    block = reader.exact(BLOCK)
    info = _parse_header(block)
    if info is None or info.name.startswith(PAYLOAD_PREFIX):
        return BundleHead(manifest_bytes, None, reader.offset - BLOCK)
    if info.name != SIGNATURE_NAME or info.size > MAX_SIGNATURE_BYTES:
        raise BundleRejected(RejectReason.CORRUPT, f"unexpected member {info.name!r} after the manifest")
    _expect_canonical(block, info)
    signature = reader.exact(info.size)
    reader.zeros(_padding(info.size), SIGNATURE_NAME)
    return BundleHead(manifest_bytes, signature, reader.offset)


def read_manifest(path: Path) -> Manifest:
    """The manifest of a bundle file, without verifying it or touching the payload (for inspect)."""
    with open(path, "rb") as fh:
        return read_head(fh).manifest


def check_signature(head: BundleHead, trusted: TrustedKeys) -> str:
    """Check the detached signature; returns the signer's key id."""
    if head.signature is None:
        raise BundleRejected(RejectReason.UNSIGNED, "bundle has no signature; sign it with `edgefleet bundle build`")
    try:
        envelope = json.loads(head.signature)
        if canonical_json(envelope) != head.signature:
            raise ValueError("signature member is not canonical JSON")
        algorithm, signer, signature = envelope["algorithm"], envelope["key_id"], envelope["signature"]
        raw = base64.b64decode(signature, validate=True)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise BundleRejected(RejectReason.BAD_SIGNATURE, f"signature member is malformed: {exc}") from None
    if algorithm != SIGNATURE_ALGORITHM:
        raise BundleRejected(RejectReason.BAD_SIGNATURE, f"signature algorithm {algorithm!r} is not ed25519")
    public_key = trusted.get(signer)
    if public_key is None:
        raise BundleRejected(
            RejectReason.UNTRUSTED_KEY,
            f"bundle is signed by {signer}, which this device does not trust (trusted: "
            f"{', '.join(sorted(trusted)) or 'none'}); pin the controller key with --trusted-key",
        )
    try:
        public_key.verify(raw, head.manifest_bytes)
    except InvalidSignature:
        raise BundleRejected(RejectReason.BAD_SIGNATURE, f"signature by {signer} does not match the manifest") from None
    return str(signer)


def check_policy(manifest: Manifest, *, hardware_class: str | None, min_version: int | None, now: float | None) -> None:
    """The device-specific checks: class, expiry and anti-rollback."""
    if hardware_class is not None and manifest.hardware_class != hardware_class:
        raise BundleRejected(
            RejectReason.WRONG_CLASS,
            f"bundle is built for {manifest.hardware_class!r}, this device is {hardware_class!r}",
        )
    now = time.time() if now is None else now
    if manifest.expires_at is not None and manifest.expires_at <= now:
        raise BundleRejected(
            RejectReason.EXPIRED, f"bundle expired at {manifest.to_dict()['expires_at']}; rebuild or re-sign it"
        )
    if min_version is not None and manifest.version < min_version and not manifest.rollback:
        raise BundleRejected(
            RejectReason.DOWNGRADE,
            f"version {manifest.version} is lower than the committed version {min_version}; "
            "a downgrade needs an explicitly signed rollback bundle (--rollback)",
        )


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed every check, with where each payload file sits in it (for unpacking)."""

    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    signer: str
    payload_offsets: dict[str, int]  # payload path -> byte offset of its data in the bundle
    size: int


def verify_stream(
    fp: BinaryIO,
    trusted_public_keys: Iterable[Ed25519PublicKey] | TrustedKeys,
    *,
    hardware_class: str | None = None,
    min_version: int | None = None,
    now: float | None = None,
) -> VerifiedBundle:
    """Verify a bundle in one front-to-back pass; raises :class:`BundleRejected` with the reason.

    Order matters: the signature is checked before any manifest field is believed, the cheap policy
    checks run before the payload is hashed, and the payload is hashed as it streams by.
    """
    trusted = trusted_keys(trusted_public_keys)
    reader = _StrictReader(fp)
    head = _read_head(reader)
    signer = check_signature(head, trusted)
    document = _load_signed_json(head.manifest_bytes)
    manifest = Manifest.from_dict(document)
    check_policy(manifest, hardware_class=hardware_class, min_version=min_version, now=now)

    offsets: dict[str, int] = {}
    for entry in manifest.files:
        block = reader.exact(BLOCK)
        info = _parse_header(block)
        name = PAYLOAD_PREFIX + entry.path
        if info is None or info.name != name or info.size != entry.size:
            found = "the end of the archive" if info is None else f"{info.name!r} ({info.size} bytes)"
            raise BundleRejected(
                RejectReason.MANIFEST_MISMATCH,
                f"manifest expects {name!r} ({entry.size} bytes) next, the bundle has {found}",
            )
        _expect_canonical(block, info)
        offsets[entry.path] = reader.offset
        digest = hashlib.sha256()
        remaining = entry.size
        while remaining:
            chunk = reader.exact(min(CHUNK, remaining))
            digest.update(chunk)
            remaining -= len(chunk)
        if digest.hexdigest() != entry.sha256:
            raise BundleRejected(
                RejectReason.MANIFEST_MISMATCH,
                f"payload {entry.path!r} has sha256 {digest.hexdigest()[:16]}..., the manifest says "
                f"{entry.sha256[:16]}...",
            )
        reader.zeros(_padding(entry.size), name)

    end = reader.exact(2 * BLOCK)
    if end != bytes(2 * BLOCK):
        if _parse_header(end[:BLOCK]) is not None:
            raise BundleRejected(RejectReason.MANIFEST_MISMATCH, "bundle holds a member the manifest does not list")
        raise BundleRejected(RejectReason.CORRUPT, "end-of-archive blocks are not zero")
    if not reader.at_eof():
        raise BundleRejected(RejectReason.CORRUPT, f"unexpected bytes after the end of the bundle (at {reader.offset})")
    assert head.signature is not None  # check_signature refused unsigned bundles
    return VerifiedBundle(manifest, head.manifest_bytes, head.signature, signer, offsets, reader.offset)


def _load_signed_json(manifest_bytes: bytes) -> dict[str, Any]:
    try:
        document = json.loads(manifest_bytes)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleRejected(RejectReason.CORRUPT, f"signed manifest is not JSON: {exc}") from None
    if not isinstance(document, dict) or canonical_json(document) != manifest_bytes:
        raise BundleRejected(RejectReason.CORRUPT, "signed manifest is not canonical JSON")
    return document


def verify_bundle(
    path: Path,
    trusted_public_keys: Iterable[Ed25519PublicKey] | TrustedKeys,
    *,
    hardware_class: str | None = None,
    min_version: int | None = None,
    now: float | None = None,
) -> Manifest:
    """Verify a bundle file and return its manifest; raises :class:`BundleRejected` otherwise."""
    return verify_file(
        path, trusted_public_keys, hardware_class=hardware_class, min_version=min_version, now=now
    ).manifest


def verify_file(
    path: Path,
    trusted_public_keys: Iterable[Ed25519PublicKey] | TrustedKeys,
    *,
    hardware_class: str | None = None,
    min_version: int | None = None,
    now: float | None = None,
) -> VerifiedBundle:
    with open(path, "rb", buffering=0) as fh:
        return verify_stream(fh, trusted_public_keys, hardware_class=hardware_class, min_version=min_version, now=now)


def payload_layout(head: BundleHead, manifest: Manifest) -> dict[str, int]:
    """Byte offset of each payload file's data, computed from the (verified) head alone."""
    offsets: dict[str, int] = {}
    offset = head.payload_offset
    for entry in manifest.files:
        offsets[entry.path] = offset + BLOCK
        offset += BLOCK + entry.size + _padding(entry.size)
    return offsets
