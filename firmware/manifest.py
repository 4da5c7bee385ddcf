"""The bundle manifest: what a device needs to decide whether to trust, install and self-test a model.

The manifest is the only signed object in a bundle. Everything else (payload bytes, sizes) is bound
to it through the sha256 and size recorded here, so a verifier never trusts a byte the signature
does not cover. Its serialized form is canonical JSON (sorted keys, no whitespace, ASCII), so the
signature can be checked over exactly the bytes on disk and re-serialization gives the same bytes.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from edgefleet.firmware.rejections import BundleRejected, RejectReason

if TYPE_CHECKING:
    import numpy as np

MANIFEST_FORMAT_VERSION = 1
# Payload paths become tar member names "payload/<path>", which USTAR caps at 100 bytes.
MAX_PAYLOAD_PATH = 92
_SAFE_PATH = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def canonical_json(document: Any) -> bytes:
    """The one byte form of a JSON document that signatures are made over."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


def format_time(unix_seconds: float) -> str:
    return datetime.fromtimestamp(int(unix_seconds), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> float:
    # datetime.fromisoformat only learnt the "Z" suffix in 3.11; we still support 3.10.
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output; symbolic dimensions stay strings (e.g. "batch")."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(name=str(d["name"]), dtype=str(d["dtype"]), shape=tuple(d["shape"]))


@dataclass(frozen=True)
class IOSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IOSpec:
        return cls(
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
        )


@dataclass(frozen=True)
class RuntimeSpec:
    """Which runtime runs the payload: onnxruntime with an execution provider, LiteRT with a delegate, or
    OpenVINO on a device (CPU, GPU, NPU) with an inference-precision hint (bf16, f16, f32)."""

    name: str = "onnxruntime"
    execution_provider: str = "CPUExecutionProvider"
    delegate: str | None = None
    version: str | None = None  # the runtime version the build was measured with, for provenance
    device: str | None = None  # OpenVINO device
    inference_precision: str | None = None  # OpenVINO INFERENCE_PRECISION_HINT the build was gated and timed with
    threads: int | None = None  # intra-op threads the build was timed with, when fewer than the device's cores

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "execution_provider": self.execution_provider,
            "delegate": self.delegate,
            "version": self.version,
        }
        # Written only when set, so manifests of onnxruntime and LiteRT builds keep their exact bytes.
        if self.device is not None:
            out["device"] = self.device
        if self.inference_precision is not None:
            out["inference_precision"] = self.inference_precision
        if self.threads:
            out["threads"] = self.threads
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RuntimeSpec:
        return cls(
            name=str(d["name"]),
            execution_provider=str(d["execution_provider"]),
            delegate=d.get("delegate"),
            version=d.get("version"),
            device=d.get("device"),
            inference_precision=d.get("inference_precision"),
            threads=int(d["threads"]) if d.get("threads") else None,
        )



@dataclass(frozen=True)
class PayloadFile:
    path: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PayloadFile:
        entry = cls(path=str(d["path"]), sha256=str(d["sha256"]), size=int(d["size"]))
        check_payload_path(entry.path)
        if not _SHA256.match(entry.sha256) or entry.size < 0:
            raise ValueError(f"payload entry {entry.path!r} has a malformed sha256 or size")
        return entry


def check_payload_path(path: str) -> None:
    """Refuse names that could escape the slot directory when the payload is unpacked."""
    if len(path) > MAX_PAYLOAD_PATH or not _SAFE_PATH.match(path) or ".." in path.split("/"):
        raise ValueError(
            f"payload path {path!r} is not allowed; use relative names of letters, digits, '._-' "
            f"and '/', at most {MAX_PAYLOAD_PATH} characters, without '..'"
        )


@dataclass(frozen=True)
class GoldenTensor:
    """A tensor stored inline in the manifest: little-endian raw bytes, base64."""

    dtype: str
    shape: tuple[int, ...]
    data_b64: str

    @classmethod
    def from_array(cls, array: np.ndarray) -> GoldenTensor:
        import numpy as np

        little = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
        return cls(
            dtype=np.dtype(array.dtype).name,
            shape=tuple(int(n) for n in array.shape),
            data_b64=base64.b64encode(little.tobytes()).decode("ascii"),
        )

    def to_array(self) -> np.ndarray:
        import numpy as np

        dtype = np.dtype(self.dtype).newbyteorder("<")
        return np.frombuffer(base64.b64decode(self.data_b64), dtype=dtype).reshape(self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data_b64": self.data_b64}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GoldenTensor:
        return cls(dtype=str(d["dtype"]), shape=tuple(int(n) for n in d["shape"]), data_b64=str(d["data_b64"]))


@dataclass(frozen=True)
class SelfTestSpec:
    """The golden input and the output the device must reproduce before it serves the model."""

    inputs: dict[str, GoldenTensor]
    expected_outputs: dict[str, GoldenTensor]
    rtol: float = 1e-3
    atol: float = 1e-4

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "expected_outputs": {k: v.to_dict() for k, v in self.expected_outputs.items()},
            "rtol": self.rtol,
            "atol": self.atol,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SelfTestSpec:
        return cls(
            inputs={k: GoldenTensor.from_dict(v) for k, v in d["inputs"].items()},
            expected_outputs={k: GoldenTensor.from_dict(v) for k, v in d["expected_outputs"].items()},
            rtol=float(d["rtol"]),
            atol=float(d["atol"]),
        )


@dataclass(frozen=True)
class Manifest:
    """Everything signed about one model build for one hardware class."""

    name: str
    version: int
    hardware_class: str
    runtime: RuntimeSpec
    model_file: str
    io: IOSpec
    files: tuple[PayloadFile, ...]
    self_test: SelfTestSpec
    created_at: float
    expires_at: float | None = None
    rollback: bool = False  # an explicitly signed rollback may go below the committed version
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = MANIFEST_FORMAT_VERSION

    @property
    def payload_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "hardware_class": self.hardware_class,
            "runtime": self.runtime.to_dict(),
            "model_file": self.model_file,
            "io": self.io.to_dict(),
            "files": [f.to_dict() for f in self.files],
            "self_test": self.self_test.to_dict(),
            "provenance": self.provenance,
            "created_at": format_time(self.created_at),
            "expires_at": None if self.expires_at is None else format_time(self.expires_at),
            "rollback": self.rollback,
        }

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Parse and validate; raises ``BundleRejected`` so callers see one failure type."""
        fmt = d.get("format_version") if isinstance(d, dict) else None
        if not isinstance(fmt, int):
            raise BundleRejected(RejectReason.CORRUPT, "manifest has no integer format_version")
        if fmt > MANIFEST_FORMAT_VERSION:
            raise BundleRejected(
                RejectReason.UNSUPPORTED_FORMAT,
                f"manifest format {fmt} is newer than this agent reads ({MANIFEST_FORMAT_VERSION}); "
                "upgrade the agent first",
            )
        try:
            files = tuple(PayloadFile.from_dict(f) for f in d["files"])
            manifest = cls(
                format_version=fmt,
                name=str(d["name"]),
                version=int(d["version"]),
                hardware_class=str(d["hardware_class"]),
                runtime=RuntimeSpec.from_dict(d["runtime"]),
                model_file=str(d["model_file"]),
                io=IOSpec.from_dict(d["io"]),
                files=files,
                self_test=SelfTestSpec.from_dict(d["self_test"]),
                provenance=dict(d.get("provenance") or {}),
                created_at=parse_time(d["created_at"]),
                expires_at=None if d.get("expires_at") is None else parse_time(d["expires_at"]),
                rollback=bool(d.get("rollback", False)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleRejected(RejectReason.CORRUPT, f"manifest is malformed: {exc}") from None
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise BundleRejected(RejectReason.CORRUPT, "manifest lists a payload path twice")
        if manifest.model_file not in paths:
            raise BundleRejected(
                RejectReason.MANIFEST_MISMATCH, f"model_file {manifest.model_file!r} is not in the payload"
            )
        return manifest

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise BundleRejected(RejectReason.CORRUPT, f"manifest is not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise BundleRejected(RejectReason.CORRUPT, "manifest is not a JSON object")
        return cls.from_dict(document)
