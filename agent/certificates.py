"""The device's TLS identity: its own key pair, the certificate the controller signed, the CAs it trusts.

Files in the agent's state dir:
  device.key     the private key (EC P-256, 0600); made here, never sent anywhere
  device.pem     the certificate (CN = device id, URI SAN edgefleet://device/<id>)
  ca-bundle.pem  the controller CAs to trust, as last handed over (enrollment, session, renewal)

A renewal makes a new key pair. The new key and certificate are written beside the old ones
(`.new`) and then moved into place; a crash between the two moves is finished on the next load,
so the key and the certificate on disk always belong together.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefleet.common.durable_files import atomic_write_bytes

KEY_FILE = "device.key"
CERT_FILE = "device.pem"
BUNDLE_FILE = "ca-bundle.pem"
PENDING = ".new"
RENEW_AT_FRACTION = 2 / 3


class CertificateFilesError(Exception):
    pass


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def csr_pem(key: ec.EllipticCurvePrivateKey, name: str = "edgefleet-device") -> str:
    """A CSR only proves the key; the controller names the certificate after the device id."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64] or "edgefleet-device")]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclasses.dataclass(frozen=True)
class DeviceTls:
    key_pem: bytes
    cert_pem: bytes
    bundle_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    def renew_at(self) -> float:
        """Unix time at which to renew: about 2/3 into the certificate's lifetime."""
        cert = self.certificate
        start, end = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
        return start + (end - start) * RENEW_AT_FRACTION

    def expires_at(self) -> float:
        return self.certificate.not_valid_after_utc.timestamp()

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.bundle_pem, self.key_pem, self.cert_pem)

    def server_only_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.bundle_pem)


def _matches(key: bytes, cert: bytes) -> bool:
    private = serialization.load_pem_private_key(key, password=None)
    public = x509.load_pem_x509_certificate(cert).public_key()
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(private.public_key().public_bytes(serialization.Encoding.DER, raw)
                == public.public_bytes(serialization.Encoding.DER, raw))


def _finish_pending(state_dir: Path) -> None:
    key_new, cert_new = state_dir / (KEY_FILE + PENDING), state_dir / (CERT_FILE + PENDING)
    if cert_new.exists() and key_new.exists() and _matches(key_new.read_bytes(), cert_new.read_bytes()):
        os.replace(key_new, state_dir / KEY_FILE)
        os.replace(cert_new, state_dir / CERT_FILE)
        return
    if cert_new.exists() and not key_new.exists() and (state_dir / KEY_FILE).exists() \
            and _matches((state_dir / KEY_FILE).read_bytes(), cert_new.read_bytes()):
        os.replace(cert_new, state_dir / CERT_FILE)  # the crash fell between the two moves
        return
    for leftover in (key_new, cert_new):  # a renewal that never got its certificate
        leftover.unlink(missing_ok=True)


def load_device_tls(state_dir: Path) -> DeviceTls | None:
    """The device's key, certificate and CA bundle; None when it has no certificate yet."""
    _finish_pending(state_dir)
    paths = [state_dir / KEY_FILE, state_dir / CERT_FILE, state_dir / BUNDLE_FILE]
    if not all(p.exists() for p in paths[:2]):
        return None
    if not paths[2].exists():
        raise CertificateFilesError(f"{paths[2]} is missing; copy the controller's STATE_DIR/ca-bundle.pem there")
    return DeviceTls(*(p.read_bytes() for p in paths))


def save_bundle(state_dir: Path, bundle_pem: str | bytes) -> None:
    data = bundle_pem.encode() if isinstance(bundle_pem, str) else bundle_pem
    path = state_dir / BUNDLE_FILE
    if not path.exists() or path.read_bytes() != data:
        atomic_write_bytes(path, data, mode=0o644)


def save_device_tls(state_dir: Path, key: ec.EllipticCurvePrivateKey, cert_pem: str, bundle_pem: str) -> DeviceTls:
    """Keep a newly issued certificate with its key (see the module docstring for the order)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if bundle_pem:
        save_bundle(state_dir, bundle_pem)
    atomic_write_bytes(state_dir / (KEY_FILE + PENDING), key_pem(key), mode=0o600)
    atomic_write_bytes(state_dir / (CERT_FILE + PENDING), cert_pem.encode(), mode=0o644)
    _finish_pending(state_dir)
    tls = load_device_tls(state_dir)
    assert tls is not None
    return tls


def describe(tls: DeviceTls) -> dict[str, object]:
    cert = tls.certificate
    return {"serial": format(cert.serial_number, "x"), "issuer": cert.issuer.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "renew_in_s": round(tls.renew_at() - time.time(), 1),
            "expired": cert.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc)}
