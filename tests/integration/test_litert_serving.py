"""A TFLite bundle: self-tested and served by the agent through LiteRT."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.agent.client import LocalClient
from edgefleet.firmware.bundle import BundleSpec, build_bundle
from edgefleet.firmware.installer import Installer
from edgefleet.firmware.keys import generate_signing_key
from edgefleet.firmware.manifest import RuntimeSpec
from edgefleet.firmware.selftest import LiteRTSession, describe_tflite_model
from edgefleet.firmware.sources import FileSource
from fleet_harness import wait_until
from model_factory import local_hardware_class
from models.tiny_models import tflite_mlp

pytestmark = pytest.mark.integration


def test_tflite_bundle_installs_and_serves_through_litert(tmp_path, controller, start_agent):
    model = tflite_mlp(tmp_path / "mlp.tflite")
    io, self_test = describe_tflite_model(model)
    key = generate_signing_key()
    bundle = build_bundle(BundleSpec(
        name="tfl", version=1, hardware_class=local_hardware_class(), model_file="mlp.tflite",
        payload={"mlp.tflite": model}, io=io, self_test=self_test, runtime=RuntimeSpec(name="litert"),
    ), key, tmp_path / "tfl.efb")
    state = tmp_path / "a1"
    outcome = Installer(state, [key.public_key()]).install(FileSource(bundle))
    assert outcome.result == "committed", outcome

    agent = start_agent("a1", controller.create_token(), ["--telemetry-interval", "0.5s"])
    wait_until(lambda: (agent.state_dir / "agent.sock").exists(), 30, "local API")
    x = np.random.default_rng(3).standard_normal((1, 64)).astype(np.float32)
    with LocalClient(f"unix://{agent.state_dir / 'agent.sock'}") as client:
        status = client.status()
        assert status.runtime == "litert:xnnpack" and status.fallback == ""
        (name,) = status.input_names
        out = client.infer({name: x})
    expected = LiteRTSession(model).run(None, {name: x})[0]
    np.testing.assert_allclose(next(iter(out.values())), expected, rtol=1e-5)
