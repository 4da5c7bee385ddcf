"""The bundle format: round trip, canonical layout, keys, and reading the head without the payload."""

from __future__ import annotations

import io
import stat
import tarfile
import time
from pathlib import Path

import pytest
from bundle_fixtures import HARDWARE_CLASS, affine_spec

from edgefleet.firmware.bundle import (
    BundleRejected,
    RejectReason,
    build_bundle,
    bundle_size,
    read_head,
    read_manifest,
    verify_bundle,
    verify_file,
)
from edgefleet.firmware.keys import (
    generate_signing_key,
    key_id,
    load_public_key,
    load_signing_key,
    save_public_key,
    save_signing_key,
    trusted_keys,
)
from edgefleet.firmware.manifest import Manifest, check_payload_path


def test_round_trip_keeps_every_manifest_field(make_bundle, signing_key, tmp_path):
    path = make_bundle(3, extra_bytes=5000)
    manifest = verify_bundle(path, [signing_key.public_key()], hardware_class=HARDWARE_CLASS, min_version=1)
    assert (manifest.name, manifest.version, manifest.hardware_class) == ("affine", 3, HARDWARE_CLASS)
    assert manifest.format_version == 1
    assert manifest.runtime.execution_provider == "CPUExecutionProvider"
    assert [f.path for f in manifest.files] == ["model.onnx", "weights.bin"]
    assert manifest.files[1].size == 5000
    assert manifest.io.inputs[0].name == "x"
    assert manifest.self_test.inputs["x"].to_array().shape == (1, 4)
    assert manifest.provenance["recipe"] == "fp32"
    assert manifest.expires_at is not None and manifest.rollback is False
    assert Manifest.from_bytes(manifest.canonical_bytes()) == manifest


def test_bundle_is_a_plain_tar_in_canonical_order(make_bundle):
    path = make_bundle(1, extra_bytes=700)
    with tarfile.open(path) as tar:
        names = tar.getnames()
        assert names == ["manifest.json", "manifest.sig", "payload/model.onnx", "payload/weights.bin"]
        assert {m.mtime for m in tar.getmembers()} == {0}
    with open(path, "rb") as fh:
        head = read_head(fh)
    manifest = head.manifest
    assert head.signature is not None
    assert path.stat().st_size == bundle_size(len(head.manifest_bytes), len(head.signature), manifest.files)


def test_building_twice_gives_identical_bytes(tmp_path, signing_key):
    spec = affine_spec(tmp_path / "src", version=1, created_at=1_700_000_000, expires_at=None)
    a = build_bundle(spec, signing_key, tmp_path / "a.efb").read_bytes()
    b = build_bundle(spec, signing_key, tmp_path / "b.efb").read_bytes()
    assert a == b  # Ed25519 signatures are deterministic, the layout is canonical


def test_manifest_is_read_without_touching_the_payload(make_bundle):
    path = make_bundle(2, extra_bytes=100_000)
    head_only = io.BytesIO(path.read_bytes()[:4096])  # the payload is not even there
    assert read_head(head_only).manifest.version == 2
    assert read_manifest(path).version == 2


def test_verified_offsets_point_at_the_payload_bytes(make_bundle, signing_key, tmp_path):
    path = make_bundle(1, extra_bytes=3000)
    verified = verify_file(path, [signing_key.public_key()])
    data = path.read_bytes()
    src = tmp_path / "src0" / "weights-v1.bin"
    offset = verified.payload_offsets["weights.bin"]
    assert data[offset : offset + 3000] == src.read_bytes()


def test_several_trusted_keys_allow_rotation(make_bundle, signing_key, other_key):
    old = make_bundle(1)
    new = make_bundle(2, key=other_key)
    both = [signing_key.public_key(), other_key.public_key()]
    assert verify_bundle(old, both).version == 1
    assert verify_bundle(new, both).version == 2
    with pytest.raises(BundleRejected) as exc:
        verify_bundle(new, [signing_key.public_key()])
    assert exc.value.reason == RejectReason.UNTRUSTED_KEY


def test_signing_key_file_is_private_and_round_trips(tmp_path):
    key = generate_signing_key()
    path = tmp_path / "signing.pem"
    save_signing_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(load_signing_key(path).public_key()) == key_id(key.public_key())
    with pytest.raises(FileExistsError):
        save_signing_key(key, path)  # never overwrite a signing key
    pub = tmp_path / "signing.pub.pem"
    save_public_key(key.public_key(), pub)
    assert key_id(load_public_key(pub)) == key_id(key.public_key())
    assert key_id(load_public_key(path)) == key_id(key.public_key())  # a private PEM works as a trust anchor
    assert key_id(key.public_key()).startswith("ed25519:")
    assert list(trusted_keys([key.public_key()])) == [key_id(key.public_key())]


@pytest.mark.parametrize("bad", ["../escape", "/abs", "a/../../b", "spaces are bad", "x" * 93, ""])
def test_payload_paths_cannot_escape_the_slot(bad):
    with pytest.raises(ValueError):
        check_payload_path(bad)


def test_manifest_newer_than_the_agent_is_refused_clearly(signing_key, tmp_path):
    spec = affine_spec(tmp_path / "src", version=1)
    path = build_bundle(spec, signing_key, tmp_path / "b.efb")
    document = read_manifest(path).to_dict()
    document["format_version"] = 99
    with pytest.raises(BundleRejected) as exc:
        Manifest.from_dict(document)
    assert exc.value.reason == RejectReason.UNSUPPORTED_FORMAT


def test_created_at_defaults_to_now(signing_key, tmp_path):
    spec = affine_spec(tmp_path / "src", version=1, created_at=None)
    before = time.time()
    manifest = read_manifest(build_bundle(spec, signing_key, tmp_path / "b.efb"))
    assert before - 1 <= manifest.created_at <= time.time() + 1


def test_bundle_spec_requires_model_file_in_payload(tmp_path, signing_key):
    spec = affine_spec(tmp_path / "src", version=1, model_file="missing.onnx")
    with pytest.raises(ValueError, match="model_file"):
        build_bundle(spec, signing_key, Path(tmp_path / "x.efb"))
