"""Suite-wide pytest configuration.

The environment block below must run before anything imports airflow: Airflow reads its config
(and creates ``AIRFLOW_HOME``) at import time, so setting it later would let tests touch the
developer's real ``~/airflow`` and its database.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

_AIRFLOW_HOME = tempfile.mkdtemp(prefix="pgplakar-airflow-home-")
atexit.register(shutil.rmtree, _AIRFLOW_HOME, ignore_errors=True)
os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO_ROOT / "example_dags")
# prune's waits (the settle time after an intent, the grace period of unindexed packs) are for real clocks and
# slow uploads; tests that exercise them set their own values
os.environ.setdefault("PGPLAKAR_PRUNE_SETTLE", "0")
os.environ.setdefault("PGPLAKAR_PRUNE_GRACE", "0")

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

pytest_plugins = ["tests.s3_server", "tests.pgservers"]


@pytest.fixture(scope="session")
def airflow_db() -> Iterator[None]:
    """Create the Airflow metadata DB (sqlite in the temp ``AIRFLOW_HOME``) once, only for tests that ask."""
    from airflow.utils import db

    db.initdb()
    yield


@pytest.fixture(autouse=True)
def _signal_handlers() -> Iterator[None]:
    """A task run in-process (``dag.test()``) leaves Airflow's SIGTERM and SIGALRM handlers installed: the pytest
    process would then shrug off the SIGTERM that stops a hung run. Each test ends with the handlers it began with."""
    kept = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
    yield
    for sig, handler in kept.items():
        signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def _uncancelled() -> Iterator[None]:
    """The cancellation of pg/process.py is process-wide (one task per process in Airflow): a test that cancels
    must not cancel the tests after it."""
    from airflow_provider_pgplakar.pg.process import reset_cancellation

    reset_cancellation()
    yield
    reset_cancellation()
