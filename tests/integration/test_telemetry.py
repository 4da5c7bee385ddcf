"""Serving and telemetry with real processes: local API, live percentiles, power, /metrics, outages."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.agent.client import InferenceError, LocalClient
from edgefleet.controller.cli.main import cli
from edgefleet.protos.v1 import control_pb2
from fleet_harness import wait_until
from model_factory import install_offline, mlp_onnx, signed_bundle

pytestmark = pytest.mark.integration


@pytest.fixture
def served_agent(tmp_path, controller, start_agent):  # type: ignore[no-untyped-def]
    """An enrolled agent serving an MLP under a 40/s golden workload, telemetry every 0.3 s."""
    bundle, key = signed_bundle(tmp_path, mlp_onnx(tmp_path / "mlp.onnx"))
    install_offline(tmp_path / "a1", bundle, key)
    agent = start_agent("a1", controller.create_token(),
                        ["--telemetry-interval", "0.3s", "--workload", "golden:40/s"])
    wait_until(lambda: agent.device_id, 30, "enrolled")
    return agent


def model_rows(controller, device_id: str):  # type: ignore[no-untyped-def]
    reply = controller.call("TelemetrySummary", control_pb2.TelemetrySummaryRequest(device_id=device_id))
    return [r for r in reply.rows if r.model]


def test_local_api_serves_and_rejects_bad_inputs_without_crashing(served_agent):
    address = f"unix://{served_agent.state_dir / 'agent.sock'}"
    wait_until(lambda: (served_agent.state_dir / "agent.sock").exists(), 30, "local API socket")
    with LocalClient(address) as client:
        status = client.status()
        assert status.model == "mlp" and status.version == "1" and status.runtime == "onnxruntime:CPUExecutionProvider"
        assert status.fallback == "" and list(status.input_names) == ["x"]
        x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
        out = client.infer({"x": x})
        assert out["logits"].shape == (3, 10)
        for bad, needle in [
            ({"x": x.astype(np.float64)}, "is float64; expected x: float32[batch,64]"),
            ({"x": x[:, :10]}, "has shape [3, 10]; expected x: float32[batch,64]"),
            ({"input": x}, "expected x: float32[batch,64]"),
        ]:
            with pytest.raises(InferenceError) as info:
                client.infer(bad)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and needle in str(info.value)
        assert client.infer({"x": x})["logits"].shape == (3, 10)  # still serving
    assert served_agent.running


def test_inference_streams_are_renewed_and_capped(served_agent):
    """LocalClient keeps one InferStream per client; a stream is used for the first half of its
    deadline only (then renewed), and when the agent's streams are all taken the client goes on
    with unary Infer calls instead of failing."""
    from edgefleet.agent.local_api import MAX_STREAMS

    address = f"unix://{served_agent.state_dir / 'agent.sock'}"
    wait_until(lambda: (served_agent.state_dir / "agent.sock").exists(), 30, "local API socket")
    x = np.ones((1, 64), np.float32)
    with LocalClient(address, timeout_s=0.5) as client:
        assert client.infer({"x": x})["logits"].shape == (1, 10)
        first = client._stream
        assert first is not None
        time.sleep(0.6)  # past the fresh half: the next call opens another stream
        assert client.infer({"x": x})["logits"].shape == (1, 10)
        assert client._stream is not None and client._stream is not first
        time.sleep(1.2)  # past the whole deadline: the agent has ended that stream
        assert client.infer({"x": x})["logits"].shape == (1, 10)
    holders = [LocalClient(address) for _ in range(MAX_STREAMS)]
    try:
        for holder in holders:
            holder.infer({"x": x})  # each holds one stream open
        with LocalClient(address) as late:
            assert late.infer({"x": x})["logits"].shape == (1, 10)
            assert not late.use_stream  # refused a stream, served by unary calls
    finally:
        for holder in holders:
            holder.close()

    def stream_granted() -> bool:  # closed streams are given back
        with LocalClient(address) as again:
            again.infer({"x": x})
            return again.use_stream and again._stream is not None

    wait_until(stream_granted, 10, "a stream granted once the others closed")


def test_agent_infer_command(served_agent, tmp_path):
    wait_until(lambda: (served_agent.state_dir / "agent.sock").exists(), 30, "local API socket")
    np.save(tmp_path / "x.npy", np.ones((1, 64), np.float32))
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.agent.cli", "infer", "--input", str(tmp_path / "x.npy"), "--json",
         "--state-dir", str(served_agent.state_dir), "--output", str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["model"] == "mlp" and reply["outputs"]["logits"]["shape"] == [1, 10]
    assert np.load(tmp_path / "out.npz")["logits"].shape == (1, 10)
    np.save(tmp_path / "bad.npy", np.ones((1, 3), np.float32))
    bad = subprocess.run(
        [sys.executable, "-m", "edgefleet.agent.cli", "infer", "--input", f"x={tmp_path / 'bad.npy'}",
         "--state-dir", str(served_agent.state_dir)], capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 2 and "expected x: float32[batch,64]" in bad.stderr and "Traceback" not in bad.stderr


def test_live_percentiles_power_and_prometheus(served_agent, controller, monkeypatch):
    device = served_agent.device_id
    rows = wait_until(lambda: [r for r in model_rows(controller, device) if r.throughput > 5], 30, "model rows")
    row = rows[0]
    assert row.model == "mlp" and row.version == "1" and 0 < row.p50_ms <= row.p95_ms <= row.p99_ms
    assert 10 < row.throughput < 80  # the 40/s workload, over a 0.3 s batch
    # No readable sensor on this machine: power and energy must say they are estimates.
    assert row.power_source == "estimated:model" and row.watts > 0
    assert row.energy_source == "estimated:model" and row.energy_mj > 0

    monkeypatch.delenv("EDGEFLEET_TOKEN", raising=False)
    monkeypatch.delenv("EDGEFLEET_CONTROLLER", raising=False)
    run = CliRunner()
    args = ["telemetry", "query", "--device", device, "--metric", "p95_ms", "--since", "5m", "--json",
            "--state-dir", str(controller.state_dir)]

    def stored_samples() -> list[dict[str, str]] | None:
        samples = json.loads(run.invoke(cli, args).output)["samples"]
        return samples if len(samples) >= 3 else None

    samples = wait_until(stored_samples, 30, "3 stored samples")
    assert all(s["value"] > 0 for s in samples)
    seqs = [int(s["seq"]) for s in samples]
    assert seqs == sorted(seqs)
    watch = run.invoke(cli, ["telemetry", "watch", "--once", "--model", "mlp",
                             "--state-dir", str(controller.state_dir)])
    assert watch.exit_code == 0 and device in watch.output and "mlp:1" in watch.output
    bad_metric = run.invoke(cli, ["telemetry", "query", "--device", device, "--metric", "nope",
                                  "--state-dir", str(controller.state_dir)])
    assert bad_metric.exit_code == 2 and "unknown metric 'nope'" in bad_metric.output

    body = urllib.request.urlopen(f"http://{controller.http_address}/metrics", timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    histogram = families["edgefleet_inference_latency_seconds"]
    counts = {s.labels.get("le"): s.value for s in histogram.samples if s.name.endswith("_bucket")}
    assert counts["+Inf"] > 10 and counts["+Inf"] >= counts["0.01"]
    gauges = families["edgefleet_device_inference_latency_seconds"].samples
    assert {s.labels["quantile"] for s in gauges if s.labels["device"] == device} == {"0.5", "0.95", "0.99"}
    power = [s for s in families["edgefleet_device_power_watts"].samples if s.labels["device"] == device]
    assert power and power[0].labels["source"] == "estimated:model"
    stored = [s for s in families["edgefleet_telemetry_batches"].samples
              if s.name == "edgefleet_telemetry_batches_total" and s.labels["result"] == "stored"]
    assert stored and stored[0].value >= 3


@pytest.mark.long
def test_controller_outage_loses_and_duplicates_nothing(tmp_path, controller, start_agent):
    """Cut the controller for the whole of OUTAGE_S under load; every seq then arrives exactly once."""
    outage_s = 120
    bundle, key = signed_bundle(tmp_path, mlp_onnx(tmp_path / "mlp.onnx"))
    install_offline(tmp_path / "a1", bundle, key)
    agent = start_agent("a1", controller.create_token(),
                        ["--telemetry-interval", "0.5s", "--workload", "golden:30/s"])
    wait_until(lambda: agent.device_id and model_rows(controller, agent.device_id), 30, "telemetry flowing")
    controller.stop()
    controller.close_channel()
    time.sleep(outage_s)
    queued = sqlite3.connect(agent.state_dir / "telemetry.db").execute("SELECT COUNT(*) FROM batches").fetchone()[0]
    assert queued >= outage_s / 0.5 * 0.8  # the agent kept cutting batches while alone
    controller.start()
    db = controller.state_dir / "controller.db"

    def drained() -> bool:
        left = sqlite3.connect(agent.state_dir / "telemetry.db").execute("SELECT COUNT(*) FROM batches").fetchone()
        return left[0] <= 2

    wait_until(drained, 60, "the agent's queue to drain")
    agent.stop()  # a clean stop cuts one last batch into the outbox
    stored = [r[0] for r in sqlite3.connect(db).execute(
        "SELECT seq FROM telemetry_batches WHERE device_id = ? ORDER BY seq", (agent.device_id,))]
    left = [r[0] for r in sqlite3.connect(agent.state_dir / "telemetry.db").execute("SELECT seq FROM batches")]
    assert len(stored) == len(set(stored)) and len(stored) >= queued
    assert sorted(set(stored) | set(left)) == list(range(1, max(stored + left) + 1)), "a sequence number is missing"
    assert stored == list(range(1, len(stored) + 1))
