"""Commands from the controller, executed one at a time and acked exactly once per command.

Outcomes are journaled on disk by command id before they are acked. A command delivered again
(the ack was lost, the session dropped) is answered from the journal and never executed twice;
the installer's nonce store refuses a replayed install on top of that.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from edgefleet.agent.endpoint import ControllerEndpoint, plaintext
from edgefleet.agent.identity import Identity
from edgefleet.common.durable_files import atomic_write_json, read_json
from edgefleet.firmware.installer import Installer
from edgefleet.firmware.replay import InstallCommand
from edgefleet.firmware.sources import ControllerArtifact, SourceInterrupted
from edgefleet.protos.v1 import fleet_pb2, fleet_pb2_grpc

log = logging.getLogger("edgefleet.agent.commands")

JOURNAL_FILE = "command_journal.json"
JOURNAL_FORMAT = 1
FETCH_CHUNK = 1024 * 1024
SUSPENDED_RETRY_S = 2.0
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
              grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


# Downloads: HTTP/2 frames up to 1 MiB (the default 16 KiB cuts every 1 MiB chunk into 64 frames,
# each parsed on its own), and 4 MiB a stream may receive ahead of the reader.
TRANSFER_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.http2.max_frame_size", 1024 * 1024),
    ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),
]


class GrpcArtifactSource(ControllerArtifact):
    """A bundle in the controller's artifact store, read with FetchArtifact from any offset."""

    def __init__(self, controller: str, identity: Identity, sha256: str, size: int,
                 endpoint: ControllerEndpoint | None = None) -> None:
        super().__init__(sha256, size)
        self.controller = controller
        self.identity = identity
        self.endpoint = endpoint or plaintext(controller)  # TLS: the device port, with the device certificate

    def read(self, offset: int) -> Iterator[bytes]:
        channel = self.endpoint.device_channel(TRANSFER_CHANNEL_OPTIONS)
        call: Any = fleet_pb2_grpc.FleetStub(channel).FetchArtifact(
            fleet_pb2.FetchArtifactRequest(sha256=self.sha256, offset=offset, chunk_size=FETCH_CHUNK),
            metadata=self.endpoint.metadata(self.identity.device_id, self.identity.device_secret),
        )
        try:
            position = offset
            for chunk in call:
                if chunk.offset != position:
                    raise SourceInterrupted(f"controller sent offset {chunk.offset}, expected {position}")
                position += len(chunk.data)
                yield chunk.data
        except grpc.RpcError as exc:
            code = exc.code()
            if code in _TRANSIENT:
                raise SourceInterrupted(f"artifact transfer interrupted: {exc.details()}") from None
            raise RuntimeError(f"controller refused the artifact: {exc.details()}") from None
        finally:
            call.cancel()
            channel.close()


class CommandJournal:
    """command id -> the final ack, persisted; entries are dropped once their command expires."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, dict[str, Any]]:
        document = read_json(self.path)
        if document is None:
            return {}
        if document.get("format") != JOURNAL_FORMAT:
            raise ValueError(f"{self.path} has format {document.get('format')}; this agent reads {JOURNAL_FORMAT}")
        return dict(document["commands"])

    def get(self, command_id: str) -> fleet_pb2.CommandAck | None:
        entry = self._load().get(command_id)
        return fleet_pb2.CommandAck.FromString(base64.b64decode(entry["ack"])) if entry else None

    def put(self, command: fleet_pb2.Command, ack: fleet_pb2.CommandAck) -> None:
        now_ms = time.time() * 1000
        entries = {k: v for k, v in self._load().items() if v["expires_at_unix_ms"] > now_ms}
        entries[command.command_id] = {
            "expires_at_unix_ms": command.expires_at_unix_ms,
            "ack": base64.b64encode(ack.SerializeToString()).decode(),
        }
        atomic_write_json(self.path, {"format": JOURNAL_FORMAT, "commands": entries})


class CommandRunner:
    def __init__(
        self,
        state_dir: Path,
        installer: Installer,
        source_for: Callable[[fleet_pb2.InstallBundle], Any],
        send_ack: Callable[[fleet_pb2.CommandAck], None],
        on_installed: Callable[[], None],
        threads: int = 0,
    ) -> None:
        self.state_dir = state_dir
        self.threads = threads
        self.journal = CommandJournal(state_dir / JOURNAL_FILE)
        self.installer = installer
        self.source_for = source_for
        self.send_ack = send_ack
        self.on_installed = on_installed
        self._queue: asyncio.Queue[fleet_pb2.Command | fleet_pb2.InstallBundle] = asyncio.Queue()
        self._queued: set[str] = set()

    def submit(self, command: fleet_pb2.Command) -> None:
        """Called by the transport for every delivery, duplicates included."""
        done = self.journal.get(command.command_id)
        if done is not None:
            log.info("command already done; acking again", extra={"command": command.command_id})
            self.send_ack(done)
            return
        if command.command_id in self._queued:
            return  # still running: its ack will follow
        self._queued.add(command.command_id)
        self._queue.put_nowait(command)

    def converge(self, bundle: fleet_pb2.InstallBundle) -> None:
        """Install a bundle no command asked for (the retained desired model, after the device's
        queued commands were lost); it runs in turn with commands and is never acked."""
        if not self._queued:
            self._queue.put_nowait(bundle)

    async def run(self) -> None:
        while True:
            command = await self._queue.get()
            if isinstance(command, fleet_pb2.InstallBundle):
                await self._converge(command)
                continue
            try:
                ack = await self._execute(command)
            except Exception as exc:  # a bug must not kill the agent; the controller sees it
                log.exception("command failed", extra={"command": command.command_id})
                ack = fleet_pb2.CommandAck(command_id=command.command_id, result="failed", reason="agent_error",
                                           message=str(exc), final=True)
            self.journal.put(command, ack)
            self._queued.discard(command.command_id)
            self.send_ack(ack)

    async def _execute(self, command: fleet_pb2.Command) -> fleet_pb2.CommandAck:
        kind = command.WhichOneof("action")
        if command.expires_at_unix_ms <= time.time() * 1000:
            return fleet_pb2.CommandAck(command_id=command.command_id, result="rejected", reason="command_expired",
                                        message="the command expired before it could run", final=True)
        if kind == "install":
            return await self._install(command)
        if kind == "measure":
            return await self._measure(command)
        return fleet_pb2.CommandAck(command_id=command.command_id, result="rejected", reason="unsupported",
                                    message=f"this agent does not know command {kind!r}; upgrade it", final=True)

    async def _converge(self, bundle: fleet_pb2.InstallBundle) -> None:
        log.info("installing the desired model", extra={"model": bundle.name, "version": bundle.version})
        try:
            outcome = await asyncio.to_thread(self.installer.install, self.source_for(bundle), None)
        except Exception:  # the next desired message or command tries again
            log.exception("desired install failed", extra={"model": bundle.name})
            return
        log.info("desired install finished", extra={"result": outcome.result, "reason": outcome.reason})
        if outcome.result == "committed":
            self.on_installed()

    async def _install(self, command: fleet_pb2.Command) -> fleet_pb2.CommandAck:
        spec = command.install
        source = self.source_for(spec)
        request = InstallCommand(nonce=command.nonce, expires_at=command.expires_at_unix_ms / 1000,
                                 artifact=f"sha256:{spec.sha256}", rollout_id=command.rollout_id)
        log.info("install starting", extra={"command": command.command_id, "model": spec.name,
                                            "version": spec.version, "rollout": command.rollout_id})
        outcome = await asyncio.to_thread(self.installer.install, source, request)
        while outcome.result == "suspended" and command.expires_at_unix_ms > time.time() * 1000:
            # The transfer broke off; it resumes from the bytes already on disk.
            self.send_ack(fleet_pb2.CommandAck(command_id=command.command_id, result="suspended",
                                               message=outcome.message, final=False))
            await asyncio.sleep(SUSPENDED_RETRY_S)
            outcome = await asyncio.to_thread(self.installer.install, source, None)
        if outcome.result == "committed":
            self.on_installed()
        log.info("install finished", extra={"command": command.command_id, "result": outcome.result,
                                            "reason": outcome.reason, "rollout": command.rollout_id})
        return fleet_pb2.CommandAck(
            command_id=command.command_id, result=outcome.result, reason=outcome.reason, message=outcome.message,
            model=outcome.name, version=int(outcome.version or 0), final=True,
        )

    async def _measure(self, command: fleet_pb2.Command) -> fleet_pb2.CommandAck:
        """Fetch each candidate model, time them interleaved, report per-round means."""
        import tempfile

        from edgefleet.agent.measure import time_candidates

        spec = command.measure
        with tempfile.TemporaryDirectory(prefix="measure-", dir=self.state_dir) as tmp:
            files: dict[str, Path] = {}
            for candidate in spec.candidates:
                # OpenVINO finds an IR's weights as the .bin beside the .xml.
                target = Path(tmp) / f"{len(files)}.{'xml' if candidate.weights_sha256 else 'model'}"
                source = self.source_for(fleet_pb2.InstallBundle(sha256=candidate.sha256, size=candidate.size))
                await asyncio.to_thread(_fetch_whole, source, target)
                if candidate.weights_sha256:
                    weights = self.source_for(
                        fleet_pb2.InstallBundle(sha256=candidate.weights_sha256, size=candidate.weights_size)
                    )
                    await asyncio.to_thread(_fetch_whole, weights, target.with_suffix(".bin"))
                files[candidate.name] = target
            timings = await asyncio.to_thread(time_candidates, files, spec, self.threads)
        return fleet_pb2.CommandAck(command_id=command.command_id, result="done", timings=timings, final=True)


def _fetch_whole(source: Any, target: Path) -> None:
    with open(target, "wb") as out:
        for chunk in source.read(0):
            out.write(chunk)
    if target.stat().st_size != source.total_size:
        raise SourceInterrupted(f"got {target.stat().st_size} of {source.total_size} bytes")
