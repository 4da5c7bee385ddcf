"""The installer in-process: every outcome, its reason code, its state log and what serves after it.

The SIGKILL-everywhere version of these runs the real CLI in tests/integration/test_installer_crash.py.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundle_fixtures import GOLDEN_X, HARDWARE_CLASS

from edgefleet.firmware.faults import FaultPlan
from edgefleet.firmware.install_state import InstallState, StateStore
from edgefleet.firmware.installer import Installer, InstallPolicy
from edgefleet.firmware.replay import InstallCommand
from edgefleet.firmware.slots import active_model
from edgefleet.firmware.sources import FileSource, SourceInterrupted

HAPPY = ["DOWNLOADING", "VERIFYING", "STAGED", "ACTIVATING", "PROBATION", "COMMITTED", "IDLE"]
FAILED_SELF_TEST = ["DOWNLOADING", "VERIFYING", "STAGED", "ACTIVATING", "ROLLING_BACK", "IDLE"]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "device"


def make_installer(state_dir: Path, signing_key, **kwargs) -> Installer:
    kwargs.setdefault("hardware_class", HARDWARE_CLASS)
    kwargs.setdefault("policy", InstallPolicy(probation_inferences=2))
    return Installer(state_dir, [signing_key.public_key()], **kwargs)


def states(state_dir: Path) -> list[str]:
    return [
        e.get("state") or f"rejected:{e['rejected']}"
        for e in StateStore(state_dir).read_log()
        if "state" in e or "rejected" in e
    ]


def serving(state_dir: Path) -> tuple[int, float] | None:
    """(version, first output value) of the model the device serves, checking its bytes first."""
    import onnxruntime as ort

    model = active_model(state_dir)
    if model is None:
        return None
    for f in model.manifest.files:
        data = (model.slot_dir / "payload" / f.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f.sha256 and len(data) == f.size
    session = ort.InferenceSession(str(model.model_path), providers=["CPUExecutionProvider"])
    (y,) = session.run(["y"], {"x": GOLDEN_X})
    return model.manifest.version, float(y[0, 0])


class FlakySource:
    """A file source whose link drops once after ``cut_at`` bytes."""

    def __init__(self, path: Path, cut_at: int) -> None:
        self.inner = FileSource(path, chunk_size=1000)
        self.cut_at = cut_at
        self.reads: list[int] = []

    @property
    def ref(self) -> str:
        return self.inner.ref

    @property
    def total_size(self) -> int:
        return self.inner.total_size

    def read(self, offset: int) -> Iterator[bytes]:
        self.reads.append(offset)
        sent = offset
        for chunk in self.inner.read(offset):
            if offset == 0 and len(self.reads) > 1 and sent + len(chunk) > self.cut_at:
                raise SourceInterrupted("link down")
            sent += len(chunk)
            yield chunk


def test_first_install_then_upgrade(make_bundle, signing_key, state_dir):
    installer = make_installer(state_dir, signing_key)
    first = installer.install(FileSource(make_bundle(1)))
    assert (first.result, first.version) == ("committed", 1)
    assert serving(state_dir) == (1, 3.0)
    second = installer.install(FileSource(make_bundle(2, scale=3.0)))
    assert (second.result, second.version) == ("committed", 2)
    assert serving(state_dir) == (2, 4.0)
    assert states(state_dir) == HAPPY + HAPPY
    committed = json.loads((state_dir / "committed.json").read_text())
    assert committed["slot"] == "b" and committed["previous"]["version"] == 1
    assert sorted(p.name for p in (state_dir / "slots" / "b").iterdir()) == [
        "manifest.json",
        "manifest.sig",
        "payload",
        "staged.json",
    ]  # the downloaded bundle is gone once unpacked
    assert active_model(state_dir).committed is True
    assert installer.status()["active"] == {"slot": "b", "name": "affine", "version": 2, "committed": True}


def test_self_test_failure_rolls_back_and_marks_the_bundle_bad(make_bundle, signing_key, state_dir):
    installer = make_installer(state_dir, signing_key)
    installer.install(FileSource(make_bundle(1)))
    bad = make_bundle(2, scale=3.0, expected_scale=5.0)  # loads fine, wrong numbers
    outcome = installer.install(FileSource(bad))
    assert (outcome.result, outcome.reason) == ("rolled_back", "self_test_failed")
    assert serving(state_dir) == (1, 3.0)
    assert states(state_dir)[len(HAPPY) :] == FAILED_SELF_TEST
    again = installer.install(FileSource(bad))
    assert (again.result, again.reason) == ("rejected", "marked_bad")
    assert states(state_dir)[-1] == "rejected:marked_bad"
    assert serving(state_dir) == (1, 3.0)


def test_self_test_failure_on_an_empty_device_serves_nothing(make_bundle, signing_key, state_dir):
    outcome = make_installer(state_dir, signing_key).install(FileSource(make_bundle(1, expected_scale=9.0)))
    assert outcome.reason == "self_test_failed"
    assert serving(state_dir) is None


def test_a_model_that_does_not_load(make_bundle, signing_key, state_dir, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    outcome = make_installer(state_dir, signing_key).install(FileSource(make_bundle(1, payload={"model.onnx": junk})))
    assert (outcome.result, outcome.reason) == ("rolled_back", "load_failed")


def test_replayed_and_expired_commands(make_bundle, signing_key, state_dir):
    installer = make_installer(state_dir, signing_key)
    now = time.time()
    command = InstallCommand(nonce="n-1", expires_at=now + 60, rollout_id="r1")
    assert installer.install(FileSource(make_bundle(1)), command).result == "committed"
    replay = installer.install(FileSource(make_bundle(2)), command)
    assert (replay.result, replay.reason) == ("rejected", "replayed")
    stale = installer.install(FileSource(make_bundle(2)), InstallCommand(nonce="n-2", expires_at=now - 1))
    assert (stale.result, stale.reason) == ("rejected", "command_expired")
    fresh = installer.install(FileSource(make_bundle(2)), InstallCommand(nonce="n-3", expires_at=now + 60))
    assert fresh.result == "committed"
    # the nonce store survives a restart (a new Installer reads it back)
    again = make_installer(state_dir, signing_key).install(FileSource(make_bundle(3)), command)
    assert again.reason == "replayed"


def test_full_disk_refuses_before_touching_anything(make_bundle, signing_key, state_dir):
    make_installer(state_dir, signing_key).install(FileSource(make_bundle(1)))
    before = sorted(str(p.relative_to(state_dir)) for p in state_dir.rglob("*") if "install" not in p.name)
    small = make_installer(state_dir, signing_key, policy=InstallPolicy(slot_capacity_bytes=20_000))
    outcome = small.install(FileSource(make_bundle(2, extra_bytes=50_000)))
    assert (outcome.result, outcome.reason) == ("rejected", "insufficient_space")
    after = sorted(str(p.relative_to(state_dir)) for p in state_dir.rglob("*") if "install" not in p.name)
    assert before == after
    assert serving(state_dir) == (1, 3.0)


def test_policy_rejections_happen_before_the_download(make_bundle, signing_key, other_key, state_dir):
    installer = make_installer(state_dir, signing_key)
    installer.install(FileSource(make_bundle(2)))
    cases = {
        "downgrade": make_bundle(1),
        "wrong_class": make_bundle(3, hardware_class="arm64-dotprod"),
        "expired": make_bundle(3, expires_at=time.time() - 1),
        "untrusted_key": make_bundle(3, key=other_key),
    }
    for reason, bundle in cases.items():
        outcome = installer.install(FileSource(bundle))
        assert (outcome.result, outcome.reason) == ("rejected", reason)
    assert states(state_dir) == HAPPY + [f"rejected:{r}" for r in cases]
    rollback = installer.install(FileSource(make_bundle(1, rollback=True)))
    assert (rollback.result, rollback.version) == ("committed", 1)
    assert serving(state_dir) == (1, 3.0)


def test_tampered_payload_is_caught_by_the_whole_file_verification(make_bundle, signing_key, state_dir, tmp_path):
    installer = make_installer(state_dir, signing_key)
    installer.install(FileSource(make_bundle(1)))
    bundle = bytearray(make_bundle(2, extra_bytes=4000).read_bytes())
    bundle[-2000] ^= 0xFF  # inside weights.bin: the head still checks out
    tampered = tmp_path / "tampered.efb"
    tampered.write_bytes(bundle)
    outcome = installer.install(FileSource(tampered))
    assert (outcome.result, outcome.reason) == ("rolled_back", "manifest_mismatch")
    assert states(state_dir)[len(HAPPY) :] == ["DOWNLOADING", "VERIFYING", "ROLLING_BACK", "IDLE"]
    assert serving(state_dir) == (1, 3.0)
    assert list((state_dir / "slots" / "b").iterdir()) == []


def test_already_installed_is_a_no_op(make_bundle, signing_key, state_dir):
    installer = make_installer(state_dir, signing_key)
    bundle = make_bundle(1)
    installer.install(FileSource(bundle))
    outcome = installer.install(FileSource(bundle))
    assert outcome.result == "already_installed" and outcome.ok
    assert states(state_dir) == HAPPY


def test_network_cut_then_resume_from_the_same_offset(make_bundle, signing_key, state_dir):
    installer = make_installer(state_dir, signing_key)
    source = FlakySource(make_bundle(1, extra_bytes=20_000), cut_at=9_000)
    cut = installer.install(source)
    assert cut.result == "suspended"
    assert installer.store.load().state == InstallState.DOWNLOADING
    assert serving(state_dir) is None
    done = installer.install(source)
    assert done.result == "committed"
    assert source.reads[-1] == 9_000  # resumed, not restarted
    log = StateStore(state_dir).read_log()
    assert [e["state"] for e in log] == ["DOWNLOADING", *HAPPY]
    assert [e["attempt"] for e in log][:2] == [1, 1]  # a clean suspension is not a crash
    assert log[1]["have"] == 9_000


def test_resume_reopens_a_local_file_by_its_ref(make_bundle, signing_key, state_dir):
    installer = make_installer(state_dir, signing_key)
    bundle = make_bundle(1, extra_bytes=20_000)
    assert installer.install(FlakySource(bundle, cut_at=5_000)).result == "suspended"
    assert make_installer(state_dir, signing_key).resume().result == "committed"


def test_resume_without_a_reachable_source_stays_suspended(make_bundle, signing_key, state_dir):
    installer = make_installer(state_dir, signing_key, open_source=lambda ref: None)
    bundle = make_bundle(1, extra_bytes=20_000)
    assert installer.install(FlakySource(bundle, cut_at=5_000)).result == "suspended"
    assert installer.resume().result == "suspended"
    assert installer.store.load().state == InstallState.DOWNLOADING


class _Died(BaseException):
    """Stands in for the process dying: propagates through everything, like SIGKILL would stop it."""


class DieAt(FaultPlan):
    def __init__(self, point: str) -> None:
        super().__init__()
        object.__setattr__(self, "die_at", point)

    def point(self, name: str) -> None:
        if name == self.die_at:  # type: ignore[attr-defined]
            raise _Died(name)


def test_crash_loop_rolls_back_and_marks_bad(make_bundle, signing_key, state_dir):
    make_installer(state_dir, signing_key).install(FileSource(make_bundle(1)))
    crashing = make_installer(state_dir, signing_key, faults=DieAt("PROBATION"))
    bundle = make_bundle(2, scale=3.0)
    for _ in range(3):
        with pytest.raises(_Died):
            crashing.install(FileSource(bundle))
        # between crashes the device serves the new model on probation, whole
        assert serving(state_dir) == (2, 4.0)
    outcome = crashing.install(FileSource(bundle))
    assert (outcome.result, outcome.reason) == ("rolled_back", "crash_loop")
    assert states(state_dir)[len(HAPPY) :] == [
        "DOWNLOADING",
        "VERIFYING",
        "STAGED",
        "ACTIVATING",
        "PROBATION",
        "PROBATION",
        "PROBATION",
        "ROLLING_BACK",
        "IDLE",
    ]
    assert serving(state_dir) == (1, 3.0)
    assert make_installer(state_dir, signing_key).install(FileSource(bundle)).reason == "marked_bad"


def test_a_new_bundle_supersedes_an_unfinished_download(make_bundle, signing_key, state_dir):
    installer = make_installer(state_dir, signing_key, open_source=lambda ref: None)
    assert installer.install(FlakySource(make_bundle(1, extra_bytes=20_000), cut_at=5_000)).result == "suspended"
    outcome = installer.install(FileSource(make_bundle(2)))
    assert (outcome.result, outcome.version) == ("committed", 2)
    assert states(state_dir) == ["DOWNLOADING", "ROLLING_BACK", "IDLE", *HAPPY]
    assert StateStore(state_dir).read_log()[2]["reason"] == "superseded"


def test_a_second_installer_on_the_same_state_dir_is_refused(make_bundle, signing_key, state_dir):
    installer = make_installer(state_dir, signing_key)
    fd = os.open(state_dir / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        outcome = installer.install(FileSource(make_bundle(1)))
    finally:
        os.close(fd)
    assert (outcome.result, outcome.reason) == ("rejected", "busy")


def test_state_record_format_is_checked(state_dir):
    state_dir.mkdir()
    store = StateStore(state_dir)
    (state_dir / "install_state.json").write_text(json.dumps({"format": 1, "state": "VERIFYING", "future": 1}))
    assert store.load().state == InstallState.VERIFYING  # unknown fields from a newer v1 writer are ignored
    (state_dir / "install_state.json").write_text(json.dumps({"format": 7, "state": "VERIFYING"}))
    with pytest.raises(ValueError, match="Upgrade the agent"):
        store.load()


def test_probation_time_window(make_bundle, signing_key, state_dir):
    installer = make_installer(state_dir, signing_key, policy=InstallPolicy(probation_seconds=0.3))
    started = time.monotonic()
    assert installer.install(FileSource(make_bundle(1))).result == "committed"
    assert time.monotonic() - started >= 0.3


def test_disk_filling_up_mid_download_rolls_back(make_bundle, signing_key, state_dir, monkeypatch):
    installer = make_installer(state_dir, signing_key)
    installer.install(FileSource(make_bundle(1)))
    real_write = Installer._write
    written = {"n": 0}

    def filling_disk(out, data):
        written["n"] += len(data)
        if written["n"] > 10_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(out, data)

    monkeypatch.setattr(Installer, "_write", staticmethod(filling_disk))
    outcome = installer.install(FlakySource(make_bundle(2, extra_bytes=40_000), cut_at=10**9))
    assert (outcome.result, outcome.reason) == ("rolled_back", "insufficient_space")
    assert states(state_dir)[len(HAPPY) :] == ["DOWNLOADING", "ROLLING_BACK", "IDLE"]
    assert serving(state_dir) == (1, 3.0)
    assert list((state_dir / "slots" / "b").iterdir()) == []


class BrokenSource(FlakySource):
    def read(self, offset: int) -> Iterator[bytes]:
        raise RuntimeError("NOT_FOUND: no such artifact")
        yield b""


def test_a_failing_transport_is_a_reason_not_a_crash(make_bundle, signing_key, state_dir):
    outcome = make_installer(state_dir, signing_key).install(BrokenSource(make_bundle(1), cut_at=0))
    assert (outcome.result, outcome.reason) == ("rejected", "source_failed")
    assert "NOT_FOUND" in outcome.message
