"""The controller's certificate authority: device certificates, the server certificate, rotation.

Files in the state dir (private keys 0600):
  ca.pem / ca.key                    the active CA: signs every certificate issued from now on
  ca-previous.pem / ca-previous.key  the CA before the last `edgefleet ca rotate`, until `ca retire-old`
  ca-bundle.pem                      what devices trust: the active CA first, then the previous one
  server.pem / server.key            the controller's TLS certificate for the names of --tls-san

During a rotation the server certificate stays signed by the previous CA, which every device
trusts, and devices learn the bundle on their next session and renewal; `ca retire-old` re-issues
the server certificate from the active CA and stops accepting client certificates of the old one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import ipaddress
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.common.durable_files import atomic_write_bytes

log = logging.getLogger("edgefleet.controller.fleet.certificates")

DEFAULT_CERT_LIFETIME_S = 90 * 24 * 3600
SERVER_CERT_LIFETIME_S = 365 * 24 * 3600
CA_LIFETIME_S = 10 * 365 * 24 * 3600
CLOCK_SKEW_S = 300  # certificates are valid from a little before they are issued
DEFAULT_TLS_SANS = ("localhost", "127.0.0.1")
DEVICE_URI_PREFIX = "edgefleet://device/"
# A P-256 CSR is under 1 KiB and an RSA-4096 one under 2 KiB: anything near this is not a CSR.
MAX_CSR_BYTES = 16 * 1024
# The CN an agent puts in its CSR before it has an id (enrollment); once it has one, its CSRs may
# name that id or this, and nothing else: a renewal that asks for another name is refused.
PLACEHOLDER_CN = "edgefleet-device"

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
PREVIOUS_CA_FILE = "ca-previous.pem"
PREVIOUS_CA_KEY_FILE = "ca-previous.key"
BUNDLE_FILE = "ca-bundle.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
LOCK_FILE = "ca.lock"


class CertificateError(ValueError):
    """A CSR or certificate that cannot be used; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class IssuedCertificate:
    pem: str
    serial: str
    not_after_ms: int


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def serial_of(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _not_after_ms(cert: x509.Certificate) -> int:
    return int(cert.not_valid_after_utc.timestamp() * 1000)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def load_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    """A CSR a device certificate may be made from, or CertificateError with the one-line reason:
    bounded in size, parseable, self-signed by its key, and the key EC or RSA-2048 or more."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CertificateError(f"the CSR is {len(csr_pem)} bytes; a CSR is at most {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError:
        raise CertificateError("the CSR is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise CertificateError("the CSR's signature does not match its public key")
    public_key = csr.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise CertificateError(f"the CSR's RSA key has {public_key.key_size} bits; use 2048 or more")
    elif not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CertificateError("the CSR's key must be EC (P-256) or RSA")
    return csr


class DeviceCA:
    def __init__(self, state_dir: Path, *, cert_lifetime_s: float = DEFAULT_CERT_LIFETIME_S,
                 tls_sans: Sequence[str] = DEFAULT_TLS_SANS, clock: Callable[[], float] = time.time) -> None:
        self.dir = state_dir
        self.cert_lifetime_s = cert_lifetime_s
        self.tls_sans = tuple(tls_sans) or DEFAULT_TLS_SANS
        self.clock = clock
        self._lock = threading.Lock()
        self.ensure()

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """One change at a time: threads here, and replicas that share this state dir (two first
        starts must not both make a CA)."""
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.dir / LOCK_FILE, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    # -- files ---------------------------------------------------------------------------------
    def _read_cert(self, name: str) -> x509.Certificate | None:
        path = self.dir / name
        return x509.load_pem_x509_certificate(path.read_bytes()) if path.exists() else None

    def _read_key(self, name: str) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key((self.dir / name).read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock(), datetime.timezone.utc)

    def _new_ca(self, cert_name: str, key_name: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        now = self._now()
        # The key's id in the name: a CA rotated within the second it was made must still have a
        # name of its own, or chain building (which matches issuer to subject) confuses the two.
        key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest.hex()[:8]
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EdgeFleet"),
                          x509.NameAttribute(NameOID.COMMON_NAME,
                                             f"EdgeFleet controller CA {now:%Y-%m-%d %H:%M:%S} {key_id}")])
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=CLOCK_SKEW_S))
            .not_valid_after(now + datetime.timedelta(seconds=CA_LIFETIME_S))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        atomic_write_bytes(self.dir / key_name, _key_pem(key), mode=0o600)  # the key first: a cert needs it
        atomic_write_bytes(self.dir / cert_name, _pem(cert), mode=0o644)
        log.info("controller CA created", extra={"file": str(self.dir / cert_name), "sha256": fingerprint(cert)})

    def ensure(self) -> None:
        """Create the CA on first start; (re)issue the server certificate when it is missing, for
        other names than --tls-san, near its end, or not from the CA that signs server certificates."""
        with self._changing():
            if not (self.dir / CA_FILE).exists() or not (self.dir / CA_KEY_FILE).exists():
                self._new_ca(CA_FILE, CA_KEY_FILE)
            for name in (CA_KEY_FILE, PREVIOUS_CA_KEY_FILE, SERVER_KEY_FILE):
                if (self.dir / name).exists():
                    os.chmod(self.dir / name, 0o600)
            self._write_bundle()
            self._ensure_server_cert()

    @property
    def active(self) -> x509.Certificate:
        cert = self._read_cert(CA_FILE)
        assert cert is not None
        return cert

    @property
    def previous(self) -> x509.Certificate | None:
        return self._read_cert(PREVIOUS_CA_FILE)

    def cas(self) -> list[x509.Certificate]:
        """Every CA devices should trust, the active one first."""
        previous = self.previous
        return [self.active, *([previous] if previous is not None else [])]

    def bundle_pem(self) -> str:
        return b"".join(_pem(c) for c in self.cas()).decode()

    def _write_bundle(self) -> None:
        atomic_write_bytes(self.dir / BUNDLE_FILE, self.bundle_pem().encode(), mode=0o644)

    def _server_signer(self) -> tuple[x509.Certificate, str]:
        """The oldest CA still trusted signs the server certificate: every device trusts it."""
        if self.previous is not None:
            return self.previous, PREVIOUS_CA_KEY_FILE
        return self.active, CA_KEY_FILE

    def _ensure_server_cert(self) -> None:
        signer, signer_key = self._server_signer()
        current = self._read_cert(SERVER_CERT_FILE)
        if current is not None and (self.dir / SERVER_KEY_FILE).exists():
            try:
                sans = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                same_names = set(sans) == {_san(n) for n in self.tls_sans}
            except x509.ExtensionNotFound:
                same_names = False
            remaining = current.not_valid_after_utc - self._now()
            if same_names and current.issuer == signer.subject and remaining > datetime.timedelta(days=30):
                return
        key = ec.generate_private_key(ec.SECP256R1())
        now = self._now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.tls_sans[0])]))
            .issuer_name(signer.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=CLOCK_SKEW_S))
            .not_valid_after(min(now + datetime.timedelta(seconds=SERVER_CERT_LIFETIME_S), signer.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([_san(n) for n in self.tls_sans]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._read_key(signer_key), hashes.SHA256())
        )
        atomic_write_bytes(self.dir / SERVER_KEY_FILE, _key_pem(key), mode=0o600)
        atomic_write_bytes(self.dir / SERVER_CERT_FILE, _pem(cert), mode=0o644)
        log.info("server certificate issued", extra={"names": ",".join(self.tls_sans), "sha256": fingerprint(cert)})

    # -- device certificates -------------------------------------------------------------------
    def sign_device_csr(self, device_id: str, csr_pem: str, *, known_device: bool = False) -> IssuedCertificate:
        """A client certificate for `device_id`: the CSR proves the device holds the private key, and
        the identity is the controller's to give. At enrollment the agent has no id yet, so any CN
        goes (it is replaced); for a `known_device` (renewal, the move from a secret) a CSR naming
        another CN than the device's own (or the placeholder) is refused."""
        csr = load_csr(csr_pem)
        if known_device:
            names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            cn = str(names[0].value) if names else ""
            if cn not in ("", PLACEHOLDER_CN, device_id):
                raise CertificateError(f"the CSR names CN={cn!r} but this is device {device_id}; make the CSR "
                                       f"for CN={device_id}")
        public_key = csr.public_key()
        with self._lock:
            ca, ca_key = self.active, self._read_key(CA_KEY_FILE)
            now = self._now()
            cert = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
                .issuer_name(ca.subject).public_key(public_key)
                .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
                .not_valid_before(now - datetime.timedelta(seconds=min(CLOCK_SKEW_S, self.cert_lifetime_s)))
                .not_valid_after(now + datetime.timedelta(seconds=self.cert_lifetime_s))
                .add_extension(x509.SubjectAlternativeName([
                    x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256())
            )
        return IssuedCertificate(_pem(cert).decode(), serial_of(cert), _not_after_ms(cert))

    def from_active(self, cert: x509.Certificate) -> bool:
        return cert.issuer == self.active.subject

    # -- rotation ------------------------------------------------------------------------------
    def rotate(self) -> None:
        """A new active CA; the old one stays trusted (and signs the server certificate) until retired."""
        with self._changing():
            if self.previous is not None:
                raise CertificateError("a rotation is already in progress; finish it with `edgefleet ca retire-old` "
                                       "once every device has renewed")
            os.replace(self.dir / CA_KEY_FILE, self.dir / PREVIOUS_CA_KEY_FILE)
            os.replace(self.dir / CA_FILE, self.dir / PREVIOUS_CA_FILE)
            self._new_ca(CA_FILE, CA_KEY_FILE)
            self._write_bundle()
        log.info("controller CA rotated", extra={"active": fingerprint(self.active)})

    def retire_old(self) -> None:
        with self._changing():
            if self.previous is None:
                raise CertificateError("there is no old CA to retire; rotate first with `edgefleet ca rotate`")
            (self.dir / PREVIOUS_CA_FILE).unlink()
            (self.dir / PREVIOUS_CA_KEY_FILE).unlink()
            self._write_bundle()
            self._ensure_server_cert()
        log.info("old controller CA retired", extra={"active": fingerprint(self.active)})

    # -- gRPC ----------------------------------------------------------------------------------
    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        with open(self.dir / LOCK_FILE, "a") as lock:  # never a rotation half written by another process
            fcntl.flock(lock, fcntl.LOCK_SH)
            try:
                return grpc.ssl_server_certificate_configuration(
                    [((self.dir / SERVER_KEY_FILE).read_bytes(), (self.dir / SERVER_CERT_FILE).read_bytes())],
                    root_certificates=(self.dir / BUNDLE_FILE).read_bytes(),
                )
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def files_stamp(self) -> tuple[tuple[int, int, int] | None, ...]:
        """What the TLS credentials are made of, as the files stand: each is replaced whole on a change."""
        stamps: list[tuple[int, int, int] | None] = []
        for name in (BUNDLE_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE):
            try:
                st = os.stat(self.dir / name)
            except FileNotFoundError:
                stamps.append(None)
                continue
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def server_credentials(self, *, require_client_auth: bool) -> grpc.ServerCredentials:
        """Credentials that follow a rotation without a restart: each handshake asks whether the
        CA changed since the configuration it has, and takes the new one if so. The files say,
        not this object: the rotation may have been made by another process of the controller
        (with workers, the Control process answers `edgefleet ca rotate`; the device workers
        serve the handshakes)."""
        seen = self.files_stamp()

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal seen
            stamp = self.files_stamp()
            if stamp == seen:
                return None
            with self._lock:
                seen = stamp  # taken before the read: a change after it is read at the next handshake
                return self._configuration()

        return grpc.dynamic_ssl_server_credentials(self._configuration(), fetch,
                                                   require_client_authentication=require_client_auth)
