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
from .logical import (
    _PgPlakarOperator,
    cancellable_execute,
    committed_by_earlier_try,
    idempotency_key,
    run_labels,
)

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


class PgPlakarBaseBackupOperator(_PgPlakarOperator):
    """Physical base backup of the whole cluster into the store; returns the snapshot ID (XCom ``return_value``).

    :param checkpoint: ``fast`` or ``spread`` (default: the option/connection value, else ``spread``).
    :param max_rate: transfer limit in kB/s (``100M`` style suffixes accepted as strings).
    :param server_compression: ``auto`` (default: lz4 when the server has it), ``none``, ``lz4`` or ``zstd``,
        optionally ``:<level>``; the server compresses the stream, which also costs it less CPU than sending it raw.
    :param options: seed option names (``pg_bin_dir``, ``ssl_*``, ``checkpoint``, ``max_rate``,
        ``server_compression``); templated.
    """

    template_fields: Sequence[str] = ("tags", "labels", "options", "checkpoint", "server_compression",
                                      "postgres_conn_id", "store_conn_id")

    def __init__(self, *, checkpoint: str | None = None, max_rate: int | str | None = None,
                 server_compression: str | None = None, tags: Sequence[str] = (),
                 labels: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
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
        with PgPlakarStoreHook(self.store_conn_id).get_store() as store:
            existing = committed_by_earlier_try(store, key, self.log)
            if existing:
                return existing
            result = physical_backup(store, opts, labels=labels, tags=self.tags, idempotency_key=key)
        for w in result.warnings:
            self.log.warning("%s", w)
        self.log.info("snapshot %s: base backup of PostgreSQL %d, %d files, %.1f MiB (%.1f MiB new), WAL %s..%s",
                      result.snapshot_id, result.major, result.files, result.bytes / 2**20,
                      result.new_stored_bytes / 2**20, result.start_lsn, result.end_lsn)
        return result.snapshot_id


class PgPlakarPhysicalRestoreOperator(BaseOperator):
    """Restore a physical snapshot as a data directory on the worker (see :mod:`..pg.datadir`).

    :param snapshot_id: templated, e.g. ``{{ ti.xcom_pull(task_ids='base_backup') }}`` or ``base_backup.output``.
    :param target_dir: the new data directory (templated); it must be empty or absent unless ``overwrite``.
    :param tablespace_mapping: ``{OLD: NEW}`` (or ``["OLD=NEW", ...]``) per tablespace location (templated; a
        rendered string is read as a JSON object or list, e.g. ``"{{ params.mapping | tojson }}"``).
    :param pg_bin_dir: bin directory of the PostgreSQL that will start it: refused unless it is the backup's major
        version, checked before anything is written; its ``pg_verifybackup`` verifies the result.
    Returns the restore summary (a small dict: major version, files, tablespaces, verification).
    """

    template_fields: Sequence[str] = ("snapshot_id", "target_dir", "tablespace_mapping", "pg_bin_dir",
                                      "store_conn_id")
    ui_color = "#d0e4f5"

    def __init__(self, *, snapshot_id: str, target_dir: str,
                 tablespace_mapping: Mapping[str, str] | Sequence[str] | None = None, overwrite: bool = False,
                 pg_bin_dir: str | None = None, verify: bool = True,
                 store_conn_id: str = PgPlakarStoreHook.default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.snapshot_id = snapshot_id
        self.target_dir = target_dir
        self.tablespace_mapping = tablespace_mapping
        self.overwrite = overwrite
        self.pg_bin_dir = pg_bin_dir
        self.verify = verify
        self.store_conn_id = store_conn_id

    @cancellable_execute
    def execute(self, context: Context) -> dict[str, Any]:
        from ..pg.datadir import physical_restore

        with PgPlakarStoreHook(self.store_conn_id).get_store() as store:
            sid = store.resolve(str(self.snapshot_id).strip())
            result = physical_restore(store, sid, str(self.target_dir),
                                      tablespace_mapping=_mapping_arg(self.tablespace_mapping),
                                      overwrite=self.overwrite, pg_bin_dir=self.pg_bin_dir or None,
                                      verify=self.verify)
        self.log.info("%s", result.text())
        return result.as_dict()

    def on_kill(self) -> None:
        cancel()
