"""The Control API's access rules: the method -> role table, role order, and what the audit log keeps."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from edgefleet.controller.api.control_audit import REDACTED, arguments_json, scrub
from edgefleet.controller.api.control_roles import CONTROL_METHOD_ACCESS, access_refusal
from edgefleet.controller.fleet.credentials import (
    OperatorRole,
    new_enrollment_token,
    new_operator_token,
    operator_token_refusal,
)
from edgefleet.controller.store.base import OperatorTokenRecord
from edgefleet.protos.v1 import control_pb2

CONTROL = control_pb2.DESCRIPTOR.services_by_name["Control"]


def test_every_control_method_has_a_role_and_the_table_names_no_other() -> None:
    methods = {m.name for m in CONTROL.methods}
    assert methods - set(CONTROL_METHOD_ACCESS) == set(), "new Control RPCs need a row in control_roles.py"
    assert set(CONTROL_METHOD_ACCESS) - methods == set(), "the table names methods the service no longer has"


def test_the_table_is_what_the_readme_documents() -> None:
    def named(role: OperatorRole, mutates: bool) -> set[str]:
        return {m for m, a in CONTROL_METHOD_ACCESS.items() if a.role is role and a.mutates is mutates}

    assert named(OperatorRole.ADMIN, True) == {"CreateOperatorToken", "RevokeOperatorToken", "RevokeDevice",
                                               "RotateCertificateAuthority", "RetireOldCertificateAuthority"}
    assert named(OperatorRole.ADMIN, False) == {"ListOperatorTokens"}
    assert named(OperatorRole.OPERATOR, False) == {"ListAudit"}
    assert {"CreateRollout", "ChangeRollout", "AddModel", "UploadArtifact", "InstallOnDevice", "MeasureOnDevice",
            "CreateEnrollmentToken", "RevokeEnrollmentToken"} == named(OperatorRole.OPERATOR, True)
    # Nothing a viewer may call changes anything.
    assert named(OperatorRole.VIEWER, True) == set()


def test_roles_are_ordered_and_each_includes_those_below() -> None:
    viewer, operator, admin = OperatorRole.VIEWER, OperatorRole.OPERATOR, OperatorRole.ADMIN
    assert viewer.rank < operator.rank < admin.rank
    assert admin.includes(operator) and admin.includes(viewer) and operator.includes(viewer)
    assert not viewer.includes(operator) and not operator.includes(admin) and not viewer.includes(admin)
    assert all(r.includes(r) for r in OperatorRole)
    assert OperatorRole.parse("operator") is operator
    with pytest.raises(ValueError, match="unknown role 'root'; use one of: viewer, operator, admin"):
        OperatorRole.parse("root")


def test_a_refusal_names_the_role_needed_and_the_callers_role() -> None:
    message = access_refusal("CreateRollout", OperatorRole.VIEWER, "opt-1234")
    assert message is not None
    assert "CreateRollout needs role operator" in message and "(opt-1234) has role viewer" in message
    assert access_refusal("CreateRollout", OperatorRole.OPERATOR, "opt-1") is None
    assert access_refusal("ListDevices", OperatorRole.VIEWER, "opt-1") is None
    assert "needs role admin" in (access_refusal("CreateOperatorToken", OperatorRole.OPERATOR, "opt-1") or "")
    # A method the table does not know is refused to everyone, admin included.
    assert "has no role" in (access_refusal("DropEverything", OperatorRole.ADMIN, "opt-1") or "")


def test_revoked_expired_and_unknown_role_tokens_are_refused_by_name() -> None:
    token = OperatorTokenRecord("opt-1", "h", "operator", 1000, expires_at_ms=5000)
    assert operator_token_refusal(token, 4999) is None
    assert "opt-1 has expired" in (operator_token_refusal(token, 5000) or "")
    revoked = OperatorTokenRecord("opt-1", "h", "admin", 1, revoked_at_ms=2)
    assert "opt-1 was revoked" in (operator_token_refusal(revoked, 3) or "")
    assert "unknown role 'root'" in (operator_token_refusal(OperatorTokenRecord("opt-1", "h", "root", 1), 3) or "")
    assert "missing or invalid operator token" in (operator_token_refusal(None, 3) or "")
    assert operator_token_refusal(OperatorTokenRecord("opt-1", "h", "viewer", 1), 2**40) is None  # 0 = no expiry


SECRET_BYTES = b"SECRET-BYTES-\x00\xff"
SECRETS = [new_operator_token(), new_enrollment_token(), "efd_" + "d" * 43]


def _sample(field: FieldDescriptor, n: int) -> Any:
    if field.type == FieldDescriptor.TYPE_STRING:
        # Named like a secret: a value with no recognisable prefix. Anything else: a credential-shaped value,
        # as if someone pasted a token into a label or a name.
        return f"hunter2-plain-{n}" if field.name in ("token", "secret", "password") else SECRETS[n % len(SECRETS)]
    if field.type == FieldDescriptor.TYPE_BYTES:
        return SECRET_BYTES
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return 1.5
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number if field.enum_type else None
    return 7


def fill(message: Message, depth: int = 0) -> Message:
    """Every field of `message` (and its sub-messages, 3 deep) set, strings to secrets, bytes to secret bytes."""
    for n, field in enumerate(message.DESCRIPTOR.fields):
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            if key.type == value.type == FieldDescriptor.TYPE_STRING:
                getattr(message, field.name)[SECRETS[1]] = SECRETS[0]
            continue
        if entry is not None:
            if depth < 3:
                target = getattr(message, field.name).add() if field.is_repeated else getattr(message, field.name)
                fill(target, depth + 1)
                target.SetInParent()
            continue
        value = _sample(field, n)
        if field.is_repeated:
            getattr(message, field.name).append(value)
        else:
            setattr(message, field.name, value)
    return message


@pytest.mark.parametrize("method", sorted(m.name for m in CONTROL.methods))
def test_scrubbed_arguments_never_keep_a_secret(method: str) -> None:
    descriptor = CONTROL.methods_by_name[method].input_type
    request = fill(control_pb2.DESCRIPTOR.message_types_by_name[descriptor.name]._concrete_class())
    text = arguments_json(scrub(request))
    for secret in [*SECRETS, "hunter2", "SECRET-BYTES", "efo_", "efe_", "efd_"]:
        assert secret not in text, (method, text)
    json.loads(text)


def test_scrub_keeps_what_an_auditor_needs() -> None:
    upload = scrub(control_pb2.ArtifactUpload(sha256="ab" * 32, size=3, data=b"xyz"))
    assert upload == {"sha256": "ab" * 32, "size": 3, "data": {"bytes": 3}}
    measure = scrub(control_pb2.MeasureOnDeviceRequest(hardware_class="x86_64-avx2", inputs_npz=b"\x00" * 1000,
                                                       candidate_sha256=["c1", "c2"]))
    assert measure == {"hardware_class": "x86_64-avx2", "inputs_npz": {"bytes": 1000},
                       "candidate_sha256": ["c1", "c2"]}
    token = scrub(control_pb2.CreateEnrollmentTokenRequest(uses=2, labels={"site": "lab", "note": SECRETS[1]}))
    assert token == {"uses": 2, "labels": {"site": "lab", "note": REDACTED}}
    assert scrub(control_pb2.CreateOperatorTokenRequest(role="viewer", name="ci")) == {"role": "viewer", "name": "ci"}


def test_huge_arguments_are_cut_to_a_small_row() -> None:
    request = control_pb2.MeasureOnDeviceRequest(candidate_sha256=["f" * 64] * 500)
    text = arguments_json(scrub(request))
    assert len(text) < 5000 and json.loads(text)["truncated_from_chars"] > 30_000
