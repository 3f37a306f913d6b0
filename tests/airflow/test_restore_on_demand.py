"""``example_dags/pgplakar_restore_on_demand.py`` with ``dag.test()`` on a real PostgreSQL 15, and its planning code.

The human-in-the-loop answer is recorded the way the API server's ``PATCH .../hitlDetails`` does it (the response
columns, then ``handle_event_submit`` moves the parked task back to SCHEDULED), from a thread while ``dag.test()``
waits; ``tests/airflow/test_real_scheduler.py`` answers through the real REST API instead.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_pgplakar.pg import PgError
from airflow_provider_pgplakar.pg.logical import logical_backup
from airflow_provider_pgplakar.pg.options import parse_source_options
from airflow_provider_pgplakar.store.repo import Store
from tests.conftest import REPO_ROOT
from tests.pgservers import PgServer

PASSPHRASE = "on-demand restore passphrase"
DAG_FILE = REPO_ROOT / "example_dags" / "pgplakar_restore_on_demand.py"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg15: PgServer) -> None:
    monkeypatch.setenv("PGPLAKAR_KDF", "1,8192,1")
    monkeypatch.setenv("PGPLAKAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AIRFLOW_CONN_POSTGRES_DEFAULT", json.dumps({
        "conn_type": "postgres", "host": pg15.host, "port": pg15.port, "login": pg15.superuser,
        "password": pg15.password, "extra": {"pg_bin_dir": str(pg15.bin_dir)}}))
    monkeypatch.setenv("AIRFLOW_CONN_PGPLAKAR_STORE_DEFAULT", json.dumps(
        {"conn_type": "pgplakar", "password": PASSPHRASE, "extra": {"location": str(tmp_path / "store")}}))
    Store.create(str(tmp_path / "store"), PASSPHRASE).close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(str(tmp_path / "store"), PASSPHRASE) as st:
        yield st


def _source_opts(server: PgServer, database: str) -> Any:
    return parse_source_options(f"postgres:///{database}", {
        "host": server.host, "port": str(server.port), "username": server.superuser, "password": server.password,
        "pg_bin_dir": str(server.bin_dir)})


@pytest.fixture
def backed_up(pg15: PgServer, store: Store) -> tuple[str, str]:
    """A database with 300 rows, backed up; afterwards 5 more rows and a table the snapshot does not have."""
    name = f"od_{secrets.token_hex(4)}"
    with pg15.connect() as c:
        c.execute(f'CREATE DATABASE "{name}"')
    with pg15.connect(name) as c:
        c.execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric)")
        c.execute("INSERT INTO orders SELECT g, g * 1.5 FROM generate_series(1, 300) g")
    sid = logical_backup(store, _source_opts(pg15, name)).snapshot_id
    with pg15.connect(name) as c:
        c.execute("INSERT INTO orders SELECT g, 0 FROM generate_series(301, 305) g")
        c.execute("CREATE TABLE added_later (x int)")
    return name, sid


def _state(server: PgServer, database: str) -> tuple[int, bool]:
    with server.connect(database) as c:
        rows = c.execute("SELECT count(*) FROM orders").fetchone()[0]
        later = c.execute("SELECT to_regclass('public.added_later') IS NOT NULL").fetchone()[0]
    return rows, later


def _dag() -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    return bag.dags["pgplakar_restore_on_demand"]


class Responder(threading.Thread):
    """Answers the ``approve`` task waiting for input, as ``PATCH .../hitlDetails`` would, until the run ends. If it
    cannot (an error, or no request within ``timeout``), it fails the waiting task so that ``dag.test()`` returns.

    ``dag.test()`` (Airflow 3.3, ``_run_task``) writes the state the task reported (AWAITING_INPUT) back to the database
    after the in-process run returns, and the execution API has already committed that state a moment before: an
    answer given in between is overwritten and the run waits forever (a CI run hung 80 minutes on it). So a request
    that is still waiting after it was answered gets the same answer submitted again."""

    def __init__(self, option: str, timeout: float = 300.0) -> None:
        super().__init__(daemon=True)
        self.option = option
        self.timeout = timeout
        self.answered: dict[str, Any] = {}
        self.resubmitted = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.stop.wait(0.2):
            try:
                self._answer()
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.error = e
            if self.error is not None or (not self.answered and time.monotonic() > deadline):
                self.error = self.error or TimeoutError("no approval request appeared")
                self._fail_waiting_task()
                return

    @staticmethod
    def _waiting(session: Any) -> Any:
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.state import TaskInstanceState
        from sqlalchemy import select
        from sqlalchemy.orm import joinedload

        return session.scalar(select(TaskInstance).where(
            TaskInstance.dag_id == "pgplakar_restore_on_demand", TaskInstance.task_id == "approve",
            TaskInstance.state == TaskInstanceState.AWAITING_INPUT).options(joinedload(TaskInstance.hitl_detail)))

    def _answer(self) -> None:
        from airflow.models.trigger import handle_event_submit
        from airflow.triggers.base import TriggerEvent
        from airflow.utils.session import create_session

        with create_session() as session:
            ti = self._waiting(session)
            if ti is None or ti.hitl_detail is None:
                return
            detail = ti.hitl_detail
            if detail.responded_at is None:
                self.answered = {"subject": detail.subject, "body": detail.body, "options": list(detail.options),
                                 "defaults": detail.defaults}
                detail.responded_by = {"id": "tester", "name": "tester"}
                detail.responded_at = datetime.now(UTC)
                detail.chosen_options = [self.option]
                detail.params_input = {}
            else:  # answered, then put back to waiting by dag.test() (see the class docstring)
                self.resubmitted += 1
            handle_event_submit(TriggerEvent(detail.as_resume_event_payload()), task_instance=ti, session=session)

    def _fail_waiting_task(self) -> None:
        from airflow.utils.session import create_session
        from airflow.utils.state import TaskInstanceState

        with create_session() as session:
            ti = self._waiting(session)
            if ti is not None:
                ti.state = TaskInstanceState.FAILED


def _run(dag: Any, conf: dict[str, Any], answer: str | None = None) -> tuple[Any, Responder | None]:
    responder = Responder(answer) if answer else None
    if responder:
        responder.start()
    try:
        dr = dag.test(logical_date=None, run_conf=conf)
    finally:
        if responder:
            responder.stop.set()
            responder.join()
    assert responder is None or responder.error is None, responder.error
    return dr, responder


def _states(dr: Any) -> dict[str, str | None]:
    return {ti.task_id: ti.state for ti in dr.get_task_instances()}


def test_plan_is_logged_and_a_wrong_confirmation_changes_nothing(pg15: PgServer, backed_up: tuple[str, str],
                                                                 caplog: pytest.LogCaptureFixture,
                                                                 capfd: pytest.CaptureFixture[str],
                                                                 airflow_db: None) -> None:
    name, sid = backed_up
    caplog.set_level("INFO")
    dr, _ = _run(_dag(), {"databases": [name], "recreate": True, "confirm": f"{name}x"})
    states = _states(dr)
    assert dr.state == "failed" and states["plan"] == "failed", states
    assert states["approve"] == "upstream_failed" and states["restore_logical"] != "success"
    assert _state(pg15, name) == (305, True)  # untouched
    out, err = capfd.readouterr()
    text = caplog.text + out + err  # the task's own log lines, and the task runner's (the failure) on stdout
    assert f"restore plan: logical snapshot {sid[:8]}" in text
    assert f"DROP DATABASE '{name}'" in text and "everything in it now is lost" in text
    assert "roles/tablespaces: skipped (no_globals)" in text and "DESTRUCTIVE" in text
    assert f"confirm: type the restore's target(s) exactly to confirm: {name} (got '{name}x'); nothing was " \
           "changed" in text
    assert pg15.password not in text and PASSPHRASE not in text


def test_approved_restore_recreates_the_database_from_the_snapshot(pg15: PgServer, backed_up: tuple[str, str],
                                                                   caplog: pytest.LogCaptureFixture,
                                                                   airflow_db: None) -> None:
    name, sid = backed_up
    caplog.set_level("INFO")
    dr, responder = _run(_dag(), {"snapshot": sid[:10], "databases": [name], "recreate": True,
                                  "confirm": f" {name} "}, answer="Approve")
    states = _states(dr)
    assert dr.state == "success", states
    assert states == {"plan": "success", "approve": "success", "route": "success", "restore_logical": "success",
                      "restore_physical": "skipped"}
    assert responder is not None and responder.answered["options"] == ["Approve", "Reject"]
    assert responder.answered["defaults"] == ["Reject"]
    assert responder.answered["subject"] == f"Restore logical snapshot {sid[:8]} into {name}?"
    assert f"DROP DATABASE '{name}'" in responder.answered["body"]  # the approver sees the plan
    assert _state(pg15, name) == (300, False)  # as in the snapshot: later rows and table gone
    plan = dr.get_task_instance("plan").xcom_pull(task_ids="plan")
    assert plan["snapshot_id"] == sid and plan["target_names"] == [name] and plan["destructive"] is True
    summary = dr.get_task_instance("restore_logical").xcom_pull(task_ids="restore_logical")
    assert summary["ok"] and [r["database"] for r in summary["records"] if r["status"] == "restored"] == [name]
    assert caplog.text.count(f"restore of snapshot {sid[:8]}") == 1


def test_rejected_restore_skips_the_restore(pg15: PgServer, backed_up: tuple[str, str], airflow_db: None) -> None:
    name, _ = backed_up
    dr, _ = _run(_dag(), {"databases": [name], "clean": True, "confirm": name}, answer="Reject")
    states = _states(dr)
    assert states["approve"] == "success" and states["route"] == "skipped", states
    assert states["restore_logical"] == "skipped" and states["restore_physical"] == "skipped"
    assert _state(pg15, name) == (305, True)


def test_an_answer_dag_test_overwrites_is_given_again(pg15: PgServer, backed_up: tuple[str, str],
                                                     monkeypatch: pytest.MonkeyPatch, airflow_db: None) -> None:
    """The window in which ``dag.test()`` overwrites an answer (see ``Responder``), widened to 2 s: the answer is
    given inside it, lost, and given again. With a responder that answers once this run never ends."""
    from airflow.sdk.execution_time import supervisor

    in_process = supervisor.run_task_in_process

    def slow_to_return(*, ti: Any, task: Any) -> Any:
        result = in_process(ti=ti, task=task)
        if ti.task_id == "approve":
            time.sleep(2)
        return result

    monkeypatch.setattr(supervisor, "run_task_in_process", slow_to_return)
    name, _ = backed_up
    dr, responder = _run(_dag(), {"databases": [name], "clean": True, "confirm": name}, answer="Reject")
    assert responder is not None and responder.resubmitted >= 1
    assert _states(dr)["approve"] == "success" and _state(pg15, name) == (305, True)


def test_planning_refusals(pg15: PgServer, store: Store, backed_up: tuple[str, str], tmp_path: Path) -> None:
    """Each refusal is one line naming the fix, decided from reads only."""
    from airflow_provider_pgplakar.hooks.postgres import PgPlakarPostgresHook
    from airflow_provider_pgplakar.pg import OptionError
    from airflow_provider_pgplakar.pg.restore_plan import (
        ConfirmationMismatch,
        check_confirmation,
        pick_snapshot,
        plan_logical_restore,
        plan_physical_restore,
    )

    name, sid = backed_up
    hook = PgPlakarPostgresHook()
    # latest with a source filter; an ID of the wrong kind or outside the filter is refused, not replaced
    assert pick_snapshot(store, "latest", kind="logical", source_contains=name).id == sid
    with pytest.raises(PgError, match="no physical snapshot in the store"):
        pick_snapshot(store, "latest", kind="physical")
    with pytest.raises(PgError, match=f"snapshot {sid[:8]} .* is not a physical backup"):
        pick_snapshot(store, sid, kind="physical")
    with pytest.raises(PgError, match="no logical snapshot .* source_contains='elsewhere'"):
        pick_snapshot(store, "latest", kind="logical", source_contains="elsewhere")
    snap = store.load_snapshot(sid)
    # restoring into a database the target lacks, without recreate
    opts = hook.restore_options({"databases": name, "database": f"{name}_missing"}).options
    with pytest.raises(PgError, match=f"database '{name}_missing' does not exist on the target server: set "
                                      "recreate=true"):
        plan_logical_restore(store, snap, opts)
    with pytest.raises(OptionError, match="clean and recreate are mutually exclusive"):
        hook.restore_options({"clean": "true", "recreate": "true"})
    into = plan_logical_restore(store, snap, hook.restore_options({"databases": name, "database": "postgres"}).options)
    assert [(t.target, t.action) for t in into.targets] == [("postgres", "restore-into")] and not into.destructive
    with pytest.raises(ConfirmationMismatch, match="nothing was changed"):
        check_confirmation(into, "")
    check_confirmation(into, "postgres")
    # physical: a non-empty directory is refused before anything is written
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "PG_VERSION").write_text("15")
    with pytest.raises(PgError, match="exists and is not an empty directory"):
        plan_physical_restore(snap, str(busy))
    with pytest.raises(PgError, match="give an absolute directory"):
        plan_physical_restore(snap, "relative/dir")
    fresh = plan_physical_restore(snap, str(tmp_path / "new"))
    assert fresh.target_names() == [str(tmp_path / "new")] and not fresh.destructive


def test_params_form_validates(airflow_db: None) -> None:
    """The trigger form's schema refuses a malformed snapshot reference and an unknown kind before any task runs."""
    from airflow.sdk.definitions.param import ParamsDict

    dag = _dag()
    params = ParamsDict(dag.params)
    with pytest.raises(Exception, match="does not match"):
        params.update({"snapshot": "not-an-id"})
        params.validate()
    params = ParamsDict(dag.params)
    with pytest.raises(Exception, match="is not one of"):
        params.update({"kind": "both"})
        params.validate()
    ok = ParamsDict(dag.params)
    ok.update({"snapshot": "ABCD1234", "databases": ["shop"], "confirm": "shop"})
    assert ok.validate()["snapshot"] == "ABCD1234"
    assert not set(dag.params) & {"password", "passphrase", "key"}  # no secret is ever a Param


def test_params_refuse_a_comma_inside_a_database_name(airflow_db: None) -> None:
    from airflow.sdk.definitions.param import ParamsDict

    params = ParamsDict(_dag().params)
    with pytest.raises(Exception, match="does not match"):
        params.update({"databases": ["a,b"]})
        params.validate()


def test_restore_waits_for_the_approval(airflow_db: None) -> None:
    dag = _dag()
    assert dag.schedule is None or str(dag.timetable.summary) == "None"
    assert dag.get_task("approve").upstream_task_ids == {"plan"}
    assert dag.get_task("route").upstream_task_ids == {"approve"}
    assert dag.get_task("restore_logical").upstream_task_ids == {"route"}
    assert dag.get_task("restore_physical").upstream_task_ids == {"route"}
    assert not dag.get_task("restore_physical").overwrite


def test_approved_physical_restore_writes_a_new_data_directory(pg_factory: Any, pg_manager: Any, store: Store,
                                                               airflow_db: None) -> None:
    """kind=physical: ``latest`` picks the base backup (not the newer logical one), the confirmation is the target
    directory, and the restore writes and verifies a data directory there."""
    from airflow_provider_pgplakar.pg.physical import physical_backup
    from tests.physical.conftest import phys_opts, scratch_dir

    src = pg_factory(15)
    physical_id = physical_backup(store, phys_opts(src)).snapshot_id
    logical_backup(store, _source_opts(src, "postgres"))  # newer, but not of the kind asked for
    target = scratch_dir(pg_manager, "on-demand")
    dr, responder = _run(_dag(), {"kind": "physical", "target_dir": str(target), "confirm": str(target),
                                  "pg_bin_dir": str(src.bin_dir)}, answer="Approve")
    states = _states(dr)
    assert dr.state == "success", states
    assert states["restore_physical"] == "success" and states["restore_logical"] == "skipped"
    assert responder is not None and str(target) in responder.answered["subject"]
    plan = dr.get_task_instance("plan").xcom_pull(task_ids="plan")
    assert plan["snapshot_id"] == physical_id and plan["kind"] == "physical" and plan["destructive"] is False
    summary = dr.get_task_instance("restore_physical").xcom_pull(task_ids="restore_physical")
    assert summary["snapshot_id"] == physical_id and summary["verified"] is True
    assert (target / "PG_VERSION").read_text().strip() == "15"
