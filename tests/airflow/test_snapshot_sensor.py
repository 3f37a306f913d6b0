"""PgPlakarSnapshotSensor (poke and deferrable) and PgPlakarSnapshotTrigger (its run() driven directly) on a real
store: the wait ends when a matching snapshot is committed by another thread, not before, and never on a snapshot
that misses a tag, a label, the source or the time bound."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pendulum
import pytest
from airflow.sdk.exceptions import AirflowSensorTimeout, TaskDeferred

from airflow_provider_pgplakar.sensors.snapshot import PgPlakarSnapshotSensor, SnapshotWaitFailed
from airflow_provider_pgplakar.store.repo import Store
from airflow_provider_pgplakar.store.stats import parse_newer_than
from airflow_provider_pgplakar.triggers.snapshot import PgPlakarSnapshotTrigger
from tests.task_context import FakeTI, context

PASSPHRASE = "sensor-tests passphrase"
SALES = "postgres://u@db1:5432/sales"


@pytest.fixture
def location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("PGPLAKAR_KDF", "1,8192,1")
    monkeypatch.setenv("PGPLAKAR_CACHE_DIR", str(tmp_path / "cache"))
    loc = str(tmp_path / "store")
    monkeypatch.setenv("AIRFLOW_CONN_WAIT_STORE", json.dumps(
        {"conn_type": "pgplakar_store", "password": PASSPHRASE, "extra": {"location": loc}}))
    Store.create(loc, PASSPHRASE).close()
    return loc


def put(location: str, origin: str = SALES, tags: tuple[str, ...] = ("nightly",), hours_ago: float = 0,
        **labels: str) -> str:
    with Store.open(location, PASSPHRASE) as st, st.writer(
            source={"kind": origin.partition("://")[0], "origin": origin}, tags=list(tags), labels=labels) as w:
        if hours_ago:
            w._start = pendulum.now("UTC").subtract(seconds=int(hours_ago * 3600))
        w.add_bytes("/dump", f"{origin} {tags} {labels}".encode())
    return w.snapshot_id


def later(delay: float, fn, *args, **kwargs) -> dict:  # noqa: ANN001
    """Run fn after delay seconds in a thread; the result lands in the returned dict under "value"."""
    out: dict = {}

    def go() -> None:
        time.sleep(delay)
        out["value"] = fn(*args, **kwargs)

    threading.Thread(target=go, daemon=True).start()
    return out


def decoys(location: str) -> None:
    """Snapshots that must not end a wait for tag nightly + label dag_id=nightly + source */sales + newer than 1h."""
    put(location, tags=("weekly",), dag_id="nightly")  # wrong tag
    put(location, dag_id="other")  # wrong label
    put(location, origin="postgres://u@db1:5432/crm", dag_id="nightly")  # wrong source
    put(location, hours_ago=5, dag_id="nightly")  # too old
    put(location, origin="pgplakar-verify://x", tags=("nightly",), dag_id="nightly")  # not a backup source


async def first_event(trigger: PgPlakarSnapshotTrigger, timeout: float = 30) -> dict:
    gen = trigger.run()
    try:
        event = await asyncio.wait_for(gen.__anext__(), timeout)
    finally:
        await gen.aclose()
    return event.payload


def test_trigger_serializes_and_round_trips() -> None:
    trig = PgPlakarSnapshotTrigger(store_conn_id="s", tags=["a"], labels={"dag_id": "d"}, source="postgres:*",
                                   newer_than="2026-01-01T00:00:00+00:00", poll_interval=5)
    path, kwargs = trig.serialize()
    assert path == "airflow_provider_pgplakar.triggers.snapshot.PgPlakarSnapshotTrigger"
    json.dumps(kwargs)  # plain JSON values
    import importlib

    module, _, name = path.rpartition(".")
    again = getattr(importlib.import_module(module), name)(**kwargs)
    assert again.serialize() == (path, kwargs)


def test_trigger_run_fires_only_for_a_matching_snapshot(location: str) -> None:
    decoys(location)
    bound = parse_newer_than("1h").isoformat()
    trig = PgPlakarSnapshotTrigger(store_conn_id="wait_store", tags=["nightly"], labels={"dag_id": "nightly"},
                                   source="postgres:*/sales", newer_than=bound, poll_interval=0.2)
    started = time.monotonic()
    made = later(1.5, put, location, dag_id="nightly", map_index="3")
    payload = asyncio.run(first_event(trig))
    assert time.monotonic() - started >= 1.5  # not fired by a decoy
    assert payload == {"status": "success", "snapshot_id": made["value"], "source": "postgres:db1:5432/sales",
                       "time": payload["time"]}


def test_trigger_reports_an_unreadable_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_NO_STORE", json.dumps(
        {"conn_type": "pgplakar_store", "password": PASSPHRASE, "extra": {"location": str(tmp_path / "none")}}))
    payload = asyncio.run(first_event(PgPlakarSnapshotTrigger(store_conn_id="no_store", poll_interval=0.1)))
    assert payload["status"] == "error" and "no store at" in payload["message"] and PASSPHRASE not in payload["message"]


def test_sensor_pokes_until_the_backup_lands(location: str) -> None:
    decoys(location)
    sensor = PgPlakarSnapshotSensor(task_id="wait", store_conn_id="{{ params.store }}", tags=["nightly"],
                                    labels={"dag_id": "{{ params.dag }}"}, source="postgres:*/sales",
                                    newer_than="1h", poke_interval=0.3, timeout=60)
    ctx = context(FakeTI(task_id="wait"), store="wait_store", dag="nightly")
    sensor.render_template_fields(ctx)
    made = later(1.5, put, location, dag_id="nightly")
    assert sensor.execute(ctx) == made["value"]

    nothing = PgPlakarSnapshotSensor(task_id="wait", store_conn_id="wait_store", tags=["never"], poke_interval=0.2,
                                     timeout=1)
    with pytest.raises(AirflowSensorTimeout):
        nothing.execute(context(FakeTI(task_id="wait")))


def test_sensor_deferrable(location: str) -> None:
    sensor = PgPlakarSnapshotSensor(task_id="wait", store_conn_id="wait_store", tags=["nightly"],
                                    newer_than="2026-01-01T00:00:00Z", deferrable=True, poke_interval=0.2,
                                    timeout=120)
    ctx = context(FakeTI(task_id="wait"))
    with pytest.raises(TaskDeferred) as exc:  # nothing yet: the wait moves to the triggerer
        sensor.execute(ctx)
    deferred = exc.value
    assert deferred.method_name == "execute_complete" and deferred.timeout.total_seconds() == 120
    trigger = deferred.trigger
    assert isinstance(trigger, PgPlakarSnapshotTrigger)
    assert trigger.serialize()[1]["newer_than"] == "2026-01-01T00:00:00+00:00"
    made = later(1.0, put, location)
    event = asyncio.run(first_event(trigger))
    assert sensor.execute_complete(ctx, event) == made["value"]

    # already there: no deferral at all
    assert sensor.execute(ctx) == made["value"]
    with pytest.raises(SnapshotWaitFailed, match="no store at"):
        sensor.execute_complete(ctx, {"status": "error", "message": "StoreNotFound: no store at /x"})


def test_bad_arguments_fail_at_parse_time() -> None:
    with pytest.raises(ValueError, match="newer_than"):
        PgPlakarSnapshotSensor(task_id="w", newer_than="yesterday-ish")
    with pytest.raises(ValueError, match="list of tags"):
        PgPlakarSnapshotSensor(task_id="w", tags="nightly")
