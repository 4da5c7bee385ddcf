"""Device identity over real TLS: the controller CA, CSR enrollment, mutual TLS, renewal, rotation,
revocation and the move of secret-only devices, with real controller and agent processes."""

from __future__ import annotations

import datetime
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefleet.agent.certificates import csr_pem, key_pem, new_key
from edgefleet.protos.capability import CAPABILITY_VERSION
from edgefleet.protos.v1 import control_pb2, fleet_pb2, fleet_pb2_grpc, profile_pb2
from fleet_harness import AgentProc, ControllerProc, Proc, enroll_request, wait_until

PROFILE = profile_pb2.HardwareProfile(hardware_class="x86_64-sim", os=profile_pb2.OsInfo(hostname="sim"))


def device_cert(controller: ControllerProc) -> tuple[str, bytes, bytes]:
    """Enroll a simulated device: (device id, private key PEM, certificate PEM)."""
    key = new_key()
    reply = enroll_request(controller, fleet_pb2.EnrollRequest(
        token=controller.create_token(), capability_version=CAPABILITY_VERSION, agent_version="sim",
        profile=PROFILE, csr_pem=csr_pem(key)))
    return reply.device_id, key_pem(key), reply.certificate.certificate_pem.encode()


def open_session(controller: ControllerProc, *, key: bytes | None = None, cert: bytes | None = None,
                 address: str | None = None, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    """Open a Session as an agent would and return the first message, or raise the RpcError."""
    creds = grpc.ssl_channel_credentials(controller.ca_path.read_bytes(), key, cert)
    with grpc.secure_channel(address or controller.device_address, creds) as channel:
        hello = fleet_pb2.AgentMessage(hello=fleet_pb2.Hello(capability_version=CAPABILITY_VERSION,
                                                             agent_version="sim", profile=PROFILE))
        call = fleet_pb2_grpc.FleetStub(channel).Session(iter([hello]), metadata=metadata, timeout=5)
        return next(call)


def refusal(fn: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def foreign_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone else's CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def client_cert(device_id: str, issuer_key: Any, issuer: x509.Certificate, *, days: float) -> tuple[bytes, bytes]:
    """A device-shaped certificate signed by `issuer_key`, valid until `days` from now (negative: expired)."""
    key = new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(issuer.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=abs(days) + 1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                f"edgefleet://device/{device_id}")]), critical=False)
            .sign(issuer_key, hashes.SHA256()))
    return key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def cli(controller: ControllerProc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet.controller.cli", *args, "--state-dir",
                           str(controller.state_dir), "--controller", controller.grpc_address],
                          capture_output=True, text=True, timeout=30)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_tls_enrollment_gives_the_device_a_certificate_of_its_own_key(
        controller: ControllerProc, procs: list[Proc], tmp_path: Path) -> None:
    state = controller.state_dir
    assert mode(state / "ca.key") == 0o600 and mode(state / "server.key") == 0o600
    assert (state / "ca.pem").read_text().startswith("-----BEGIN CERTIFICATE")
    agent = AgentProc(tmp_path, "a1", controller, token=controller.create_token()).start()
    procs.append(agent)
    wait_until(lambda: any(d.online for d in controller.devices()), 30, "the agent online over mutual TLS")
    device_id = agent.device_id
    assert mode(agent.state_dir / "device.key") == 0o600
    cert = x509.load_pem_x509_certificate((agent.state_dir / "device.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [f"edgefleet://device/{device_id}"]
    lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(days=89) < lifetime <= datetime.timedelta(days=90)  # the default
    identity = json.loads((agent.state_dir / "identity.json").read_text())
    assert identity["device_secret"] == ""  # over TLS the certificate is the credential
    key = serialization.load_pem_private_key((agent.state_dir / "device.key").read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]


def test_the_device_port_refuses_every_certificate_but_a_current_one_of_ours(controller: ControllerProc) -> None:
    device_a, key_a, cert_a = device_cert(controller)
    device_b, _, _ = device_cert(controller)
    assert open_session(controller, key=key_a, cert=cert_a).WhichOneof("body") == "accepted"

    # No client certificate: the TLS port says what to do; the device port ends the handshake.
    err = refusal(lambda: open_session(controller, address=controller.grpc_address))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "client certificate" in (err.details() or "")
    assert refusal(lambda: open_session(controller)).code() == grpc.StatusCode.UNAVAILABLE

    # A certificate from another CA, and an expired one from ours: refused in the handshake.
    other_key, other_ca = foreign_ca()
    key, cert = client_cert(device_a, other_key, other_ca, days=1)
    assert refusal(lambda: open_session(controller, key=key, cert=cert)).code() == grpc.StatusCode.UNAVAILABLE
    ca_key = serialization.load_pem_private_key((controller.state_dir / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate((controller.state_dir / "ca.pem").read_bytes())
    key, cert = client_cert(device_a, ca_key, ca, days=-1)
    assert refusal(lambda: open_session(controller, key=key, cert=cert)).code() == grpc.StatusCode.UNAVAILABLE
    # One of ours, valid, but never issued (a copy of the CA key would make it): not the device's serial.
    key, cert = client_cert(device_a, ca_key, ca, days=1)
    err = refusal(lambda: open_session(controller, key=key, cert=cert))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "superseded" in (err.details() or "")

    # Device A's certificate claiming to be device B: refused and logged.
    err = refusal(lambda: open_session(controller, key=key_a, cert=cert_a,
                                       metadata=(("edgefleet-device-id", device_b),)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and device_b in (err.details() or "")
    assert "claimed another device's id" in controller.log()


def test_revoked_device_loses_its_stream_at_once_and_for_good(
        controller: ControllerProc, procs: list[Proc], tmp_path: Path) -> None:
    agent = AgentProc(tmp_path, "a1", controller, token=controller.create_token()).start()
    procs.append(agent)
    wait_until(lambda: any(d.online for d in controller.devices()), 30, "the agent online")
    device_id = agent.device_id
    assert device_id is not None
    started = time.monotonic()
    result = cli(controller, "devices", "revoke", device_id)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: not controller.device(device_id).online, 1.0, "the revoked device's stream to end")
    assert time.monotonic() - started < 3  # the CLI's own start-up included
    wait_until(lambda: not agent.running, 15, "the agent to stop: a revocation is final")
    assert "revoked" in agent.log()

    key = (agent.state_dir / "device.key").read_bytes()
    cert = (agent.state_dir / "device.pem").read_bytes()
    err = refusal(lambda: open_session(controller, key=key, cert=cert))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in (err.details() or "")
    creds = grpc.ssl_channel_credentials(controller.ca_path.read_bytes(), key, cert)
    with grpc.secure_channel(controller.device_address, creds) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        err = refusal(lambda: list(stub.FetchArtifact(fleet_pb2.FetchArtifactRequest(sha256="0" * 64), timeout=5)))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        err = refusal(lambda: stub.RenewCertificate(fleet_pb2.RenewCertificateRequest(csr_pem=csr_pem(new_key())),
                                                    timeout=5))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED

    controller.stop()
    controller.close_channel()
    controller.start()  # stored: still refused after a restart
    err = refusal(lambda: open_session(controller, key=key, cert=cert))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = json.loads(cli(controller, "devices", "list", "--json").stdout)["devices"]
    assert [d["revoked"] for d in listed if d["device_id"] == device_id] == [True]
    assert "revoked" in cli(controller, "devices", "list").stdout


def test_agent_renews_its_certificate_before_it_expires(procs: list[Proc], tmp_path: Path) -> None:
    controller = ControllerProc(tmp_path, extra_args=["--cert-lifetime", "6s"])
    procs.append(controller)
    controller.start()
    agent = AgentProc(tmp_path, "a1", controller, token=controller.create_token()).start()
    procs.append(agent)
    wait_until(lambda: any(d.online for d in controller.devices()), 30, "the agent online")
    first = x509.load_pem_x509_certificate((agent.state_dir / "device.pem").read_bytes())

    def renewed() -> bool:
        cert = x509.load_pem_x509_certificate((agent.state_dir / "device.pem").read_bytes())
        return cert.serial_number != first.serial_number

    wait_until(renewed, 10, "a renewed certificate")
    time.sleep(max(0.0, first.not_valid_after_utc.timestamp() - time.time()) + 1)  # the first one expired
    agent.stop()
    agent.start()  # a new handshake, with the renewed certificate
    wait_until(lambda: "certificate renewed" in agent.log() and agent.log().count("session open") >= 2, 20,
               "a session with the renewed certificate")
    assert controller.device(agent.device_id or "").online


# With 2 workers the Control process rotates and retires while the device workers serve the
# handshakes: they must follow the CA files another process changed.
@pytest.mark.parametrize("workers", [1, 2])
def test_ca_rotation_keeps_devices_connected_and_issues_from_the_new_ca(
        workers: int, procs: list[Proc], tmp_path: Path) -> None:
    controller = ControllerProc(tmp_path, workers=workers)
    procs.append(controller)
    controller.start()
    agent = AgentProc(tmp_path, "a1", controller, token=controller.create_token()).start()
    procs.append(agent)
    wait_until(lambda: any(d.online for d in controller.devices()), 30, "the agent online")
    old_ca = x509.load_pem_x509_certificate((controller.state_dir / "ca.pem").read_bytes())
    result = cli(controller, "ca", "rotate")
    assert result.returncode == 0, result.stderr
    new_ca = x509.load_pem_x509_certificate((controller.state_dir / "ca.pem").read_bytes())
    assert new_ca.subject != old_ca.subject
    assert controller.device(agent.device_id or "").online  # the open stream is untouched

    _, _, cert = device_cert(controller)  # issued after the rotation: from the new CA
    assert x509.load_pem_x509_certificate(cert).issuer == new_ca.subject

    # A reconnecting device learns the bundle and is asked to renew from the new CA.
    agent.stop()
    agent.start()

    def from_new_ca() -> bool:
        issued = x509.load_pem_x509_certificate((agent.state_dir / "device.pem").read_bytes())
        return issued.issuer == new_ca.subject

    wait_until(from_new_ca, 20, "the agent's certificate from the new CA")
    assert b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (new_ca, old_ca)) == \
        (agent.state_dir / "ca-bundle.pem").read_bytes()
    result = cli(controller, "ca", "retire-old")
    assert result.returncode == 0, result.stderr
    agent.stop()
    agent.start()  # the server certificate now comes from the new CA; the device trusts it
    wait_until(lambda: agent.log().count("session open") >= 3, 20, "a session after the old CA was retired")


def test_secret_only_device_moves_to_a_certificate_without_re_enrolling(
        procs: list[Proc], tmp_path: Path) -> None:
    old = ControllerProc(tmp_path, insecure=True)  # --insecure still works when asked for
    procs.append(old)
    old.start()
    agent = AgentProc(tmp_path, "a1", old, token=old.create_token()).start()
    procs.append(agent)
    wait_until(lambda: any(d.online for d in old.devices()), 30, "the plaintext agent online")
    device_id = agent.device_id
    assert json.loads((agent.state_dir / "identity.json").read_text())["device_secret"]
    assert not (agent.state_dir / "device.pem").exists()
    agent.stop()
    old.stop()
    old.close_channel()

    controller = ControllerProc(tmp_path)  # the same state dir, now with TLS
    procs.append(controller)
    controller.start()
    moved = AgentProc(tmp_path, "a1", controller).start()  # no token: --ca-cert only
    procs.append(moved)
    wait_until(lambda: controller.device(device_id or "").online, 30, "the moved device online over mutual TLS")
    assert moved.device_id == device_id
    assert "moved from its secret to a certificate" in moved.log()
    cert = x509.load_pem_x509_certificate((moved.state_dir / "device.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id

    # The secret moved it once; it does not buy a second certificate.
    secret = json.loads((moved.state_dir / "identity.json").read_text())["device_secret"]
    with controller.channel() as channel:
        err = refusal(lambda: fleet_pb2_grpc.FleetStub(channel).RenewCertificate(
            fleet_pb2.RenewCertificateRequest(csr_pem=csr_pem(new_key())), timeout=5,
            metadata=(("edgefleet-device-id", device_id or ""), ("edgefleet-device-secret", secret))))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "already has a certificate" in (err.details() or "")


def test_ca_show_prints_the_fingerprint_devices_can_check(controller: ControllerProc) -> None:
    info = controller.call("GetCertificateAuthority", control_pb2.GetCertificateAuthorityRequest())
    assert len(info.cas) == 1 and info.cas[0].active
    assert info.cas[0].sha256_fingerprint in cli(controller, "ca", "show").stdout


def test_bad_csrs_are_refused_with_their_reason_and_spend_nothing(controller: ControllerProc) -> None:
    """A malformed, oversized or wrongly named CSR: refused with its reason; an enrollment token
    offered with a bad CSR is not spent, and renewing may not ask for another device's name."""
    token = controller.create_token()

    def enroll(csr: str) -> Any:
        return enroll_request(controller, fleet_pb2.EnrollRequest(
            token=token, capability_version=CAPABILITY_VERSION, agent_version="sim", profile=PROFILE, csr_pem=csr))

    for csr, reason in [("not a csr", "not a PEM certificate signing request"),
                        ("-----BEGIN CERTIFICATE REQUEST-----\n" + "A" * 40_000, "a CSR is at most")]:
        err = refusal(lambda csr=csr: enroll(csr))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in err.details(), err.details()
    assert enroll(csr_pem(new_key())).device_id, "the token was not spent by the refused attempts"
    _, key, cert = device_cert(controller)
    creds = grpc.ssl_channel_credentials(controller.ca_path.read_bytes(), key, cert)
    with grpc.secure_channel(controller.device_address, creds) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        err = refusal(lambda: stub.RenewCertificate(
            fleet_pb2.RenewCertificateRequest(csr_pem=csr_pem(new_key(), "dev-someone-else")), timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "names CN='dev-someone-else'" in err.details()
