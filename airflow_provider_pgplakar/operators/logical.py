"""Operators for logical backups: dump, capture the manifest, restore. Thin glue over :mod:`..pg`; labels,
idempotency and cancellation are :mod:`.base`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..hooks.postgres import password_source
from ..hooks.store import PgPlakarStoreHook
from .base import PgPlakarOperator, cancellable_execute, idempotency_key, run_labels
from .outcome import LOGICAL_SCHEME, backup_stats, report, source_uri

if TYPE_CHECKING:
    from airflow.sdk import Context


class PgPlakarBackupOperator(PgPlakarOperator):
    """Logical backup of a cluster or one database; returns the snapshot ID (XCom ``return_value``).

    :param database: one database (templated; e.g. ``{{ params.db }}`` or a mapped value); None = the connection's
        database if it has one, else every database; ``""`` forces the whole cluster.
    :param options: the CLI's option names (README, "Source options": ``exclude_databases``, ``compress``,
        ``schema_only``, ``data_only``, ``fingerprint``, ``jobs``, ``pg_bin_dir``, ``ssl_*``); they override the
        connection.
    :param jobs: databases dumped at once into the one snapshot (templated; overrides ``options`` and the
        connection; None = theirs, else 1). One task, one snapshot; a mapped task per database is the alternative
        (README, "Many databases").
    :param manifest_only: capture only ``/manifest.json`` (what :class:`PgPlakarManifestOperator` does).
    :param emit_assets: emit one Asset event per database, ``pgplakar://HOST:PORT/DATABASE``, through the outlet
        alias ``pgplakar-backups`` (default True; see :mod:`.outcome`). A second XCom, ``stats``, holds the summary.
    """

    template_fields: Sequence[str] = ("database", "jobs", "tags", "labels", "options", "postgres_conn_id",
                                      "store_conn_id")

    def __init__(self, *, database: str | None = None, jobs: int | str | None = None, tags: Sequence[str] = (),
                 labels: Mapping[str, str] | None = None, manifest_only: bool = False, emit_assets: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(emit_assets=emit_assets and not manifest_only, **kwargs)
        self.emit_assets = emit_assets and not manifest_only
        self.database = database
        self.jobs = jobs
        self.tags = list(tags)
        self.labels = dict(labels or {})
        self.manifest_only = manifest_only

    @cancellable_execute
    def execute(self, context: Context) -> str:
        from ..pg.logical import logical_backup

        overrides = dict(self.options)
        if self.database is not None:
            overrides["database"] = self.database
        if self.jobs is not None:
            overrides["jobs"] = self.jobs
        source = self._pg_hook().source_options(overrides)
        opts = source.options
        password = password_source(opts, source.aws_conn_id)  # postgres+aws: its region is resolved here
        labels = {**self.labels, **run_labels(context)}
        key = idempotency_key(labels) + ("/manifest" if self.manifest_only else "")
        # the store is unlocked while the backup connects and starts its tools; a retry finds what an earlier try
        # committed under ``key`` once it is open, and reuses it (reuse_committed)
        with PgPlakarStoreHook(self.store_conn_id).opening() as opening:
            result = logical_backup(opening, opts, labels=labels, tags=self.tags, idempotency_key=key,
                                    manifest_only=self.manifest_only, password=password, reuse_committed=True)
            for w in result.warnings:
                self.log.warning("%s", w)
            sid = result.snapshot_id
            stats = backup_stats(opening.result(), sid)
        uris = [source_uri(LOGICAL_SCHEME, opts.conn.host, opts.conn.port, row["database"])
                for row in stats["databases"]] if self.emit_assets else []
        report(context, self.log, stats, uris)
        return sid


class PgPlakarManifestOperator(PgPlakarBackupOperator):
    """Capture the cluster manifest only (roles, databases, relations, settings) as a small snapshot; returns its ID."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(manifest_only=True, **kwargs)


class PgPlakarRestoreOperator(PgPlakarOperator):
    """Restore a logical snapshot into a running server.

    :param snapshot_id: templated: e.g. ``{{ ti.xcom_pull(task_ids='backup') }}`` or ``backup_task.output``.
    :param options: destination options with the CLI's names (README, "Destination options": ``database``,
        ``databases``, ``clean``, ``recreate``, ``no_globals``, ``no_owner``, ``schema_only``, ``data_only``,
        ``exit_on_error``, ``ignore_globals_errors``, ``pg_bin_dir``, ``tables``, ``schemas``, ``jobs``,
        ``ssl_*``); templated.
    Returns the restore summary (a small dict) for downstream checks.
    """

    template_fields: Sequence[str] = ("snapshot_id", "options", "postgres_conn_id", "store_conn_id")

    def __init__(self, *, snapshot_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.snapshot_id = snapshot_id

    @cancellable_execute
    def execute(self, context: Context) -> dict[str, Any]:
        from ..pg.restore import logical_restore

        dest = self._pg_hook().restore_options(self.options)
        password = password_source(dest.options, dest.aws_conn_id)  # postgres+aws: its region is resolved here
        with PgPlakarStoreHook(self.store_conn_id).get_store() as store:
            sid = store.resolve(str(self.snapshot_id).strip())
            summary = logical_restore(store, sid, dest.options, password=password)
        return summary.as_dict()
