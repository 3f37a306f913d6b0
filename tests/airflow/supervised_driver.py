"""Run one DAG under Airflow's real task supervisor, for tests/airflow/test_supervised_kill.py.

``python -m tests.airflow.supervised_driver DAG_FILE CONTROL_DIR`` (with ``AIRFLOW_HOME``, ``DAGS_FOLDER`` and the
connections in the environment) runs ``dag.test()``, except that each task goes through
``airflow.sdk.execution_time.supervisor.supervise_task`` (what a worker runs: the task in a forked subprocess, the
supervisor heartbeating it through the execution API, served in-process here) instead of in-process execution.

``CONTROL_DIR/mark-failed`` appearing makes it mark the running task instance failed, as a user does in the UI;
the supervisor then learns from its next heartbeat that the task should stop and terminates it (SIGTERM, which
calls ``on_kill``, then SIGKILL after a grace period). ``CONTROL_DIR/result.json`` gets the final states.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any


def _mark_failed_on_request(control: Path, dag_id: str) -> None:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    while not (control / "mark-failed").exists():
        time.sleep(0.1)
    with create_session() as session:
        for ti in session.scalars(select(TaskInstance).where(TaskInstance.dag_id == dag_id)):
            if ti.state == TaskInstanceState.RUNNING:
                ti.set_state(TaskInstanceState.FAILED, session=session)
    (control / "marked").touch()


def main() -> None:
    dag_file, control = Path(sys.argv[1]), Path(sys.argv[2])
    from airflow.utils import db

    db.initdb()
    spec = importlib.util.spec_from_file_location("supervised_dag", dag_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.dag

    from airflow.api_fastapi.execution_api.app import InProcessExecutionAPI
    from airflow.executors import workloads
    from airflow.sdk.api.client import Client
    from airflow.sdk.definitions import dag as dag_module
    from airflow.sdk.execution_time.supervisor import supervise_task
    from airflow.utils.state import TaskInstanceState

    api = InProcessExecutionAPI()
    exit_codes: dict[str, int] = {}

    def supervised(*, ti: Any, task: Any, run_triggerer: bool = False) -> None:
        ti.set_state(TaskInstanceState.QUEUED)  # what the scheduler hands an executor
        workload = workloads.ExecuteTask.make(ti, dag_rel_path=Path(dag_file.name),
                                              bundle_info=workloads.BundleInfo(name="dags-folder"))
        client = Client(base_url=None, token="", dry_run=True, transport=api.transport)
        client.base_url = "http://in-process.invalid./"  # as Airflow's dag processor and triggerer do
        (control / "started").write_text(ti.task_id)
        exit_codes[ti.task_id] = supervise_task(ti=workload.ti, bundle_info=workload.bundle_info,
                                                dag_rel_path=workload.dag_rel_path, token=workload.token,
                                                client=client, log_path="task.log")

    dag_module._run_task = supervised
    threading.Thread(target=_mark_failed_on_request, args=(control, dag.dag_id), daemon=True).start()
    dr = dag.test()
    states = {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}
    (control / "result.json").write_text(json.dumps({"dag_run": str(dr.state), "tasks": states,
                                                     "exit_codes": exit_codes}))


if __name__ == "__main__":
    main()
