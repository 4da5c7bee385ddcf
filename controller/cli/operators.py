"""`edgefleet operator-token` and `edgefleet audit`: who may use the Control API, and what they did."""

from __future__ import annotations

import json
import time

import click

from edgefleet.controller.cli.base import Context, cli, remote_options
from edgefleet.controller.cli.output import duration_option, emit_json, table, to_dict
from edgefleet.controller.fleet.credentials import OperatorRole
from edgefleet.protos.v1 import control_pb2


def _utc(unix_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix_ms / 1000)) if unix_ms else "-"


# -- operator tokens ---------------------------------------------------------------------------
@cli.group("operator-token")
def operator_token_group() -> None:
    """Operator tokens for the Control API, each with a role: viewer, operator or admin (admin only)."""


@operator_token_group.command("create")
@click.option("--role", required=True, type=click.Choice([r.value for r in OperatorRole]),
              help="viewer: read only; operator: also models, rollouts, installs, enrollment tokens; "
                   "admin: also operator tokens.")
@click.option("--name", default="", help="Who or what holds it (shown in lists and the audit log).")
@click.option("--ttl", default=None, help="Lifetime, e.g. 12h, 30d; default: until revoked.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def operator_token_create(obj: Context, role: str, name: str, ttl: str | None, as_json: bool) -> None:
    """Create an operator token (its secret is shown once, on stdout)."""
    ttl_s = max(1, int(duration_option(ttl, "--ttl"))) if ttl else 0
    reply = obj.client().call("CreateOperatorToken",
                              control_pb2.CreateOperatorTokenRequest(role=role, name=name, ttl_s=ttl_s))
    if as_json:
        emit_json({"token": reply.token, **to_dict(reply.info)})
        return
    click.echo(reply.token)
    expires = f"expires {_utc(reply.info.expires_at_unix_ms)} UTC" if reply.info.expires_at_unix_ms else "no expiry"
    click.echo(f"operator token {reply.info.token_id}: role {reply.info.role}, {expires}", err=True)


def _state(token: control_pb2.OperatorToken, now_ms: float) -> str:
    if token.revoked_at_unix_ms:
        return "revoked"
    if token.expires_at_unix_ms and token.expires_at_unix_ms <= now_ms:
        return "expired"
    return "active"


@operator_token_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def operator_token_list(obj: Context, as_json: bool) -> None:
    """List operator tokens (never their secrets: only digests are stored)."""
    reply = obj.client().call("ListOperatorTokens", control_pb2.ListOperatorTokensRequest())
    if as_json:
        emit_json({"tokens": [to_dict(t) for t in reply.tokens]})
        return
    now_ms = time.time() * 1000
    rows = [[t.token_id, t.role, _state(t, now_ms), t.name, _utc(t.created_at_unix_ms),
             _utc(t.expires_at_unix_ms) if t.expires_at_unix_ms else "never", t.created_by or "state dir"]
            for t in reply.tokens]
    click.echo(table(rows, ["TOKEN", "ROLE", "STATE", "NAME", "CREATED (UTC)", "EXPIRES (UTC)", "CREATED BY"]))


@operator_token_group.command("revoke")
@click.argument("token_id")
@remote_options
@click.pass_obj
def operator_token_revoke(obj: Context, token_id: str) -> None:
    """Revoke an operator token: its next call is refused, on every controller replica."""
    reply = obj.client().call("RevokeOperatorToken", control_pb2.RevokeOperatorTokenRequest(token_id=token_id))
    click.echo(f"revoked {reply.token_id} (role {reply.role})")


# -- audit log ---------------------------------------------------------------------------------
@cli.group("audit")
def audit_group() -> None:
    """The audit log: every mutating Control call and every refused one (operator and admin)."""


@audit_group.command("list")
@click.option("--since", default=None, help="Only entries this recent, e.g. 15m, 1h, 7d; default: all.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10_000),
              help="The newest this many entries.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def audit_list(obj: Context, since: str | None, limit: int, as_json: bool) -> None:
    """Show who did what, when, and how it ended (arguments never hold secrets)."""
    since_ms = int(time.time() * 1000 - duration_option(since, "--since") * 1000) if since else 0
    reply = obj.client().call("ListAudit", control_pb2.ListAuditRequest(since_unix_ms=since_ms, limit=limit))
    if as_json:
        entries = []
        for e in reply.entries:
            entry = to_dict(e)
            entry["arguments"] = json.loads(e.arguments_json or "{}")
            del entry["arguments_json"]
            entries.append(entry)
        emit_json({"entries": entries})
        return
    rows = []
    for e in reply.entries:
        outcome = e.outcome if e.outcome == "ok" else f"{e.outcome}: {e.message}"
        arguments = e.arguments_json if len(e.arguments_json) <= 60 else e.arguments_json[:57] + "..."
        rows.append([_utc(e.unix_ms), e.token_id, e.role, e.method, outcome[:100], arguments])
    click.echo(table(rows, ["TIME (UTC)", "TOKEN", "ROLE", "METHOD", "OUTCOME", "ARGUMENTS"]))
