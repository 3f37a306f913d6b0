"""Operators for logical backups: dump, capture the manifest, restore. Thin glue over :mod:`..pg`.

Every snapshot is labelled with dag_id, run_id, task_id, map_index and try_number, and written with an
idempotency key of dag/task/run/map_index: a retried task that already committed returns the same snapshot ID
instead of leaving a second snapshot for the run. ``on_kill`` cancels the task (:func:`..pg.process.cancel`): every
tool's process group is killed, running queries are cancelled, nothing further starts and nothing is committed
(the uncommitted snapshot is simply absent; its packs are orphans for prune); the task fails with "the task was
cancelled". Airflow's task runner calls ``on_kill`` from its SIGTERM handler and then returns to ``execute``, which
is why a flag that every phase checks is needed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from airflow.sdk import BaseOperator

from ..hooks.postgres import PgPlakarPostgresHook
from ..hooks.store import PgPlakarStoreHook
from ..pg.options import SSL_KEY_DATA_ALIAS
from ..pg.process import cancel, cancellable
from .outcome import BACKUPS_ALIAS, LOGICAL_SCHEME, backup_stats, report, source_uri

if TYPE_CHECKING:
    from airflow.sdk import Context

    from ..store.repo import Store

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def run_labels(context: Context) -> dict[str, str]:
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    return {
        "dag_id": ti.dag_id, "task_id": ti.task_id, "run_id": context["run_id"],
        "map_index": str(map_index if map_index is not None else -1), "try_number": str(ti.try_number),
    }


def idempotency_key(labels: Mapping[str, str]) -> str:
    return "/".join(labels[k] for k in ("dag_id", "task_id", "run_id", "map_index"))


def committed_by_earlier_try(store: Store, key: str, task_log: Any) -> str | None:
    """The snapshot an earlier try of this task already committed under ``key``, if any (a retry then reuses it
    instead of dumping again)."""
    existing = store.idempotent_id(key)
    if existing in store.snapshot_ids():
        task_log.info("snapshot %s was already committed by an earlier try of this task: reusing it", existing)
        return existing
    return None


def cancellable_execute(execute: Callable[[Any, Context], _T]) -> Callable[[Any, Context], _T]:
    """Run ``execute`` as one cancellable task (:func:`..pg.process.cancellable`): a fresh cancellation state, and
    any failure after ``on_kill`` reported as :class:`..pg.process.TaskCancelled`."""

    @functools.wraps(execute)
    def wrapper(self: Any, context: Context) -> _T:
        with cancellable():
            return execute(self, context)

    return wrapper


def masked_option_names(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` with ``ssl_key_data`` renamed ``ssl_private_key_data``: ``options`` is a template field, and
    Airflow masks a rendered value by its key name (``private_key``), not ``ssl_key_data``."""
    out = dict(options or {})
    if "ssl_key_data" in out and SSL_KEY_DATA_ALIAS not in out:
        out[SSL_KEY_DATA_ALIAS] = out.pop("ssl_key_data")
    return out


class _PgPlakarOperator(BaseOperator):
    ui_color = "#d0e4f5"

    def __init__(self, *, store_conn_id: str = PgPlakarStoreHook.default_conn_name,
                 postgres_conn_id: str | None = PgPlakarPostgresHook.default_conn_name, location: str | None = None,
                 options: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        if kwargs.pop("emit_assets", False):  # backups: the sources are Assets, known only at run time
            from airflow.sdk import AssetAlias

            kwargs["outlets"] = [*(kwargs.get("outlets") or []), AssetAlias(BACKUPS_ALIAS)]
        super().__init__(**kwargs)
        self.store_conn_id = store_conn_id
        self.postgres_conn_id = postgres_conn_id
        self.location = location
        self.options = masked_option_names(options)

    def _pg_hook(self) -> PgPlakarPostgresHook:
        return PgPlakarPostgresHook(None if self.location else self.postgres_conn_id, location=self.location)

    def on_kill(self) -> None:
        cancel()


class PgPlakarBackupOperator(_PgPlakarOperator):
    """Logical backup of a cluster or one database; returns the snapshot ID (XCom ``return_value``).

    :param database: one database (templated; e.g. ``{{ params.db }}`` or a mapped value); None = the connection's
        database if it has one, else every database; ``""`` forces the whole cluster.
    :param options: seed option names (``exclude_databases``, ``compress``, ``schema_only``, ``data_only``,
        ``fingerprint``, ``jobs``, ``pg_bin_dir``, ``ssl_*``); they override the connection.
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
        hook = self._pg_hook()
        opts = hook.source_options(overrides)
        labels = {**self.labels, **run_labels(context)}
        key = idempotency_key(labels) + ("/manifest" if self.manifest_only else "")
        with PgPlakarStoreHook(self.store_conn_id).get_store() as store:
            sid = committed_by_earlier_try(store, key, self.log)
            if sid is None:
                result = logical_backup(store, opts, labels=labels, tags=self.tags, idempotency_key=key,
                                        manifest_only=self.manifest_only, password=hook.password_source(opts))
                for w in result.warnings:
                    self.log.warning("%s", w)
                sid = result.snapshot_id
            stats = backup_stats(store, sid)
        uris = [source_uri(LOGICAL_SCHEME, opts.conn.host, opts.conn.port, row["database"])
                for row in stats["databases"]] if self.emit_assets else []
        report(context, self.log, stats, uris)
        return sid


class PgPlakarManifestOperator(PgPlakarBackupOperator):
    """Capture the cluster manifest only (roles, databases, relations, settings) as a small snapshot; returns its ID."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(manifest_only=True, **kwargs)


class PgPlakarRestoreOperator(_PgPlakarOperator):
    """Restore a logical snapshot into a running server.

    :param snapshot_id: templated: e.g. ``{{ ti.xcom_pull(task_ids='backup') }}`` or ``backup_task.output``.
    :param options: destination options with the seed's names (``database``, ``databases``, ``clean``,
        ``recreate``, ``no_globals``, ``no_owner``, ``schema_only``, ``data_only``, ``exit_on_error``,
        ``ignore_globals_errors``, ``pg_bin_dir``, ``tables``, ``schemas``, ``jobs``, ``ssl_*``); templated.
    Returns the restore summary (a small dict) for downstream checks.
    """

    template_fields: Sequence[str] = ("snapshot_id", "options", "postgres_conn_id", "store_conn_id")

    def __init__(self, *, snapshot_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.snapshot_id = snapshot_id

    @cancellable_execute
    def execute(self, context: Context) -> dict[str, Any]:
        from ..pg.restore import logical_restore

        hook = self._pg_hook()
        opts = hook.restore_options(self.options)
        with PgPlakarStoreHook(self.store_conn_id).get_store() as store:
            sid = store.resolve(str(self.snapshot_id).strip())
            summary = logical_restore(store, sid, opts, password=hook.password_source(opts))
        return summary.as_dict()
