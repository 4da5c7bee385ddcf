"""Shared pieces of the benchmarks: tables, baselines, bundles of a given size, enrolled identities.

Everything here drives the real system (real controller processes, real gRPC, real files); only
the reporting is benchmark-specific. Figures are always printed as ratios taken side by side in
one run, because the machines these run on are small and shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.identity import Identity
from edgefleet.firmware.bundle import BundleSpec, build_bundle
from edgefleet.firmware.selftest import describe_onnx_model
from edgefleet.protos.capability import CAPABILITY_VERSION
from edgefleet.protos.v1 import fleet_pb2, fleet_pb2_grpc, profile_pb2

MB = 1024 * 1024
COPY_BLOCK = 1024 * 1024


# -- reporting ---------------------------------------------------------------------------------
def verdict(met: bool) -> str:
    """A table cell: MET or MISSED."""
    return "MET" if met else "MISSED"


def report_targets(name: str, checks: Sequence[tuple[str, bool]]) -> bool:
    """Print a benchmark's last line: each target with what this run measured against it, then
    the overall verdict, e.g. ``ingest targets: stored 1890/s >= 1900/s MISSED => MISSED``
    (the shape bench_real_models prints). Returns whether every target was met.

    A missed target is reported, never failed: a benchmark fails only when it could not measure
    (an error, a setup that cannot give a meaningful number)."""
    met = all(ok for _, ok in checks)
    text = "; ".join(f"{label} {verdict(ok)}" for label, ok in checks)
    print(f"{name} targets: {text} => {verdict(met)}", flush=True)
    return met


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table on stdout (run pytest with -s to see it)."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n== {title}")
    for index, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# -- baselines ---------------------------------------------------------------------------------
def copyfile_s(src: Path, dst: Path) -> float:
    """`shutil.copyfile` (sendfile on Linux): the plain file copy of the issue."""
    started = time.perf_counter()
    shutil.copyfile(src, dst)
    elapsed = time.perf_counter() - started
    dst.unlink()
    return elapsed


def stream_copy_s(src: Path, dst: Path) -> float:
    """A read/write loop in 1 MiB blocks through user space: what any transport has to do at least."""
    started = time.perf_counter()
    with open(src, "rb") as f, open(dst, "wb") as out:
        while block := f.read(COPY_BLOCK):
            out.write(block)
    elapsed = time.perf_counter() - started
    dst.unlink()
    return elapsed


def drop(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(COPY_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# -- bundles -----------------------------------------------------------------------------------
def sized_bundle(workdir: Path, size_mb: int, key: Any, name: str = "bench") -> Path:
    """A signed bundle of about `size_mb` MiB: a tiny model plus incompressible weights, like real ones."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])], "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(np.full([16], 0.5, np.float32), "w")],
    )
    model_path = workdir / f"{name}-{size_mb}.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(model_path))
    weights = workdir / f"weights-{size_mb}.bin"
    rng = np.random.default_rng(size_mb)
    with open(weights, "wb") as fh:
        for _ in range(size_mb):
            fh.write(rng.bytes(MB))
    io_spec, self_test = describe_onnx_model(model_path)
    spec = BundleSpec(name=name, version=1, hardware_class="bench", model_file=model_path.name,
                      payload={model_path.name: model_path, "weights.bin": weights}, io=io_spec, self_test=self_test)
    bundle = build_bundle(spec, key, workdir / f"{name}-{size_mb}mb.efb")
    weights.unlink()
    model_path.unlink()
    return bundle


# -- devices -----------------------------------------------------------------------------------
def bench_profile(hardware_class: str = "x86_64-bench") -> profile_pb2.HardwareProfile:
    """This machine's real profile (no micro-benchmark), pinned to one hardware class."""
    from edgefleet.agent.profiler import collect_profile

    return collect_profile(microbench=False, hardware_class_override=hardware_class)


async def enroll_many(address: str, token: str, count: int, profile: profile_pb2.HardwareProfile | None = None,
                      concurrency: int = 64) -> list[Identity]:
    """`count` device identities through the real Fleet.Enroll RPC, all from one multi-use token."""
    request = fleet_pb2.EnrollRequest(token=token, capability_version=CAPABILITY_VERSION, agent_version="bench",
                                      profile=profile or profile_pb2.HardwareProfile())
    limit = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)

        async def one() -> Identity:
            async with limit:
                reply = await stub.Enroll(request, timeout=60)
            return Identity(reply.device_id, reply.device_secret, address, dict(reply.labels),
                            int(time.time() * 1000))

        return list(await asyncio.gather(*(one() for _ in range(count))))


async def close_streams(devices: Sequence[Any], channels: Sequence[grpc.aio.Channel]) -> None:
    """End simulated devices (their ``tasks`` and Session ``call``) and close their channels."""
    for device in devices:
        for task in device.tasks:
            task.cancel()
        if device.call is not None:
            device.call.cancel()
    for channel in channels:
        with contextlib.suppress(Exception):
            await channel.close()


def device_metadata(identity: Identity) -> tuple[tuple[str, str], ...]:
    return (("edgefleet-device-id", identity.device_id), ("edgefleet-device-secret", identity.device_secret))


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def env_flag(name: str, default: int) -> int:
    """Benchmark knobs from the environment (EDGEFLEET_BENCH_*), so `make bench` needs no arguments."""
    return int(os.environ.get(name, default))
