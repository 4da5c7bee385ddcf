"""One contract, run against every store backend."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.controller.store.base import DeviceRecord, EnrollmentRefused, EnrollmentTokenRecord, Store
from edgefleet.controller.store.sqlite import SQLiteStore

NOW = 1_800_000_000_000


def sqlite_store(tmp_path: Path) -> Store:
    return SQLiteStore(tmp_path / "store.db")


BACKENDS = {"sqlite": sqlite_store}


@pytest.fixture(params=sorted(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = BACKENDS[request.param](tmp_path)
    yield s
    s.close()


def token(token_id: str = "tok-1", uses: int = 2, expires: int = NOW + 60_000, **labels: str) -> EnrollmentTokenRecord:
    return EnrollmentTokenRecord(token_id, f"hash-{token_id}", uses, uses, NOW, expires, dict(labels))


def device(device_id: str = "dev-1", **labels: str) -> DeviceRecord:
    return DeviceRecord(device_id, f"secret-{device_id}", dict(labels), 0, hostname="h", hardware_class="x86_64-avx2",
                        profile=b"\x08\x01")


class TestStoreContract:
    def test_operator_tokens(self, store: Store) -> None:
        assert not store.is_operator_token("h")
        store.add_operator_token("h", NOW)
        store.add_operator_token("h", NOW)  # idempotent
        assert store.is_operator_token("h")

    def test_enroll_spends_a_use_and_merges_labels_token_first(self, store: Store) -> None:
        store.create_enrollment_token(token(uses=2, site="lab"))
        enrolled = store.enroll_device("hash-tok-1", NOW + 1, device(site="mine", extra="1"))
        assert enrolled.labels == {"site": "lab", "extra": "1"}
        assert enrolled.enrolled_at_ms == NOW + 1 and enrolled.token_id == "tok-1"
        assert store.get_device("dev-1") == enrolled
        assert store.list_enrollment_tokens()[0].uses_left == 1

    @pytest.mark.parametrize("case", ["unknown", "expired", "used_up", "revoked"])
    def test_refused_enrollment_writes_nothing(self, store: Store, case: str) -> None:
        store.create_enrollment_token(token(uses=1, expires=NOW + 10))
        if case == "used_up":
            store.enroll_device("hash-tok-1", NOW, device("dev-0"))
        if case == "revoked":
            assert store.revoke_enrollment_token("tok-1") is not None
        before_devices = store.list_devices()
        before_tokens = store.list_enrollment_tokens()
        token_hash = "nope" if case == "unknown" else "hash-tok-1"
        now = NOW + 10 if case == "expired" else NOW
        with pytest.raises(EnrollmentRefused):
            store.enroll_device(token_hash, now, device("dev-9"))
        assert store.list_devices() == before_devices
        assert store.list_enrollment_tokens() == before_tokens

    def test_concurrent_enrollment_never_overspends(self, store: Store) -> None:
        store.create_enrollment_token(token(uses=5))
        results: list[bool] = []

        def attempt(i: int) -> None:
            try:
                store.enroll_device("hash-tok-1", NOW, device(f"dev-{i}"))
                results.append(True)
            except EnrollmentRefused:
                results.append(False)

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(True) == 5 and len(store.list_devices()) == 5
        assert store.list_enrollment_tokens()[0].uses_left == 0

    def test_sessions_presence_and_touch(self, store: Store) -> None:
        store.create_enrollment_token(token(uses=2))
        store.enroll_device("hash-tok-1", NOW, device("dev-1"))
        store.enroll_device("hash-tok-1", NOW, device("dev-2"))
        store.update_device_session("dev-1", connected=True, last_seen_ms=NOW + 5, agent_version="1.2",
                                    capability_version=1, hardware_class="arm64-dotprod", profile=b"p")
        d1 = store.get_device("dev-1")
        assert d1 is not None and d1.connected and d1.agent_version == "1.2" and d1.profile == b"p"
        assert d1.hardware_class == "arm64-dotprod" and d1.hostname == "h"  # None keeps the old value
        store.touch_devices([("dev-1", NOW + 50), ("dev-2", NOW + 60)])
        store.touch_devices([("dev-1", NOW + 20)])  # never moves backwards
        assert store.get_device("dev-1").last_seen_ms == NOW + 50  # type: ignore[union-attr]
        assert store.get_device("dev-2").last_seen_ms == NOW + 60  # type: ignore[union-attr]
        assert store.reset_connections() == 1
        assert not store.get_device("dev-1").connected  # type: ignore[union-attr]
        assert [d.device_id for d in store.list_devices()] == ["dev-1", "dev-2"]
        assert store.get_device("dev-3") is None

    def test_tokens_listing_and_revoke(self, store: Store) -> None:
        store.create_enrollment_token(token("tok-a"))
        store.create_enrollment_token(dataclasses.replace(token("tok-b"), created_at_ms=NOW + 1))
        assert [t.token_id for t in store.list_enrollment_tokens()] == ["tok-a", "tok-b"]
        revoked = store.revoke_enrollment_token("tok-b")
        assert revoked is not None and revoked.revoked
        assert store.revoke_enrollment_token("tok-zzz") is None


def test_sqlite_reopen_keeps_everything_and_uses_wal(tmp_path: Path) -> None:
    first = SQLiteStore(tmp_path / "s.db")
    first.create_enrollment_token(token())
    first.enroll_device("hash-tok-1", NOW, device())
    first.close()
    second = SQLiteStore(tmp_path / "s.db")
    assert second.get_device("dev-1") is not None and second.list_enrollment_tokens()[0].uses_left == 1
    mode = second._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    second.close()
