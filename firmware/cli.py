"""Operator and device commands for bundles: ``edgefleet bundle ...`` and ``edgefleet-agent install``.

The commands build specs and call the same public functions a library user would
(:func:`build_bundle`, :func:`verify_bundle`, :class:`Installer`), so the CLI cannot drift from
the API. Every failure is one line on stderr and exit code 2, never a traceback; an interrupted
download exits 75 (EX_TEMPFAIL: run the same command again to resume).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from edgefleet.firmware.bundle import BundleSpec, build_bundle, read_head, verify_bundle
from edgefleet.firmware.faults import FaultPlan
from edgefleet.firmware.installer import Installer, InstallPolicy, installer_status
from edgefleet.firmware.keys import (
    TRUSTED_KEYS_DIR,
    generate_signing_key,
    key_id,
    load_public_key,
    load_signing_key,
    pinned_keys,
    save_public_key,
    save_signing_key,
)
from edgefleet.firmware.manifest import RuntimeSpec
from edgefleet.firmware.rejections import BundleRejected
from edgefleet.firmware.sources import FileSource

EXIT_FAILED = 2
EXIT_RESUMABLE = 75

F = TypeVar("F", bound=Callable[..., Any])


def _one_line_errors(func: F) -> F:
    """Turn expected failures into ``error: ...`` and exit 2, so scripts get a reason, not a trace."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BundleRejected as exc:
            click.echo(f"error: rejected: {exc.reason.value}: {exc.message}", err=True)
        except (OSError, ValueError) as exc:
            click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)

    return wrapper  # type: ignore[return-value]


@click.group("bundle")
def bundle_group() -> None:
    """Build, inspect and verify signed model bundles."""


@bundle_group.command("keygen")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Private key PEM (0600).")
@click.option("--public", "public", type=click.Path(path_type=Path), help="Also write the public key PEM.")
@_one_line_errors
def keygen(out: Path, public: Path | None) -> None:
    """Create an Ed25519 signing key (never overwrites an existing file)."""
    key = generate_signing_key()
    save_signing_key(key, out)
    if public is not None:
        save_public_key(key.public_key(), public)
    click.echo(key_id(key.public_key()))


@bundle_group.command("build")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", required=True)
@click.option("--version", "version", type=int, required=True, help="Monotonic version number.")
@click.option("--hardware-class", required=True, help="e.g. x86_64-avx512vnni, arm64-dotprod.")
@click.option("--key", "key_path", type=click.Path(path_type=Path), required=True)
@click.option("--out", "out", type=click.Path(path_type=Path), required=True)
@click.option("--execution-provider", default="CPUExecutionProvider", show_default=True)
@click.option(
    "--extra",
    "extras",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Another payload file (external weights, labels).",
)
@click.option(
    "--golden",
    type=click.Path(path_type=Path),
    help="An .npz of golden inputs keyed by input name (default: seeded random).",
)
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--atol", type=float, default=1e-4, show_default=True)
@click.option("--expires-in-days", type=float, default=None, help="Refuse the bundle after this long.")
@click.option("--rollback", is_flag=True, help="Sign as an explicit rollback (may go below the committed version).")
@click.option("--provenance", type=click.Path(path_type=Path), help="Compile report JSON.")
@_one_line_errors
def build(
    model: Path,
    name: str,
    version: int,
    hardware_class: str,
    key_path: Path,
    out: Path,
    execution_provider: str,
    extras: tuple[Path, ...],
    golden: Path | None,
    rtol: float,
    atol: float,
    expires_in_days: float | None,
    rollback: bool,
    provenance: Path | None,
) -> None:
    """Sign MODEL (ONNX) and its golden self-test into a bundle."""
    from edgefleet.firmware.selftest import describe_onnx_model

    golden_inputs = None
    if golden is not None:
        import numpy as np

        with np.load(golden) as npz:
            golden_inputs = {k: npz[k] for k in npz.files}
    io, self_test = describe_onnx_model(
        model, golden_inputs, rtol=rtol, atol=atol, execution_provider=execution_provider
    )
    payload = {model.name: model, **{p.name: p for p in extras}}
    now = time.time()
    spec = BundleSpec(
        name=name,
        version=version,
        hardware_class=hardware_class,
        model_file=model.name,
        payload=payload,
        io=io,
        self_test=self_test,
        runtime=RuntimeSpec(execution_provider=execution_provider),
        provenance=json.loads(provenance.read_text()) if provenance else {},
        created_at=now,
        expires_at=None if expires_in_days is None else now + expires_in_days * 86400,
        rollback=rollback,
    )
    path = build_bundle(spec, load_signing_key(key_path), out)
    click.echo(f"{path} {path.stat().st_size} bytes, signed by {key_id(load_signing_key(key_path).public_key())}")


@bundle_group.command("inspect")
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@_one_line_errors
def inspect(bundle: Path, as_json: bool) -> None:
    """Show a bundle's manifest without verifying or unpacking it."""
    with open(bundle, "rb") as fh:
        head = read_head(fh)
    manifest = head.manifest
    signer = json.loads(head.signature)["key_id"] if head.signature else None
    if as_json:
        click.echo(json.dumps({"manifest": manifest.to_dict(), "signed_by": signer}, indent=2))
        return
    click.echo(f"name:           {manifest.name}")
    click.echo(f"version:        {manifest.version}{'  (signed rollback)' if manifest.rollback else ''}")
    click.echo(f"hardware class: {manifest.hardware_class}")
    click.echo(f"runtime:        {manifest.runtime.name} / {manifest.runtime.execution_provider}")
    click.echo(f"created:        {manifest.to_dict()['created_at']}  expires: {manifest.to_dict()['expires_at']}")
    click.echo(f"signed by:      {signer or 'UNSIGNED'}")
    for f in manifest.files:
        marker = " (model)" if f.path == manifest.model_file else ""
        click.echo(f"  {f.size:>12}  {f.sha256[:16]}  {f.path}{marker}")


@bundle_group.command("verify")
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--trusted-key",
    "trusted",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Public key PEM; repeat for several.",
)
@click.option("--hardware-class", default=None)
@click.option("--min-version", type=int, default=None)
@_one_line_errors
def verify(bundle: Path, trusted: tuple[Path, ...], hardware_class: str | None, min_version: int | None) -> None:
    """Check signature, integrity and policy exactly as a device would."""
    manifest = verify_bundle(
        bundle, [load_public_key(p) for p in trusted], hardware_class=hardware_class, min_version=min_version
    )
    click.echo(f"ok: {manifest.name} v{manifest.version} for {manifest.hardware_class}")


def _device_trusted_keys(state_dir: Path, extra: tuple[Path, ...]) -> list[Any]:
    """Keys pinned at enrollment (``<state-dir>/trusted_keys/*.pem``) plus any given on the command line."""
    keys = [load_public_key(p) for p in extra] + pinned_keys(state_dir)
    if not keys:
        raise ValueError(
            f"no trusted keys: pass --trusted-key or put the controller's key in {state_dir / TRUSTED_KEYS_DIR}/"
        )
    return keys


@click.command("install")
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The agent's state directory (slots, install state).",
)
@click.option(
    "--trusted-key",
    "trusted",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Public key PEM to trust in addition to <state-dir>/trusted_keys/*.pem.",
)
@click.option("--hardware-class", default=None, help="This device's class; refuse bundles for another.")
@click.option("--slot-capacity", type=int, default=None, help="Bytes the staging slot may use (default: free disk).")
@click.option("--probation-inferences", type=int, default=3, show_default=True)
@click.option("--probation-seconds", type=float, default=0.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON object.")
@_one_line_errors
def install_command(
    bundle: Path,
    state_dir: Path,
    trusted: tuple[Path, ...],
    hardware_class: str | None,
    slot_capacity: int | None,
    probation_inferences: int,
    probation_seconds: float,
    as_json: bool,
) -> None:
    """Install BUNDLE offline (USB, air gap): the same verified, crash-safe path as a network install.

    Re-running the same command after an interruption resumes where it stopped.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    installer = Installer(
        state_dir,
        _device_trusted_keys(state_dir, trusted),
        hardware_class=hardware_class,
        policy=InstallPolicy(
            slot_capacity_bytes=slot_capacity,
            probation_inferences=probation_inferences,
            probation_seconds=probation_seconds,
        ),
        faults=FaultPlan.from_env(),
    )
    outcome = installer.install(FileSource(bundle))
    if as_json:
        click.echo(json.dumps(outcome.to_dict(), sort_keys=True))
    if outcome.ok:
        if not as_json:
            click.echo(f"{outcome.result}: {outcome.name} v{outcome.version}")
        return
    if outcome.result == "suspended":
        click.echo(f"error: interrupted: {outcome.message}", err=True)
        sys.exit(EXIT_RESUMABLE)
    click.echo(f"error: {outcome.result}: {outcome.reason}: {outcome.message}", err=True)
    sys.exit(EXIT_FAILED)


@click.command("model-status")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@_one_line_errors
def model_status_command(state_dir: Path) -> None:
    """Print the installer state and the model being served, as JSON (``edgefleet-agent model-status``)."""
    click.echo(json.dumps(installer_status(state_dir), indent=2, sort_keys=True))


@click.group()
def main() -> None:
    """Stand-alone entry point (``python -m edgefleet.firmware.cli``) until the lead wires the scripts."""


main.add_command(bundle_group)
main.add_command(install_command)
main.add_command(model_status_command)

if __name__ == "__main__":
    main()
