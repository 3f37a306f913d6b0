"""A store being opened on a helper thread, so that a backup's own start-up runs meanwhile.

Unlocking a store with a passphrase runs Argon2id (~0.3 s at the default cost, on one or two cores) and reads
``config`` and ``keys/`` (round trips on S3). A backup does not need the store before its first byte of data: it can
connect to PostgreSQL, read the catalog and start its tools first. :meth:`.repo.Store.opening` starts
:meth:`.repo.Store.open` on a thread and returns an :class:`OpeningStore`; :meth:`OpeningStore.result` waits for it
(and raises its error, e.g. :class:`.errors.WrongPassphrase`, unchanged). argon2-cffi releases the GIL while it hashes,
so the caller's Python keeps running. Nothing is written to the store before it is open: a tool started early only
blocks on its full pipe.

:meth:`close` (also the ``with`` exit) waits for the thread and closes the store if it opened, so no thread outlives
the caller's block, whatever happened in it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .repo import Store


class OpeningStore:
    """``open_store()`` running on a helper thread; :meth:`result` is the opened :class:`~.repo.Store`."""

    def __init__(self, open_store: Callable[[], Store], *, name: str = "pgplakar-unlock") -> None:
        self._open: Callable[[], Store] | None = open_store  # holds the passphrase: dropped once it ran
        self._store: Store | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        open_store, self._open = self._open, None
        assert open_store is not None
        try:
            self._store = open_store()
        except BaseException as e:  # noqa: BLE001 - raised by result(), on the caller's thread
            self._error = e
        finally:
            del open_store

    def result(self) -> Store:
        """Wait for the store; raise the error that opening it raised (every caller gets that same error)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._closed or self._store is None:
            raise RuntimeError("the store was closed")
        return self._store

    def close(self) -> None:
        """Wait for the thread; close the store if it opened. Safe to call twice."""
        self._thread.join()
        self._closed = True
        store, self._store = self._store, None
        if store is not None:
            store.close()

    def __enter__(self) -> OpeningStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def resolve(store: Store | OpeningStore) -> Store:
    """``store`` itself, or the store an :class:`OpeningStore` opens (waiting for it)."""
    return store.result() if isinstance(store, OpeningStore) else store
