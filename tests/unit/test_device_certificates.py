"""The controller CA and the agent's certificate files, without processes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefleet.agent.certificates import (
    CERT_FILE,
    KEY_FILE,
    PENDING,
    csr_pem,
    key_pem,
    load_device_tls,
    new_key,
    save_device_tls,
)
from edgefleet.common.durable_files import atomic_write_bytes
from edgefleet.controller.fleet.certificates import CertificateError, DeviceCA


def issuer(pem: str) -> x509.Name:
    return x509.load_pem_x509_certificate(pem.encode()).issuer


def test_ca_is_made_once_with_its_key_private(tmp_path: Path) -> None:
    ca = DeviceCA(tmp_path, tls_sans=("ctrl.example", "10.0.0.5"))
    assert stat.S_IMODE(os.stat(tmp_path / "ca.key").st_mode) == 0o600
    first = (tmp_path / "ca.pem").read_bytes()
    DeviceCA(tmp_path, tls_sans=("ctrl.example", "10.0.0.5"))
    assert (tmp_path / "ca.pem").read_bytes() == first
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["ctrl.example"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert server.issuer == ca.active.subject


def test_device_certificate_names_the_device_whatever_the_csr_says(tmp_path: Path) -> None:
    ca = DeviceCA(tmp_path, cert_lifetime_s=3600)
    issued = ca.sign_device_csr("dev-abc", csr_pem(new_key(), "pretending-to-be-dev-xyz"))
    cert = x509.load_pem_x509_certificate(issued.pem.encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-abc"
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() == pytest.approx(3600 + 300)
    with pytest.raises(CertificateError, match="not a PEM"):
        ca.sign_device_csr("dev-abc", "hello")
    with pytest.raises(CertificateError, match="a CSR is at most"):
        ca.sign_device_csr("dev-abc", "-----BEGIN CERTIFICATE REQUEST-----\n" + "A" * 20_000)
    # A device that has its id may not ask for another name; its own id or the placeholder are fine.
    with pytest.raises(CertificateError, match="names CN='dev-xyz' but this is device dev-abc"):
        ca.sign_device_csr("dev-abc", csr_pem(new_key(), "dev-xyz"), known_device=True)
    assert ca.sign_device_csr("dev-abc", csr_pem(new_key(), "dev-abc"), known_device=True).pem
    assert ca.sign_device_csr("dev-abc", csr_pem(new_key()), known_device=True).pem


def test_rotation_keeps_the_old_ca_trusted_until_retired(tmp_path: Path) -> None:
    ca = DeviceCA(tmp_path)
    old = ca.active
    ca.rotate()
    assert [c.subject for c in ca.cas()] == [ca.active.subject, old.subject]
    assert issuer(ca.sign_device_csr("dev-1", csr_pem(new_key())).pem) == ca.active.subject
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    assert server.issuer == old.subject  # every device trusts it until the old CA is retired
    with pytest.raises(CertificateError, match="already in progress"):
        ca.rotate()
    ca.retire_old()
    assert [c.subject for c in ca.cas()] == [ca.active.subject]
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    assert server.issuer == ca.active.subject
    with pytest.raises(CertificateError, match="no old CA"):
        ca.retire_old()


def test_a_renewal_interrupted_between_its_two_moves_is_finished_on_load(tmp_path: Path) -> None:
    ca = DeviceCA(tmp_path / "controller")
    device = tmp_path / "device"
    first_key = new_key()
    save_device_tls(device, first_key, ca.sign_device_csr("dev-1", csr_pem(first_key)).pem, ca.bundle_pem())
    second_key = new_key()
    second = ca.sign_device_csr("dev-1", csr_pem(second_key)).pem
    # The crash: the new key already moved into place, the new certificate not yet.
    atomic_write_bytes(device / KEY_FILE, key_pem(second_key), mode=0o600)
    atomic_write_bytes(device / (CERT_FILE + PENDING), second.encode())
    tls = load_device_tls(device)
    assert tls is not None and tls.cert_pem == second.encode()
    public = tls.certificate.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == second_key.public_key().public_numbers()
    assert not (device / (CERT_FILE + PENDING)).exists()
