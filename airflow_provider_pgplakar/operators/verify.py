"""Verified restores in Airflow: thin glue over :func:`..pg.verify.verify_snapshot` (what ``pgplakar verify`` runs).

The task restores a logical snapshot into a throwaway PostgreSQL on the worker, compares it with the fingerprints
recorded at backup time, stores the report in the store as a small snapshot labelled ``verifies=<snapshot id>``
(with the run labels) and returns it as XCom. A failed verify fails the task after the report is stored: the
evidence is kept either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from ..hooks.store import PgPlakarStoreHook
from ..pg import OptionError
from ..pg.process import cancel
from .base import cancellable_execute, run_labels

if TYPE_CHECKING:
    from airflow.sdk import Context


class PgPlakarVerifyOperator(BaseOperator):
    """Prove a logical snapshot restores to exactly what was backed up; returns the report (a dict).

    :param snapshot_id: templated, e.g. ``{{ ti.xcom_pull(task_ids='backup') }}``; an ID prefix works.
    :param options: ``databases`` (list or comma-separated), ``amcheck`` (run ``pg_amcheck`` on the restored
        databases), ``pg_bin_dir`` (the verify server's binaries; default the newest installed major >= the
        source's); templated.
    :param target_conn_id: a postgres connection to a scratch server to verify into instead of a throwaway one
        (databases ``pgplakar_verify_<id>_<n>``, created and dropped by the task).
    :param store_report: keep the report in the store as a ``verifies=<snapshot id>`` snapshot (default True).
    :param fail_on_mismatch: raise (fail the task) when the verify fails (default True).
    """

    template_fields: Sequence[str] = ("snapshot_id", "options", "store_conn_id", "target_conn_id")
    ui_color = "#d5f5d0"

    def __init__(self, *, snapshot_id: str, store_conn_id: str = PgPlakarStoreHook.default_conn_name,
                 options: Mapping[str, Any] | None = None, store_report: bool = True, fail_on_mismatch: bool = True,
                 target_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target_conn_id = target_conn_id
        self.snapshot_id = snapshot_id
        self.store_conn_id = store_conn_id
        self.options = dict(options or {})
        self.store_report = store_report
        self.fail_on_mismatch = fail_on_mismatch

    @cancellable_execute
    def execute(self, context: Context) -> dict[str, Any]:
        from ..pg.verify import VerifyFailed, parse_verify_options, store_report, verify_snapshot

        opts = parse_verify_options(self.options)
        target = password = None
        if opts.target:
            raise OptionError("target", "use target_conn_id= (a postgres connection) in Airflow")
        if self.target_conn_id:
            from ..hooks.postgres import PgPlakarPostgresHook, password_source

            dest = PgPlakarPostgresHook(self.target_conn_id).restore_options()
            target, password = dest.options, password_source(dest.options, dest.aws_conn_id)
        with PgPlakarStoreHook(self.store_conn_id).get_store() as store:
            sid = store.resolve(str(self.snapshot_id).strip())
            report = verify_snapshot(store, sid, databases=opts.databases, amcheck=opts.amcheck,
                                     pg_bin_dir=opts.pg_bin_dir, target=target, password=password)
            if self.store_report:
                store_report(store, report, labels=run_labels(context))
        self.log.info("%s", report.text())
        if not report.ok and self.fail_on_mismatch:
            raise VerifyFailed(report)
        return report.as_dict()

    def on_kill(self) -> None:
        cancel()
