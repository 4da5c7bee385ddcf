"""Which operator role each Control method needs, and whether it changes anything (so it is audited).

One table, read by the interceptor in front of the whole service: a method is checked here or
refused, never checked inside its handler. tests/unit/test_control_access.py asserts the table
names every method of the Control service descriptor, so a new RPC cannot ship unchecked.

Choices worth knowing:
- Enrollment tokens are operator work: provisioning devices is routine for the people who run
  rollouts, the tokens are bounded (uses, TTL) and audited, and demanding admin for each new device
  would push admin tokens onto technicians' laptops.
- Device measurement (MeasureOnDevice) is operator work and audited: it runs uploaded code on a device.
- The audit log is readable by operator and admin, not viewer: operators need "who paused this
  rollout" during an incident; it holds no secrets, but it does show who holds which tokens.
- Operator tokens (create, list, revoke) are admin only. Any future key or device-revocation RPC
  belongs there too.
"""

from __future__ import annotations

import dataclasses

from edgefleet.controller.fleet.credentials import OperatorRole

VIEWER, OPERATOR, ADMIN = OperatorRole.VIEWER, OperatorRole.OPERATOR, OperatorRole.ADMIN


@dataclasses.dataclass(frozen=True)
class MethodAccess:
    role: OperatorRole    # the least role that may call it
    mutates: bool         # recorded in the audit log (a refused call is recorded whatever this says)


def _reads(role: OperatorRole) -> MethodAccess:
    return MethodAccess(role, mutates=False)


def _changes(role: OperatorRole) -> MethodAccess:
    return MethodAccess(role, mutates=True)


CONTROL_METHOD_ACCESS: dict[str, MethodAccess] = {
    # the fleet, read
    "GetControllerInfo": _reads(VIEWER),
    "ListDevices": _reads(VIEWER),
    "GetDevice": _reads(VIEWER),
    "QueryTelemetry": _reads(VIEWER),
    "TelemetrySummary": _reads(VIEWER),
    "GetCommand": _reads(VIEWER),
    "ListCommands": _reads(VIEWER),
    "ListModels": _reads(VIEWER),
    "GetRollout": _reads(VIEWER),
    "ListRollouts": _reads(VIEWER),
    "ListEnrollmentTokens": _reads(VIEWER),     # ids, uses and labels only; secrets are never stored
    # the fleet, changed
    "CreateEnrollmentToken": _changes(OPERATOR),
    "RevokeEnrollmentToken": _changes(OPERATOR),
    "UploadArtifact": _changes(OPERATOR),
    "InstallOnDevice": _changes(OPERATOR),
    "AddModel": _changes(OPERATOR),
    "CreateRollout": _changes(OPERATOR),
    "ChangeRollout": _changes(OPERATOR),
    "MeasureOnDevice": _changes(OPERATOR),
    "ListAudit": _reads(OPERATOR),
    # who may do all that
    "CreateOperatorToken": _changes(ADMIN),
    "ListOperatorTokens": _reads(ADMIN),
    "RevokeOperatorToken": _changes(ADMIN),
    # Device identity: revocation and CA rotation are admin actions. The CA certificate is public
    # (whoever enrolls a device hands it to the agent as --ca-cert), so any role may read it.
    "RevokeDevice": _changes(ADMIN),
    "GetCertificateAuthority": _reads(VIEWER),
    "RotateCertificateAuthority": _changes(ADMIN),
    "RetireOldCertificateAuthority": _changes(ADMIN),
}


def access_refusal(method: str, role: OperatorRole, token_id: str) -> str | None:
    """Why a token of `role` may not call `method` (the PERMISSION_DENIED message), or None when it may.
    A method missing from the table is refused: unchecked must never mean allowed."""
    access = CONTROL_METHOD_ACCESS.get(method)
    if access is None:
        return f"Control method {method} has no role in controller/api/control_roles.py; refused until it has one"
    if role.includes(access.role):
        return None
    return (f"{method} needs role {access.role} or higher; this token ({token_id}) has role {role}; "
            f"ask an admin for a token with role {access.role}")
