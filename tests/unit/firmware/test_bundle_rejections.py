"""Every way a bundle must be refused, each with its own reason code."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from bundle_fixtures import HARDWARE_CLASS

from edgefleet.firmware.bundle import (
    BundleRejected,
    RejectReason,
    payload_layout,
    read_head,
    signature_envelope,
    verify_bundle,
    verify_stream,
    write_bundle,
)
from edgefleet.firmware.keys import trusted_keys
from edgefleet.firmware.manifest import canonical_json

R = RejectReason


def reason_of(path, keys, **kwargs) -> RejectReason:
    with pytest.raises(BundleRejected) as exc:
        verify_bundle(path, keys, **kwargs)
    return exc.value.reason


def rewrite(path, tmp_path, *, manifest_bytes=None, signature=b"keep", payload=None, name="re.efb"):
    """Re-lay a bundle with some members replaced (payload: list of (member path, bytes))."""
    with open(path, "rb") as fh:
        head = read_head(fh)
    manifest = head.manifest
    files = []
    data = path.read_bytes()
    offsets = payload_layout(head, manifest)
    for entry in manifest.files:
        files.append((entry.path, data[offsets[entry.path] : offsets[entry.path] + entry.size]))
    if payload is not None:
        files = payload
    sources = []
    for i, (member, blob) in enumerate(files):
        src = tmp_path / f"member{i}"
        src.write_bytes(blob)
        sources.append((member, src))
    return write_bundle(
        tmp_path / name,
        head.manifest_bytes if manifest_bytes is None else manifest_bytes,
        head.signature if signature == b"keep" else signature,
        sources,
    )


def test_unsigned(make_bundle, signing_key, tmp_path):
    path = rewrite(make_bundle(1), tmp_path, signature=None)
    assert reason_of(path, [signing_key.public_key()]) == R.UNSIGNED


def test_signature_by_another_key_under_our_key_id(make_bundle, signing_key, other_key, tmp_path):
    original = make_bundle(1)
    with open(original, "rb") as fh:
        head = read_head(fh)
    forged = json.loads(signature_envelope(head.manifest_bytes, other_key))
    forged["key_id"] = json.loads(head.signature)["key_id"]  # claim to be the trusted key
    path = rewrite(original, tmp_path, signature=canonical_json(forged))
    assert reason_of(path, [signing_key.public_key()]) == R.BAD_SIGNATURE


def test_signature_over_other_bytes(make_bundle, signing_key, tmp_path):
    original = make_bundle(1)
    with open(original, "rb") as fh:
        head = read_head(fh)
    envelope = json.loads(head.signature)
    envelope["signature"] = base64.b64encode(signing_key.sign(b"something else")).decode()
    path = rewrite(original, tmp_path, signature=canonical_json(envelope))
    assert reason_of(path, [signing_key.public_key()]) == R.BAD_SIGNATURE


def test_untrusted_key(make_bundle, other_key, signing_key):
    path = make_bundle(1, key=other_key)
    assert reason_of(path, [signing_key.public_key()]) == R.UNTRUSTED_KEY
    assert reason_of(path, []) == R.UNTRUSTED_KEY


def test_one_flipped_byte_anywhere_is_refused(make_bundle, signing_key, tmp_path):
    """Every single offset: headers, manifest, signature, payload, padding and the end blocks."""
    path = make_bundle(1, extra_bytes=300)
    data = path.read_bytes()
    keys = [signing_key.public_key()]
    accepted, reasons = [], set()
    trusted = trusted_keys(keys)
    for offset in range(len(data)):
        for mask in (0x01, 0x80) if offset % 7 == 0 else (0x01,):
            flipped = bytearray(data)
            flipped[offset] ^= mask
            try:
                verify_stream(io.BytesIO(flipped), trusted)
                accepted.append((offset, mask))
            except BundleRejected as exc:
                reasons.add(exc.reason)
    assert accepted == []
    assert reasons <= {R.CORRUPT, R.BAD_SIGNATURE, R.MANIFEST_MISMATCH, R.TRUNCATED, R.UNSIGNED, R.UNTRUSTED_KEY}
    assert {R.CORRUPT, R.BAD_SIGNATURE, R.MANIFEST_MISMATCH} <= reasons


def test_every_truncation_is_refused(make_bundle, signing_key, tmp_path):
    path = make_bundle(1, extra_bytes=300)
    data = path.read_bytes()
    trusted = trusted_keys([signing_key.public_key()])
    boundaries = {b + d for b in range(0, len(data), 512) for d in (-1, 0, 1)}
    for length in sorted((set(range(0, len(data), 5)) | boundaries) & set(range(len(data)))):
        with pytest.raises(BundleRejected) as exc:
            verify_stream(io.BytesIO(data[:length]), trusted)
        reason = exc.value.reason
        assert reason == R.TRUNCATED or (length % 512 == 0 and reason in (R.CORRUPT, R.UNSIGNED)), length


def test_trailing_bytes_are_refused(make_bundle, signing_key, tmp_path):
    path = make_bundle(1)
    target = tmp_path / "long.efb"
    target.write_bytes(path.read_bytes() + b"\0")
    assert reason_of(target, [signing_key.public_key()]) == R.CORRUPT


def test_payload_that_does_not_match_its_manifest(make_bundle, signing_key, tmp_path):
    original = make_bundle(1, extra_bytes=64)
    keys = [signing_key.public_key()]
    other_bytes = rewrite(original, tmp_path, payload=None, name="same.efb")
    assert verify_bundle(other_bytes, keys).version == 1  # the re-layout itself is faithful
    swapped = rewrite(
        original,
        tmp_path,
        name="swapped.efb",
        payload=[("model.onnx", (tmp_path / "src0" / "model-v1.onnx").read_bytes()), ("weights.bin", b"x" * 64)],
    )
    assert reason_of(swapped, keys) == R.MANIFEST_MISMATCH
    missing = rewrite(
        original,
        tmp_path,
        name="missing.efb",
        payload=[("model.onnx", (tmp_path / "src0" / "model-v1.onnx").read_bytes())],
    )
    assert reason_of(missing, keys) == R.MANIFEST_MISMATCH
    extra = rewrite(
        original,
        tmp_path,
        name="extra.efb",
        payload=[
            ("model.onnx", (tmp_path / "src0" / "model-v1.onnx").read_bytes()),
            ("weights.bin", (tmp_path / "src0" / "weights-v1.bin").read_bytes()),
            ("surprise.bin", b"!"),
        ],
    )
    assert reason_of(extra, keys) == R.MANIFEST_MISMATCH


def test_wrong_hardware_class(make_bundle, signing_key):
    path = make_bundle(1)
    assert reason_of(path, [signing_key.public_key()], hardware_class="arm64-dotprod") == R.WRONG_CLASS
    assert verify_bundle(path, [signing_key.public_key()], hardware_class=HARDWARE_CLASS).version == 1


def test_expired(make_bundle, signing_key):
    path = make_bundle(1, expires_at=time.time() + 60)
    keys = [signing_key.public_key()]
    assert verify_bundle(path, keys, now=time.time()).version == 1
    assert reason_of(path, keys, now=time.time() + 61) == R.EXPIRED


def test_downgrade_needs_an_explicitly_signed_rollback(make_bundle, signing_key):
    keys = [signing_key.public_key()]
    old = make_bundle(2)
    assert reason_of(old, keys, min_version=3) == R.DOWNGRADE
    assert verify_bundle(old, keys, min_version=2).version == 2  # same version is not a downgrade
    rollback = make_bundle(2, rollback=True)
    assert verify_bundle(rollback, keys, min_version=3).rollback is True


def test_not_a_bundle(tmp_path, signing_key):
    junk = tmp_path / "junk.efb"
    junk.write_bytes(b"\x7fELF" + bytes(2000))
    assert reason_of(junk, [signing_key.public_key()]) == R.CORRUPT
    empty = tmp_path / "empty.efb"
    empty.write_bytes(b"")
    assert reason_of(empty, [signing_key.public_key()]) == R.TRUNCATED
