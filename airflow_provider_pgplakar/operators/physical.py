"""Operators for physical backups: a base backup of the whole cluster, and its restore as a data directory.

A standard Airflow ``postgres`` connection works (host, port, login, password, SSL extras, ``pg_bin_dir``); its
``schema`` (database) is ignored because a base backup always covers the whole cluster, and extras meant for
logical backups (``compress``, ``exclude_databases``, ...) are ignored too so one connection can serve both kinds.
A ``location`` must be ``postgres+bin://`` (or ``postgres://``) without a database path. The user needs the
REPLICATION privilege and the server a ``replication`` line in pg_hba.conf for the worker's address; the task fails
with a message saying which one is missing.

Snapshots carry the same run labels and idempotency key as logical backups (a retry that already committed returns
the same snapshot ID). ``on_kill`` cancels the running ``BASE_BACKUP``; nothing is committed then.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from ..hooks.store import PgPlakarStoreHook
from ..pg import OptionError
from ..pg.process import cancel
from .base import PgPlakarOperator, cancellable_execute, idempotency_key, run_labels
from .outcome import PHYSICAL_SCHEME, backup_stats, report, source_uri

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = ["PgPlakarBaseBackupOperator", "PgPlakarPhysicalRestoreOperator"]

def _mapping_arg(value: Any) -> Any:
    """A templated ``tablespace_mapping`` renders to text: read it as JSON (an object or a list of OLD=NEW)."""
    if not isinstance(value, str):
        return value
    import json

    text = value.strip()
    if not text:
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        raise OptionError("tablespace_mapping", "a string must be a JSON object {\"OLD\": \"NEW\"} or a JSON "
                                                "list of \"OLD=NEW\" strings") from None
    if not isinstance(parsed, (dict, list)):
        raise OptionError("tablespace_mapping", "must be a JSON object or list")
    return parsed


class PgPlakarBaseBackupOperator(PgPlakarOperator):
    """Physical base backup of the whole cluster into the store; returns the snapshot ID (XCom ``return_value``).

    :param checkpoint: ``fast`` or ``spread`` (default: the option/connection value, else ``spread``).
    :param max_rate: transfer limit in kB/s (``100M`` style suffixes accepted as strings).
    :param server_compression: ``auto`` (default: lz4 when the server has it), ``none``, ``lz4`` or ``zstd``,
        optionally ``:<level>``; the server compresses the stream, which also costs it less CPU than sending it raw.
    :param options: the CLI's option names (README: ``pg_bin_dir``, ``ssl_*``, ``checkpoint``, ``max_rate``,
        ``server_compression``); templated.
    """

    template_fields: Sequence[str] = ("tags", "labels", "options", "checkpoint", "server_compression",
                                      "postgres_conn_id", "store_conn_id")

    def __init__(self, *, checkpoint: str | None = None, max_rate: int | str | None = None,
                 server_compression: str | None = None, tags: Sequence[str] = (),
                 labels: Mapping[str, str] | None = None, emit_assets: bool = True, **kwargs: Any) -> None:
        super().__init__(emit_assets=emit_assets, **kwargs)
        self.emit_assets = emit_assets
        self.checkpoint = checkpoint
        self.max_rate = max_rate
        self.server_compression = server_compression
        self.tags = list(tags)
        self.labels = dict(labels or {})

    @cancellable_execute
    def execute(self, context: Context) -> str:
        from ..pg.physical import physical_backup

        overrides = dict(self.options)
        if self.checkpoint is not None:
            overrides["checkpoint"] = self.checkpoint
        if self.max_rate is not None:
            overrides["max_rate"] = self.max_rate
        if self.server_compression is not None:
            overrides["server_compression"] = self.server_compression
        opts = self._pg_hook().physical_source_options(overrides, self.log)
        labels = {**self.labels, **run_labels(context)}
        key = idempotency_key(labels) + "/physical"
        # as the CLI: the store is unlocked while the replication connection, its slot and the manifest are set up;
        # a retry finds what an earlier try committed under ``key`` once it is open, and reuses it
        with PgPlakarStoreHook(self.store_conn_id).opening() as opening:
            result = physical_backup(opening, opts, labels=labels, tags=self.tags, idempotency_key=key,
                                     reuse_committed=True)
            for w in result.warnings:
                self.log.warning("%s", w)
            if not result.already_existed:
                self.log.info("base backup of PostgreSQL %d: %d files, WAL %s..%s", result.major, result.files,
                              result.start_lsn, result.end_lsn)
            sid = result.snapshot_id
            stats = backup_stats(opening.result(), sid)
        report(context, self.log, stats,
               [source_uri(PHYSICAL_SCHEME, opts.conn.host, opts.conn.port)] if self.emit_assets else [])
        return sid


class PgPlakarPhysicalRestoreOperator(BaseOperator):
    """Restore a physical snapshot as a data directory on the worker (see :mod:`..pg.datadir`).

    :param snapshot_id: templated, e.g. ``{{ ti.xcom_pull(task_ids='base_backup') }}`` or ``base_backup.output``.
    :param target_dir: the new data directory (templated); it must be empty or absent unless ``overwrite``.
    :param tablespace_mapping: ``{OLD: NEW}`` (or ``["OLD=NEW", ...]``) per tablespace location (templated; a
        rendered string is read as a JSON object or list, e.g. ``"{{ params.mapping | tojson }}"``).
    :param pg_bin_dir: bin directory of the PostgreSQL that will start it: refused unless it is the backup's major
        version, checked before anything is written; its ``pg_verifybackup`` verifies the result.
    :param overwrite: empty a non-empty ``target_dir`` first (never a tablespace directory unless it is mapped
        explicitly in ``tablespace_mapping``; never a running server's directory).
    :param require_verify: fail when no ``pg_verifybackup`` of the backup's major is available (checked before
        writing) or it cannot run (without it the result says ``verified: false`` and the task logs a warning).
    :param file_owner: ``USER[:GROUP]`` for every restored file when the worker runs as root (default: the snapshot's
        owner names, i.e. ``postgres``); templated.
    :param sync: fsync every restored file and directory before succeeding (default true; false is faster).
    :param clean: remove what a failed or cancelled restore wrote (default true, as ``pg_basebackup``); false keeps
        the incomplete directory for debugging (it must not be started).
    Returns the restore summary (a small dict: major version, files, tablespaces, verification, warnings).
    """

    template_fields: Sequence[str] = ("snapshot_id", "target_dir", "tablespace_mapping", "pg_bin_dir", "file_owner",
                                      "store_conn_id")
    ui_color = "#d0e4f5"

    def __init__(self, *, snapshot_id: str, target_dir: str,
                 tablespace_mapping: Mapping[str, str] | Sequence[str] | None = None, overwrite: bool = False,
                 pg_bin_dir: str | None = None, verify: bool = True, require_verify: bool = False,
                 file_owner: str | None = None, sync: bool = True, clean: bool = True,
                 store_conn_id: str = PgPlakarStoreHook.default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.snapshot_id = snapshot_id
        self.target_dir = target_dir
        self.tablespace_mapping = tablespace_mapping
        self.overwrite = overwrite
        self.pg_bin_dir = pg_bin_dir
        self.verify = verify
        self.require_verify = require_verify
        self.file_owner = file_owner  # not ``owner``: BaseOperator.owner is the task's owner in Airflow
        self.sync = sync
        self.clean = clean
        self.store_conn_id = store_conn_id

    @cancellable_execute
    def execute(self, context: Context) -> dict[str, Any]:
        from ..pg.datadir import physical_restore

        with PgPlakarStoreHook(self.store_conn_id).get_store() as store:
            sid = store.resolve(str(self.snapshot_id).strip())
            result = physical_restore(store, sid, str(self.target_dir),
                                      tablespace_mapping=_mapping_arg(self.tablespace_mapping),
                                      overwrite=self.overwrite, pg_bin_dir=self.pg_bin_dir or None,
                                      verify=self.verify, require_verify=self.require_verify,
                                      owner=self.file_owner or None, sync=self.sync,
                                      clean=self.clean)
        for w in result.warnings:
            self.log.warning("%s", w)
        return result.as_dict()  # physical_restore logged the summary

    def on_kill(self) -> None:
        cancel()
