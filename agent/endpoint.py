"""How the agent reaches its controller: plaintext with the device secret (--insecure), or TLS.

Over TLS there are two ports: the controller's address (server-authenticated TLS) takes Enroll
and the one-time move of a secret-only device to a certificate; the device port (mutual TLS)
takes Session, FetchArtifact and renewals, and the device is whoever its certificate names.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import grpc

from edgefleet.agent.certificates import DeviceTls, load_device_tls

DEVICE_ID_HEADER = "edgefleet-device-id"
DEVICE_SECRET_HEADER = "edgefleet-device-secret"


@dataclasses.dataclass
class ControllerEndpoint:
    address: str                  # HOST:PORT the device enrolled with (or --controller)
    insecure: bool = True
    state_dir: Path | None = None
    tls: DeviceTls | None = None  # replaced in place by a renewal, so every later channel uses the new one
    device_port: int = 0

    @property
    def device_address(self) -> str:
        if self.insecure or not self.device_port:
            return self.address
        host = self.address.rpartition(":")[0]
        return f"{host}:{self.device_port}"

    def reload(self) -> None:
        if self.state_dir is not None:
            self.tls = load_device_tls(self.state_dir)

    def _credentials(self) -> grpc.ChannelCredentials:
        if self.tls is None:
            raise RuntimeError("no device certificate loaded; the agent enrolls or moves over before connecting")
        return self.tls.channel_credentials()

    def aio_device_channel(self, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        if self.insecure:
            return grpc.aio.insecure_channel(self.address, options=options)
        return grpc.aio.secure_channel(self.device_address, self._credentials(), options=options)

    def device_channel(self, options: list[tuple[str, Any]]) -> grpc.Channel:
        if self.insecure:
            return grpc.insecure_channel(self.address, options=options)
        return grpc.secure_channel(self.device_address, self._credentials(), options=options)

    def metadata(self, device_id: str, device_secret: str) -> tuple[tuple[str, str], ...]:
        """Plaintext: the id and secret. TLS: nothing, the certificate says who the device is."""
        if self.insecure:
            return ((DEVICE_ID_HEADER, device_id), (DEVICE_SECRET_HEADER, device_secret))
        return ()


def plaintext(address: str) -> ControllerEndpoint:
    return ControllerEndpoint(address=address, insecure=True)
