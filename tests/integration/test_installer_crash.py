"""Crash consistency of the real installer: SIGKILL it anywhere, restart it, and it serves old or new.

Each kill point runs the real ``install`` CLI as a subprocess on a device that serves v1, pauses it
at the point (a persisted state, a step, or a byte offset of the download or the unpacking), kills
it with SIGKILL, checks that the device serves exactly v1 or exactly v2 (bytes against the manifest
hashes, and an inference), restarts it until it settles and asserts the exact state log.
"""

from __future__ import annotations

import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from installer_harness import (
    HAPPY,
    NEW_SERVED,
    OLD_SERVED,
    SELF_TEST_ROLLBACK,
    Fixture,
    build_fixture,
    install_cmd,
    kill_at,
    run,
    served,
    settle,
    state_log,
    states,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    return build_fixture(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="module")
def device_v1(tmp_path_factory: pytest.TempPathFactory, fixture: Fixture) -> Path:
    """A device that has committed v1; each case copies it, so setup is paid once."""
    state_dir = tmp_path_factory.mktemp("template") / "device"
    result = run(install_cmd(fixture, state_dir, fixture.old))
    assert result.returncode == 0, result.stderr
    assert served(state_dir) == OLD_SERVED
    (state_dir / "install.log").unlink()  # cases assert their own log from an empty one
    return state_dir


def fresh_device(template: Path, where: Path) -> Path:
    state_dir = where / "device"
    shutil.copytree(template, state_dir, symlinks=True)
    return state_dir


def repeated(chain: list[str], state: str | None) -> list[str]:
    """The chain with ``state`` entered twice: once before the kill, once on restart."""
    if state is None:
        return list(chain)
    i = chain.index(state)
    return [*chain[: i + 1], state, *chain[i + 1 :]]


def kill_points(fixture: Fixture) -> list[tuple[str, str, str | None, tuple[int, float]]]:
    """(pause point, bundle, state re-entered on restart, what must serve right after the kill)."""
    rng = random.Random(5)
    size = fixture.new.stat().st_size
    points: list[tuple[str, str, str | None, tuple[int, float]]] = [
        ("DOWNLOADING", "new", "DOWNLOADING", OLD_SERVED),
        ("VERIFYING", "new", "VERIFYING", OLD_SERVED),
        ("STAGED", "new", "STAGED", OLD_SERVED),
        ("ACTIVATING", "new", "ACTIVATING", OLD_SERVED),
        ("activate:tested", "new", "ACTIVATING", OLD_SERVED),
        ("activate:swapped", "new", "ACTIVATING", NEW_SERVED),
        ("PROBATION", "new", "PROBATION", NEW_SERVED),
        ("COMMITTED", "new", "COMMITTED", NEW_SERVED),
        ("commit:recorded", "new", "COMMITTED", NEW_SERVED),
        ("IDLE", "new", None, NEW_SERVED),
        ("ACTIVATING", "bad", "ACTIVATING", OLD_SERVED),
        ("ROLLING_BACK", "bad", "ROLLING_BACK", OLD_SERVED),
        ("rollback:swapped", "bad", "ROLLING_BACK", OLD_SERVED),
    ]
    for offset in sorted(rng.sample(range(1, size), 10)):
        points.append((f"download@{offset}", "new", "DOWNLOADING", OLD_SERVED))
    for offset in sorted(rng.sample(range(1, fixture.new_payload_size), 7)):
        points.append((f"stage@{offset}", "new", "STAGED", OLD_SERVED))
    return points


def test_sigkill_anywhere_leaves_exactly_the_old_or_the_new_model(
    fixture: Fixture, device_v1: Path, tmp_path: Path
) -> None:
    points = kill_points(fixture)
    assert len(points) >= 30

    def one_case(index: int) -> str | None:
        point, which, again, served_after_kill = points[index]
        bundle = fixture.new if which == "new" else fixture.bad
        state_dir = fresh_device(device_v1, tmp_path / f"case{index}")
        cmd = install_cmd(fixture, state_dir, bundle)
        problems = []
        kill_at(cmd, point)
        if (now := served(state_dir)) != served_after_kill:
            problems.append(f"after the kill it serves {now}, expected {served_after_kill}")
        codes = settle(cmd)
        chain = HAPPY if which == "new" else SELF_TEST_ROLLBACK
        expected_codes, expected_served = ([0], NEW_SERVED) if which == "new" else ([2], OLD_SERVED)
        if codes != expected_codes:
            problems.append(f"restarts exited {codes}, expected {expected_codes}")
        if (got := states(state_dir)) != repeated(chain, again):
            problems.append(f"state log {got}, expected {repeated(chain, again)}")
        if (final := served(state_dir)) != expected_served:
            problems.append(f"settled serving {final}, expected {expected_served}")
        if point.startswith("download@"):
            resumed_from = state_log(state_dir)[1].get("have")
            if resumed_from != int(point.split("@")[1]):
                problems.append(f"download resumed from {resumed_from}, not from the kill offset")
        leftovers = [p.name for p in (state_dir / "slots").rglob("*.part")]
        if leftovers:
            problems.append(f"partial downloads left behind: {leftovers}")
        return f"{point} ({which}): " + "; ".join(problems) if problems else None

    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [f for f in pool.map(one_case, range(len(points))) if f]
    assert failures == []


CASES = {
    # name: (bundle, extra CLI args, faults for the first run, faults on restart, exit codes, state log, serves)
    "network cut mid-download, then resume": (
        "new", [], {"EDGEFLEET_FAULT_NETCUT": "50000"}, None, [75, 0], ["DOWNLOADING", *HAPPY], NEW_SERVED,
    ),
    "full disk": ("new", ["--slot-capacity", "100000"], None, None, [2], ["rejected:insufficient_space"], OLD_SERVED),
    "self-test failure, then rollback": ("bad", [], None, None, [2], SELF_TEST_ROLLBACK, OLD_SERVED),
    "crash loop in probation, then rollback": (
        "new", [], {"EDGEFLEET_FAULT_CRASH": "PROBATION"}, {"EDGEFLEET_FAULT_CRASH": "PROBATION"},
        [-9, -9, -9, 2],
        ["DOWNLOADING", "VERIFYING", "STAGED", "ACTIVATING", "PROBATION", "PROBATION", "PROBATION",
         "ROLLING_BACK", "IDLE"],
        OLD_SERVED,
    ),
    "crash loop while loading, then rollback": (
        "new", [], {"EDGEFLEET_FAULT_CRASH": "ACTIVATING"}, {"EDGEFLEET_FAULT_CRASH": "ACTIVATING"},
        [-9, -9, -9, 2],
        ["DOWNLOADING", "VERIFYING", "STAGED", "ACTIVATING", "ACTIVATING", "ACTIVATING", "ROLLING_BACK", "IDLE"],
        OLD_SERVED,
    ),
    "tampered payload": ("tampered", [], None, None, [2], ["DOWNLOADING", "VERIFYING", "ROLLING_BACK", "IDLE"],
                         OLD_SERVED),
}  # fmt: skip
REASONS = {
    "self-test failure, then rollback": "self_test_failed",
    "crash loop in probation, then rollback": "crash_loop",
    "crash loop while loading, then rollback": "crash_loop",
    "tampered payload": "manifest_mismatch",
}


@pytest.mark.parametrize("case", list(CASES))
def test_failure_table_exact_state_log(case: str, fixture: Fixture, device_v1: Path, tmp_path: Path) -> None:
    which, args, first_faults, restart_faults, codes, log, serves = CASES[case]
    if which == "tampered":
        data = bytearray(fixture.new.read_bytes())
        data[-5000] ^= 0x01  # inside weights.bin: the signed head still checks out
        bundle = tmp_path / "tampered.efb"
        bundle.write_bytes(data)
    else:
        bundle = fixture.new if which == "new" else fixture.bad
    state_dir = fresh_device(device_v1, tmp_path)
    cmd = install_cmd(fixture, state_dir, bundle, *args)
    first = run(cmd, first_faults)
    got_codes = [first.returncode]
    if first.returncode < 0 or first.returncode == 75:
        got_codes += settle(cmd, restart_faults)
    assert got_codes == codes, first.stderr
    assert states(state_dir) == log
    assert served(state_dir) == serves
    if case in REASONS:
        assert state_log(state_dir)[-1]["reason"] == REASONS[case]
    if "network cut" in case:
        assert state_log(state_dir)[1]["have"] == 50000  # resumed where the link dropped
    if serves == OLD_SERVED:
        assert list((state_dir / "slots" / "b").iterdir()) == []  # nothing of the refused bundle remains
    if case in ("self-test failure, then rollback", "crash loop in probation, then rollback"):
        again = run(install_cmd(fixture, state_dir, bundle))
        assert again.returncode == 2 and "marked_bad" in again.stderr
        assert "Traceback" not in again.stderr
