"""A missing or unreadable file, node or sensor shrinks the profile and says why; it never raises."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from edgefleet.agent.profiler import collect_profile
from edgefleet.protos.v1.profile_pb2 import HardwareProfile

BOARDS = Path(__file__).resolve().parents[2] / "data" / "boards"
RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def copy_board(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(BOARDS / name, target, symlinks=True)
    return target


def gaps(profile: HardwareProfile) -> dict[str, str]:
    return {g.what: g.reason for g in profile.gaps}


def replace_with_directory(path: Path) -> None:
    """Root reads every file, so an unreadable file is simulated by a directory in its place."""
    path.unlink()
    path.mkdir()


def test_missing_root_is_a_gap(tmp_path: Path) -> None:
    profile = collect_profile(tmp_path / "nowhere")
    assert gaps(profile)["everything"].endswith("is not a directory")
    assert profile.hardware_class == "unknown"


def test_empty_root_profiles_to_nothing_but_gaps(tmp_path: Path) -> None:
    profile = collect_profile(tmp_path)
    found = gaps(profile)
    assert found["CPU (vendor, model, ISA features)"] == "/proc/cpuinfo not found"
    assert found["memory size"] == "/proc/meminfo not found"
    assert "power sensor" in found and "CPU caches" in found
    assert profile.hardware_class == "unknown" and not profile.accelerators


def test_cpuinfo_that_is_a_directory(tmp_path: Path) -> None:
    root = copy_board("rpi5", tmp_path)
    replace_with_directory(root / "proc" / "cpuinfo")
    profile = collect_profile(root)
    assert "is a directory" in gaps(profile)["CPU (vendor, model, ISA features)"]
    assert not profile.cpu.isa_features


def test_garbage_cpuinfo(tmp_path: Path) -> None:
    root = copy_board("rpi5", tmp_path)
    (root / "proc" / "cpuinfo").write_bytes(b"\xff\xfe\x00garbage: :\n\nCPU part\t: zz\nprocessor\t: x\n")
    profile = collect_profile(root)
    assert profile.cpu.isa_features == []


def test_rapl_energy_unreadable_is_a_gap_not_a_crash(tmp_path: Path) -> None:
    root = copy_board("coral-usb", tmp_path)
    energy = root / "sys/devices/virtual/powercap/intel-rapl/intel-rapl:0/energy_uj"
    replace_with_directory(energy)
    profile = collect_profile(root)
    package = next(s for s in profile.power_sensors if s.name == "package-0")
    assert not package.readable
    reason = gaps(profile)["RAPL energy_uj (package-0, /sys/class/powercap/intel-rapl:0/energy_uj)"]
    assert reason == "not readable (is a directory, expected a file)"
    assert "power sensor" not in gaps(profile)  # the other RAPL domains still read


def test_rapl_permission_denied_says_root_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a non-root agent sees on Linux >= 5.10; simulated so the test also holds when run as root."""
    root = copy_board("intel-core-ultra", tmp_path)
    real_open = Path.open

    def deny_energy(self: Path, *args: object, **kwargs: object) -> object:
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", deny_energy)
    profile = collect_profile(root)
    rapl = [s for s in profile.power_sensors if s.kind == "rapl"]
    assert rapl and not any(s.readable for s in rapl)
    reason = gaps(profile)["RAPL energy_uj (package-0, /sys/class/powercap/intel-rapl:0/energy_uj)"]
    assert reason.startswith("not readable (root only since Linux 5.10)")
    assert "power sensor" not in gaps(profile)  # the battery still reads


def _profile_as_unprivileged_user(root: Path) -> HardwareProfile:
    """Root reads chmod 000 files, so as root the profile is taken in a forked child that dropped
    to `nobody` (imports are warmed up first: the child may not be able to read site-packages)."""
    if not RUNNING_AS_ROOT:
        return collect_profile(root)
    collect_profile(root)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            data = collect_profile(root).SerializeToString()
            with os.fdopen(write_end, "wb") as out:
                out.write(data)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged profile crashed"
    return HardwareProfile.FromString(data)


def test_chmod_000_files() -> None:
    work = Path(tempfile.mkdtemp(prefix="edgefleet-chmod-"))
    try:
        work.chmod(0o755)  # `nobody` must reach the tree; only the two files are closed to it
        root = copy_board("intel-core-ultra", work)
        energy = root / "sys/devices/virtual/powercap/intel-rapl/intel-rapl:0/energy_uj"
        meminfo = root / "proc/meminfo"
        energy.chmod(0)
        meminfo.chmod(0)
        profile = _profile_as_unprivileged_user(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    found = gaps(profile)
    assert found["RAPL energy_uj (package-0, /sys/class/powercap/intel-rapl:0/energy_uj)"].startswith(
        "not readable (root only since Linux 5.10)"
    )
    assert "permission denied" in found["memory size"]


def test_npu_node_without_driver_link(tmp_path: Path) -> None:
    root = copy_board("intel-core-ultra", tmp_path)
    (root / "sys/class/accel/accel0").unlink()
    profile = collect_profile(root)
    assert gaps(profile)["driver of /dev/accel/accel0"].endswith("is the NPU driver loaded?")
    assert profile.hardware_class == "x86_64-avxvnni"  # falls back to the CPU class


def test_rknpu_debugfs_unreadable(tmp_path: Path) -> None:
    root = copy_board("rk3588", tmp_path)
    replace_with_directory(root / "sys/kernel/debug/rknpu/version")
    profile = collect_profile(root)
    assert profile.hardware_class == "rknpu"
    assert "debugfs is root only" in gaps(profile)["RKNPU driver version"]


def test_missing_ina3221_current_channel(tmp_path: Path) -> None:
    root = copy_board("jetson-orin-nano", tmp_path)
    (root / "sys/devices/platform/bus@0/c240000.i2c/i2c-1/1-0040/hwmon/hwmon1/curr2_input").unlink()
    sensors = [(s.name, s.unit) for s in collect_profile(root).power_sensors]
    assert ("VDD_CPU_GPU_CV", "mV") in sensors and ("VDD_CPU_GPU_CV", "mA") not in sensors


def test_jetson_with_unknown_soc(tmp_path: Path) -> None:
    root = copy_board("jetson-orin-nano", tmp_path)
    (root / "proc/device-tree/compatible").write_bytes(b"nvidia,p9999\x00nvidia,tegra999\x00")
    profile = collect_profile(root)
    assert "Tegra SoC not recognised" in gaps(profile)["Jetson GPU compute capability"]
    assert profile.hardware_class == "arm64-dotprod"


def test_mcu_manifest_that_is_not_json(tmp_path: Path) -> None:
    root = copy_board("rpi4", tmp_path)
    (root / "etc/edgefleet").mkdir(parents=True)
    (root / "etc/edgefleet/mcu.json").write_text("{not json")
    profile = collect_profile(root)
    assert "is not valid JSON" in gaps(profile)["MCU manifest"]
    assert profile.hardware_class == "arm64"


def test_board_model_file_that_is_a_directory(tmp_path: Path) -> None:
    root = copy_board("rpi4", tmp_path)
    replace_with_directory(root / "proc/device-tree/model")
    profile = collect_profile(root)
    assert profile.os.board_model == "Raspberry Pi 4 Model B Rev 1.4"  # from cpuinfo's Model line
    assert "is a directory" in gaps(profile)["/proc/device-tree/model"]


def test_a_probe_that_raises_costs_only_its_part(monkeypatch: pytest.MonkeyPatch) -> None:
    import edgefleet.agent.profiler as profiler

    def explode(*args: object, **kwargs: object) -> None:
        raise KeyError("unforeseen sysfs layout")

    monkeypatch.setattr(profiler, "collect_power_sensors", explode)
    profile = profiler.collect_profile(BOARDS / "intel-core-ultra")
    assert not profile.power_sensors
    assert "unforeseen sysfs layout" in gaps(profile)["power sensor probe"]
    assert profile.hardware_class == "intel-npu"
