"""A real Airflow deployment, not ``dag.test()``: api-server, scheduler and dag-processor processes with the
LocalExecutor and a PostgreSQL metadata database, on loopback, with ``AIRFLOW_HOME`` in a temp directory.

``dag.test()`` runs tasks in-process from the DAG object it was given; here the dag-processor parses every example
DAG file (no import error allowed), the scheduler schedules from the serialized DAGs and hands the tasks to the
executor's worker processes, which talk to the API server's execution API, exactly as in a deployment (issue 11
§6/§7: ``pgplakar_weekly_physical`` failed on every manual trigger there and nowhere in ``dag.test()``).
Everything goes through the public REST API with a JWT from the simple auth manager's ``/auth/token``:

* ``pgplakar_nightly_backup`` triggered with no logical date (as the UI's trigger button and most API clients do):
  task states, the snapshot ID as XCom, an Asset event per database with the snapshot ID in its ``extra``, the
  scratch database ``*_restore_check`` left out of the snapshot;
* ``pgplakar_verify_after_backup``, scheduled on the Asset alias ``pgplakar-backups``: the backup's events trigger
  it (a run of type ``asset_triggered``, no one calls the API for it), it picks the snapshot ID out of the
  events and verifies that snapshot in a throwaway server (the proof snapshot in the store says so);
* ``pgplakar_restore_on_demand``: the plan, the human-in-the-loop approval answered with
  ``PATCH .../hitlDetails``, then the restore, checked on the restored rows;
* no secret (PostgreSQL password, store passphrase) in any task log file, rendered template field, XCom or Asset
  event.

It takes one to a few minutes (three Airflow processes starting on a shared machine), so it is marked slow; it runs
in the default test command all the same.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from airflow_provider_pgplakar.store.repo import Store
from tests.conftest import REPO_ROOT
from tests.pgservers import PgManager, PgServer

pytestmark = pytest.mark.slow

PASSPHRASE = "real-scheduler store passphrase"
ADMIN_PASSWORD = secrets.token_urlsafe(12)
# every example DAG is parsed; these run (the verify one only when the backup's Asset events trigger it)
RUN = ("pgplakar_nightly_backup", "pgplakar_restore_on_demand", "pgplakar_verify_after_backup")
START_TIMEOUT = 300.0
RUN_TIMEOUT = 420.0
# Variables of the suite's own in-process Airflow that must not leak into the deployment.
_SUITE_ONLY = ("AIRFLOW__CORE__UNIT_TEST_MODE", "AIRFLOW__CORE__DAGS_FOLDER", "AIRFLOW_HOME")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Deployment:
    home: Path
    base_url: str
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    token: str = ""

    def request(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - loopback URL we built
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{method} {path}: HTTP {e.code}: {e.read().decode()[:2000]}") from None
        return json.loads(text) if text else None

    def alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"airflow {name} exited with {proc.returncode}:\n{self.output(name)}")

    def output(self, name: str, tail: int = 6000) -> str:
        path = self.home / f"{name}.out"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def wait(self, what: str, check: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            self.alive()
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{self.output(n, 3000)}" for n in self.procs)
                raise AssertionError(f"timed out waiting for {what}\n{logs}")
            time.sleep(1.0)

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        run = self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
        assert run["logical_date"] is None
        return run["dag_run_id"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        tis = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {ti["task_id"]: ti["state"] for ti in tis}

    def finished(self, dag_id: str, run_id: str, timeout: float = RUN_TIMEOUT) -> str:
        def done() -> str | None:
            state = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]
            return state if state in ("success", "failed") else None

        return self.wait(f"{dag_id} run {run_id}", done, timeout)

    def report(self, dag_id: str, run_id: str) -> str:
        """The run's task states and the logs of its failed tasks: what a CI failure needs to be understood."""
        tis = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        parts = [repr({ti["task_id"]: ti["state"] for ti in tis})]
        for ti in tis:
            if ti["state"] == "failed":
                log = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/"
                                          f"{ti['task_id']}/logs/{max(1, ti['try_number'])}?full_content=true")
                lines = [e.get("event", "") if isinstance(e, dict) else str(e) for e in log.get("content", [])]
                parts.append(f"--- {ti['task_id']} (try {ti['try_number']}):\n" + "\n".join(map(str, lines))[-6000:])
        parts += [f"--- {n}\n{self.output(n, 3000)}" for n in self.procs]
        return "\n".join(parts)

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        entry = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/"
                                    "return_value?deserialize=true")
        return entry["value"]

    def rendered_fields(self, dag_id: str, run_id: str) -> list[Any]:
        tis = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return [ti.get("rendered_fields") for ti in tis]

    def start(self, name: str, argv: list[str], **env: str) -> None:
        with open(self.home / f"{name}.out", "ab") as out:
            self.procs[name] = subprocess.Popen(  # noqa: S603 - argv of the venv's airflow, no shell
                [_airflow(), *argv], env={**self.env, **env}, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def restart_scheduler(self, **env: str) -> None:
        proc = self.procs.pop("scheduler")
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        self.start("scheduler", ["scheduler"], **env)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def _airflow() -> str:
    airflow = Path(sys.executable).with_name("airflow")
    assert airflow.is_file(), f"airflow CLI not installed next to {sys.executable}"
    return str(airflow)


@pytest.fixture(scope="module")
def source(pg_manager: PgManager) -> Iterator[PgServer]:
    """The cluster the DAGs back up and restore into: its own small server (a full-cluster backup of the
    suite's shared server would dump every other test's databases)."""
    server = pg_manager.start(15)
    yield server
    pg_manager.discard(server)


@pytest.fixture(scope="module")
def deployment(pg15: PgServer, source: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    home = tmp_path_factory.mktemp("airflow-deployment")
    dags = home / "dags"
    dags.mkdir()
    example_dags = sorted((REPO_ROOT / "example_dags").glob("pgplakar_*.py"))
    for path in example_dags:
        (dags / path.name).write_text(path.read_text())
    store_dir = home / "store"
    Store.create(str(store_dir), PASSPHRASE).close()

    meta_db = f"airflow_meta_{secrets.token_hex(4)}"
    with pg15.connect() as c:
        c.execute(f'CREATE DATABASE "{meta_db}"')
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    (home / "passwords.json").write_text(json.dumps({"admin": ADMIN_PASSWORD}))
    from cryptography.fernet import Fernet

    env = {k: v for k, v in os.environ.items() if k not in _SUITE_ONLY and not k.startswith("AIRFLOW_CONN_")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",  # only RUN are unpaused
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base_url}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": (f"postgresql+psycopg2://{pg15.superuser}:{pg15.password}@"
                                                f"{pg15.host}:{pg15.port}/{meta_db}"),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": base_url,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # only the runs the test triggers (until the test turns it on)
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        # the DAGs' connections, as a deployment's secrets backend or environment would provide them
        "AIRFLOW_CONN_POSTGRES_DEFAULT": json.dumps({
            "conn_type": "postgres", "host": source.host, "port": source.port, "login": source.superuser,
            "password": source.password, "extra": {"pg_bin_dir": str(source.bin_dir)}}),
        "AIRFLOW_CONN_PGPLAKAR_STORE_DEFAULT": json.dumps(
            {"conn_type": "pgplakar", "password": PASSPHRASE, "extra": {"location": str(store_dir)}}),
        "PGPLAKAR_KDF": "1,8192,1",
        "PGPLAKAR_CACHE_DIR": str(home / "cache"),
    })
    dep = Deployment(home, base_url, env)
    migrate = subprocess.run(  # noqa: S603 - argv of the venv's airflow, no shell
        [_airflow(), "db", "migrate"], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
    try:
        for name, argv in (("api-server", ["api-server", "--port", str(port), "--host", "127.0.0.1"]),
                           ("scheduler", ["scheduler"]), ("dag-processor", ["dag-processor"])):
            dep.start(name, argv)

        def token() -> str | None:
            try:
                return dep.request("POST", "/auth/token", {"username": "admin", "password": ADMIN_PASSWORD},
                                   auth=False)["access_token"]
            except (AssertionError, OSError):
                return None

        dep.token = dep.wait("the API server", token, START_TIMEOUT)

        def parsed() -> bool:
            errors = dep.request("GET", "/api/v2/importErrors")
            assert errors["total_entries"] == 0, errors
            listed = dep.request("GET", "/api/v2/dags?dag_id_pattern=pgplakar&limit=100")["total_entries"]
            return listed == len(example_dags)

        dep.wait("the dag-processor to parse every example DAG", parsed, START_TIMEOUT)
        for dag_id in RUN:
            dep.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        yield dep
    finally:
        dep.stop()


def _rows(server: PgServer, database: str) -> int:
    with server.connect(database) as c:
        return c.execute("SELECT count(*) FROM orders").fetchone()[0]


def test_backup_and_approved_restore_through_the_rest_api(deployment: Deployment, source: PgServer) -> None:
    dep = deployment
    with source.connect() as c:
        c.execute("CREATE DATABASE shop")
        c.execute("CREATE DATABASE shop_restore_check")  # a scratch database: never backed up
    with source.connect("shop") as c:
        c.execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric)")
        c.execute("INSERT INTO orders SELECT g, g * 2 FROM generate_series(1, 1000) g")

    # 1. the nightly backup, triggered like the UI's button (no logical date)
    run = dep.trigger("pgplakar_nightly_backup", {})
    assert dep.finished("pgplakar_nightly_backup", run) == "success", dep.report("pgplakar_nightly_backup", run)
    assert dep.task_states("pgplakar_nightly_backup", run) == {"backup": "success", "manifest": "success"}
    snapshot_id = dep.xcom("pgplakar_nightly_backup", run, "backup")
    with Store.open(str(dep.home / "store"), PASSPHRASE) as store:
        header = store.load_snapshot(snapshot_id).header
    assert header["labels"]["run_id"] == run and header["labels"]["dag_id"] == "pgplakar_nightly_backup"
    assert "shop" in header["meta"]["databases"] and "shop_restore_check" not in header["meta"]["databases"]
    events = dep.request("GET", "/api/v2/assets/events?source_dag_id=pgplakar_nightly_backup&source_task_id=backup"
                                f"&source_run_id={quote(run, safe='')}")["asset_events"]
    by_database = {(e["extra"] or {}).get("database"): e for e in events}
    assert by_database["shop"]["uri"] == f"pgplakar://{source.host}:{source.port}/shop"
    assert by_database["shop"]["extra"]["snapshot_id"] == snapshot_id and "shop_restore_check" not in by_database
    # The events queued a run of the DAG scheduled on their alias; a scheduler creates queued Asset-triggered runs
    # only with job scheduling on, which would also start the unpaused nightly DAG's cron run: pause it first.
    dep.request("PATCH", "/api/v2/dags/pgplakar_nightly_backup", {"is_paused": True})
    dep.restart_scheduler(AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="True")

    # 2. damage, then restore on demand: plan, human approval through the REST API, restore
    with source.connect("shop") as c:
        c.execute("DELETE FROM orders WHERE id > 10")
    restore = dep.trigger("pgplakar_restore_on_demand", {
        "snapshot": snapshot_id, "databases": ["shop"], "recreate": True, "confirm": "shop"})
    path = f"/api/v2/dags/pgplakar_restore_on_demand/dagRuns/{restore}/taskInstances"

    def awaiting() -> bool:
        states = dep.task_states("pgplakar_restore_on_demand", restore)
        assert states.get("plan") not in ("failed", "upstream_failed"), states
        return states.get("approve") == "awaiting_input"

    dep.wait("the approval request", awaiting, RUN_TIMEOUT)
    # Answer only once the scheduler has read the executor's event for the process that parked the task. An answer
    # before that races Airflow's own bookkeeping: the resumed try has the parked try's key, and when that event is
    # read after the resumed try was queued, the scheduler drops the new try from its running set and fails it as
    # "killed externally" (airflow/jobs/scheduler_job_runner.py, _process_executor_events). Seen twice under CI
    # load, once after a fixed 5 s wait.
    parked = re.compile(r"Received executor event with state \S+ for task instance TaskInstanceKey\(dag_id="
                        rf"'pgplakar_restore_on_demand', task_id='approve', run_id='{re.escape(restore)}'")
    dep.wait("the scheduler to read the parked approval's executor event",
             lambda: parked.search(dep.output("scheduler", tail=1 << 30)), RUN_TIMEOUT)
    assert _rows(source, "shop") == 10  # nothing restored before the approval
    detail = dep.request("GET", f"{path}/approve/-1/hitlDetails")
    assert detail["options"] == ["Approve", "Reject"]
    assert "DROP DATABASE 'shop'" in detail["body"] and snapshot_id[:8] in detail["subject"]
    dep.request("PATCH", f"{path}/approve/-1/hitlDetails", {"chosen_options": ["Approve"], "params_input": {}})
    assert dep.finished("pgplakar_restore_on_demand", restore) == "success", \
        dep.report("pgplakar_restore_on_demand", restore)
    assert dep.task_states("pgplakar_restore_on_demand", restore) == {
        "plan": "success", "approve": "success", "route": "success", "restore_logical": "success",
        "restore_physical": "skipped"}
    assert _rows(source, "shop") == 1000
    plan = dep.xcom("pgplakar_restore_on_demand", restore, "plan")
    assert plan["snapshot_id"] == snapshot_id and plan["target_names"] == ["shop"]
    summary = dep.xcom("pgplakar_restore_on_demand", restore, "restore_logical")
    assert summary["ok"] and summary["snapshot"] == snapshot_id

    # 3. the backup's Asset events triggered the DAG scheduled on the alias, which verified that snapshot
    def verify_run() -> dict[str, Any] | None:
        runs = dep.request("GET", "/api/v2/dags/pgplakar_verify_after_backup/dagRuns")["dag_runs"]
        done = [r for r in runs if r["state"] in ("success", "failed")]
        return done[0] if done else None

    verify = dep.wait("the Asset-triggered verify run", verify_run, RUN_TIMEOUT)
    verify_id = verify["dag_run_id"]
    assert (verify["run_type"], verify["state"]) == ("asset_triggered", "success"), \
        dep.report("pgplakar_verify_after_backup", verify_id)
    assert dep.xcom("pgplakar_verify_after_backup", verify_id, "snapshots") == [snapshot_id]
    consumed = dep.request("GET", f"/api/v2/dags/pgplakar_verify_after_backup/dagRuns/{quote(verify_id, safe='')}"
                                  "/upstreamAssetEvents")["asset_events"]
    assert f"pgplakar://{source.host}:{source.port}/shop" in {e["uri"] for e in consumed}
    with Store.open(str(dep.home / "store"), PASSPHRASE) as store:
        proofs = [s.header["labels"] for s in store.snapshots() if s.header["labels"].get("verifies")]
    assert [(p["verifies"], p["verify_status"], p["dag_id"]) for p in proofs] == [
        (snapshot_id, "passed", "pgplakar_verify_after_backup")]

    # 4. no secret in task logs, rendered template fields or XComs
    texts = [p.read_text(errors="replace") for p in (dep.home / "logs").rglob("*") if p.is_file()]
    assert any("restore plan: logical snapshot" in t for t in texts), "task logs not found"
    texts += [json.dumps(dep.rendered_fields(d, r)) for d, r in (("pgplakar_nightly_backup", run),
                                                                ("pgplakar_restore_on_demand", restore),
                                                                ("pgplakar_verify_after_backup", verify_id))]
    texts += [json.dumps([snapshot_id, plan, summary, events, consumed])]
    for secret in (source.password, PASSPHRASE):
        for text in texts:
            assert secret not in text
