"""Bundle transfer over loopback gRPC (issue 5): FetchArtifact MB/s against a plain file copy.

Run: ``.venv/bin/pytest -s tests/bench/bench_transfer.py`` (sizes: EDGEFLEET_BENCH_TRANSFER_MB="10,100").

A real controller process holds the bundle in its artifact store (uploaded with the operator
CLI's ``upload_artifact``); the agent's own ``GrpcArtifactSource`` (a device identity enrolled
through Fleet.Enroll) streams it over loopback and the bytes are written to a file, as the
installer's DOWNLOADING step does (without its fsync; the baselines have none either). Baselines,
interleaved with the fetches on the same files:

- ``copyfile``: ``shutil.copyfile`` (sendfile), the issue's "plain file copy";
- ``rw-copy``: a 1 MiB read/write loop in Python, the floor of any user-space transport.

Target: the fetch reaches >= 50% of the copyfile rate at every size, as the median of the
per-repeat ratios (copyfile time / fetch time). Also reported, without a target: FetchArtifact
alone (no disk write) by requested chunk size with the controller's CPU, and ``verify_bundle``'s
cost per MB against a bare sha256 of the same file. The last line says MET or MISSED; a missed
target does not fail the test, a transfer that breaks (a short or refused fetch) does.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc
import pytest
from bench_support import (
    MB,
    copyfile_s,
    cpu_seconds,
    device_metadata,
    enroll_many,
    median,
    print_table,
    report_targets,
    sha256_file,
    sized_bundle,
    stream_copy_s,
    verdict,
)

from edgefleet.agent.commands import FETCH_CHUNK, GrpcArtifactSource
from edgefleet.agent.identity import Identity
from edgefleet.controller.client import Connection, upload_artifact
from edgefleet.firmware.bundle import verify_bundle
from edgefleet.firmware.keys import generate_signing_key
from edgefleet.protos.v1 import fleet_pb2, fleet_pb2_grpc
from fleet_harness import ControllerProc

pytestmark = pytest.mark.integration

SIZES_MB = [int(s) for s in os.environ.get("EDGEFLEET_BENCH_TRANSFER_MB", "10,100").split(",")]
TARGET_SHARE = 0.5
CHUNKS = [64 * 1024, 256 * 1024, 1024 * 1024, 2 * 1024 * 1024]


def fetch_s(source: GrpcArtifactSource, dst: Path) -> float:
    started = time.perf_counter()
    written = 0
    with open(dst, "wb") as out:
        for block in source.read(0):
            out.write(block)
            written += len(block)
    elapsed = time.perf_counter() - started
    assert written == source.total_size, f"fetched {written} of {source.total_size} bytes"
    dst.unlink()
    return elapsed


def raw_fetch(address: str, identity: Identity, sha: str, chunk: int, controller_pid: int) -> tuple[float, float]:
    """FetchArtifact without the disk write: (seconds, controller CPU seconds) for one whole artifact."""
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 8 * MB)])
    stub = fleet_pb2_grpc.FleetStub(channel)
    cpu0, started = cpu_seconds(controller_pid), time.perf_counter()
    for _ in stub.FetchArtifact(fleet_pb2.FetchArtifactRequest(sha256=sha, chunk_size=chunk),
                                metadata=device_metadata(identity)):
        pass
    elapsed, cpu = time.perf_counter() - started, cpu_seconds(controller_pid) - cpu0
    channel.close()
    return elapsed, cpu


def test_fetch_artifact_against_a_plain_copy(tmp_path: Path) -> None:
    key = generate_signing_key()
    controller = ControllerProc(tmp_path, insecure=True).start()  # device secrets, plaintext
    try:
        identity: Identity = asyncio.run(enroll_many(controller.grpc_address, controller.create_token(), 1))[0]
        client = Connection.resolve(controller.grpc_address, controller.state_dir).control()
        rows, verify_rows, diag_rows, verdicts = [], [], [], []
        for size_mb in SIZES_MB:
            workdir = tmp_path / f"{size_mb}mb"
            workdir.mkdir()
            bundle = sized_bundle(workdir, size_mb, key)
            size = bundle.stat().st_size
            client.timeout_s = 120.0
            sha = upload_artifact(client, bundle)
            source = GrpcArtifactSource(controller.grpc_address, identity, sha, size)
            repeats = 7 if size_mb <= 20 else 3
            fetch_s(source, workdir / "warm")  # warm both page caches and the channel code paths
            copyfile_s(bundle, workdir / "warm")
            fetch, copy, rw, ratios = [], [], [], []
            for _ in range(repeats):  # interleaved: the same noise hits all three
                c = copyfile_s(bundle, workdir / "copy")
                f = fetch_s(source, workdir / "fetched")
                r = stream_copy_s(bundle, workdir / "rw")
                fetch.append(f)
                copy.append(c)
                rw.append(r)
                ratios.append(c / f)
            mb = size / MB
            share = median(ratios)
            met = share >= TARGET_SHARE
            verdicts.append((f"{mb:.1f} MB fetch {share:.0%} of copyfile >= {TARGET_SHARE:.0%}", met))
            rows.append([f"{mb:.1f} MB", mb / median(copy), mb / median(rw), mb / median(fetch),
                         f"{share:.0%}", f"{median(rw) / median(fetch):.0%}", verdict(met)])
            trusted = [key.public_key()]
            verify_bundle(bundle, trusted)
            verify, hashing = [], []
            for _ in range(repeats):  # interleaved with a bare sha256 of the same file
                started = time.perf_counter()
                verify_bundle(bundle, trusted, hardware_class="bench")
                verify.append(time.perf_counter() - started)
                started = time.perf_counter()
                sha256_file(bundle)
                hashing.append(time.perf_counter() - started)
            assert controller.popen is not None
            chunk_rows = {chunk: ([], []) for chunk in CHUNKS}
            for _ in range(repeats):
                for chunk in CHUNKS:
                    elapsed, cpu = raw_fetch(controller.grpc_address, identity, sha, chunk, controller.popen.pid)
                    chunk_rows[chunk][0].append(elapsed)
                    chunk_rows[chunk][1].append(cpu)
            for chunk, (times, cpus) in chunk_rows.items():
                diag_rows.append([f"{mb:.1f} MB", f"{chunk // 1024} KiB" + (" (agent)" if chunk == FETCH_CHUNK else ""),
                                  mb / median(times), f"{mb / median(times) * median(copy) / mb:.0%}",
                                  median(cpus) / median(times)])
            verify_rows.append([f"{mb:.1f} MB", median(verify) * 1000 / mb, mb / median(verify),
                                f"{median(verify) / median(hashing):.2f}x", f"{median(verify) / median(copy):.1f}x"])
        client.close()
        print_table("FetchArtifact over loopback vs a plain copy (MB/s, medians; target fetch >= 50% of copyfile)",
                    ["bundle", "copyfile", "rw-copy", "fetch", "fetch/copyfile", "fetch/rw-copy", "target"], rows)
        print_table("Diagnostic: FetchArtifact alone (no disk write), by requested chunk size",
                    ["bundle", "chunk", "MB/s", "of copyfile", "controller CPU (cores)"], diag_rows)
        print_table("verify_bundle (page cache warm), interleaved with a bare sha256 of the same file",
                    ["bundle", "ms/MB", "MB/s", "x bare sha256", "x copyfile time"], verify_rows)
    finally:
        controller.stop()
        controller.close_channel()
    report_targets("bundle transfer", verdicts)
