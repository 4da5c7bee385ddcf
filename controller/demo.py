"""`edgefleet demo`: a controller and a few agents as real processes on this machine.

Everything runs on embedded defaults (SQLite in a temp state dir, gRPC on a free localhost
port). It stops on Ctrl-C or after --duration and leaves no process behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import click

from edgefleet.controller.client import Connection, UserError
from edgefleet.protos.v1 import control_pb2

HEARTBEAT = "1s"
TELEMETRY_INTERVAL = "1s"
WORKLOAD = "golden:20/s"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcessGroup:
    """Children started in their own sessions, stopped with SIGTERM then SIGKILL."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def stop_all(self, grace_s: float = 5.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def demo_state_dir(state_dir: Path | None) -> Iterator[Path]:
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        yield state_dir
        return
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def wait_for(predicate, timeout_s: float, what: str, procs: ProcessGroup) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, proc in procs.procs.items():
            if proc.poll() is not None:
                raise UserError(f"{name} exited with code {proc.returncode}; see {procs.log_dir / name}.log")
        if predicate():
            return
        time.sleep(0.2)
    raise UserError(f"timed out waiting for {what}; logs are in {procs.log_dir}")


def run_demo(agents: int, duration_s: float | None, state_dir: Path | None) -> int:
    py = sys.executable
    with demo_state_dir(state_dir) as root:
        controller_dir = root / "controller"
        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        grpc_address = f"127.0.0.1:{free_port()}"
        device_address = f"127.0.0.1:{free_port()}"  # mutual TLS for the agents' sessions
        http_address = f"127.0.0.1:{free_port()}"
        group = ProcessGroup(logs)
        stop = {"now": False}

        def on_signal(signum: int, frame: object) -> None:
            stop["now"] = True

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            click.echo(f"demo: state in {root}")
            group.start("controller", [
                py, "-m", "edgefleet.controller.cli", "controller", "serve",
                "--state-dir", str(controller_dir), "--grpc", grpc_address, "--http", http_address,
                "--heartbeat-interval", HEARTBEAT, "--device-grpc", device_address,
            ])
            wait_for(lambda: (controller_dir / "controller.json").exists(), 30, "the controller to listen", group)
            client = Connection.resolve(None, controller_dir).control()
            token = client.call(
                "CreateEnrollmentToken",
                control_pb2.CreateEnrollmentTokenRequest(uses=agents, ttl_s=3600, labels={"fleet": "demo"}),
            ).token
            click.echo(f"demo: controller on {grpc_address} (TLS; devices on {device_address}, mutual TLS), "
                       f"metrics on http://{http_address}/metrics, dashboard on http://{http_address}/")
            for i in range(agents):
                group.start(f"agent-{i + 1}", [
                    py, "-m", "edgefleet.agent.cli", "run", "--controller", grpc_address, "--token", token,
                    "--state-dir", str(root / f"agent-{i + 1}"), "--labels", f"site=demo-{i % 2 + 1}",
                    "--no-microbench", "--telemetry-interval", TELEMETRY_INTERVAL, "--workload", WORKLOAD,
                    # The CA given out of band, as an operator copies it to a device.
                    "--ca-cert", str(controller_dir / "ca.pem"),
                ])

            def all_online() -> bool:
                devices = client.call("ListDevices", control_pb2.ListDevicesRequest()).devices
                return len(devices) == agents and all(d.online for d in devices)

            wait_for(all_online, 60, f"{agents} agents to enroll and come online", group)
            env_hint = f"EDGEFLEET_STATE_DIR={controller_dir}"
            cli = [py, "-m", "edgefleet.controller.cli", "--state-dir", str(controller_dir)]
            click.echo(f"demo: {agents} agents enrolled and online:\n")
            subprocess.run([*cli, "devices", "list"], check=False)
            rollout_id = roll_out_demo_model(client, root / "model", wait_for, group)
            click.echo("\ndemo: rollout finished:\n")
            subprocess.run([*cli, "rollout", "status", rollout_id], check=False)
            wait_for(lambda: live_rows(client) >= agents, 60, "live latency from every device", group)
            click.echo("\ndemo: live telemetry from the fleet (every device runs digits:1 at 20 inferences/s):\n")
            subprocess.run([*cli, "telemetry", "watch", "--once"], check=False)
            click.echo(
                "\nwhere to look next (in another terminal):\n"
                f"  {env_hint} edgefleet devices list\n"
                f"  {env_hint} edgefleet devices show <DEVICE> --json\n"
                f"  {env_hint} edgefleet telemetry watch\n"
                f"  {env_hint} edgefleet rollout status {rollout_id}\n"
                f"  curl http://{http_address}/metrics\n"
                f"  dashboard: http://{http_address}/ (log in with the token in {controller_dir / 'operator-token'})\n"
                f"  logs: {logs}\n"
            )
            deadline = time.monotonic() + duration_s if duration_s is not None else None
            click.echo("demo: running until Ctrl-C" if deadline is None else f"demo: running for {duration_s:g}s")
            while not stop["now"] and (deadline is None or time.monotonic() < deadline):
                time.sleep(0.2)
        finally:
            click.echo("demo: stopping")
            group.stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0


def roll_out_demo_model(client, work: Path, wait_for, group: ProcessGroup) -> str:
    """Train the digits model, register it, and roll it out: canary, then everyone."""
    from edgefleet.controller.client import upload_artifact
    from edgefleet.controller.demo_model import build_digits_model

    model, calib, accuracy = build_digits_model(work)
    click.echo(f"\ndemo: trained digits:1 (held-out accuracy {accuracy:.1%}); compiling per class and rolling out")
    client.call("AddModel", control_pb2.AddModelRequest(
        name="digits", version=1, sha256=upload_artifact(client, model), format="onnx",
        calib_sha256=upload_artifact(client, calib), budget=0.99))
    info = client.call("CreateRollout", control_pb2.CreateRolloutRequest(
        model="digits", version=1, to="all", waves="1,100%", soak_s=3, max_failures=0.0,
        gates=["p95_ms<=1.5x", "error_rate<=0.01"], device_timeout_s=120, auto_rollback=True))

    def finished() -> bool:
        state = client.call("GetRollout", control_pb2.GetRolloutRequest(rollout_id=info.rollout_id)).state
        if state in ("paused", "failed", "aborted"):
            raise UserError(f"the demo rollout stopped: {state}; see `edgefleet rollout status {info.rollout_id}`")
        return bool(state == "completed")

    wait_for(finished, 300, "the rollout to complete", group)
    return str(info.rollout_id)


def live_rows(client) -> int:
    rows = client.call("TelemetrySummary", control_pb2.TelemetrySummaryRequest(model="digits")).rows
    return sum(1 for r in rows if r.p95_ms > 0)
