"""Airflow discovers the provider through its entry point: a broken get_provider_info breaks every airflow command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import airflow_provider_pgplakar

PACKAGE = "airflow-provider-pgplakar"


def _json_list(stdout: str) -> list[dict]:
    """The JSON array in the CLI output, tolerating log lines Airflow may print around it."""
    for line in stdout.splitlines():
        if line.startswith("[{") or line.strip() == "[]":
            return json.loads(line)
    raise AssertionError(f"no JSON provider list in output:\n{stdout}")


def test_airflow_cli_lists_provider(tmp_path: Path) -> None:
    airflow = Path(sys.executable).with_name("airflow")
    assert airflow.is_file(), f"airflow CLI not installed next to {sys.executable}"
    # As a user runs it: own AIRFLOW_HOME, and without the suite's unit-test mode (it logs to stdout).
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW__CORE__UNIT_TEST_MODE"}
    env["AIRFLOW_HOME"] = str(tmp_path)
    result = subprocess.run(  # noqa: S603 - argv of the venv's airflow, no shell
        [str(airflow), "providers", "list", "-o", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    providers = {p["package_name"]: p for p in _json_list(result.stdout)}
    assert PACKAGE in providers, sorted(providers)
    assert providers[PACKAGE]["version"] == airflow_provider_pgplakar.__version__


def test_providers_manager_knows_provider() -> None:
    from airflow.providers_manager import ProvidersManager

    providers = ProvidersManager().providers
    assert PACKAGE in providers
    info = providers[PACKAGE]
    assert info.version == airflow_provider_pgplakar.__version__
    assert info.data["package-name"] == PACKAGE


def test_airflow_is_isolated_in_temp_home(airflow_db: None) -> None:
    """Tests must never touch a developer's ~/airflow: config and metadata DB live in the suite's temp home."""
    from airflow import settings
    from airflow.configuration import conf
    from sqlalchemy import inspect

    home = os.environ["AIRFLOW_HOME"]
    assert Path(home).name.startswith("pgplakar-airflow-home-")
    assert conf.get("database", "sql_alchemy_conn") == f"sqlite:///{home}/airflow.db"
    assert conf.get("core", "dags_folder") == str(Path(__file__).resolve().parent.parent / "example_dags")
    assert {"dag", "dag_run", "connection"} <= set(inspect(settings.engine).get_table_names())
