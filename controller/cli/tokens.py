"""`edgefleet token`: one-time enrollment tokens."""

from __future__ import annotations

import time

import click

from edgefleet.common.units import parse_labels
from edgefleet.controller.cli.base import Context, cli, remote_options
from edgefleet.controller.cli.output import duration_option, emit_json, table, to_dict
from edgefleet.controller.fleet.credentials import token_state
from edgefleet.protos.v1 import control_pb2


# -- enrollment tokens -------------------------------------------------------------------------
@cli.group("token")
def token_group() -> None:
    """Enrollment tokens: bounded, expiring, stored hashed."""


@token_group.command("create")
@click.option("--uses", default=1, show_default=True, type=click.IntRange(1, 100_000),
              help="How many devices may enroll with it.")
@click.option("--ttl", default="24h", show_default=True, help="Lifetime, e.g. 30m, 24h, 7d.")
@click.option("--labels", default="", metavar="k=v,...", help="Labels given to every device that uses it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def token_create(obj: Context, uses: int, ttl: str, labels: str, as_json: bool) -> None:
    """Create an enrollment token (shown once)."""
    ttl_s = duration_option(ttl, "--ttl")
    try:
        label_map = parse_labels(labels)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--labels") from None
    reply = obj.client().call(
        "CreateEnrollmentToken",
        control_pb2.CreateEnrollmentTokenRequest(uses=uses, ttl_s=max(1, int(ttl_s)), labels=label_map),
    )
    if as_json:
        emit_json({"token": reply.token, **to_dict(reply.info)})
        return
    click.echo(reply.token)
    expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(reply.info.expires_at_unix_ms / 1000))
    click.echo(f"token {reply.info.token_id}: {uses} use(s), expires {expires}", err=True)


@token_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def token_list(obj: Context, as_json: bool) -> None:
    """List enrollment tokens (never their secrets)."""
    reply = obj.client().call("ListEnrollmentTokens", control_pb2.ListEnrollmentTokensRequest())
    if as_json:
        emit_json({"tokens": [to_dict(t) for t in reply.tokens]})
        return
    now_ms = time.time() * 1000
    rows = []
    for t in reply.tokens:
        state = token_state(revoked=t.revoked, expires_at_ms=t.expires_at_unix_ms, uses_left=t.uses_left,
                            now_ms=now_ms).value
        labels = ",".join(f"{k}={v}" for k, v in sorted(t.labels.items()))
        rows.append([t.token_id, state, f"{t.uses_left}/{t.uses_total}",
                     time.strftime("%Y-%m-%d %H:%M", time.gmtime(t.expires_at_unix_ms / 1000)), labels])
    click.echo(table(rows, ["TOKEN", "STATE", "USES LEFT", "EXPIRES (UTC)", "LABELS"]))


@token_group.command("revoke")
@click.argument("token_id")
@remote_options
@click.pass_obj
def token_revoke(obj: Context, token_id: str) -> None:
    """Revoke a token so no further device can enroll with it."""
    obj.client().call("RevokeEnrollmentToken", control_pb2.RevokeEnrollmentTokenRequest(token_id=token_id))
    click.echo(f"revoked {token_id}")
