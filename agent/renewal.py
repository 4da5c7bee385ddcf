"""Certificate renewal: at about 2/3 of the certificate's lifetime, over mutual TLS with it.

One loop per agent whatever its transport: a gRPC device renews on the device port it already
uses, an MQTT device (whose broker may take its certificate too) reaches that port only for this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from edgefleet.agent.certificates import DeviceTls, csr_pem, new_key, save_device_tls
from edgefleet.agent.endpoint import ControllerEndpoint
from edgefleet.protos.v1 import fleet_pb2, fleet_pb2_grpc

log = logging.getLogger("edgefleet.agent.renewal")

RENEW_RETRY_S = 30.0  # a failed renewal is tried again after this long (or sooner near the expiry)
_FINAL = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


class RenewalRefused(Exception):
    """The controller refused the renewal for good (the device was revoked or replaced)."""


class CertificateRenewer:
    def __init__(self, endpoint: ControllerEndpoint, device_id: str, *, channel_options: list[tuple[str, Any]],
                 timeout_s: float = 15.0) -> None:
        self.endpoint = endpoint
        self.device_id = device_id
        self.channel_options = channel_options
        self.timeout_s = timeout_s
        self.renew_now = asyncio.Event()  # set by the link when the controller asks (after a CA rotation)
        self.renewals = 0
        self.on_renewed: list[Callable[[DeviceTls], None]] = []

    async def run(self) -> None:
        while True:
            tls = self.endpoint.tls
            assert tls is not None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.renew_now.wait(), max(0.0, tls.renew_at() - time.time()))
            self.renew_now.clear()
            try:
                await self.renew()
            except RenewalRefused:
                raise
            except Exception as exc:  # unreachable controller: try again, sooner as the expiry nears
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
                retry_s = min(RENEW_RETRY_S, max(0.2, (tls.expires_at() - time.time()) / 10))
                log.warning("certificate renewal failed, retrying",
                            extra={"device": self.device_id, "retry_in_s": round(retry_s, 2), "error": detail})
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.renew_now.wait(), retry_s)

    async def renew(self) -> None:
        """A new key, a CSR for it, the certificate kept with the key; then every listener told."""
        assert self.endpoint.state_dir is not None
        key = new_key()
        async with self.endpoint.aio_device_channel(self.channel_options) as channel:
            try:
                reply = await fleet_pb2_grpc.FleetStub(channel).RenewCertificate(
                    fleet_pb2.RenewCertificateRequest(csr_pem=csr_pem(key)), timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _FINAL:
                    raise RenewalRefused(f"certificate renewal for {self.device_id} refused by the controller: "
                                         f"{exc.details()}") from None
                raise
        tls = await asyncio.to_thread(save_device_tls, self.endpoint.state_dir, key, reply.certificate_pem,
                                      reply.ca_bundle_pem)
        self.endpoint.tls = tls
        self.renewals += 1
        log.info("certificate renewed", extra={"device": self.device_id, "not_after_ms": reply.not_after_unix_ms})
        for listener in self.on_renewed:
            listener(tls)
