"""An OpenVINO build as a bundle (IR .xml + .bin, or a TFLite file OpenVINO reads): verified, self-tested, served."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
from bundle_fixtures import GOLDEN_X, HARDWARE_CLASS, write_affine_model

from edgefleet.agent.runtime import load_model
from edgefleet.firmware.bundle import BundleSpec, build_bundle
from edgefleet.firmware.installer import Installer, InstallPolicy
from edgefleet.firmware.manifest import RuntimeSpec
from edgefleet.firmware.selftest import describe_openvino_model
from edgefleet.firmware.slots import active_model
from edgefleet.firmware.sources import FileSource


def openvino_bundle(tmp_path: Path, signing_key, *, device: str = "CPU", precision: str | None = "f32",
                    threads: int | None = None) -> Path:
    onnx_path = write_affine_model(tmp_path / "affine.onnx", 2.0, 1.0)
    xml = tmp_path / "model.xml"
    ov.save_model(ov.Core().read_model(str(onnx_path)), str(xml), compress_to_fp16=True)
    io, self_test = describe_openvino_model(xml, {"x": GOLDEN_X}, inference_precision=precision)
    spec = BundleSpec(
        name="affine", version=1, hardware_class=HARDWARE_CLASS, model_file="model.xml",
        payload={"model.xml": xml, "model.bin": xml.with_suffix(".bin")}, io=io, self_test=self_test,
        runtime=RuntimeSpec(name="openvino", execution_provider="", device=device, inference_precision=precision,
                            version=ov.get_version(), threads=threads),
        provenance={"recipe": "ov-fp32-fp16w"}, created_at=time.time(), expires_at=time.time() + 3600,
    )
    return build_bundle(spec, signing_key, tmp_path / "ov.efb")


def test_openvino_bundle_installs_self_tests_and_serves(tmp_path: Path, signing_key) -> None:
    state = tmp_path / "device"
    installer = Installer(state, [signing_key.public_key()], hardware_class=HARDWARE_CLASS,
                          policy=InstallPolicy(probation_inferences=2))
    outcome = installer.install(FileSource(openvino_bundle(tmp_path, signing_key)))
    assert outcome.result == "committed", outcome
    active = active_model(state)
    assert active is not None and active.manifest.runtime.name == "openvino"
    assert active.manifest.runtime.inference_precision == "f32"
    loaded = load_model(active.model_path, active.manifest, threads=1)
    assert loaded.runtime == "openvino:CPU/f32" and loaded.fallback == ""
    out = loaded.run({"x": GOLDEN_X})
    np.testing.assert_allclose(next(iter(out.values())), GOLDEN_X * 2.0 + 1.0, rtol=1e-3)


def test_a_build_timed_on_fewer_threads_is_served_on_those(tmp_path: Path, signing_key) -> None:
    from edgefleet.agent.runtime import serving_threads

    state = tmp_path / "device"
    installer = Installer(state, [signing_key.public_key()], hardware_class=HARDWARE_CLASS,
                          policy=InstallPolicy(probation_inferences=1))
    outcome = installer.install(FileSource(openvino_bundle(tmp_path, signing_key, threads=1)))
    assert outcome.result == "committed", outcome
    active = active_model(state)
    assert active is not None and active.manifest.runtime.threads == 1, "the count survives the signed manifest"
    loaded = load_model(active.model_path, active.manifest, threads=2)
    assert loaded.runner.session.compiled.get_property("INFERENCE_NUM_THREADS") == 1  # type: ignore[attr-defined]
    # Never more threads than the device serves with; a build with no count takes the device's.
    assert serving_threads(RuntimeSpec(threads=4), 2) == 2 and serving_threads(RuntimeSpec(threads=1), 0) == 1
    assert serving_threads(RuntimeSpec(), 2) == 2


def test_a_bundle_for_a_missing_openvino_device_is_refused_and_serving_says_why(
    tmp_path: Path, signing_key
) -> None:
    if "NPU" in ov.Core().available_devices:  # pragma: no cover - only on a machine with an Intel NPU
        return
    from edgefleet.agent.runtime import _load_openvino

    state = tmp_path / "device"
    installer = Installer(state, [signing_key.public_key()], hardware_class=HARDWARE_CLASS,
                          policy=InstallPolicy(probation_inferences=1))
    outcome = installer.install(FileSource(openvino_bundle(tmp_path, signing_key, device="NPU", precision="f16")))
    assert outcome.result != "committed" and active_model(state) is None
    assert "load" in str(outcome.reason).lower() or "NPU" in str(outcome.message)
    # Serving a build whose device is gone (a plugin removed after install) falls back to the CPU, said so.
    _, used, fallback = _load_openvino(tmp_path / "model.xml", "NPU", "f16", 1)
    assert used == "openvino:CPU" and "NPU is not available" in fallback


def test_device_in_the_loop_times_an_openvino_ir_beside_an_onnx_build(tmp_path: Path) -> None:
    import io

    from edgefleet.agent.measure import time_candidates
    from edgefleet.protos.v1 import fleet_pb2

    onnx_path = write_affine_model(tmp_path / "affine.onnx", 2.0, 1.0)
    xml = tmp_path / "ir.xml"
    ov.save_model(ov.Core().read_model(str(onnx_path)), str(xml))
    buffer = io.BytesIO()
    np.savez(buffer, x=GOLDEN_X)
    spec = fleet_pb2.MeasureCandidates(warmup=1, runs=3, rounds=2, inputs_are_feed=True)
    spec.candidates.add(name="c0", runtime="onnxruntime", inputs_npz=buffer.getvalue())
    spec.candidates.add(name="c1", runtime="openvino", device="CPU", inference_precision="f32",
                        inputs_npz=buffer.getvalue())
    timings = time_candidates({"c0": onnx_path, "c1": xml}, spec, threads=1)
    assert [t.error for t in timings] == ["", ""]
    assert timings[1].runtime == "openvino:CPU/f32" and len(timings[1].latencies_ms) == 2


def test_device_in_the_loop_times_a_candidate_on_the_threads_it_asks_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Capped at the agent's own count, as the manifest's count is when the build is served."""
    import io

    from edgefleet.agent import measure
    from edgefleet.protos.v1 import fleet_pb2

    onnx_path = write_affine_model(tmp_path / "affine.onnx", 2.0, 1.0)
    buffer = io.BytesIO()
    np.savez(buffer, x=GOLDEN_X)
    spec = fleet_pb2.MeasureCandidates(warmup=1, runs=3, rounds=2, inputs_are_feed=True)
    for name, threads in (("c0", 0), ("c1", 1), ("c2", 8)):
        spec.candidates.add(name=name, runtime="openvino", device="CPU", inference_precision="f32",
                            inputs_npz=buffer.getvalue(), threads=threads)
    opened: list[int] = []
    real = measure.OpenVINOSession

    def recording(path: Path, device: str, precision: str | None, threads: int) -> object:
        opened.append(threads)
        return real(path, device, precision, threads)

    monkeypatch.setattr(measure, "OpenVINOSession", recording)
    timings = measure.time_candidates({"c0": onnx_path, "c1": onnx_path, "c2": onnx_path}, spec, threads=2)
    assert [t.error for t in timings] == ["", "", ""]
    assert opened == [2, 1, 2]
    assert [t.runtime for t in timings] == ["openvino:CPU/f32", "openvino:CPU/f32 x1 threads",
                                            "openvino:CPU/f32 x2 threads"]


def test_an_openvino_bundle_of_a_tflite_file_installs_self_tests_and_serves(tmp_path: Path, signing_key) -> None:
    """The compiler ships a TFLite model as it is when its IR would be bigger; OpenVINO reads it here."""
    from tests.models.tiny_models import tflite_mlp

    model = tflite_mlp(tmp_path / "model.tflite", din=8, dhidden=8, dout=4)
    x = np.linspace(0, 1, 8, dtype=np.float32).reshape(1, 8)
    io, self_test = describe_openvino_model(model, {"x": x}, inference_precision="f32")
    spec = BundleSpec(
        name="mlp", version=1, hardware_class=HARDWARE_CLASS, model_file="model.tflite",
        payload={"model.tflite": model}, io=io, self_test=self_test,
        runtime=RuntimeSpec(name="openvino", execution_provider="", device="CPU", inference_precision="f32",
                            version=ov.get_version()),
        provenance={"recipe": "ov-fp32"}, created_at=time.time(), expires_at=time.time() + 3600,
    )
    state = tmp_path / "device"
    installer = Installer(state, [signing_key.public_key()], hardware_class=HARDWARE_CLASS,
                          policy=InstallPolicy(probation_inferences=2))
    outcome = installer.install(FileSource(build_bundle(spec, signing_key, tmp_path / "mlp.efb")))
    assert outcome.result == "committed", outcome
    active = active_model(state)
    assert active is not None and active.model_path.suffix == ".tflite"
    loaded = load_model(active.model_path, active.manifest, threads=1)
    assert loaded.runtime == "openvino:CPU/f32" and loaded.fallback == ""
    from ai_edge_litert.interpreter import Interpreter

    litert = Interpreter(model_path=str(model))
    litert.allocate_tensors()
    litert.set_tensor(litert.get_input_details()[0]["index"], x)
    litert.invoke()
    want = litert.get_tensor(litert.get_output_details()[0]["index"])
    np.testing.assert_allclose(next(iter(loaded.run({"x": x}).values())), want, rtol=1e-4, atol=1e-5)
