"""What backup, restore, verification and physical backup share: the :class:`Session` of one run (options, SSL
files, tools, a password source), the source kinds in a snapshot's header and the record paths of a snapshot.

Its own module so that restore, verification and the physical backup do not import the logical backup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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

    def connect(self, dbname: str) -> Any:
        from .connect import connect
        from .process import track_connection

        if self.stopper is not None:
            self.stopper.check()
        conn = track_connection(connect(self.conn_opts, self.ssl, dbname, password=self.password()))
        return conn if self.stopper is None else self.stopper.connection(conn)

    def tool(self, name: str, min_major: int) -> Tool:
        if name not in self.tools:
            self.tools[name] = find_tool(name, min_major=min_major, pg_bin_dir=self.pg_bin_dir,
                                         extra_dirs=self.extra_dirs)
        return self.tools[name]
