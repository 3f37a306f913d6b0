"""What every operator shares: run labels, the idempotency key, cancellation (``on_kill``), and
:class:`PgPlakarOperator`, the base of the operators that reach a PostgreSQL server.

Every snapshot is labelled with dag_id, run_id, task_id, map_index and try_number, and written with an
idempotency key of dag/task/run/map_index: a retried task that already committed returns the same snapshot ID
instead of leaving a second snapshot for the run (the backups' ``reuse_committed``, once the store is open).
``on_kill`` cancels the task (:func:`..pg.process.cancel`): every
tool's process group is killed, running queries are cancelled, nothing further starts and nothing is committed
(the uncommitted snapshot is simply absent; its packs are orphans for prune); the task fails with "the task was
cancelled". Airflow's task runner calls ``on_kill`` from its SIGTERM handler and then returns to ``execute``, which
is why a flag that every phase checks is needed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from airflow.sdk import BaseOperator

from ..hooks.postgres import PgPlakarPostgresHook
from ..hooks.store import PgPlakarStoreHook
from ..pg.options import SSL_KEY_DATA_ALIAS
from ..pg.process import cancel, cancellable
from .outcome import BACKUPS_ALIAS

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = ["PgPlakarOperator", "cancellable_execute", "idempotency_key", "masked_option_names", "run_labels"]

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


class PgPlakarOperator(BaseOperator):
    """What the backup and restore operators share: a store connection, a PostgreSQL connection or location,
    ``options`` (with the key-data option renamed for masking), asset outlets, and cancellation on kill."""

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
