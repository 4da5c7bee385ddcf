"""`edgefleet ca`: the controller CA that signs device and server certificates, and its rotation."""

from __future__ import annotations

import time

import click

from edgefleet.controller.cli.base import Context, cli, remote_options
from edgefleet.controller.cli.output import emit_json, table, to_dict
from edgefleet.protos.v1 import control_pb2


@cli.group("ca")
def ca_group() -> None:
    """The controller CA: show it, rotate it, retire the old one."""


def _show(reply: control_pb2.CertificateAuthority, as_json: bool) -> None:
    if as_json:
        emit_json(to_dict(reply))
        return
    rows = [["active" if c.active else "previous", c.sha256_fingerprint, c.subject,
             time.strftime("%Y-%m-%d", time.gmtime(c.not_after_unix_ms / 1000))] for c in reply.cas]
    click.echo(table(rows, ["ROLE", "SHA256", "SUBJECT", "NOT AFTER"]))


@ca_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with the PEM bundle).")
@remote_options
@click.pass_obj
def ca_show(obj: Context, as_json: bool) -> None:
    """The CAs devices trust now, the active one first."""
    _show(obj.client().call("GetCertificateAuthority", control_pb2.GetCertificateAuthorityRequest()), as_json)


@ca_group.command("rotate")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def ca_rotate(obj: Context, as_json: bool) -> None:
    """Make a new CA: new certificates come from it; devices trust old and new until `retire-old`."""
    _show(obj.client().call("RotateCertificateAuthority", control_pb2.RotateCertificateAuthorityRequest()), as_json)


@ca_group.command("retire-old")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@remote_options
@click.pass_obj
def ca_retire_old(obj: Context, as_json: bool) -> None:
    """Stop trusting the CA before the last rotation (do it once every device has renewed)."""
    _show(obj.client().call("RetireOldCertificateAuthority", control_pb2.RetireOldCertificateAuthorityRequest()),
          as_json)
