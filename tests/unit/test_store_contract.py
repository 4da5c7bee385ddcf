"""One contract, run against every store backend.

The PostgreSQL backend runs against EDGEFLEET_TEST_POSTGRES (default: the local server, database `test`),
each test in a fresh schema; an unreachable server fails these tests rather than skipping them.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import psycopg
import pytest

from edgefleet.controller.store import StoreUnavailable, open_store
from edgefleet.controller.store.base import (
    AuditRecord,
    BuildRecord,
    CommandRecord,
    DeviceBrief,
    DeviceRecord,
    EnrollmentRefused,
    EnrollmentTokenRecord,
    LoginSessionRecord,
    ModelPoint,
    ModelRecord,
    OperatorTokenRecord,
    RolloutDeviceRecord,
    RolloutRecord,
    Rollup,
    SessionOpen,
    Store,
    StoreError,
    TelemetryPoint,
)
from edgefleet.controller.store.postgres import MIGRATIONS as POSTGRES_MIGRATIONS
from edgefleet.controller.store.postgres import PostgresStore
from edgefleet.controller.store.sqlite import SQLiteStore

NOW = 1_800_000_000_000
MINUTE = 60_000
POSTGRES_DSN = os.environ.get("EDGEFLEET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def with_search_path(dsn: str, schema: str) -> str:
    """The DSN with every connection's search_path set to `schema` (URL or key=value form)."""
    if dsn.startswith(("postgresql://", "postgres://")):
        return f"{dsn}{'&' if '?' in dsn else '?'}options=-csearch_path%3D{schema}"
    return psycopg.conninfo.make_conninfo(dsn, options=f"-csearch_path={schema}")


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh, uniquely named schema for one test, dropped afterwards; yields a DSN that uses it."""
    schema = f"edgefleet_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0]
    else:
        reason = ""
    if reason:  # outside the except block, so the failure is one message rather than a chained traceback
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_DSN} ({reason}): start it "
            "(`sudo service postgresql start`, or `docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust "
            "postgres:15` then `createdb -h 127.0.0.1 -U postgres test`) or set EDGEFLEET_TEST_POSTGRES to a DSN",
            pytrace=False,
        )
    with admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield with_search_path(POSTGRES_DSN, schema)
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextmanager
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    store = SQLiteStore(tmp_path / "store.db")
    try:
        yield store
    finally:
        store.close()


@contextmanager
def postgres_store(tmp_path: Path) -> Iterator[Store]:
    with postgres_schema() as dsn:
        store = PostgresStore(dsn)
        try:
            yield store
        finally:
            store.close()


BACKENDS: dict[str, Callable[[Path], AbstractContextManager[Store]]] = {
    "sqlite": sqlite_store,
    "postgres": postgres_store,
}


@pytest.fixture(params=sorted(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with BACKENDS[request.param](tmp_path) as s:
        yield s


def token(token_id: str = "tok-1", uses: int = 2, expires: int = NOW + 60_000, **labels: str) -> EnrollmentTokenRecord:
    return EnrollmentTokenRecord(token_id, f"hash-{token_id}", uses, uses, NOW, expires, dict(labels))


def operator_token(token_id: str = "opt-1", role: str = "admin", created: int = NOW, **fields: object
                   ) -> OperatorTokenRecord:
    return OperatorTokenRecord(token_id, f"hash-{token_id}", role, created, **fields)  # type: ignore[arg-type]


def device(device_id: str = "dev-1", **labels: str) -> DeviceRecord:
    return DeviceRecord(device_id, f"secret-{device_id}", dict(labels), 0, hostname="h", hardware_class="x86_64-avx2",
                        profile=b"\x08\x01")


def enroll(store: Store, *device_ids: str) -> None:
    store.create_enrollment_token(token("tok-enroll", uses=len(device_ids)))
    for device_id in device_ids:
        store.enroll_device("hash-tok-enroll", NOW, device(device_id))


def command(command_id: str, device_id: str = "dev-1", created: int = NOW, expires: int = NOW + 60_000,
            rollout_id: str = "") -> CommandRecord:
    return CommandRecord(command_id, device_id, "install", b"\x00payload\xff", created, expires, rollout_id=rollout_id)


def point(seq: int, device_id: str = "dev-1", end_ms: int = NOW + 30_000, **overrides: object) -> TelemetryPoint:
    models = (
        ModelPoint("det", "3", 100, 2, 1.5, 4.25, 9.0, 12.0, b"\x1c\x84\x00hdr", 3.5, "measured", "onnxruntime"),
        ModelPoint("cls", "1", 10, 0, 0.5, 0.75, 1.0, 1.25, b"hdr2", 0.0, "", "litert"),
    )
    fields: dict[str, object] = dict(
        device_id=device_id, seq=seq, start_ms=end_ms - 1000, end_ms=end_ms, received_ms=end_ms + 5, watts=7.125,
        power_source="rapl", cpu_system=0.5, cpu_process=0.25, rss_bytes=123_456_789_012,
        memory_available_bytes=2**40, temperature_c=51.5, load1=0.75, dropped_batches=0, models=models,
    )
    fields.update(overrides)
    return TelemetryPoint(**fields)  # type: ignore[arg-type]


def rollout(rollout_id: str, created: int = NOW, state: str = "planning") -> RolloutRecord:
    return RolloutRecord(rollout_id, "det", 3, "class=x86_64-avx2", "1,50%,100%", 30.5, 0.25, '["p95<1.2x"]', 120.0,
                         True, state=state, created_at_ms=created, updated_at_ms=created)


class TestStoreContract:
    def test_operator_tokens(self, store: Store) -> None:
        assert not store.is_operator_token("hash-opt-1") and store.get_operator_token("hash-opt-1") is None
        first = operator_token(name="ci", expires_at_ms=NOW + 60_000, created_by="opt-0")
        assert store.add_operator_token(first)
        assert not store.add_operator_token(dataclasses.replace(first, role="viewer"))  # same digest: unchanged
        assert not store.add_operator_token(OperatorTokenRecord("opt-1", "hash-other", "viewer", NOW))  # same id
        assert store.get_operator_token("hash-opt-1") == first
        assert store.get_operator_token("hash-other") is None
        assert store.is_operator_token("hash-opt-1", NOW) and not store.is_operator_token("hash-opt-1", NOW + 60_000)

    def test_operator_tokens_list_and_revoke_keeps_the_first_revocation(self, store: Store) -> None:
        store.add_operator_token(operator_token("opt-b", role="viewer", created=NOW + 1))
        store.add_operator_token(operator_token("opt-a", role="operator", created=NOW + 1))
        store.add_operator_token(operator_token("opt-z", created=NOW))
        assert [t.token_id for t in store.list_operator_tokens()] == ["opt-z", "opt-a", "opt-b"]
        revoked = store.revoke_operator_token("opt-a", NOW + 5)
        assert revoked is not None and revoked.revoked_at_ms == NOW + 5 and revoked.role == "operator"
        again = store.revoke_operator_token("opt-a", NOW + 9)
        assert again is not None and again.revoked_at_ms == NOW + 5
        assert store.revoke_operator_token("opt-missing", NOW) is None
        assert not store.is_operator_token("hash-opt-a", NOW) and store.is_operator_token("hash-opt-b", NOW)

    def test_audit_log_keeps_the_newest_entries_oldest_first(self, store: Store) -> None:
        entries = [AuditRecord(NOW + i, "opt-1", "operator", f"Method{i}", f'{{"i": {i}}}', "ok") for i in range(5)]
        entries.append(AuditRecord(NOW + 2, "opt-2", "viewer", "CreateRollout", "{}", "PERMISSION_DENIED",
                                   "CreateRollout needs role operator; this token (opt-2) is viewer"))
        for e in entries:
            store.add_audit(e)
        listed = store.list_audit()
        assert [(e.at_ms, e.method) for e in listed] == [
            (NOW, "Method0"), (NOW + 1, "Method1"), (NOW + 2, "Method2"), (NOW + 2, "CreateRollout"),
            (NOW + 3, "Method3"), (NOW + 4, "Method4")]
        assert len({e.audit_id for e in listed}) == 6 and all(e.audit_id > 0 for e in listed)
        denied = listed[3]
        assert dataclasses.replace(denied, audit_id=0) == entries[-1]
        assert [e.method for e in store.list_audit(limit=2)] == ["Method3", "Method4"]
        assert [e.method for e in store.list_audit(since_ms=NOW + 3)] == ["Method3", "Method4"]
        assert store.list_audit(since_ms=NOW + 10) == []

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

    def test_each_replica_resets_and_closes_only_its_own_streams(self, store: Store) -> None:
        store.create_enrollment_token(token(uses=3))
        for name in ("dev-1", "dev-2", "dev-3"):
            store.enroll_device("hash-tok-1", NOW, device(name))
        store.update_device_session("dev-1", connected=True, last_seen_ms=NOW, owner="replica-a")
        store.update_device_session("dev-2", connected=True, last_seen_ms=NOW, owner="replica-b")
        store.update_device_session("dev-3", connected=True, last_seen_ms=NOW, owner="replica-a")
        # dev-3 moved to replica-b; replica-a's late close of its old stream must not undo that.
        store.update_device_session("dev-3", connected=True, last_seen_ms=NOW + 1, owner="replica-b")
        store.update_device_session("dev-3", connected=False, last_seen_ms=NOW, owner="replica-a")
        assert store.get_device("dev-3").connected_by == "replica-b"  # type: ignore[union-attr]
        assert store.get_device("dev-3").connected  # type: ignore[union-attr]
        assert store.reset_connections("replica-a") == 1  # replica-a restarts: only dev-1 was its
        assert [d.connected for d in store.list_devices()] == [False, True, True]
        assert store.reset_connections() == 2  # no owner: everything

    def test_closing_many_sessions_in_one_write_leaves_other_replicas_devices(self, store: Store) -> None:
        enroll(store, "dev-1", "dev-2", "dev-3")
        for name, owner in (("dev-1", "replica-a"), ("dev-2", "replica-a"), ("dev-3", "replica-b")):
            store.update_device_session(name, connected=True, last_seen_ms=NOW + 10, owner=owner)
        store.close_device_sessions([("dev-1", NOW + 20), ("dev-2", NOW + 5), ("dev-3", NOW + 30)], "replica-a")
        devices = {d.device_id: d for d in store.list_devices()}
        assert [devices[d].connected for d in ("dev-1", "dev-2", "dev-3")] == [False, False, True]
        assert devices["dev-1"].last_seen_ms == NOW + 20
        assert devices["dev-2"].last_seen_ms == NOW + 10  # never backwards
        assert devices["dev-3"].last_seen_ms == NOW + 10  # replica-b's stream: untouched
        store.close_device_sessions([], "replica-a")  # nothing to write is no write

    def test_device_briefs_are_the_presence_columns_by_device_id(self, store: Store) -> None:
        enroll(store, "dev-b", "dev-a")
        store.update_device_session("dev-b", connected=True, last_seen_ms=NOW + 7, owner="r")
        assert store.device_briefs() == [DeviceBrief("dev-a", "x86_64-avx2", False, 0),
                                         DeviceBrief("dev-b", "x86_64-avx2", True, NOW + 7)]

    def test_reads_do_not_wait_for_an_open_write_transaction(self, store: Store) -> None:
        store.put_rollout(rollout("r-1"))
        read: list[list[RolloutRecord]] = []
        with store._tx() as tx:  # type: ignore[attr-defined]  # both backends' write transaction
            tx.execute("UPDATE rollouts SET reason = 'uncommitted'")
            reader = threading.Thread(target=lambda: read.append(store.list_rollouts()))
            reader.start()
            reader.join(5)
            assert read, "list_rollouts waited for another thread's write transaction"
        assert [r.reason for r in read[0]] == [""]  # the last committed state, not the open write

    def test_one_lease_holder_until_it_expires_or_is_released(self, store: Store) -> None:
        assert store.lease_holder("singletons", NOW) == ""
        assert store.acquire_lease("singletons", "worker-0", NOW, 3000)
        assert not store.acquire_lease("singletons", "worker-1", NOW + 1000, 3000)  # held: refused
        assert store.acquire_lease("singletons", "worker-0", NOW + 2000, 3000)  # renewed until NOW + 5000
        assert not store.acquire_lease("singletons", "worker-1", NOW + 4999, 3000)
        assert store.lease_holder("singletons", NOW + 4999) == "worker-0"
        assert store.acquire_lease("singletons", "worker-1", NOW + 5000, 3000)  # expired: taken over
        assert not store.acquire_lease("singletons", "worker-0", NOW + 5001, 3000)
        assert store.acquire_lease("other", "worker-0", NOW, 3000)  # leases are independent
        store.release_lease("singletons", "worker-0")  # not its holder: changes nothing
        assert store.lease_holder("singletons", NOW + 5001) == "worker-1"
        store.release_lease("singletons", "worker-1")
        assert store.lease_holder("singletons", NOW + 5001) == ""
        assert store.acquire_lease("singletons", "worker-0", NOW + 5002, 3000)

    def test_login_sessions_expire_are_capped_and_end_at_logout(self, store: Store) -> None:
        first = LoginSessionRecord("s1", "hash-opt-1", "csrf-1", NOW + 1000)
        store.add_login_session(first, NOW, max_sessions=2)
        assert store.get_login_session("s1") == first and store.get_login_session("nope") is None
        store.add_login_session(LoginSessionRecord("s2", "hash-opt-1", "csrf-2", NOW + 2000), NOW, 2)
        store.add_login_session(LoginSessionRecord("s3", "hash-opt-2", "csrf-3", NOW + 3000), NOW, 2)
        assert store.get_login_session("s1") is None  # the oldest made room
        assert store.get_login_session("s2") is not None and store.get_login_session("s3") is not None
        store.add_login_session(LoginSessionRecord("s4", "hash-opt-2", "csrf-4", NOW + 9000), NOW + 2500, 10)
        assert store.get_login_session("s2") is None  # expired, dropped at the next login
        store.delete_login_session("s3")
        assert store.get_login_session("s3") is None and store.get_login_session("s4") is not None

    def test_pending_commands_are_found_for_the_worker_holding_the_stream(self, store: Store) -> None:
        enroll(store, "dev-1", "dev-2", "dev-3")
        store.update_device_session("dev-1", connected=True, last_seen_ms=NOW, owner="worker-0")
        store.update_device_session("dev-2", connected=True, last_seen_ms=NOW, owner="worker-1")
        for command_id, device_id in (("c1", "dev-1"), ("c2", "dev-1"), ("c3", "dev-2"), ("c4", "dev-3")):
            store.add_command(command(command_id, device_id))
        assert store.devices_with_pending_commands("worker-0") == ["dev-1"]
        assert store.devices_with_pending_commands("worker-1") == ["dev-2"]
        store.mark_command_sent("c3", NOW + 1)
        assert store.devices_with_pending_commands("worker-1") == []
        store.update_device_session("dev-1", connected=False, last_seen_ms=NOW + 2, owner="worker-0")
        assert store.devices_with_pending_commands("worker-0") == []

    def test_opens_written_together_keep_what_they_leave_out(self, store: Store) -> None:
        enroll(store, "dev-1", "dev-2", "dev-3")
        store.set_device_model("dev-2", "det", 3)
        store.open_device_sessions([
            SessionOpen("dev-1", NOW + 5, agent_version="2.0", capability_version=7, hardware_class="arm64",
                        profile=b"\x08\x02", hostname="h1", model="cls", model_version=4),
            SessionOpen("dev-2", NOW + 6),  # reconnected as it was: presence columns only
        ], "worker-1")
        one, two, three = (store.get_device(d) for d in ("dev-1", "dev-2", "dev-3"))
        assert one is not None and two is not None and three is not None
        assert (one.connected, one.connected_by, one.last_seen_ms) == (True, "worker-1", NOW + 5)
        assert (one.agent_version, one.capability_version, one.hardware_class, one.profile, one.hostname,
                one.model, one.model_version) == ("2.0", 7, "arm64", b"\x08\x02", "h1", "cls", 4)
        assert (two.connected, two.connected_by, two.last_seen_ms) == (True, "worker-1", NOW + 6)
        assert (two.hardware_class, two.profile, two.hostname, two.model, two.model_version) == \
            ("x86_64-avx2", b"\x08\x01", "h", "det", 3)
        assert not three.connected
        store.open_device_sessions([], "worker-1")  # nothing to write: no error

    def test_revoked_streams_are_found_for_the_worker_holding_them(self, store: Store) -> None:
        enroll(store, "dev-1", "dev-2", "dev-3")
        for device_id, owner in (("dev-1", "worker-0"), ("dev-2", "worker-1"), ("dev-3", "worker-1")):
            store.update_device_session(device_id, connected=True, last_seen_ms=NOW, owner=owner)
        assert store.revoked_streams("worker-0") == [] and store.revoked_streams("worker-1") == []
        store.revoke_device("dev-1", NOW)
        store.revoke_device("dev-3", NOW)
        assert store.revoked_streams("worker-0") == ["dev-1"]
        assert store.revoked_streams("worker-1") == ["dev-3"]
        store.close_device_sessions([("dev-3", NOW + 1)], "worker-1")  # its stream ended: nothing left to end
        assert store.revoked_streams("worker-1") == []

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

    # -- commands ------------------------------------------------------------------------------
    def test_commands_round_trip_and_open_ones_oldest_first(self, store: Store) -> None:
        store.add_command(command("c-2", created=NOW + 2))
        store.add_command(command("c-1", created=NOW + 1))
        store.add_command(command("c-other", device_id="dev-2"))
        got = store.get_command("c-1")
        assert got == dataclasses.replace(command("c-1", created=NOW + 1), updated_at_ms=NOW + 1)
        assert got is not None and got.payload == b"\x00payload\xff" and got.state == "pending"
        assert store.get_command("nope") is None
        assert [c.command_id for c in store.open_commands("dev-1", NOW + 10)] == ["c-1", "c-2"]
        store.mark_command_sent("c-1", NOW + 20)
        sent = store.get_command("c-1")
        assert sent is not None and sent.state == "sent" and sent.updated_at_ms == NOW + 20
        assert [c.command_id for c in store.open_commands("dev-1", NOW + 30)] == ["c-1", "c-2"]  # sent is still open

    def test_open_commands_expires_old_ones(self, store: Store) -> None:
        store.add_command(command("c-old", expires=NOW + 100))
        store.add_command(command("c-new", expires=NOW + 10_000))
        assert [c.command_id for c in store.open_commands("dev-1", NOW + 100)] == ["c-new"]
        expired = store.get_command("c-old")
        assert expired is not None and (expired.state, expired.result, expired.updated_at_ms) == (
            "expired", "expired", NOW + 100)
        assert store.finish_command("c-old", state="done", result="ok", reason="", message="", ack=b"a",
                                    now_ms=NOW + 200) is None

    def test_finish_command_once_and_sent_only_from_pending(self, store: Store) -> None:
        store.add_command(command("c-1"))
        done = store.finish_command("c-1", state="done", result="failed", reason="self_test", message="bad output",
                                    ack=b"\x01ack", now_ms=NOW + 5)
        assert done is not None
        assert (done.state, done.result, done.reason, done.message, done.ack, done.updated_at_ms) == (
            "done", "failed", "self_test", "bad output", b"\x01ack", NOW + 5)
        assert store.finish_command("c-1", state="done", result="ok", reason="", message="", ack=b"",
                                    now_ms=NOW + 6) is None
        store.mark_command_sent("c-1", NOW + 7)  # a finished command is never re-opened
        assert store.get_command("c-1") == done
        assert store.open_commands("dev-1", NOW + 8) == []
        assert store.finish_command("missing", state="done", result="ok", reason="", message="", ack=b"",
                                    now_ms=NOW) is None

    def test_concurrent_acks_finish_a_command_exactly_once(self, store: Store) -> None:
        store.add_command(command("c-1"))
        winners: list[int] = []

        def ack(i: int) -> None:
            if store.finish_command("c-1", state="done", result="ok", reason="", message=str(i), ack=b"",
                                    now_ms=NOW + i) is not None:
                winners.append(i)

        threads = [threading.Thread(target=ack, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(winners) == 1
        assert store.get_command("c-1").message == str(winners[0])  # type: ignore[union-attr]

    def test_list_commands_filters(self, store: Store) -> None:
        store.add_command(command("c-3", created=NOW + 3, rollout_id="r-1"))
        store.add_command(command("c-1", created=NOW + 1))
        store.add_command(command("c-2", device_id="dev-2", created=NOW + 2, rollout_id="r-1"))
        assert [c.command_id for c in store.list_commands()] == ["c-1", "c-2", "c-3"]
        assert [c.command_id for c in store.list_commands(device_id="dev-1")] == ["c-1", "c-3"]
        assert [c.command_id for c in store.list_commands(rollout_id="r-1")] == ["c-2", "c-3"]
        assert [c.command_id for c in store.list_commands(device_id="dev-2", rollout_id="r-1")] == ["c-2"]
        assert store.list_commands(device_id="dev-9") == []

    # -- models, builds, rollouts -----------------------------------------------------------------
    def test_models_are_immutable_per_version_and_sorted_bytewise(self, store: Store) -> None:
        det = ModelRecord("det", 3, "a" * 64, "onnx", calib_sha256="c" * 64, budget=0.985, created_at_ms=NOW)
        store.add_model(det)
        store.add_model(det)  # the same content again is a no-op
        with pytest.raises(StoreError, match="new --version"):
            store.add_model(dataclasses.replace(det, sha256="b" * 64))
        assert store.get_model("det", 3) == det
        assert store.get_model("det", 4) is None
        for name, version in (("det", 10), ("Zeta", 1), ("alpha", 2), ("det", 2)):
            store.add_model(ModelRecord(name, version, "d" * 64, "tflite"))
        assert [(m.name, m.version) for m in store.list_models()] == [
            ("Zeta", 1), ("alpha", 2), ("det", 2), ("det", 3), ("det", 10)]

    def test_set_device_model(self, store: Store) -> None:
        enroll(store, "dev-1")
        store.set_device_model("dev-1", "det", 3)
        got = store.get_device("dev-1")
        assert got is not None and (got.model, got.model_version) == ("det", 3)
        store.set_device_model("dev-unknown", "det", 3)  # no such device: nothing happens
        assert store.get_device("dev-unknown") is None

    def test_builds_are_replaced_per_model_version_and_class(self, store: Store) -> None:
        pending = BuildRecord("det", 3, "arm64-dotprod", updated_at_ms=NOW)
        store.put_build(pending)
        assert store.get_build("det", 3, "arm64-dotprod") == pending
        ready = dataclasses.replace(pending, state="ready", bundle_sha256="e" * 64, rollback_bundle_sha256="f" * 64,
                                    report='{"winner": "int8"}', updated_at_ms=NOW + 1)
        store.put_build(ready)
        store.put_build(BuildRecord("det", 3, "x86_64-avx2", state="failed", error="no kernels"))
        assert store.get_build("det", 3, "arm64-dotprod") == ready
        assert store.get_build("det", 3, "x86_64-avx2").error == "no kernels"  # type: ignore[union-attr]
        assert store.get_build("det", 4, "arm64-dotprod") is None

    def test_rollouts_replace_list_and_filter_active(self, store: Store) -> None:
        r1 = rollout("r-1", created=NOW + 1)
        store.put_rollout(r1)
        assert store.get_rollout("r-1") == r1
        store.put_rollout(rollout("r-0", created=NOW, state="completed"))
        running = dataclasses.replace(r1, state="running", wave=2, soak_until_ms=NOW + 99, auto_rollback=False,
                                      updated_at_ms=NOW + 50)
        store.put_rollout(running)
        store.put_rollout(rollout("r-2", created=NOW + 2, state="paused"))
        assert store.get_rollout("r-1") == running
        assert store.get_rollout("r-9") is None
        assert [r.rollout_id for r in store.list_rollouts()] == ["r-0", "r-1", "r-2"]
        assert [r.rollout_id for r in store.list_rollouts(active_only=True)] == ["r-1"]

    def test_rollout_wave_counts_are_distinct_waves_per_rollout(self, store: Store) -> None:
        for rollout_id, device_id, wave in (("r-1", "a", 0), ("r-1", "b", 1), ("r-1", "c", 1), ("r-2", "a", 0)):
            store.put_rollout_device(RolloutDeviceRecord(rollout_id, device_id, "x86_64-avx2", wave))
        assert store.rollout_wave_counts() == {"r-1": 2, "r-2": 1}

    def test_rollout_devices_replace_and_order_by_wave_class_device(self, store: Store) -> None:
        rows = [
            RolloutDeviceRecord("r-1", "dev-b", "x86_64-avx2", 1),
            RolloutDeviceRecord("r-1", "dev-c", "arm64-dotprod", 1),
            RolloutDeviceRecord("r-1", "dev-a", "x86_64-avx2", 0),
            RolloutDeviceRecord("r-1", "dev-d", "x86_64-avx2", 1),
            RolloutDeviceRecord("r-2", "dev-a", "x86_64-avx2", 0),
        ]
        for row in rows:
            store.put_rollout_device(row)
        sent = dataclasses.replace(rows[0], state="committed", command_id="c-1", previous_model="det",
                                   previous_version=2, baseline='{"p95_ms": 4.5}', dispatched_at_ms=NOW,
                                   finished_at_ms=NOW + 9, rollback_command_id="c-9", reason="ok")
        store.put_rollout_device(sent)
        got = store.rollout_devices("r-1")
        assert [d.device_id for d in got] == ["dev-a", "dev-c", "dev-b", "dev-d"]
        assert got[2] == sent
        assert store.rollout_devices("r-none") == []
        assert store.rollout_devices("r-1", states=("committed",)) == [sent]
        assert [d.device_id for d in store.rollout_devices("r-1", states=("planned", "timed_out"))] == [
            "dev-a", "dev-c", "dev-d"]
        assert store.rollout_devices("r-1", states=()) == []

    # -- telemetry -------------------------------------------------------------------------------
    def test_ingest_stores_new_points_and_reports_duplicates(self, store: Store) -> None:
        first = point(1, end_ms=NOW + 1_000, temperature_c=None)
        assert store.ingest_telemetry([first, point(2, end_ms=NOW + 2_000, watts=7, load1=1)]) == [True, True]
        # A retransmit of seq 1 and a repeat inside the same batch are duplicates; nothing is overwritten.
        again = store.ingest_telemetry([point(1, watts=99.0), point(3, end_ms=NOW + 3_000), point(3, watts=1.0)])
        assert again == [False, True, False]
        window = store.telemetry_window("dev-1", NOW)
        assert [p.seq for p in window] == [1, 2, 3]
        assert window[0] == dataclasses.replace(
            first, models=tuple(sorted(first.models, key=lambda m: (m.model, m.version))))
        assert window[0].temperature_c is None and window[2].watts == 7.125
        assert store.ingest_telemetry([]) == []

    def test_telemetry_window_is_half_open_and_per_device(self, store: Store) -> None:
        store.ingest_telemetry([point(s, end_ms=NOW + s * 1_000, models=()) for s in range(1, 6)])
        store.ingest_telemetry([point(1, device_id="dev-2", end_ms=NOW + 2_000)])
        assert [p.seq for p in store.telemetry_window("dev-1", NOW + 2_000, NOW + 4_000)] == [2, 3]
        assert [p.seq for p in store.telemetry_window("dev-1", NOW + 4_000)] == [4, 5]
        assert store.telemetry_window("dev-1", NOW + 2_000, NOW + 4_000)[0].models == ()
        assert [p.device_id for p in store.telemetry_window("dev-2", 0)] == ["dev-2"]

    def test_latest_telemetry_is_the_highest_seq_per_device(self, store: Store) -> None:
        assert store.latest_telemetry() == {}
        store.ingest_telemetry([point(1), point(7, models=()), point(3), point(2, device_id="dev-2")])
        latest = store.latest_telemetry()
        assert {k: v.seq for k, v in latest.items()} == {"dev-1": 7, "dev-2": 2}
        assert latest["dev-1"].models == () and [m.model for m in latest["dev-2"].models] == ["cls", "det"]

    def test_concurrent_ingest_stores_each_point_once(self, store: Store) -> None:
        batches = [[point(seq, device_id=f"dev-{d}") for d in range(3) for seq in range(1, 21)] for _ in range(6)]
        results: list[list[bool]] = []

        def ingest(batch: list[TelemetryPoint]) -> None:
            results.append(store.ingest_telemetry(batch))

        threads = [threading.Thread(target=ingest, args=(b,)) for b in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(sum(r) for r in results) == 60
        for column in zip(*results, strict=True):
            assert sum(column) == 1  # each (device, seq) was new for exactly one caller
        assert len(store.telemetry_window("dev-1", 0)) == 20

    def test_rollups_follow_dirty_minutes(self, store: Store) -> None:
        minute = NOW - NOW % MINUTE

        def dirty() -> list[tuple[str, int]]:
            return sorted((d, m) for d, m, _ in store.dirty_rollups())

        store.ingest_telemetry([point(1, end_ms=minute + 5), point(2, end_ms=minute + 59_999),
                                point(3, end_ms=minute + MINUTE), point(1, device_id="dev-2", end_ms=minute + 1)])
        assert dirty() == [("dev-1", minute), ("dev-1", minute + MINUTE), ("dev-2", minute)]
        assert len(store.dirty_rollups(limit=2)) == 2
        assert sorted((d, m) for d, m, _ in store.dirty_rollups(max_minute_ms=minute)) == \
            [("dev-1", minute), ("dev-2", minute)]  # the minutes started by then, not the one after
        assert store.dirty_rollups(max_minute_ms=minute - 1) == []
        old = Rollup("dev-1", "det", "3", minute, 1, 0, b"old", 1, 1, 1, 1, 1, 1)
        store.write_rollups([old], [])
        fresh = [
            Rollup("dev-1", "det", "3", minute, 200, 4, b"\x00hdr", 1.5, 4.25, 9.0, 12.0, 7.125, 3.5),
            Rollup("dev-1", "", "", minute, 0, 0, b"", 0, 0, 0, 0, 7, 0),  # ints in float fields, as callers pass
            Rollup("dev-1", "cls", "1", minute + MINUTE, 10, 0, b"h", 0.5, 0.75, 1.0, 1.25, 7.0, 0.0),
        ]
        store.write_rollups(fresh, [t for t in store.dirty_rollups() if t[0] == "dev-1"])
        assert dirty() == [("dev-2", minute)]
        assert store.rollups("dev-1", minute) == [fresh[1], fresh[0], fresh[2]]  # by minute, then model
        assert store.rollups("dev-1", minute + 1) == [fresh[2]]
        assert store.rollups("dev-2", 0) == []
        store.ingest_telemetry([point(2, end_ms=minute + 10)])  # a duplicate does not dirty its minute again
        assert dirty() == [("dev-2", minute)]
        store.ingest_telemetry([point(4, end_ms=minute + 10)])
        assert dirty() == [("dev-1", minute), ("dev-2", minute)]

    def test_a_point_landing_while_a_rollup_is_built_keeps_its_minute_dirty(self, store: Store) -> None:
        minute = NOW - NOW % MINUTE
        store.ingest_telemetry([point(1, end_ms=minute + 5)])
        seen = store.dirty_rollups()  # a rollup worker reads the dirty minute ...
        store.ingest_telemetry([point(2, end_ms=minute + 6)])  # ... a late point lands in it meanwhile ...
        store.write_rollups([Rollup("dev-1", "", "", minute, 0, 0, b"", 0, 0, 0, 0, 1, 0)], seen)
        assert [(d, m) for d, m, _ in store.dirty_rollups()] == [("dev-1", minute)]  # ... so it is built again
        store.write_rollups([], store.dirty_rollups())
        assert store.dirty_rollups() == []

    def test_prune_drops_old_data_and_keeps_pruned_seqs_out(self, store: Store) -> None:
        minute = NOW - NOW % MINUTE
        store.ingest_telemetry([point(s, end_ms=minute + s * 1_000) for s in range(1, 5)])
        store.write_rollups([Rollup("dev-1", "det", "3", m, 1, 0, b"", 1, 1, 1, 1, 1, 1)
                             for m in (minute - MINUTE, minute)], [])
        assert store.prune_telemetry(minute + 3_000, minute) == 2
        assert [p.seq for p in store.telemetry_window("dev-1", 0)] == [3, 4]
        assert [r.minute_ms for r in store.rollups("dev-1", 0)] == [minute]
        # A late retransmit of a pruned batch is a duplicate, not a resurrection; newer seqs still land.
        assert store.ingest_telemetry([point(1, end_ms=minute + 1_000), point(5, end_ms=minute + 5_000)]) == [
            False, True]
        assert store.prune_telemetry(minute, minute) == 0
        assert store.ingest_telemetry([point(2, end_ms=minute + 2_000)]) == [False]  # the watermark never drops
        assert store.prune_telemetry(minute + 10 * MINUTE, minute + 10 * MINUTE) == 3
        assert store.telemetry_window("dev-1", 0) == [] and store.rollups("dev-1", 0) == []
        assert store.latest_telemetry() == {}


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


def test_sqlite_ingest_now_writes_only_when_no_writer_holds_the_store(tmp_path: Path) -> None:
    """The ingest's on-loop write: done at once when the store is free, refused (None, nothing
    written) while another process's writer or another thread of this one holds it."""
    store, other = SQLiteStore(tmp_path / "s.db"), SQLiteStore(tmp_path / "s.db")
    with other._tx():  # another process's transaction: its file lock
        assert store.ingest_telemetry_now([point(1)]) is None
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store._tx():
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    assert store.ingest_telemetry_now([point(1)]) is None  # this process's writer thread
    release.set()
    holder.join()
    assert store.telemetry_window("dev-1", 0) == []
    assert store.ingest_telemetry_now([point(1), point(1), point(2)]) == [True, False, True]
    assert store.ingest_telemetry_now([point(2), point(3)]) == [False, True]
    assert [p.seq for p in other.telemetry_window("dev-1", 0)] == [1, 2, 3]
    with other._tx():  # the file lock was released: another writer gets it
        pass
    store.close()
    other.close()


def test_sqlite_bulk_ingest_splits_at_the_variable_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups bigger than one statement's bound parameters take several statements, all of a piece."""
    from edgefleet.controller.store import sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "_variable_limit", lambda db: 30)  # 2 rows of 14, 15 of 2
    store = SQLiteStore(tmp_path / "s.db")
    points = [point(seq, device_id=f"dev-{d}", end_ms=NOW + seq * 20_000) for d in range(3) for seq in range(1, 12)]
    assert store.ingest_telemetry(points[:7]) == [True] * 7
    assert store.ingest_telemetry(points) == [False] * 7 + [True] * 26
    assert sum(len(store.telemetry_window(f"dev-{d}", 0)) for d in range(3)) == 33
    assert all(len(p.models) == 2 for p in store.telemetry_window("dev-2", 0))
    assert sum(marks for _, _, marks in store.dirty_rollups()) == 33
    store.close()


# -- PostgreSQL only ---------------------------------------------------------------------------
def test_open_store_picks_the_backend_from_the_url(tmp_path: Path) -> None:
    sqlite = open_store(tmp_path / "c.db")
    assert isinstance(sqlite, SQLiteStore) and sqlite.backend_name == "sqlite"
    sqlite.close()
    with postgres_schema() as dsn:
        for url in (dsn, dsn.replace("postgresql://", "postgres://", 1)):
            store = open_store(url)
            assert isinstance(store, PostgresStore) and store.backend_name == "postgres"
            store.close()


def test_postgres_reopen_keeps_everything_and_records_the_schema_version() -> None:
    with postgres_schema() as dsn:
        first = open_store(dsn)
        first.create_enrollment_token(token())
        first.enroll_device("hash-tok-1", NOW, device())
        first.close()
        second = open_store(dsn)
        assert second.get_device("dev-1") is not None and second.list_enrollment_tokens()[0].uses_left == 1
        second.close()
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT version FROM schema_version").fetchall() == [(len(POSTGRES_MIGRATIONS),)]


def test_postgres_replicas_starting_together_migrate_once() -> None:
    with postgres_schema() as dsn:
        barrier = threading.Barrier(6)
        opened: list[Store] = []
        errors: list[BaseException] = []

        def start() -> None:
            barrier.wait()
            try:
                opened.append(PostgresStore(dsn, max_connections=2))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and len(opened) == 6
        opened[0].add_operator_token(operator_token())
        assert all(s.is_operator_token("hash-opt-1", NOW) for s in opened)
        for s in opened:
            s.close()
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT version FROM schema_version").fetchall() == [(len(POSTGRES_MIGRATIONS),)]


def test_postgres_refuses_a_newer_schema() -> None:
    with postgres_schema() as dsn:
        PostgresStore(dsn).close()
        with psycopg.connect(dsn) as conn:
            conn.execute("UPDATE schema_version SET version = 999")
        with pytest.raises(StoreUnavailable, match=r"newer than this controller.*upgrade edgefleet"):
            PostgresStore(dsn)


def test_unreachable_postgres_says_how_to_fix_it_without_the_password() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreUnavailable) as caught:
        open_store(f"postgresql://edge:s3cret@127.0.0.1:{port}/fleet")
    message = str(caught.value)
    assert f"127.0.0.1:{port}/fleet" in message and "start PostgreSQL" in message and "EDGEFLEET_STORE" in message
    assert "s3cret" not in message and "\n" not in message


def test_postgres_search_path_without_a_schema_says_so() -> None:
    dsn = with_search_path(POSTGRES_DSN, f"edgefleet_missing_{uuid.uuid4().hex[:8]}")
    with pytest.raises(StoreUnavailable, match="CREATE SCHEMA"):
        PostgresStore(dsn)


def test_postgres_store_survives_its_connections_being_killed() -> None:
    """What a Postgres restart or failover does to a running replica's pool."""
    app = f"edgefleet_test_{uuid.uuid4().hex[:8]}"
    with postgres_schema() as dsn:
        store = PostgresStore(f"{dsn}&application_name={app}", max_connections=3)
        try:
            store.add_operator_token(operator_token())
            with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
                killed = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
                    (app,),
                ).fetchone()
            assert killed is not None and killed[0] >= 1
            assert store.is_operator_token("hash-opt-1", NOW)
        finally:
            store.close()


# The schema version that gave operator tokens a role, found by content so renumbering at a merge keeps it.
ROLES_MIGRATION = next(i for i, m in enumerate(POSTGRES_MIGRATIONS) if "CREATE TABLE audit_log" in m) + 1


def test_sqlite_tokens_from_before_roles_become_admin(tmp_path: Path) -> None:
    import sqlite3

    from edgefleet.controller.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS

    db = sqlite3.connect(tmp_path / "old.db")
    for script in SQLITE_MIGRATIONS[:ROLES_MIGRATION - 1]:
        db.executescript(script)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (?)", (ROLES_MIGRATION - 1,))
    db.execute("INSERT INTO operator_tokens VALUES ('abcdef0123456789', ?)", (NOW,))
    db.commit()
    db.close()
    store = SQLiteStore(tmp_path / "old.db")
    try:
        old = store.get_operator_token("abcdef0123456789")
        assert old is not None and old.role == "admin" and old.token_id == "opt-abcdef01" and not old.revoked_at_ms
        assert store.is_operator_token("abcdef0123456789", NOW)
    finally:
        store.close()


def test_postgres_tokens_from_before_roles_become_admin() -> None:
    with postgres_schema() as dsn:
        with psycopg.connect(dsn) as conn:
            for script in POSTGRES_MIGRATIONS[:ROLES_MIGRATION - 1]:
                conn.execute(script.encode())
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version VALUES (%s)", (ROLES_MIGRATION - 1,))
            conn.execute("INSERT INTO operator_tokens VALUES ('abcdef0123456789', %s)", (NOW,))
        store = PostgresStore(dsn)
        try:
            old = store.get_operator_token("abcdef0123456789")
            assert old is not None and old.role == "admin" and old.token_id == "opt-abcdef01"
        finally:
            store.close()


def sqlite_schema(path: Path) -> dict[str, list[tuple[str, bool]]]:
    """Table -> [(column, nullable)] in column order, as SQLite has them after every migration."""
    import sqlite3

    db = sqlite3.connect(path)
    try:
        tables = [r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        # PRAGMA table_info: (cid, name, type, notnull, dflt_value, pk). A PRIMARY KEY column is counted as
        # NOT NULL, as PostgreSQL makes it (SQLite alone would accept a NULL key that the code never writes).
        return {t: [(c[1], not (c[3] or c[5])) for c in db.execute(f'PRAGMA table_info("{t}")')] for t in tables}
    finally:
        db.close()


def postgres_schema_columns(dsn: str) -> dict[str, list[tuple[str, bool]]]:
    with psycopg.connect(dsn) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
            "AND table_type = 'BASE TABLE' ORDER BY table_name")]
        return {t: [(name, nullable == "YES") for name, nullable in conn.execute(
            "SELECT column_name, is_nullable FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position", (t,))]
            for t in tables}


def test_both_backends_migrate_to_the_same_tables_and_columns(tmp_path: Path) -> None:
    """The two MIGRATIONS lists are kept in step by hand; this is what says they are."""
    from edgefleet.controller.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS

    assert len(SQLITE_MIGRATIONS) == len(POSTGRES_MIGRATIONS), "a migration landed in one backend only"
    SQLiteStore(tmp_path / "schema.db").close()
    lite = sqlite_schema(tmp_path / "schema.db")
    with postgres_schema() as dsn:
        PostgresStore(dsn).close()
        pg = postgres_schema_columns(dsn)
    assert sorted(lite) == sorted(pg)
    for table in sorted(lite):
        assert lite[table] == pg[table], f"table {table}: sqlite {lite[table]} != postgres {pg[table]}"
    # Every record field has its column, so the stores' generic inserts write them all.
    for table, record in (("devices", DeviceRecord), ("commands", CommandRecord), ("models", ModelRecord),
                          ("builds", BuildRecord), ("rollouts", RolloutRecord),
                          ("rollout_devices", RolloutDeviceRecord), ("telemetry_rollups", Rollup),
                          ("operator_tokens", OperatorTokenRecord), ("audit_log", AuditRecord)):
        assert {f.name for f in dataclasses.fields(record)} == {c for c, _ in lite[table]}, table
