"""Who a device is over TLS: the peer certificate, checked against the store on every call.

Transport-agnostic: the gRPC servicer hands in the peer's PEM certificate (the TLS handshake
already checked that it chains to a CA of ours and has not expired) and whatever id the call
claims; this module decides. Revocation is checked here, from the store, on every Session,
FetchArtifact and renewal, so it holds across replicas and restarts.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.x509.oid import NameOID

from edgefleet.controller.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from edgefleet.controller.fleet.certificates import DEVICE_URI_PREFIX, CertificateError, DeviceCA, load_csr, serial_of
from edgefleet.controller.fleet.presence import PresenceTracker
from edgefleet.controller.store.base import DeviceRecord, Store

if TYPE_CHECKING:
    from edgefleet.controller.fleet.broker_auth import BrokerAuth

log = logging.getLogger("edgefleet.controller.fleet.identity")


@dataclasses.dataclass(frozen=True)
class PeerDevice:
    record: DeviceRecord
    from_active_ca: bool  # False during a rotation for a certificate of the old CA: renew it


@dataclasses.dataclass(frozen=True)
class DeviceCertificateIssued:
    pem: str
    bundle_pem: str
    not_after_ms: int


def revoked_refusal(record: DeviceRecord) -> PermissionDenied:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.revoked_at_ms / 1000))
    return PermissionDenied(f"device {record.device_id} was revoked at {when}; enroll it again with a new token")


class DeviceIdentities:
    def __init__(self, store: Store, ca: DeviceCA, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.ca = ca
        self.clock = clock

    def peer_device(self, cert_pem: bytes, claimed_id: str = "") -> PeerDevice:
        """The device a verified client certificate names; refuses a revoked or superseded one,
        and a call that claims to be another device (logged: it is a misbehaving or stolen key)."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise Unauthenticated("the client certificate cannot be read") from None
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        device_id = str(names[0].value) if names else ""
        try:
            uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if not device_id or DEVICE_URI_PREFIX + device_id not in uris:
            raise Unauthenticated("the client certificate is not a device certificate of this controller "
                                  f"(no CN with a matching {DEVICE_URI_PREFIX}<id> URI); enroll the device")
        if claimed_id and claimed_id != device_id:
            log.warning("device claimed another device's id", extra={"device": device_id, "claimed": claimed_id})
            raise PermissionDenied(f"the client certificate is for device {device_id}, but the call claims "
                                   f"{claimed_id}; a device may only speak for itself")
        record = self.store.get_device(device_id)
        if record is None:
            raise Unauthenticated(f"device {device_id} is not enrolled here; enroll it with a token")
        if record.revoked:
            log.warning("revoked device refused", extra={"device": device_id})
            raise revoked_refusal(record)
        serial = serial_of(cert)
        if serial not in (record.cert_serial, record.previous_cert_serial):
            log.warning("superseded certificate refused", extra={"device": device_id, "serial": serial})
            raise Unauthenticated(f"certificate {serial} of device {device_id} was superseded by a newer one; "
                                  "use the newest certificate in the agent's state dir")
        return PeerDevice(record, self.ca.from_active(cert))

    def check_csr(self, csr_pem: str) -> None:
        """Refuse a CSR that cannot be signed before anything is spent on it (an enrollment token)."""
        try:
            load_csr(csr_pem)
        except CertificateError as exc:
            raise InvalidArgument(str(exc)) from None

    def issue(self, record: DeviceRecord, csr_pem: str, *, known_device: bool = False) -> DeviceCertificateIssued:
        """Sign a device's CSR: at enrollment, or for a `known_device` (renewal, the move of a
        secret-only device), whose CSR may name no other device."""
        if record.revoked:
            raise revoked_refusal(record)
        if not csr_pem:
            raise InvalidArgument("no CSR given; the agent makes one from its own key pair")
        try:
            issued = self.ca.sign_device_csr(record.device_id, csr_pem, known_device=known_device)
        except CertificateError as exc:
            raise InvalidArgument(str(exc)) from None
        self.store.set_device_certificate(record.device_id, issued.serial, issued.not_after_ms)
        log.info("device certificate issued", extra={"device": record.device_id, "serial": issued.serial,
                                                     "not_after_ms": issued.not_after_ms})
        return DeviceCertificateIssued(issued.pem, self.ca.bundle_pem(), issued.not_after_ms)

    def rotate(self) -> None:
        try:
            self.ca.rotate()
        except CertificateError as exc:
            raise FailedPrecondition(str(exc)) from None

    def retire_old(self) -> None:
        try:
            self.ca.retire_old()
        except CertificateError as exc:
            raise FailedPrecondition(str(exc)) from None


def require_known(record: DeviceRecord | None, device_id: str) -> DeviceRecord:
    if record is None:
        raise NotFound(f"no device {device_id!r}; see `edgefleet devices list`")
    return record


def revoke_device(store: Store, presence: PresenceTracker, mqtt_logins: BrokerAuth | None, device_id: str,
                  now_ms: int) -> DeviceRecord:
    """Revoke a device: stored first (so every replica, and this one after a restart, refuses it
    on its next handshake), then its open stream here is ended and its broker login removed."""
    record = require_known(store.revoke_device(device_id, now_ms), device_id)
    ended = presence.end_revoked(device_id)
    had_login = mqtt_logins.revoke(device_id) if mqtt_logins is not None else False
    log.warning("device revoked", extra={"device": device_id, "stream_ended": ended, "mqtt_login_removed": had_login})
    return record
