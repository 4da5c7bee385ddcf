"""How the operator CLI finds and talks to a controller.

Address: --controller, else EDGEFLEET_CONTROLLER, else `controller` in the config file, else the
endpoint a local controller wrote into its state dir, else 127.0.0.1:50051.
Token: EDGEFLEET_TOKEN, else `token` in the config file, else the state dir's operator-token.
TLS: the CA to verify the controller with is EDGEFLEET_CA_CERT, else `ca_cert` in the config file,
else the state dir's ca-bundle.pem; plaintext only when the local endpoint says the controller
runs --insecure, or with `insecure = true` in the config file.
The config file is EDGEFLEET_CONFIG or ~/.config/edgefleet/config.toml.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import click
import grpc

from edgefleet.controller.fleet.credentials import OPERATOR_TOKEN_FILE
from edgefleet.controller.server import read_endpoint
from edgefleet.protos.v1 import control_pb2, control_pb2_grpc

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_ADDRESS = "127.0.0.1:50051"


class UserError(click.ClickException):
    """A mistake the user can fix: one line on stderr, exit code 2, no traceback."""

    exit_code = 2


def default_state_dir() -> Path:
    env = os.environ.get("EDGEFLEET_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edgefleet" / "controller"


def config_path() -> Path:
    env = os.environ.get("EDGEFLEET_CONFIG")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgefleet" / "config.toml"


def load_config() -> dict[str, Any]:
    path = config_path()
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"cannot read config file {path}: {exc}; fix it or point EDGEFLEET_CONFIG elsewhere") from None


@dataclasses.dataclass(frozen=True)
class Connection:
    address: str
    token: str
    token_source: str
    ca_pem: bytes | None = None  # None: plaintext (the controller runs --insecure)

    @classmethod
    def resolve(cls, controller: str | None, state_dir: Path | None) -> Connection:
        config = load_config()
        state_dir = state_dir or Path(config.get("state_dir") or default_state_dir())
        endpoint = read_endpoint(state_dir) or {}
        address = (
            controller
            or os.environ.get("EDGEFLEET_CONTROLLER")
            or config.get("controller")
            or str(endpoint.get("grpc") or "")
            or DEFAULT_ADDRESS
        )
        token, source = os.environ.get("EDGEFLEET_TOKEN", ""), "EDGEFLEET_TOKEN"
        if not token and config.get("token"):
            token, source = str(config["token"]), str(config_path())
        if not token:
            token_file = state_dir / OPERATOR_TOKEN_FILE
            try:
                token, source = token_file.read_text().strip(), str(token_file)
            except OSError:
                source = "none"
        ca_pem: bytes | None = None
        insecure = bool(config.get("insecure")) or (endpoint.get("tls") is False and not controller)
        if not insecure:
            ca_path = os.environ.get("EDGEFLEET_CA_CERT") or config.get("ca_cert") or ""
            candidates = [Path(ca_path)] if ca_path else [state_dir / "ca-bundle.pem"]
            for path in candidates:
                try:
                    ca_pem = path.read_bytes()
                except OSError:
                    if ca_path:
                        raise UserError(f"cannot read the controller CA {path}; point EDGEFLEET_CA_CERT at the "
                                        "controller's STATE_DIR/ca-bundle.pem") from None
        return cls(address=str(address), token=token, token_source=source, ca_pem=ca_pem)

    def control(self) -> ControlClient:
        if not self.token:
            raise UserError(
                "no operator token found; set EDGEFLEET_TOKEN, add `token = ...` to "
                f"{config_path()}, or pass --state-dir pointing at the controller's state dir"
            )
        return ControlClient(self)


class ControlClient:
    """A thin synchronous wrapper: every call carries the token, every failure becomes one line."""

    def __init__(self, connection: Connection, timeout_s: float = 10.0) -> None:
        self.connection = connection
        self.timeout_s = timeout_s
        if connection.ca_pem is not None:
            self._channel = grpc.secure_channel(connection.address, grpc.ssl_channel_credentials(connection.ca_pem))
        else:
            self._channel = grpc.insecure_channel(connection.address)
        self._stub = control_pb2_grpc.ControlStub(self._channel)

    def call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(
                request,
                timeout=self.timeout_s,
                metadata=(("authorization", f"Bearer {self.connection.token}"),),
            )
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            if code == grpc.StatusCode.UNAVAILABLE:
                tls = ("over TLS with the CA given" if self.connection.ca_pem is not None else
                       "over plaintext (no CA found: set EDGEFLEET_CA_CERT if it serves TLS)")
                raise UserError(
                    f"cannot reach the controller at {self.connection.address} {tls}; start it with "
                    "`edgefleet controller serve` or pass --controller HOST:PORT"
                ) from None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise UserError(
                    f"the controller at {self.connection.address} refused the operator token from "
                    f"{self.connection.token_source}: {details}"
                ) from None
            if code == grpc.StatusCode.PERMISSION_DENIED:
                raise UserError(
                    f"the controller refused this call for the operator token from {self.connection.token_source}: "
                    f"{details} (permission_denied)"
                ) from None
            raise UserError(f"{details} ({code.name.lower()})") from None

    def close(self) -> None:
        self._channel.close()


def upload_artifact(client: ControlClient, path: Path, chunk: int = 1024 * 1024) -> str:
    """Stream a file into the controller's artifact store; returns its sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    sha, size = digest.hexdigest(), path.stat().st_size

    def messages():
        yield control_pb2.ArtifactUpload(sha256=sha, size=size)
        with open(path, "rb") as f:
            while block := f.read(chunk):
                yield control_pb2.ArtifactUpload(data=block)

    return str(client.call("UploadArtifact", messages()).sha256)
