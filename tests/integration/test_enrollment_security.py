"""Tokens expire and run out, identities are checked, operators and devices never mix."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest

from edgefleet.protos.capability import CAPABILITY_VERSION
from edgefleet.protos.v1 import control_pb2, fleet_pb2, fleet_pb2_grpc
from fleet_harness import ControllerProc, Proc, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def controller(tmp_path, procs: list[Proc]) -> ControllerProc:  # type: ignore[no-untyped-def]
    """A controller run with --insecure: this module checks tokens and device secrets, which TLS
    replaces by certificates (tests/integration/test_device_identity.py checks those)."""
    proc = ControllerProc(tmp_path, insecure=True)
    procs.append(proc)
    return proc.start()


def enroll(controller, token: str, **labels: str) -> fleet_pb2.EnrollResponse:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(controller.grpc_address) as channel:
        return fleet_pb2_grpc.FleetStub(channel).Enroll(
            fleet_pb2.EnrollRequest(token=token, capability_version=CAPABILITY_VERSION, labels=labels), timeout=10
        )


def rpc_error(fn) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def test_token_use_limit_expiry_revocation_and_unknown(controller):
    token = controller.create_token(uses=2)
    enroll(controller, token)
    enroll(controller, token)
    err = rpc_error(lambda: enroll(controller, token))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "used up" in err.details()

    short = controller.create_token(uses=5, ttl_s=1)
    time.sleep(1.2)
    err = rpc_error(lambda: enroll(controller, short))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in err.details()

    revoked = controller.create_token(uses=5)
    token_id = [t for t in controller.call("ListEnrollmentTokens", control_pb2.ListEnrollmentTokensRequest()).tokens
                if t.uses_left == 5 and not t.revoked][-1].token_id
    controller.call("RevokeEnrollmentToken", control_pb2.RevokeEnrollmentTokenRequest(token_id=token_id))
    err = rpc_error(lambda: enroll(controller, revoked))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in err.details()

    err = rpc_error(lambda: enroll(controller, "efe_made-up"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown" in err.details()
    assert len(controller.devices()) == 2  # refused enrollments left no device row


def test_agent_with_a_used_up_token_exits_2_with_one_line(controller, start_agent, tmp_path):
    token = controller.create_token(uses=1)
    first = start_agent("first", token)
    wait_until(lambda: first.device_id, 30, "first enrolled")
    second = start_agent("second", token)
    assert second.wait(30) == 2
    errors = [line for line in second.log().splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "used up" in errors[0]
    assert "Traceback" not in second.log()
    assert not (second.state_dir / "identity.json").exists()
    assert len(controller.devices()) == 1


def test_session_with_a_wrong_secret_is_unauthenticated(controller):
    reply = enroll(controller, controller.create_token())
    with grpc.insecure_channel(controller.grpc_address) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        for device_id, secret in [(reply.device_id, "efd_wrong"), ("dev-nope", reply.device_secret), ("", "")]:
            call = stub.Session(
                iter([fleet_pb2.AgentMessage(hello=fleet_pb2.Hello(capability_version=1))]),
                metadata=(("edgefleet-device-id", device_id), ("edgefleet-device-secret", secret)),
                timeout=10,
            )
            err = rpc_error(lambda call=call: list(call))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        # The right pair is accepted.
        call = stub.Session(
            iter([fleet_pb2.AgentMessage(hello=fleet_pb2.Hello(capability_version=1))]),
            metadata=(("edgefleet-device-id", reply.device_id), ("edgefleet-device-secret", reply.device_secret)),
            timeout=10,
        )
        first = next(call)
        assert first.accepted.device_id == reply.device_id
        call.cancel()


def test_control_needs_an_operator_token_and_devices_never_get_one(controller):
    reply = enroll(controller, controller.create_token())
    for token in ["", "efo_wrong", reply.device_secret]:
        err = rpc_error(lambda token=token: controller.call("ListDevices", control_pb2.ListDevicesRequest(), token))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(controller.grpc_address) as channel:
        from edgefleet.protos.v1 import control_pb2_grpc

        stub = control_pb2_grpc.ControlStub(channel)
        err = rpc_error(lambda: stub.ListDevices(control_pb2.ListDevicesRequest(), timeout=5))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_malformed_and_oversized_fields_are_named(controller):
    token = controller.create_token(uses=5)
    err = rpc_error(lambda: enroll(controller, token, **{"bad key!": "v"}))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'labels'" in err.details()
    many = {f"k{i}": "v" for i in range(100)}
    err = rpc_error(lambda: enroll(controller, token, **many))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'labels' has 100 entries" in err.details()
    big = fleet_pb2.EnrollRequest(token=token, capability_version=1)
    big.profile.os.distro = "x" * (300 * 1024)
    with grpc.insecure_channel(controller.grpc_address) as channel:
        err = rpc_error(lambda: fleet_pb2_grpc.FleetStub(channel).Enroll(big, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'profile'" in err.details()
    huge = fleet_pb2.EnrollRequest(token=token, agent_version="y" * (5 * 1024 * 1024))
    with grpc.insecure_channel(controller.grpc_address) as channel:
        err = rpc_error(lambda: fleet_pb2_grpc.FleetStub(channel).Enroll(huge, timeout=10))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert controller.devices() == []
    # Nothing was spent: all five uses remain.
    tokens = controller.call("ListEnrollmentTokens", control_pb2.ListEnrollmentTokensRequest()).tokens
    assert tokens[0].uses_left == 5


def test_port_in_use_is_one_line_and_exit_2(controller, tmp_path):
    other = ControllerProc(tmp_path / "second")
    (tmp_path / "second").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.controller.cli", "controller", "serve", "--state-dir",
         str(other.state_dir), "--grpc", controller.grpc_address, "--http", "off"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and controller.grpc_address in error_lines[0]
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.controller.cli", "controller", "serve", "--state-dir",
         str(other.state_dir), "--grpc", "127.0.0.1:0", "--http", controller.http_address],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot listen for HTTP" in result.stderr
