"""Commands run once: a redelivered command is answered from the journal, a replayed nonce is refused."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from edgefleet.agent.commands import CommandRunner
from edgefleet.firmware.installer import Installer
from edgefleet.firmware.sources import FileSource
from edgefleet.protos.v1 import fleet_pb2
from model_factory import mlp_onnx, signed_bundle


def command(command_id: str, nonce: str, *, expires_in_s: float = 600) -> fleet_pb2.Command:
    cmd = fleet_pb2.Command(command_id=command_id, nonce=nonce,
                            expires_at_unix_ms=int((time.time() + expires_in_s) * 1000))
    cmd.install.sha256 = "0" * 64
    return cmd


def test_redelivery_replay_and_expiry(tmp_path: Path) -> None:
    bundle, key = signed_bundle(tmp_path, mlp_onnx(tmp_path / "m.onnx"))
    state = tmp_path / "agent"
    acks: list[fleet_pb2.CommandAck] = []
    installed: list[int] = []
    runner = CommandRunner(state, Installer(state, [key.public_key()]), source_for=lambda spec: FileSource(bundle),
                           send_ack=acks.append, on_installed=lambda: installed.append(1))

    async def scenario() -> None:
        task = asyncio.create_task(runner.run())
        runner.submit(command("c1", "n1"))
        runner.submit(command("c1", "n1"))  # redelivered while queued: not run twice
        while len(acks) < 1:
            await asyncio.sleep(0.01)
        runner.submit(command("c1", "n1"))  # redelivered after it finished: answered from the journal
        runner.submit(command("c2", "n1"))  # same nonce under a new id: a replay
        runner.submit(command("c3", "n3", expires_in_s=-1))
        while len(acks) < 4:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(scenario())
    assert [(a.command_id, a.result) for a in acks] == [
        ("c1", "committed"), ("c1", "committed"), ("c2", "rejected"), ("c3", "rejected")]
    assert acks[2].reason == "replayed" and acks[3].reason == "command_expired"
    assert installed == [1]
    # The journal survives a restart of the agent.
    fresh: list[fleet_pb2.CommandAck] = []
    CommandRunner(state, Installer(state, [key.public_key()]), source_for=lambda spec: FileSource(bundle),
                  send_ack=fresh.append, on_installed=lambda: None).submit(command("c1", "n1"))
    assert [a.result for a in fresh] == ["committed"]
