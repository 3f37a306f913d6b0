"""What backup, restore, verification and physical backup share: the :class:`Session` of one run (options, SSL
files, tools, a password source), the source kinds in a snapshot's header and the record paths of a snapshot.

Its own module so that restore, verification and the physical backup do not import the logical backup.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from . import PgError
from .iam import PasswordSource
from .jobs import Stopper
from .secrets import SslFiles, libpq_env
from .tools import Tool, find_tool

__all__ = ["GLOBALS_PATH", "LOGICAL_KIND", "MANIFEST_KIND", "MANIFEST_PATH", "PHYSICAL_KIND", "PasswordSource",
           "Session", "database_from_path", "dump_path"]

# ``source.kind`` in a snapshot's header: a logical backup, its manifest alone, a physical backup.
LOGICAL_KIND = "postgres"
MANIFEST_KIND = "postgres-manifest"
PHYSICAL_KIND = "postgres+bin"
# Record paths of a logical snapshot (``MANIFEST_PATH`` also of a physical one; docs/format.md).
GLOBALS_PATH = "/00000-globals.sql"
MANIFEST_PATH = "/manifest.json"


def dump_path(n: int, database: str) -> str:
    safe = database.replace("%", "%25").replace("/", "%2F")
    return f"/{n:05d}-{safe}.dump"


def database_from_path(path: str) -> str:
    """Inverse of :func:`dump_path` (for records without metadata, e.g. made by the reference tool)."""
    from urllib.parse import unquote

    stem = path.rsplit("/", 1)[-1].removesuffix(".dump")
    head, sep, rest = stem.partition("-")
    name = rest if sep and head.isdigit() and head else stem
    return unquote(name)


@dataclass
class Session:
    """What every step of one backup or restore shares: options, SSL files, tools, a password source."""

    conn_opts: Any
    ssl: SslFiles
    password: PasswordSource
    pg_bin_dir: str | None
    extra_dirs: tuple[str, ...] = ()
    tools: dict[str, Tool] = field(default_factory=dict)
    stopper: Stopper | None = None  # set for a backup: what its parallel dumps started, to stop them all at once
    seconds: dict[str, float] = field(default_factory=dict)  # record path -> how long its tool ran

    def env(self, database: str | None = None) -> dict[str, str]:
        """A fresh environment per tool process (a fresh IAM token each time, when the source makes tokens)."""
        return libpq_env(self.conn_opts, self.ssl, password=self.password(), database=database)

    _spare: dict[str, Any] = field(default_factory=dict, repr=False)  # dbname -> an idle connection to reuse
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _prefetch: threading.Thread | None = field(default=None, repr=False)

    def connect(self, dbname: str, *, reuse: bool = True) -> Any:
        """A connection to ``dbname`` that the caller owns (and closes): a lent one (:meth:`lend`) unless ``reuse``
        is False, else a new one."""
        from .connect import connect
        from .process import track_connection

        if self.stopper is not None:
            self.stopper.check()
        with self._lock:
            spare = self._spare.pop(dbname, None) if reuse else None
        if spare is not None:
            try:
                spare.rollback()  # whatever its lender left open
                return spare
            except Exception:  # noqa: BLE001 - broken meanwhile (server restart, idle timeout): a new one
                spare.close()
        conn = track_connection(connect(self.conn_opts, self.ssl, dbname, password=self.password()))
        return conn if self.stopper is None else self.stopper.connection(conn)

    def lend(self, conn: Any, dbname: str) -> None:
        """Give ``conn`` (ours, to ``dbname``, no longer used by the caller) to the next :meth:`connect` of
        ``dbname``: a run that reads the same database twice opens one connection, not two."""
        with self._lock:
            old = self._spare.pop(dbname, None)
            self._spare[dbname] = conn
        if old is not None:
            old.close()

    @contextmanager
    def lending(self) -> Iterator[Session]:
        """Lent connections that nobody took are closed when the block ends, and the tool probes have ended (a run
        that failed before it needed them leaves no thread behind)."""
        try:
            yield self
        finally:
            with self._lock:
                spare, self._spare = list(self._spare.values()), {}
            for conn in spare:
                conn.close()
            if self._prefetch is not None:
                self._prefetch.join()

    def prefetch_tools(self, *names: str) -> None:
        """Run the ``--version`` probes of ``names`` on a thread while the caller connects to the server (whose
        major :meth:`tool` needs first): they are cached per file, so :meth:`tool` then finds them done."""

        def probe() -> None:
            for name in names:
                try:
                    find_tool(name, pg_bin_dir=self.pg_bin_dir, extra_dirs=self.extra_dirs)
                except PgError:  # reported by tool(), on the caller's thread
                    pass

        self._prefetch = threading.Thread(target=probe, name="pgplakar-tools", daemon=True)
        self._prefetch.start()

    def tool(self, name: str, min_major: int) -> Tool:
        if self._prefetch is not None:
            self._prefetch.join()
        if name not in self.tools:
            self.tools[name] = find_tool(name, min_major=min_major, pg_bin_dir=self.pg_bin_dir,
                                         extra_dirs=self.extra_dirs)
        return self.tools[name]
