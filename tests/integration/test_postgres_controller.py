"""A real controller process on the PostgreSQL store: an agent enrolls, and a restart keeps the device.

Runs against EDGEFLEET_TEST_POSTGRES (default: the local server, database `test`) in a fresh schema;
an unreachable server fails the test with how to start one, it never skips.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from edgefleet.protos.v1 import control_pb2
from fleet_harness import POSTGRES_DSN, AgentProc, ControllerProc, Proc, postgres_schema, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def store_url(procs: list[Proc]) -> Iterator[str]:
    """A postgresql:// URL whose connections use a fresh schema (options=-csearch_path=...), dropped afterwards.

    The schema is dropped only after every process the test started has stopped: a controller still
    writing while DROP SCHEMA takes its locks deadlocks with it."""
    assert POSTGRES_DSN.startswith(("postgresql://", "postgres://")), "EDGEFLEET_TEST_POSTGRES must be a URL here"
    with contextlib.ExitStack() as dropped_last:
        try:
            url = dropped_last.enter_context(postgres_schema("edgefleet_it"))
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[0]
            pytest.fail(
                f"PostgreSQL is not reachable at {POSTGRES_DSN} ({reason}): start it (`sudo service postgresql "
                "start`, or `docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:15`) "
                "or set EDGEFLEET_TEST_POSTGRES to a reachable postgresql:// URL",
                pytrace=False,
            )
        try:
            yield url
        finally:
            for proc in reversed(procs):
                proc.stop(timeout_s=5)


def online_ids(controller: ControllerProc) -> set[str]:
    return {d.device_id for d in controller.devices() if d.online}


def test_controller_on_postgres_enrolls_and_keeps_devices_across_a_restart(
    tmp_path: Path, procs: list[Proc], store_url: str
) -> None:
    controller = ControllerProc(tmp_path, extra_args=["--store", store_url])
    procs.append(controller)
    controller.start()
    assert controller.call("GetControllerInfo", control_pb2.GetControllerInfoRequest()).store_backend == "postgres"
    agent = AgentProc(tmp_path, "agent-pg", controller, controller.create_token(uses=1, labels={"site": "pg"}))
    procs.append(agent)
    agent.start()

    wait_until(lambda: agent.device_id in online_ids(controller), 30, "agent online")
    device_id = agent.device_id
    assert device_id is not None
    def stored_row() -> tuple[object, ...] | None:
        with psycopg.connect(store_url) as conn:  # the device lives in Postgres, not in a SQLite file
            return conn.execute("SELECT labels, connected FROM devices WHERE device_id = %s", (device_id,)).fetchone()

    # Opens are written in batches (presence.py), a few tens of ms after the device reads online.
    row = wait_until(lambda: (r := stored_row()) is not None and r[1] is True and r, 5, "the open in the store")
    assert row[0] == {"site": "pg"}
    assert not (controller.state_dir / "controller.db").exists()

    controller.stop()
    controller.close_channel()
    controller.start()

    assert [d.device_id for d in controller.devices()] == [device_id]
    assert controller.device(device_id).labels["site"] == "pg"
    wait_until(lambda: online_ids(controller) == {device_id}, 30, "agent back online after the controller restart")
    assert len(controller.devices()) == 1  # it reconnected with its identity; no second enrollment


def test_replicas_on_one_store_share_operator_tokens_revocations_and_the_audit_log(
    tmp_path: Path, procs: list[Proc], store_url: str
) -> None:
    import grpc

    replicas = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        replica = ControllerProc(tmp_path / name, extra_args=["--store", store_url])
        procs.append(replica)
        replicas.append(replica.start())
    a, b = replicas
    created = a.call("CreateOperatorToken", control_pb2.CreateOperatorTokenRequest(role="operator", name="bot"))
    assert b.call("ListDevices", control_pb2.ListDevicesRequest(), token=created.token).devices == []
    b.call("RevokeOperatorToken", control_pb2.RevokeOperatorTokenRequest(token_id=created.info.token_id))
    with pytest.raises(grpc.RpcError) as caught:
        a.call("ListDevices", control_pb2.ListDevicesRequest(), token=created.token)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in (caught.value.details() or "")
    entries = b.call("ListAudit", control_pb2.ListAuditRequest()).entries
    assert [(e.method, e.outcome) for e in entries] == [("CreateOperatorToken", "ok"), ("RevokeOperatorToken", "ok")]
    assert created.token not in str(entries)
