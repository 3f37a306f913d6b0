"""Logical backup (``postgres://``, ``postgres+aws://``): one snapshot with the manifest, globals and one dump per
database, each streamed from its tool's stdout straight into the store.

Differences from the reference, on purpose:

- Dumps run one at a time, or ``jobs`` at a time (bounded; :mod:`.jobs`), instead of all at once, so a cluster with
  many databases does not open one connection and one MVCC snapshot per database simultaneously. With ``jobs`` > 1
  the largest databases (``pg_database_size``) start first, each dump streams into its own record of the one
  snapshot, and records are appended in listing order: names and order are those of ``jobs=1``. The first failure
  kills the other dumps' process groups and nothing is committed. The globals (``pg_dumpall --globals-only``) and
  the manifest's cluster part are read on one helper thread beside the dumps, so a run's fixed cost is not spent
  before its first dump starts; each database's part of the manifest is read on its dump's fingerprint connection,
  in the snapshot pg_dump imports (a single database, or ``postgres`` when it is dumped: the whole manifest), so the
  manifest opens no connection of its own (a connection costs both sides ~5-8 ms of CPU). Their records still come
  first.
- A tool that fails fails the backup and **nothing is committed** (the reference committed a snapshot with error
  entries); its stderr is in the error.
- Database names reach tools only as ``--dbname=<conninfo>``; in record paths ``%`` and ``/`` are percent-encoded
  (a ``/`` made nested paths in the reference) and the exact name is kept in the record's metadata.
- ``template1`` and ``postgres`` are dumped like any database (they can hold user objects); restore never drops
  them (see :mod:`.restore`). ``template0`` is never dumped (it does not accept connections).
- In a whole-cluster backup, a database dropped between listing and dumping (a scratch database, a removed tenant)
  is skipped with a warning recorded in the snapshot header (``meta.warnings``, ``meta.skipped_databases``), instead
  of failing the backup. It is concluded only when pg_dump fails before writing a byte with the server's "database
  ... does not exist" *and* the database is gone from ``pg_database`` on a re-check; any other failure fails.
- ``exclude_databases`` entries are shell patterns (``*_restore_check``, :func:`excluded`); one that matches no
  database on the server is a warning (a typo excludes nothing).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import psycopg

from ..store.sizes import human_bytes
from . import PgError, commands, fingerprint
from .backup_stats import database_stats
from .connect import PgConnectError
from .iam import password_source
from .jobs import Beside, Finished, Stopper, run_ordered
from .options import AWS_DEFAULT_EXCLUDES, LogicalSourceOptions
from .pipereader import PipeReader
from .process import TaskCancelled, Tool, ToolFailed, cancelled, check_cancelled, run_tool
from .secrets import ssl_files
from .session import GLOBALS_PATH, LOGICAL_KIND, MANIFEST_KIND, MANIFEST_PATH, PasswordSource, Session, dump_path

if TYPE_CHECKING:
    from ..store.opening import OpeningStore
    from ..store.repo import Store
    from ..store.writer import SnapshotWriter, StoredRecord

log = logging.getLogger(__name__)

@dataclass
class BackupResult:
    snapshot_id: str
    databases: list[str]
    warnings: list[str] = field(default_factory=list)
    already_existed: bool = False
    bytes: int = 0
    new_bytes: int = 0  # the committed snapshot's totals: plaintext and packed bytes it added to the store
    new_stored_bytes: int = 0
    per_database: list[dict[str, Any]] = field(default_factory=list)  # :func:`.backup_stats.database_stats`


def _select(all_dbs: list[str], opts: LogicalSourceOptions) -> list[str]:
    if opts.database is not None:
        if opts.database not in all_dbs:
            raise PgError(f"database {opts.database!r} not found or does not accept connections "
                          f"(server has: {', '.join(all_dbs) or 'none'})")
        return [opts.database]
    return [d for d in all_dbs if not excluded(d, opts.exclude_databases or ())]


def excluded(name: str, patterns: Collection[str]) -> bool:
    """``name`` matches one of the ``exclude_databases`` shell patterns (case-sensitive, as database names are)."""
    return any(fnmatchcase(name, p) for p in patterns)


def logical_backup(
    store: Store | OpeningStore,
    opts: LogicalSourceOptions,
    *,
    password: PasswordSource | None = None,
    labels: Mapping[str, str] | None = None,
    tags: list[str] | tuple[str, ...] = (),
    idempotency_key: str | None = None,
    manifest_only: bool = False,
    extra_dirs: tuple[str, ...] = (),
    reuse_committed: bool = False,
) -> BackupResult:
    """Back up per ``opts`` into ``store``; return the snapshot ID. Any failure commits nothing.

    ``store`` may still be opening (:meth:`Store.opening <..store.repo.Store.opening>`): the connection, the catalog
    queries and the tools' start-up run while its passphrase is stretched, and the snapshot writer is entered on a
    helper thread as soon as it is open (:class:`_LazyWriter`); a tool that starts first blocks on its pipe until
    then. An error opening it (a wrong passphrase) is the backup's error: the tools are killed, nothing is
    committed. ``reuse_committed`` (a retried Airflow task): when a snapshot was already committed under
    ``idempotency_key``, stop and return it instead of dumping again.

    The globals and the manifest's cluster part do not depend on the dumps: they are read on a helper thread
    (:class:`.jobs.Beside`) while the dumps run; the manifest's per-database parts come from the dumps' fingerprint
    connections, and the records are added when the dumps are done (manifest and globals first). A failure on either
    side stops the other (``Stopper``) and is the error raised.
    """
    source = {"kind": MANIFEST_KIND if manifest_only else LOGICAL_KIND,
              "origin": opts.conn.redacted_uri(opts.scheme, opts.database)}
    # started: the header's time_start is now, before any tool takes its snapshot, not when the writer is entered
    stopper = Stopper()
    lazy = _LazyWriter(store, dict(source=source, tags=tags, labels=dict(labels or {}),
                                   idempotency_key=idempotency_key, started=datetime.now(UTC)),
                       reuse_committed=reuse_committed, stopper=stopper)
    try:
        return _logical_backup(lazy, opts, password, labels, manifest_only, extra_dirs, stopper)
    except Exception as e:
        # the earlier try's snapshot is the result whatever stopped this one (a source down on the retry, its
        # tools stopped): the operator used to look for it before touching PostgreSQL. A cancel is not a success.
        lazy.close()
        if lazy.committed is None or isinstance(e, TaskCancelled) or cancelled():
            raise
        if not isinstance(e, _Committed):  # a down source, or a tool stopped because of the reuse
            log.debug("this try stopped with: %s", e)
        log.info("%s", _Committed(lazy.committed))
        snap = lazy.store.load_snapshot(lazy.committed)
        return BackupResult(snap.id, list(snap.header.get("meta", {}).get("databases") or []), [], True,
                            snap.header["stats"]["bytes"], 0, 0, database_stats(lazy.store, snap))
    finally:
        lazy.close()


class _Committed(Finished):
    """An earlier try committed a snapshot under this idempotency key (``reuse_committed``): stop, reuse it."""

    def __init__(self, snapshot_id: str) -> None:
        super().__init__(f"snapshot {snapshot_id} was already committed by an earlier try of this task: reusing it")
        self.snapshot_id = snapshot_id


class _LazyWriter:
    """The backup's :class:`SnapshotWriter`, entered on a helper thread as soon as the store is open, so that the
    backup's start-up (connections, catalog, tools) does not wait for the store's unlock, lease and index sync.

    :meth:`get` waits for it and raises what opening the store or the writer raised (a wrong passphrase, a lease
    conflict), the same error to every caller. :meth:`finish` commits (no error) or aborts it; :meth:`close` waits
    for the thread, so none outlives the backup, and a backup that failed before the store was open (``stopper``
    stopped, or closed) takes no lease (it still looks for an earlier try's snapshot: :attr:`committed`)."""

    def __init__(self, store: Store | OpeningStore, writer_kwargs: dict[str, Any], *, reuse_committed: bool,
                 stopper: Stopper) -> None:
        self._source = store
        self._stopper = stopper
        self._kwargs = writer_kwargs
        self._reuse = reuse_committed and bool(writer_kwargs.get("idempotency_key"))
        self._store: Store | None = None
        self._writer: SnapshotWriter | None = None
        self._ended = False  # the writer committed or aborted
        self._error: BaseException | None = None
        self._closing = threading.Event()  # the backup ended: no writer (no lease, no index sync) from now on
        self.committed: str | None = None  # an earlier try's snapshot under the key (``reuse_committed``)
        self._thread = threading.Thread(target=self._run, name="pgplakar-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from ..store.opening import resolve

        try:
            self._store = st = resolve(self._source)
            if self._reuse:
                sid = st.idempotent_id(self._kwargs["idempotency_key"])
                if sid in st.snapshot_ids():
                    self.committed = sid
                    raise _Committed(sid)
            if self._closing.is_set() or self._stopper.stopped:  # it failed: nothing is written to the store
                raise PgError("the backup ended before its store was open")  # seen by nobody: close() waits
            check_cancelled()  # a task cancelled meanwhile takes no lease
            w = st.writer(**self._kwargs)
            w.__enter__()
            if self._closing.is_set() or self._stopper.stopped or cancelled():  # while the lease was taken
                w.abort()
                check_cancelled()
                raise PgError("the backup ended before its store was open")
            self._writer = w
        except BaseException as e:  # noqa: BLE001 - raised by get(), on the callers' threads
            self._error = e

    @property
    def store(self) -> Store:
        self._thread.join()
        if self._store is None:
            assert self._error is not None
            raise self._error
        return self._store

    def ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s; whether :meth:`get` now returns (or raises) at once."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def get(self) -> SnapshotWriter:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._writer is not None
        return self._writer

    def finish(self, exc: BaseException | None) -> None:
        """Commit (``exc`` None) or abort the writer."""
        if exc is None:
            w = self.get()
            self._ended = True
            w.commit()
            return
        self.close()

    def close(self) -> None:
        """Wait for the helper thread (which then takes no lease); abort the writer unless it committed or aborted
        already (idempotent)."""
        self._closing.set()
        self._thread.join()
        if self._writer is not None and not self._ended:
            self._ended = True
            self._writer.abort()


def _logical_backup(lazy: _LazyWriter, opts: LogicalSourceOptions, password: PasswordSource | None,
                    labels: Mapping[str, str] | None, manifest_only: bool, extra_dirs: tuple[str, ...],
                    stopper: Stopper) -> BackupResult:
    from .connect import can_read_pg_authid, list_databases, server_version_num

    # postgres+aws: a fresh IAM token per connection and tool run (made one at a time: dumps run on threads)
    pw = _one_at_a_time(password_source(opts.conn, password))
    with ssl_files(opts.conn) as ssl, Session(opts.conn, ssl, pw, opts.pg_bin_dir, extra_dirs,
                                              stopper=stopper).lending() as s:
        if not manifest_only:
            s.prefetch_tools("pg_dump", *(() if opts.data_only else ("pg_dumpall",)))
        main_db = opts.database or "postgres"
        c = s.connect(main_db)
        try:
            server_num = server_version_num(c)
            all_dbs = list_databases(c)
            unknown_excludes = _unknown_databases(c, opts.exclude_databases or ())
            authid_ok = can_read_pg_authid(c) if not (opts.data_only or manifest_only) else True
            selected = _select(all_dbs, opts)
            # sizes schedule jobs largest first and are each dump's progress estimate
            sizes = _sizes(c, selected, quiet=opts.jobs == 1) if not manifest_only else {}
        except BaseException:
            c.close()
            raise
        s.lend(c, main_db)  # the manifest's (a single database: its dump's) connection: one connection less
        major = server_num // 10000
        warnings: list[str] = []
        if unknown_excludes:
            warnings.append(f"exclude_databases: {', '.join(map(repr, unknown_excludes))} not on the server "
                            "(nothing excluded for it: check the spelling)")
            log.warning("%s", warnings[-1])
        tool_versions: dict[str, str] = {}
        if not manifest_only:
            for name in ("pg_dump",) + (() if opts.data_only else ("pg_dumpall",)):
                tool_versions[name] = s.tool(name, major).version.text
        if not authid_ok:
            warnings.append("cannot read pg_authid (restricted superuser, e.g. RDS): roles are dumped without "
                            "passwords (--no-role-passwords)")
            log.warning("%s", warnings[-1])
        dumped = list(selected)  # minus databases dropped before their dump (the header is written at commit)
        skipped: list[str] = []
        meta = {"server_version_num": server_num, "databases": dumped, "tool_versions": tool_versions,
                "options": _option_summary(opts), "warnings": warnings}
        try:

            # The manifest's per-database part is read on each dump's fingerprint connection, in the snapshot its
            # pg_dump imports: no connection of its own per database. With a single database, or when postgres is
            # dumped too, the cluster part is read on that database's fingerprint session (the lent catalog
            # connection): one connection less again.
            manifest_args = (opts, selected, tool_versions, manifest_only, authid_ok, dict(labels or {}))
            deferred = [] if manifest_only or opts.database is not None else [d for d in selected if d != main_db]
            in_dump = not manifest_only and (opts.database is not None or main_db in selected)

            def head() -> tuple[dict[str, Any] | None, list[StoredRecord]]:  # on the helper thread, beside the dumps
                manifest = None if in_dump else _manifest(s, *manifest_args, defer=deferred)
                tail = []
                if not (manifest_only or opts.data_only):  # started before the writer is waited for
                    globals_rec = _stream(lazy, s, GLOBALS_PATH, commands.pg_dumpall_globals(
                        str(s.tool("pg_dumpall", major).path), no_role_passwords=not authid_ok),
                        {"type": "globals", "tool": tool_versions.get("pg_dumpall")})
                    assert globals_rec is not None  # no skip_if: a failure raises
                    tail.append(globals_rec)
                return manifest, tail

            dumps: list[StoredRecord] = []  # in listing order; added after the manifest, which needs their details
            details: dict[str, Any] = {}  # database -> its manifest detail (main_db when in_dump: the manifest)
            with Beside(head, stopper, name="pgplakar-manifest") as beside:

                if not manifest_only:
                    dump_tool = str(s.tool("pg_dump", major).path)
                    level = fingerprint.effective_level(opts.fingerprint, schema_only=opts.schema_only,
                                                        data_only=opts.data_only)
                    prints: dict[str, Any] = {}

                    def also(db: str) -> Callable[[Any], Any] | None:  # run on the fingerprint connection
                        if db == main_db and in_dump:
                            return lambda conn: _manifest(s, *manifest_args, defer=deferred, conn=conn)
                        return (lambda conn: _detail(conn, db)) if db in deferred else None

                    def dump(item: tuple[int, str]) -> _Dumped:  # on a dump thread when jobs > 1
                        n, db = item
                        check_cancelled()
                        return _dump_database(lazy, s, opts, n, db, dump_tool, tool_versions["pg_dump"], level,
                                              sizes.get(db), also(db))

                    def deliver(i: int, d: _Dumped) -> None:  # on this thread, in listing order
                        db = selected[i]
                        if d.stored is None:
                            dumped.remove(db)
                            skipped.append(db)
                            meta["skipped_databases"] = skipped
                            warnings.append(f"database {db!r} was dropped after it was listed: skipped")
                            log.warning("%s", warnings[-1])
                            return
                        dumps.append(d.stored)
                        details[db] = d.also
                        prints[db] = d.fingerprints
                        warnings.extend([d.warning] if d.warning else [])

                    run_ordered(list(enumerate(selected, 1)), dump, deliver, jobs=opts.jobs, stopper=stopper,
                                size=lambda item: sizes.get(item[1], 0), name=lambda item: f"database {item[1]!r}")
            manifest, head_records = beside.result()
            if in_dump:  # None: main_db was dropped before its dump (then read here, as head() would have)
                manifest = details.get(main_db) or _manifest(s, *manifest_args, defer=deferred)
            if deferred:
                from .manifest import add_details

                assert manifest is not None  # head() or main_db's dump collected it
                add_details(manifest, {db: details.get(db) for db in deferred}, _factory(s, opts, manifest_only),
                            tuple(opts.exclude_databases or ()))
            w = lazy.get()
            manifest_rec = w.store_stream(MANIFEST_PATH, io.BytesIO(json.dumps(manifest, indent=2).encode()),
                                          mode=0o444, meta={"type": "manifest"})
            added = [w.add_stored(r) for r in [manifest_rec, *head_records, *dumps]]
            if not manifest_only:
                added.append(w.add_bytes(fingerprint.FINGERPRINTS_PATH, fingerprint.encode(prints), mode=0o444,
                                         meta={"type": "fingerprints"}))
                meta["seconds"] = dict(s.seconds)  # per record path: how long its tool ran
            # per record path: what it added to the store (docs/format.md §6.4; waits for its last chunks' encoding)
            meta["new_raw_bytes"] = {i.path: i.new_raw_bytes for i in added}
            meta["new_stored_bytes"] = {i.path: i.new_stored_bytes for i in added}
            w.meta = meta
            check_cancelled()  # a cancelled backup never commits
        except BaseException as e:
            lazy.finish(e)
            raise
        lazy.finish(None)
        store = lazy.store
        snap = store.load_snapshot(w.snapshot_id)
        totals = snap.header["stats"]
        return BackupResult(snap.id, dumped, warnings, w.already_existed, totals["bytes"], totals["new_raw_bytes"],
                            totals["new_stored_bytes"], database_stats(store, snap))


@dataclass
class _Dumped:
    """One database's dump: its stored record (None: dropped before its dump, skipped), fingerprints, warning."""

    stored: StoredRecord | None
    fingerprints: dict[str, Any] | None = None
    warning: str | None = None
    also: Any = None  # its manifest detail (:func:`_detail`; main_db's may be the whole manifest)


def _dump_database(w: _LazyWriter, s: Session, opts: LogicalSourceOptions, n: int, db: str, dump_tool: str,
                   tool_version: str, level: str, size: int | None = None,
                   also: Callable[[Any], Any] | None = None) -> _Dumped:
    """Fingerprint ``db`` in an exported snapshot and stream ``pg_dump --snapshot`` of it into a stored record;
    ``also(conn)`` runs in that snapshot first (:func:`.fingerprint.dump_snapshot`)."""
    gone = None if opts.database is not None else (lambda e: _vanished(s, db, e))
    try:
        with fingerprint.dump_snapshot(s.connect, db, level, also) as fp:
            argv = commands.pg_dump(dump_tool, db, compress=opts.compress, schema_only=opts.schema_only,
                                    data_only=opts.data_only, snapshot=fp.snapshot)
            stored = _stream(w, s, dump_path(n, db), argv, {
                "type": "dump", "database": db, "format": "custom", "tool": tool_version}, skip_if=gone,
                expected_size=size)
    except PgConnectError as e:  # the fingerprint connection comes first: it meets a drop first
        if gone is None or not _missing_database(e, db) or not _gone(s, db):
            raise
        return _Dumped(None)
    except psycopg.OperationalError:  # dropped WITH (FORCE) while it was being fingerprinted
        if gone is None or not _gone(s, db):
            raise
        return _Dumped(None)
    if stored is None:
        return _Dumped(None)
    return _Dumped(stored, fp.fingerprints, fp.warning, fp.also)


def _one_at_a_time(source: PasswordSource) -> PasswordSource:
    """``source`` behind a lock: dump threads ask for IAM tokens at the same time, and a token source is not
    thread-safe (it makes its boto3 client on first use)."""
    lock = threading.Lock()

    def call() -> str | None:
        with lock:
            return source()

    return call


def _sizes(c: Any, databases: list[str], quiet: bool = False) -> dict[str, int]:
    """``pg_database_size`` of each database we may connect to (``jobs`` schedules the largest first; each dump's
    progress lines use it as an estimate); {} if the sizes cannot be read (dumps then start in listing order)."""
    try:
        rows = c.execute(
            "SELECT datname::text, CASE WHEN pg_catalog.has_database_privilege(oid, 'CONNECT') "
            "THEN pg_catalog.pg_database_size(oid) END FROM pg_catalog.pg_database WHERE datname = ANY(%s)",
            (databases,)).fetchall()
    except psycopg.Error as e:
        (log.debug if quiet else log.warning)("database sizes unknown (%s): dumps start in listing order",
                                              " ".join(str(e).split()))
        return {}
    return {name: int(size) for name, size in rows if size is not None}


def _unknown_databases(conn: Any, names: tuple[str, ...]) -> list[str]:
    """Patterns in ``exclude_databases`` that match nothing in ``pg_database`` (the implicit RDS default excepted)."""
    wanted = [n for n in names if n not in AWS_DEFAULT_EXCLUDES]
    if not wanted:
        return []
    present = [r[0] for r in conn.execute("SELECT datname::text FROM pg_catalog.pg_database")]
    return [n for n in wanted if not any(fnmatchcase(d, n) for d in present)]


def _vanished(s: Session, database: str, error: ToolFailed) -> bool:
    """pg_dump could not connect because ``database`` does not exist, and a re-check confirms it is gone.

    The message is the server's (``lc_messages``): a translated one does not match and the backup fails, the safe
    way. The re-check makes a misleading message (e.g. a database of that name inside a connection string) moot.
    """
    return f'database "{database}" does not exist' in error.stderr and _gone(s, database)


def _missing_database(error: PgConnectError, database: str) -> bool:
    """A connection refused because ``database`` does not exist (SQLSTATE 3D000, or libpq's message without one)."""
    return error.sqlstate == "3D000" or f'database "{database}" does not exist' in str(error)


def _gone(s: Session, database: str) -> bool:
    """``pg_database`` no longer lists ``database``."""
    with s.connect("postgres") as c:
        row = c.execute("SELECT count(*) FROM pg_catalog.pg_database WHERE datname = %s", (database,)).fetchone()
    count: int = row[0]
    return count == 0


def _stream(w: _LazyWriter, s: Session, path: str, argv: list[str], meta: dict[str, Any],
            skip_if: Callable[[ToolFailed], bool] | None = None,
            expected_size: int | None = None) -> StoredRecord | None:
    """Store a tool's stdout as the content of ``path``; the caller adds the returned record to the snapshot
    (``add_stored``). The tool starts before the writer is waited for (it may still be opening: the tool then
    blocks on its pipe; one that fails meanwhile fails the backup at once, before the store is open). None (nothing
    stored) when the tool failed before writing a byte and ``skip_if`` accepts its failure. The time the tool ran,
    less the time it was held up waiting for the store (:func:`_wait_for_writer`), goes to ``s.seconds[path]`` (the
    header's ``meta.seconds``; not the record, whose metadata must not change from run to run for manifest leaves
    to dedup)."""
    log.info("%s: running %s", path, argv[0].rsplit("/", 1)[-1])
    started = time.monotonic()
    if s.stopper is not None:
        s.stopper.check()
    with run_tool(argv, s.env()) as tool, (s.stopper.tool(tool) if s.stopper is not None else nullcontext()):
        if skip_if is not None and not tool.stdout.peek(1):  # EOF before any output: see why before recording
            try:
                tool.finish()
            except ToolFailed as e:
                if skip_if(e):
                    log.warning("%s: %s", path, e)
                    return None
                raise
        reader = PipeReader(tool.stdout)  # the pipe enlarged before the writer is waited for
        held = _wait_for_writer(w, tool, reader)
        stored = w.get().store_stream(path, cast(BinaryIO, reader), mode=0o444, meta=meta,
                                      expected_size=expected_size)
        warnings = tool.finish()
    s.seconds[path] = took = round(time.monotonic() - started - held, 3)
    if warnings.strip():
        log.info("%s: %s", tool.name, warnings.strip())
    log.info("%s: %s in %.1f s", path, human_bytes(stored.info.size), took)
    return stored


_WRITER_POLL = 0.01  # seconds: how soon a tool's exit or full pipe is seen while the store opens


def _wait_for_writer(w: _LazyWriter, tool: Tool, reader: PipeReader) -> float:
    """Wait for the snapshot writer (the store may still be opening) while watching ``tool``; return how long the
    tool was held up by the wait: from when its pipe was full or it exited until the writer was ready (0 when it was
    ready). A tool that fails meanwhile raises its error at once: the backup then ends before its store is open and
    writes nothing to it (:class:`_LazyWriter`)."""
    since: float | None = None
    while not w.ready(_WRITER_POLL):
        if tool.proc.poll() not in (None, 0):
            tool.finish()  # raises its ToolFailed (or TaskCancelled)
        if since is None and (tool.proc.returncode is not None or reader.held()):
            since = time.monotonic()
    return 0.0 if since is None else time.monotonic() - since


def _option_summary(opts: LogicalSourceOptions) -> dict[str, Any]:
    return {"database": opts.database, "exclude_databases": list(opts.exclude_databases or ()),
            "compress": opts.compress, "schema_only": opts.schema_only, "data_only": opts.data_only,
            "fingerprint": opts.fingerprint, "jobs": opts.jobs}


def _factory(s: Session, opts: LogicalSourceOptions, manifest_only: bool) -> Callable[[str], Any]:
    def factory(dbname: str) -> Any:  # a single database's lent connection is its dump's (it waits for it)
        return s.connect(dbname, reuse=opts.database is None or manifest_only)

    return factory


def _detail(conn: Any, db: str) -> Any:
    """The manifest's part for ``db`` (:func:`.manifest.database_detail`), in the caller's transaction on ``conn``;
    a failure to start it is the manifest's error entry, not the backup's failure (as on a connection of its own)."""
    from .manifest import database_detail

    try:
        return database_detail(conn, db)
    except psycopg.Error as e:
        return {}, [{"database": db, "section": "transaction", "sqlstate": e.sqlstate,
                     "message": " ".join(str(e).split()) or type(e).__name__}]


def _manifest(s: Session, opts: LogicalSourceOptions, selected: list[str], tool_versions: dict[str, str],
              manifest_only: bool, authid_ok: bool, labels: dict[str, str], *, defer: Collection[str] = (),
              conn: Any = None) -> dict[str, Any]:
    from .manifest import collect_manifest

    return collect_manifest(
        _factory(s, opts, manifest_only), database=opts.database, connector="postgresql", host=opts.conn.host,
        port=opts.conn.port, dump_format="custom", options={"schema_only": opts.schema_only,
                                                            "data_only": opts.data_only, "compress": opts.compress},
        tool_versions=tool_versions, exclude_databases=tuple(opts.exclude_databases or ()),
        extra={"databases_dumped": [] if manifest_only else selected, "role_passwords": authid_ok,
               "scheme": opts.scheme, "labels": labels}, defer=defer, conn=conn,
    )
