"""Builds for devices: bundles made per hardware class, and the install action that ships one."""

from __future__ import annotations

from edgefleet.controller.errors import (
    InvalidArgument,
    NotFound,
)
from edgefleet.controller.store.artifacts import ArtifactStore
from edgefleet.protos.v1 import fleet_pb2


def bundle_install_action(artifacts: ArtifactStore, sha256: str) -> fleet_pb2.InstallBundle:
    """The install action for an uploaded bundle, with name and version read from its manifest."""
    from edgefleet.firmware.bundle import read_manifest
    from edgefleet.firmware.rejections import BundleRejected

    path = artifacts.path(sha256)
    if not path.exists():
        raise NotFound(f"no artifact {sha256}; upload the bundle first")
    try:
        manifest = read_manifest(path)
    except BundleRejected as exc:
        raise InvalidArgument(f"artifact {sha256[:12]} is not a readable bundle: {exc.message}") from None
    return fleet_pb2.InstallBundle(sha256=sha256, size=path.stat().st_size, name=manifest.name,
                                   version=manifest.version)
