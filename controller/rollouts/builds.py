"""Builds for devices: one compile per hardware class, signed into bundles, and the install action
that ships one.

The compile tool-chain is imported inside the functions, so importing the engine (and the
controller) does not load it until a rollout needs a build.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.controller.errors import (
    InvalidArgument,
    NotFound,
)
from edgefleet.controller.store.artifacts import ArtifactStore
from edgefleet.controller.store.base import BuildRecord, Store
from edgefleet.protos.v1 import fleet_pb2

# The engine's logger name, kept so "build ready" lines read as before.
log = logging.getLogger("edgefleet.controller.rollouts.engine")


def bundle_install_action(artifacts: ArtifactStore, sha256: str) -> fleet_pb2.InstallBundle:
    """The install action for an uploaded bundle, with name and version read from its manifest."""
    from edgefleet.firmware.bundle import read_manifest
    from edgefleet.firmware.rejections import BundleRejected

    path = artifacts.path(sha256)
    if not path.exists():
        raise NotFound(f"no artifact {sha256}; upload the bundle first")
    try:
        manifest = read_manifest(path)
    except BundleRejected as exc:
        raise InvalidArgument(f"artifact {sha256[:12]} is not a readable bundle: {exc.message}") from None
    return fleet_pb2.InstallBundle(sha256=sha256, size=path.stat().st_size, name=manifest.name,
                                   version=manifest.version)


def build_for_class(
    store: Store,
    artifacts: ArtifactStore,
    signing_key: Ed25519PrivateKey,
    compile_cache: Path,
    model: str,
    version: int,
    hardware_class: str,
    *,
    device_measurers: Callable[[], Any] | None = None,
    now_ms: Callable[[], int],
) -> BuildRecord:
    """Compile one model version for one hardware class and sign it twice: as an install bundle
    and as the explicit rollback bundle a later rollout returns devices to. Blocking: the engine
    runs it in a thread."""
    from edgefleet.controller.compiler.api import CompileSpec, compile_model
    from edgefleet.controller.compiler.runner import build_files
    from edgefleet.controller.compiler.target import TargetSpec
    from edgefleet.firmware.bundle import BundleSpec, build_bundle
    from edgefleet.firmware.manifest import RuntimeSpec
    from edgefleet.firmware.selftest import describe_onnx_model, describe_openvino_model, describe_tflite_model

    registered = store.get_model(model, version)
    assert registered is not None
    source = artifacts.path(registered.sha256)
    calib = artifacts.path(registered.calib_sha256) if registered.calib_sha256 else None
    target: Any = compile_target(store, hardware_class) or TargetSpec.from_class(hardware_class)
    with tempfile.TemporaryDirectory(prefix="edgefleet-build-") as tmp:
        work = Path(tmp)
        model_file = work / f"source.{registered.format}"
        model_file.symlink_to(source)
        calib_file = None
        if calib is not None:
            calib_file = work / "calib.npz"
            calib_file.symlink_to(calib)

        def linked(name: str, sha: str) -> Path | None:
            if not sha:
                return None
            path = work / name
            path.symlink_to(artifacts.path(sha))
            return path

        measurers = device_measurers() if device_measurers else None
        report = compile_model(
            CompileSpec(model=model_file, target=target, calib=calib_file, budget=registered.budget,
                        eval_data=linked("eval.npz", registered.eval_sha256),
                        eval_labels=linked("eval-labels.npz", registered.eval_labels_sha256),
                        metric=registered.metric or "cosine", out=work / "out", cache_dir=compile_cache,
                        thread_search=serves_build_threads(store, hardware_class)),
            device_measurers=measurers,
        )
        artifact = Path(report.artifact)
        golden = None
        if calib_file is not None and registered.format != "tflite":
            from edgefleet.controller.compiler.data import load_npz
            from edgefleet.controller.compiler.model_io import load_source

            # The first calibration sample, in the model's own shapes whatever layout it was stored in.
            golden = load_npz(calib_file, load_source(model_file).inputs, flag="--calib").model_sample(0)
        provider = str(report.target.get("execution_provider") or "CPUExecutionProvider")
        chosen_runtime = report.runtime or {}
        threads = int(chosen_runtime.get("threads") or 0) or None  # set when timed on fewer threads than cores
        if chosen_runtime.get("name") == "openvino":
            device = str(chosen_runtime.get("device") or "CPU")
            precision = chosen_runtime.get("inference_precision")
            io, self_test = describe_openvino_model(artifact, golden, device=device, inference_precision=precision,
                                                    rtol=1e-2, atol=1e-3)
            runtime = RuntimeSpec(name="openvino", execution_provider="", device=device,
                                  inference_precision=precision, version=chosen_runtime.get("version"), threads=threads)
        elif artifact.suffix == ".tflite":
            # TFLite names its tensors itself, so the golden input is generated from its own spec.
            io, self_test = describe_tflite_model(artifact, rtol=1e-2, atol=1e-3)
            runtime = RuntimeSpec(name="litert", threads=threads)
        else:
            io, self_test = describe_onnx_model(artifact, golden, rtol=1e-2, atol=1e-3)
            runtime = RuntimeSpec(name="onnxruntime", execution_provider=provider, threads=threads)
        provenance = {"compile": {k: report.to_dict()[k] for k in (
            "chosen", "speedup", "cache_key", "toolchain", "baseline", "result")},
            "source_sha256": registered.sha256}
        shas = []
        for rollback in (False, True):
            bundle = work / f"bundle-{int(rollback)}.efb"
            build_bundle(BundleSpec(
                name=model, version=version, hardware_class=hardware_class, model_file=artifact.name,
                payload={f.name: f for f in build_files(artifact)}, io=io, self_test=self_test,
                runtime=runtime,
                provenance=provenance, rollback=rollback,
            ), signing_key, bundle)
            shas.append(artifacts.put_file(bundle))
    log.info("build ready", extra={"model": model, "version": version, "class": hardware_class,
                                   "chosen": report.chosen, "speedup": report.speedup,
                                   "measured_on": report.latency.get("measured_on", ""),
                                   "cached": report.cached})
    return BuildRecord(model, version, hardware_class, state="ready", bundle_sha256=shas[0],
                       rollback_bundle_sha256=shas[1], report=json.dumps(report.to_dict()),
                       updated_at_ms=now_ms())


def serves_build_threads(store: Store, hardware_class: str) -> bool:
    """Whether every device of the class serves a build on the thread count its manifest names: an
    older agent serves every build on all its threads, where a build chosen on fewer does not hold."""
    from edgefleet.protos.capability import CANDIDATE_THREADS

    older = [d.device_id for d in store.list_devices()
             if d.hardware_class == hardware_class and d.capability_version < CANDIDATE_THREADS]
    if older:
        log.info("no thread-count search for the class: some agents serve every build on all their threads",
                 extra={"class": hardware_class, "devices": ",".join(older[:5]), "needs_capability": CANDIDATE_THREADS})
    return not older


def compile_target(store: Store, hardware_class: str) -> Any:
    """The profile of an enrolled device of the class makes a better target than the class name."""
    from dataclasses import replace

    from edgefleet.controller.compiler.target import TargetSpec, openvino_from_profile
    from edgefleet.protos.capability import OPENVINO_RUNTIME, lacks
    from edgefleet.protos.v1 import profile_pb2

    target = None
    # A build of the class must run on every device of it: OpenVINO devices (and their precisions)
    # are offered only where every profiled device of the class has them, and its agent speaks
    # capability OPENVINO_RUNTIME (an older one would be sent a build it cannot load).
    shared_ov: dict[str, set[str]] | None = None
    for device in store.list_devices():
        if device.hardware_class == hardware_class and device.profile:
            profile = profile_pb2.HardwareProfile.FromString(device.profile)
            if target is None:
                try:
                    target = TargetSpec.from_profile(profile)
                except Exception as exc:  # a profile the compiler cannot use: fall back to the class name
                    log.warning("compiling for the class name: the profile of %s is not usable as a target (%s)",
                                device.device_id, exc, extra={"class": hardware_class})
                    return None
            devices = dict(openvino_from_profile(profile)[0])
            why = lacks(device.capability_version, OPENVINO_RUNTIME, "an OpenVINO build")
            if why:  # its agent predates OpenVINO builds: none for the class
                log.info("no OpenVINO candidates for the class", extra={"class": hardware_class,
                                                                      "device": device.device_id, "reason": why})
                devices = {}
            mine = {name: set(caps) for name, caps in devices.items()}
            shared_ov = mine if shared_ov is None else {
                name: caps & mine[name] for name, caps in shared_ov.items() if name in mine
            }
    if target is not None and shared_ov is not None:
        kept = tuple((name, tuple(c for c in caps if c in shared_ov[name]))
                     for name, caps in target.openvino_devices if name in shared_ov)
        if kept != target.openvino_devices:
            log.info("OpenVINO candidates limited to what every device of the class runs",
                     extra={"class": hardware_class, "openvino": str(kept)})
        target = replace(target, openvino_devices=kept)
    return target
