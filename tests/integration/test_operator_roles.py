"""Operator roles and the audit log, against a real controller process through the real CLI."""

from __future__ import annotations

import json

import grpc
import pytest
from click.testing import CliRunner

from edgefleet.controller.cli.main import cli
from edgefleet.protos.v1 import control_pb2

pytestmark = pytest.mark.integration


@pytest.fixture
def run(controller, monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    """The CLI as a given token: `run(token, *args)`; token None = the state dir's admin token."""
    for var in ("EDGEFLEET_CONTROLLER", "EDGEFLEET_TOKEN", "EDGEFLEET_STATE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EDGEFLEET_CONFIG", str(tmp_path / "no-config.toml"))

    def invoke(token: str | None, *args: str):  # type: ignore[no-untyped-def]
        env = {"EDGEFLEET_TOKEN": token} if token else None
        return CliRunner().invoke(cli, [*args, "--state-dir", str(controller.state_dir)], env=env,
                                  catch_exceptions=False)

    return invoke


def create(run, role: str, name: str = "") -> dict:  # type: ignore[no-untyped-def]
    result = run(None, "operator-token", "create", "--role", role, "--name", name or role, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["token"].startswith("efo_") and info["role"] == role and info["token_id"].startswith("opt-")
    return info


def test_roles_are_enforced_and_every_change_and_refusal_is_audited(run, controller):
    admin_secret = controller.operator_token
    viewer = create(run, "viewer", "dashboards")
    operator = create(run, "operator", "release-bot")

    # A viewer reads the fleet...
    for args in (["devices", "list", "--json"], ["rollout", "list", "--json"], ["token", "list", "--json"]):
        ok = run(viewer["token"], *args)
        assert ok.exit_code == 0, (args, ok.output)
    # ...and changes nothing: refused before the handler runs, naming the role needed and the caller's.
    for args, method in ((["rollout", "create", "det:1", "--to", "all"], "CreateRollout"),
                         (["rollout", "pause", "r-does-not-exist"], "ChangeRollout"),
                         (["token", "create"], "CreateEnrollmentToken")):
        refused = run(viewer["token"], *args)
        assert refused.exit_code == 2, refused.output
        assert f"{method} needs role operator" in refused.output, refused.output
        assert f"({viewer['token_id']}) has role viewer" in refused.output
        assert "permission_denied" in refused.output
    with pytest.raises(grpc.RpcError) as caught:
        controller.call("CreateRollout", control_pb2.CreateRolloutRequest(model="det", version=1),
                        token=viewer["token"])
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert run(viewer["token"], "audit", "list").exit_code == 2  # the audit log is for operators and admins

    # An operator changes the fleet but cannot hand out operator tokens; an admin can.
    enrollment = run(operator["token"], "token", "create", "--json")
    assert enrollment.exit_code == 0, enrollment.output
    enrollment_secret = json.loads(enrollment.output)["token"]
    denied = run(operator["token"], "operator-token", "create", "--role", "admin")
    assert denied.exit_code == 2 and "CreateOperatorToken needs role admin" in denied.output
    assert "has role operator" in denied.output
    assert run(operator["token"], "operator-token", "list").exit_code == 2
    missing = run(operator["token"], "rollout", "pause", "r-missing")
    assert missing.exit_code == 2 and "no rollout" in missing.output  # allowed; the rollout is not there

    # The list shows roles and never a secret.
    listed = run(None, "operator-token", "list", "--json")
    assert listed.exit_code == 0, listed.output
    tokens = {t["token_id"]: t for t in json.loads(listed.output)["tokens"]}
    assert {tokens[viewer["token_id"]]["role"], tokens[operator["token_id"]]["role"]} == {"viewer", "operator"}
    bootstrap = next(t for t in tokens.values() if t["created_by"] == "")
    assert bootstrap["role"] == "admin" and tokens[viewer["token_id"]]["created_by"] == bootstrap["token_id"]
    for secret in (viewer["token"], operator["token"], admin_secret):
        assert secret not in listed.output
    table = run(None, "operator-token", "list")
    assert table.exit_code == 0 and "release-bot" in table.output and "active" in table.output

    # A revoked token is refused at once; the last usable admin cannot be revoked.
    revoked = run(None, "operator-token", "revoke", operator["token_id"])
    assert revoked.exit_code == 0 and operator["token_id"] in revoked.output
    refused = run(operator["token"], "devices", "list")
    assert refused.exit_code == 2 and "refused the operator token" in refused.output and "revoked" in refused.output
    with pytest.raises(grpc.RpcError) as caught:
        controller.call("ListDevices", control_pb2.ListDevicesRequest(), token=operator["token"])
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    last = run(None, "operator-token", "revoke", bootstrap["token_id"])
    assert last.exit_code == 2 and "last usable admin" in last.output
    assert "revoked" in run(None, "operator-token", "list").output

    # The audit log: who, what, outcome, refusals included, no secret anywhere.
    audit = run(None, "audit", "list", "--json", "--since", "1h")
    assert audit.exit_code == 0, audit.output
    entries = json.loads(audit.output)["entries"]
    seen = [(e["token_id"], e["method"], e["outcome"]) for e in entries]
    assert (bootstrap["token_id"], "CreateOperatorToken", "ok") in seen
    assert (viewer["token_id"], "CreateRollout", "PERMISSION_DENIED") in seen
    assert (viewer["token_id"], "ChangeRollout", "PERMISSION_DENIED") in seen
    assert (viewer["token_id"], "ListAudit", "PERMISSION_DENIED") in seen  # a refused read is recorded too
    assert (operator["token_id"], "CreateEnrollmentToken", "ok") in seen
    assert (operator["token_id"], "CreateOperatorToken", "PERMISSION_DENIED") in seen
    assert (operator["token_id"], "ChangeRollout", "NOT_FOUND") in seen
    assert (bootstrap["token_id"], "RevokeOperatorToken", "ok") in seen
    assert (bootstrap["token_id"], "RevokeOperatorToken", "FAILED_PRECONDITION") in seen
    # Reads that were allowed are not recorded; a refused one is.
    assert not any(e["method"] in ("ListDevices", "ListRollouts", "ListOperatorTokens") and e["outcome"] == "ok"
                   for e in entries)
    assert (operator["token_id"], "ListOperatorTokens", "PERMISSION_DENIED") in seen
    pause = next(e for e in entries if e["method"] == "ChangeRollout" and e["outcome"] == "PERMISSION_DENIED")
    assert pause["role"] == "viewer" and pause["arguments"] == {"rollout_id": "r-does-not-exist", "action": "pause"}
    assert "needs role operator" in pause["message"]
    created = next(e for e in entries if e["method"] == "CreateOperatorToken" and e["outcome"] == "ok")
    assert created["arguments"] == {"role": "viewer", "name": "dashboards"}
    for secret in (viewer["token"], operator["token"], admin_secret, enrollment_secret):
        assert secret not in audit.output
    assert "efo_" not in audit.output and "efe_" not in audit.output
    assert [e["method"] for e in json.loads(run(None, "audit", "list", "--json", "--limit", "1").output)[
        "entries"]] == [entries[-1]["method"]]
    table = run(None, "audit", "list")
    assert table.exit_code == 0 and "PERMISSION_DENIED" in table.output and viewer["token_id"] in table.output


def test_uploads_are_audited_by_size_and_bad_roles_named(run, controller, tmp_path):
    from edgefleet.controller.client import Connection, upload_artifact

    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"efo_notreallyasecretbutlookslikeone" * 100)
    client = Connection.resolve(None, controller.state_dir).control()
    sha = upload_artifact(client, blob)
    bad = run(None, "operator-token", "create", "--role", "root")
    assert bad.exit_code == 2 and "root" in bad.output
    with pytest.raises(grpc.RpcError) as caught:
        controller.call("CreateOperatorToken", control_pb2.CreateOperatorTokenRequest(role="root"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "use one of: viewer" in caught.value.details()
    entries = json.loads(run(None, "audit", "list", "--json").output)["entries"]
    upload = next(e for e in entries if e["method"] == "UploadArtifact")
    assert upload["outcome"] == "ok" and upload["arguments"]["sha256"] == sha
    assert upload["arguments"]["stream"]["messages"] == 2 and upload["arguments"]["size"] == 3500
    assert "notreallyasecret" not in json.dumps(entries)
    invalid = next(e for e in entries if e["method"] == "CreateOperatorToken")
    assert invalid["outcome"] == "INVALID_ARGUMENT" and "unknown role 'root'" in invalid["message"]
