"""Rollouts with a real controller and real agents: classes, canary, gates, failures, restarts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgefleet.controller.cli.main import cli
from edgefleet.protos.v1 import control_pb2
from fleet_harness import wait_until
from model_factory import mlp_onnx

pytestmark = pytest.mark.integration

TELEMETRY = ["--telemetry-interval", "0.3s", "--workload", "golden:40/s"]


@pytest.fixture
def run_cli(controller, monkeypatch):  # type: ignore[no-untyped-def]
    for var in ("EDGEFLEET_CONTROLLER", "EDGEFLEET_TOKEN", "EDGEFLEET_STATE_DIR"):
        monkeypatch.delenv(var, raising=False)

    def invoke(*args: str):  # type: ignore[no-untyped-def]
        result = CliRunner().invoke(cli, [*args, "--state-dir", str(controller.state_dir)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    return invoke


def register(run_cli, tmp_path, version: int, **mlp: int) -> None:  # type: ignore[no-untyped-def]
    model = mlp_onnx(tmp_path / f"mlp-v{version}.onnx", **mlp)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    run_cli("models", "add", str(model), "--name", "mlp", "--version", str(version), "--calib", str(calib))


def rollout(controller, rollout_id: str) -> control_pb2.RolloutInfo:  # type: ignore[no-untyped-def]
    return controller.call("GetRollout", control_pb2.GetRolloutRequest(rollout_id=rollout_id))


def create(run_cli, *args: str) -> str:  # type: ignore[no-untyped-def]
    return json.loads(run_cli("rollout", "create", *args, "--json"))["rollout_id"]


def wait_state(controller, rollout_id: str, states: tuple[str, ...], timeout_s: float = 120):  # type: ignore[no-untyped-def]
    return wait_until(lambda: rollout(controller, rollout_id).state in states and rollout(controller, rollout_id),
                      timeout_s, f"rollout {rollout_id} in {states}")


def test_two_classes_compile_once_each_and_the_canary_goes_first(tmp_path, controller, start_agent, run_cli):
    token = controller.create_token(uses=6)
    for i in range(6):
        cls = "x86_64-avx2" if i % 2 else "arm64-dotprod"
        start_agent(f"a{i}", token, ["--hardware-class", cls, *TELEMETRY])
    wait_until(lambda: sum(d.online for d in controller.devices()) == 6, 60, "6 online")
    register(run_cli, tmp_path, 1)
    rid = create(run_cli, "mlp:1", "--waves", "1,100%", "--soak", "1s", "--gate", "p95_ms<=5x")
    # --watch --json follows the rollout with one JSON object per refresh and returns when it stops.
    frames = [json.loads(line) for line in run_cli("rollout", "status", rid, "--watch", "--json").splitlines()]
    assert len(frames) >= 2 and frames[0]["state"] in ("planning", "running"), frames[0]
    assert frames[-1]["state"] == "completed", frames[-1].get("reason")
    waves = [f.get("wave", 0) for f in frames]
    assert waves == sorted(waves), "the watch sees the waves in order"
    info = wait_state(controller, rid, ("completed", "paused", "failed"), 10)
    assert info.state == "completed", info.reason
    assert sorted(b.hardware_class for b in info.builds) == ["arm64-dotprod", "x86_64-avx2"]
    assert all(b.state == "ready" and b.measured_on.startswith("device:") for b in info.builds)
    assert [d.state for d in info.devices] == ["committed"] * 6
    for cls in ("arm64-dotprod", "x86_64-avx2"):
        members = [d for d in info.devices if d.hardware_class == cls]
        canary = [d for d in members if d.wave == 0]
        assert len(canary) == 1
        assert all(canary[0].finished_at_unix_ms <= d.dispatched_at_unix_ms for d in members if d.wave > 0)
    status = run_cli("rollout", "status", rid)
    assert "COMPLETED" in status and "[####################] 2/2" in status and "[####################] 4/4" in status
    # An operator action the rollout's state does not allow is refused, in one line naming the state.
    refused = CliRunner().invoke(cli, ["rollout", "resume", rid, "--state-dir", str(controller.state_dir)])
    assert refused.exit_code != 0 and len(refused.output.strip().splitlines()) == 1, refused.output
    assert f"rollout {rid} is completed; resume is allowed only when it is paused" \
        in refused.output, refused.output


def start_fleet(controller, start_agent, n: int, extra: dict[int, list[str]] | None = None):  # type: ignore[no-untyped-def]
    token = controller.create_token(uses=n)
    agents = [start_agent(f"a{i}", token, [*TELEMETRY, *(extra or {}).get(i, [])]) for i in range(n)]
    wait_until(lambda: sum(d.online for d in controller.devices()) == n, 60, f"{n} online")
    return agents


def serving(agent) -> str:  # type: ignore[no-untyped-def]
    from edgefleet.agent.client import LocalClient

    with LocalClient(f"unix://{agent.state_dir / 'agent.sock'}") as client:
        return client.status().version


@pytest.mark.long
def test_a_slower_model_trips_the_p95_gate_after_the_canary_and_rolls_back(
        tmp_path, controller, start_agent, run_cli):
    agents = start_fleet(controller, start_agent, 3)
    register(run_cli, tmp_path, 1)
    first = create(run_cli, "mlp:1", "--waves", "100%", "--soak", "0s")
    assert wait_state(controller, first, ("completed", "paused", "failed")).state == "completed"
    register(run_cli, tmp_path, 2, hidden=32768, tanh_chain=300)  # ~10 ms of work no pass removes
    rid = create(run_cli, "mlp:2", "--waves", "1,100%", "--soak", "3s", "--gate", "p95_ms<=1.5x")
    info = wait_state(controller, rid, ("completed", "paused", "failed"), 180)
    assert info.state == "paused"
    assert "p95_ms<=1.5x" in info.reason and "gate breach" in info.reason
    canary = next(d for d in info.devices if d.wave == 0)
    assert canary.device_id in info.reason
    wait_until(lambda: next(d for d in rollout(controller, rid).devices if d.wave == 0).state == "rolled_back",
               60, "canary rolled back")
    by_id = {a.device_id: a for a in agents}
    wait_until(lambda: serving(by_id[canary.device_id]) == "1", 30, "canary serving v1 again")
    assert [d.state for d in rollout(controller, rid).devices if d.wave == 1] == ["planned", "planned"]
    assert all(serving(a) == "1" for a in agents)

    # The same breach with --auto-rollback off only pauses: the canary keeps the new model.
    again = create(run_cli, "mlp:2", "--waves", "1,100%", "--soak", "3s", "--gate", "p95_ms<=1.5x",
                   "--auto-rollback", "off")
    info = wait_state(controller, again, ("completed", "paused", "failed"), 180)
    assert info.state == "paused" and "gate breach" in info.reason and "rolling back" not in info.reason
    canary = next(d for d in info.devices if d.wave == 0)
    assert canary.state == "committed" and serving(by_id[canary.device_id]) == "2"


def test_one_failed_install_of_three_pauses_with_the_reason(tmp_path, controller, start_agent, run_cli):
    agents = start_fleet(controller, start_agent, 3, {2: ["--model-disk-limit", "4096"]})
    register(run_cli, tmp_path, 1)
    rid = create(run_cli, "mlp:1", "--waves", "100%", "--soak", "0s", "--max-failures", "10%")
    info = wait_state(controller, rid, ("completed", "paused", "failed"), 120)
    assert info.state == "paused"
    assert "1 of 3 installs failed (max 10%)" in info.reason
    assert agents[2].device_id in info.reason and "insufficient_space" in info.reason
    states = sorted(d.state for d in info.devices)
    assert states == ["committed", "committed", "failed"]


def test_controller_killed_between_waves_resumes_without_double_installs(
        tmp_path, controller, start_agent, run_cli):
    start_fleet(controller, start_agent, 3)
    register(run_cli, tmp_path, 1)
    rid = create(run_cli, "mlp:1", "--waves", "1,100%", "--soak", "4s")
    wait_until(lambda: any(d.state == "committed" for d in rollout(controller, rid).devices), 120, "canary done")
    controller.kill()  # SIGKILL while the canary soaks
    controller.close_channel()
    controller.start()
    info = wait_state(controller, rid, ("completed", "paused", "failed"), 120)
    assert info.state == "completed", info.reason
    assert [d.state for d in info.devices] == ["committed"] * 3
    commands = controller.call("ListCommands", control_pb2.ListCommandsRequest(rollout_id=rid)).commands
    installs = [c for c in commands if c.kind == "install"]
    assert sorted(c.device_id for c in installs) == sorted(d.device_id for d in info.devices)  # one each
    assert all(c.result == "committed" for c in installs)


def test_offline_device_times_out_then_installs_when_it_returns(tmp_path, controller, start_agent, run_cli):
    agents = start_fleet(controller, start_agent, 2)
    away = agents[1]
    away.kill()
    wait_until(lambda: sum(d.online for d in controller.devices()) == 1, 30, "one offline")
    register(run_cli, tmp_path, 1)
    rid = create(run_cli, "mlp:1", "--waves", "100%", "--soak", "0s", "--device-timeout", "3s")
    info = wait_state(controller, rid, ("completed", "paused", "failed"), 120)
    assert info.state == "completed"
    assert {d.device_id: d.state for d in info.devices} == {agents[0].device_id: "committed",
                                                             away.device_id: "timed_out"}
    away.start()
    wait_until(lambda: {d.state for d in rollout(controller, rid).devices} == {"committed"}, 60,
               "the returning device installs")
    assert serving(away) == "1"


def test_late_joiners_get_the_rollout_and_a_newer_rollout_supersedes(tmp_path, controller, start_agent, run_cli):
    token = controller.create_token(uses=3)
    first = [start_agent(f"a{i}", token, TELEMETRY) for i in range(2)]
    wait_until(lambda: sum(d.online for d in controller.devices()) == 2, 60, "2 online")
    register(run_cli, tmp_path, 1)
    older = create(run_cli, "mlp:1", "--waves", "1,100%", "--soak", "60s")
    wait_until(lambda: any(d.state == "committed" for d in rollout(controller, older).devices), 120, "canary")

    late = start_agent("a2", token, TELEMETRY)  # enrolls while the canary soaks
    wait_until(lambda: late.device_id, 30, "late device enrolled")
    wait_until(lambda: {d.device_id: d.state for d in rollout(controller, older).devices}.get(late.device_id)
               == "committed", 60, "the late joiner installs")

    register(run_cli, tmp_path, 2, seed=1)
    newer = create(run_cli, "mlp:2", "--waves", "100%", "--soak", "0s")
    old = rollout(controller, older)
    waiting = next(d for d in old.devices if d.wave == 1)
    assert waiting.state == "superseded" and newer in waiting.reason
    assert f"superseded by {newer}" in old.reason
    info = wait_state(controller, newer, ("completed", "paused", "failed"), 120)
    assert info.state == "completed" and len(info.devices) == 3
    assert all(serving(a) == "2" for a in [*first, late])
