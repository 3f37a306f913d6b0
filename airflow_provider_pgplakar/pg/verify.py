"""Verified restores: restore a snapshot into a throwaway server and prove it holds what was backed up.

:func:`verify_snapshot` starts a private server (:mod:`.scratch`; the newest installed major >= the source's),
restores the snapshot with the normal restore code (:func:`.restore.logical_restore`, ``recreate``), recomputes
the fingerprints recorded at backup time (:mod:`.fingerprint`) on every restored database and compares them. The
report names every table and object: expected vs found and a status. Failing statuses: ``missing``, ``differs``
(rows, digest, columns, sequence value, large objects) and a restore error; an extension the verify server does not
have fails by name before the restore starts. ``unlogged`` and ``foreign`` tables and materialized views (refreshed
at restore from the restored tables) are reported, never failed on. Snapshots made before fingerprints existed are
still restored and their tables counted (status ``restored``). Physical snapshots go to :mod:`.physical_verify`.

:func:`store_report` keeps the report in the store as a small snapshot labelled ``verifies=<snapshot id>`` (see
``pgplakar ls --verified``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from . import PgError, fingerprint
from .fingerprint import level_rank
from .secrets import ssl_files
from .session import LOGICAL_KIND, PHYSICAL_KIND, Session

if TYPE_CHECKING:
    from ..store.repo import Snapshot, Store

log = logging.getLogger(__name__)

REPORT_PATH = "/verify.json"
VERIFY_KIND = "pgplakar-verify"
VERIFIES_LABEL = "verifies"
FAILING = ("missing", "differs", "failed")


class VerifyFailed(PgError):
    """The restored copy differs from the backup (or did not restore); ``report`` says where."""

    def __init__(self, report: VerifyReport) -> None:
        self.report = report
        bad = [f"{d.database}: {f.object} {f.status}" + (f" ({f.detail})" if f.detail else "")
               for d in report.databases for f in d.findings if f.status in FAILING]
        bad = report.errors + bad
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        super().__init__(f"verify of snapshot {report.snapshot_id[:8]} FAILED: " + "; ".join(bad[:5]) + more)


@dataclass
class Finding:
    object: str
    kind: str
    status: str  # ok | restored | missing | differs | unlogged | foreign | refreshed | failed
    expected: Any = None
    found: Any = None
    detail: str = ""


@dataclass
class DatabaseReport:
    database: str
    level: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.status not in FAILING for f in self.findings)


@dataclass
class VerifyReport:
    snapshot_id: str
    server: str = ""
    level: str = ""
    amcheck: bool = False
    databases: list[DatabaseReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    started: str = ""
    duration_s: float = 0.0
    report_snapshot: str | None = None

    @property
    def ok(self) -> bool:
        return not self.errors and all(d.ok for d in self.databases)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        out["status"] = "passed" if self.ok else "failed"
        for d, src in zip(out["databases"], self.databases, strict=True):
            d["ok"] = src.ok
        return out

    def text(self) -> str:
        lines = [f"verify of snapshot {self.snapshot_id[:8]} on {self.server}: {'PASSED' if self.ok else 'FAILED'}"]
        lines += [f"  ERROR {e}" for e in self.errors]
        for d in self.databases:
            lines.append(f"  database {d.database} (fingerprint={d.level}): {'ok' if d.ok else 'FAILED'}")
            for f in d.findings:
                exp = "" if f.expected is None else f" expected={_short(f.expected)}"
                got = "" if f.found is None else f" found={_short(f.found)}"
                lines.append(f"    {f.status:9} {f.kind} {f.object}{exp}{got}" + (f": {f.detail}" if f.detail else ""))
        return "\n".join(lines)


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class VerifyOptions:
    """What a verify may be told (CLI ``key=value``, operator ``options``): which databases, ``amcheck``, and the
    ``pg_bin_dir`` of the verify server (else the newest installed major >= the source's)."""

    databases: tuple[str, ...] = ()
    amcheck: bool = False
    pg_bin_dir: str | None = None
    target: str | None = None


VERIFY_KEYS = ("databases", "amcheck", "pg_bin_dir", "target")


def parse_verify_options(options: dict[str, Any] | None) -> VerifyOptions:
    """``databases`` (comma-separated or a list), ``amcheck`` (a boolean), ``pg_bin_dir``; anything else refused."""
    from . import OptionError
    from .options import parse_bool

    opts = dict(options or {})
    unknown = sorted(set(opts) - set(VERIFY_KEYS))
    if unknown:
        raise OptionError(unknown[0], f"unknown verify option (accepted: {', '.join(VERIFY_KEYS)})")
    dbs = opts.get("databases") or ()
    if isinstance(dbs, str):
        dbs = [d.strip() for d in dbs.split(",")]
    amcheck = opts.get("amcheck", False)
    if isinstance(amcheck, str):
        amcheck = parse_bool("amcheck", amcheck) if amcheck.strip() else False
    if not isinstance(amcheck, bool):
        raise OptionError("amcheck", f"must be a boolean, got {type(amcheck).__name__}")
    pg_bin_dir = opts.get("pg_bin_dir") or None
    if pg_bin_dir is not None and (not isinstance(pg_bin_dir, str) or "\0" in pg_bin_dir):
        raise OptionError("pg_bin_dir", "must be a directory path")
    names = tuple(dict.fromkeys(str(d) for d in dbs if str(d)))
    target = opts.get("target") or None
    if target is not None:
        from .location import PHYSICAL, parse_location

        if not isinstance(target, str) or parse_location(target).scheme == PHYSICAL:
            raise OptionError("target", "must be a postgres:// or postgres+aws:// location of a scratch server")
    return VerifyOptions(databases=names, amcheck=amcheck, pg_bin_dir=pg_bin_dir, target=target)


# -- comparison ------------------------------------------------------------------------------------------------------

def compare(database: str, expected: dict[str, Any], found: dict[str, Any]) -> DatabaseReport:
    """Compare the fingerprints taken at backup time with those of the restored copy (extras found are fine)."""
    level = expected.get("level", "catalog")
    rep = DatabaseReport(database, level)
    add = rep.findings.append
    found_ext = found.get("extensions", {})
    for name, version in sorted(expected.get("extensions", {}).items()):
        if name not in found_ext:
            add(Finding(name, "extension", "missing", version, None, "not restored"))
        else:
            add(Finding(name, "extension", "ok", version, found_ext[name]))
    for key, kind in (("schemas", "schema"), ("indexes", "index"), ("constraints", "constraint")):
        have = set(found.get(key, ()))
        for name in expected.get(key, ()):
            if name not in have:
                add(Finding(name, kind, "missing"))
    found_rels = found.get("relations", {})
    for name, rel in sorted(expected.get("relations", {}).items()):
        add(_compare_relation(name, rel, found_rels.get(name), level))
    if level == "full":
        found_seq = found.get("sequences", {})
        for name, value in sorted(expected.get("sequences", {}).items()):
            got = found_seq.get(name)
            if got != value:
                add(Finding(name, "sequence", "missing" if got is None else "differs", value, got, "last value"))
        exp_lo, got_lo = expected.get("large_objects"), found.get("large_objects")
        if exp_lo is not None:
            status = "ok" if exp_lo == got_lo else "differs"
            add(Finding("large objects", "large objects", status, exp_lo.get("count"), (got_lo or {}).get("count"),
                        "" if status == "ok" else "count or content digest"))
    return rep


def _compare_relation(name: str, rel: dict[str, Any], got: dict[str, Any] | None, level: str) -> Finding:
    kind = rel["kind"]
    if got is None:
        return Finding(name, kind, "missing", rel.get("rows", rel.get("estimate")))
    if rel.get("columns") != got.get("columns"):
        return Finding(name, kind, "differs", rel.get("columns"), got.get("columns"), "columns")
    if kind == "foreign table":
        return Finding(name, kind, "foreign", detail="rows live on the foreign server (not in a dump)")
    if "rows" not in got:
        return Finding(name, kind, "ok")
    expected_rows = rel.get("rows", rel.get("estimate"))
    same = rel.get("rows") == got["rows"] and rel.get("digest") == got.get("digest")
    if level == "catalog" or "rows" not in rel:
        status, detail = "ok", "row count reported (backup recorded the catalog and an estimate only)"
    elif same:
        status, detail = "ok", ""
    else:
        status = "differs"
        detail = "row count" if rel.get("rows") != got["rows"] else "content digest"
    if status == "differs" and rel.get("unlogged"):
        status, detail = "unlogged", f"{detail} differs (unlogged: not crash-safe, empty after recovery)"
    elif status == "differs" and kind == "materialized view":
        status, detail = "refreshed", f"{detail} differs (refreshed at restore from the restored tables)"
    elif status == "ok" and rel.get("unlogged"):
        status = "unlogged"
    return Finding(name, kind, status, expected_rows, got["rows"], detail)


# -- verify ----------------------------------------------------------------------------------------------------------

def verify_snapshot(store: Store, snapshot_id: str, *, databases: Sequence[str] = (), amcheck: bool = False,
                    pg_bin_dir: str | None = None, extra_dirs: tuple[str, ...] = (), target: Any = None,
                    password: Any = None) -> VerifyReport:
    """Restore ``snapshot_id`` into a throwaway server and compare; the report says PASSED or FAILED (not raised).

    ``target`` (:class:`.options.RestoreOptions` of a server the user provides; ``password`` as for a restore):
    restore there instead, each database into a new ``pgplakar_verify_<id>_<n>`` database (refused if one
    exists), without globals and owners, and drop those databases afterwards (logical snapshots only).
    """
    from .scratch import throwaway_server

    snap = store.load_snapshot(snapshot_id)
    kind = (snap.header.get("source") or {}).get("kind")
    t0 = time.time()
    report = VerifyReport(snapshot_id, amcheck=amcheck, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if kind == PHYSICAL_KIND and target is not None:
        raise PgError(f"snapshot {snapshot_id[:8]} is physical: it is verified on a throwaway server of its own "
                      "major, not into target=")
    if kind == PHYSICAL_KIND:
        from .physical_verify import verify_physical

        verify_physical(store, snapshot_id, report, databases=tuple(databases), amcheck=amcheck,
                        pg_bin_dir=pg_bin_dir, extra_dirs=extra_dirs)
        return _finish(report, t0)
    if kind not in (LOGICAL_KIND, None):
        raise PgError(f"snapshot {snapshot_id[:8]} is a {kind!r} snapshot: verify handles PostgreSQL backups "
                      "(postgres://, postgres+aws://, postgres+bin://)")
    meta = snap.header.get("meta") or {}
    expected = fingerprint.read(store, snap)
    names = list(databases) or list(expected or meta.get("databases") or [])
    if target is not None:
        _verify_into_target(store, snapshot_id, report, expected, names, target, password, _min_major(meta),
                            extra_dirs)
        return _finish(report, t0)
    with throwaway_server(_min_major(meta), pg_bin_dir=pg_bin_dir, extra_dirs=extra_dirs) as srv:
        report.server = srv.version
        with ssl_files(srv.conn) as ssl:
            s = Session(srv.conn, ssl, lambda: None, srv.bin_dir, extra_dirs)
            _check_extensions(s, expected or {}, names, report)
            if not report.errors:
                _restore(store, snapshot_id, srv, tuple(databases), report, extra_dirs)
                _compare_all(s, expected, names, report)
                if amcheck:
                    _amcheck(s, names, report)
    return _finish(report, t0)


def _finish(report: VerifyReport, t0: float) -> VerifyReport:
    report.level = ",".join(sorted({d.level for d in report.databases})) or "none"
    report.duration_s = round(time.time() - t0, 3)
    log.info("%s", report.text())
    return report


def _min_major(meta: dict[str, Any]) -> int:
    """The verify server must be as new as the source and as the pg_dump that wrote the archives."""
    from .tools import parse_version

    majors = [int(meta.get("server_version_num") or 0) // 10000]
    for text in (meta.get("tool_versions") or {}).values():
        try:
            majors.append(parse_version(str(text)).major)
        except ValueError:
            pass
    return max(majors)


def _check_extensions(s: Session, expected: dict[str, Any], names: list[str], report: VerifyReport) -> None:
    """Fail by name, before restoring, on an extension the verify server cannot create."""
    with s.connect("postgres") as c:
        available = {r[0] for r in c.execute("SELECT name FROM pg_catalog.pg_available_extensions")}
    for db in names:
        for ext in sorted((expected.get(db) or {}).get("extensions", {})):
            if ext not in available:
                report.errors.append(f"database {db}: extension {ext} is not available on the verify server "
                                     f"({report.server}): install it there or set pg_bin_dir to a server that has it")


def _restore(store: Store, snapshot_id: str, srv: Any, databases: tuple[str, ...], report: VerifyReport,
             extra_dirs: tuple[str, ...]) -> None:
    from . import restore as restore_mod  # by module: a test injects a faulty restore here
    from .options import RestoreOptions

    opts = RestoreOptions(conn=srv.conn, recreate=True, databases=databases, pg_bin_dir=srv.bin_dir)
    try:
        restore_mod.logical_restore(store, snapshot_id, opts, extra_dirs=extra_dirs)
    except restore_mod.RestoreFailed as e:
        for r in e.summary.results:
            if r.status == "failed":
                report.errors.append(f"restore of {r.path} failed: {' '.join(r.detail.split())[:1000]}")


def _compare_all(s: Session, expected: dict[str, Any] | None, names: list[str], report: VerifyReport,
                 renamed: dict[str, str] | None = None) -> None:
    from .connect import PgConnectError

    for db in names:
        exp = (expected or {}).get(db)
        level = (exp or {}).get("level", "catalog")
        try:
            with s.connect((renamed or {}).get(db, db)) as c:
                c.autocommit = True
                c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                found = fingerprint.collect(c, level if level_rank(level) >= level_rank("counts") else "counts")
                c.execute("ROLLBACK")
        except PgConnectError as e:
            report.databases.append(DatabaseReport(db, level, [Finding(db, "database", "missing", detail=str(e))]))
            continue
        if exp is None:
            rep = DatabaseReport(db, "none", [Finding(n, r["kind"], "restored", None, r.get("rows"),
                                                      "no fingerprints recorded at backup")
                                              for n, r in found["relations"].items()])
        else:
            rep = compare(db, exp, found)
        report.databases.append(rep)


def _verify_into_target(store: Store, snapshot_id: str, report: VerifyReport, expected: dict[str, Any] | None,
                        names: list[str], target: Any, password: Any, min_major: int,
                        extra_dirs: tuple[str, ...]) -> None:
    """``target=``: restore each database into a new prefixed database of the user's server; drop them after.
    Client tools: the target's ``pg_bin_dir``, else the usual search plus the server wheels."""
    from psycopg import sql

    from . import restore as restore_mod
    from .connect import list_databases, server_version_num
    from .iam import password_source
    from .options import RestoreOptions
    from .scratch import wheel_bin_dirs

    extra_dirs = (*extra_dirs, *wheel_bin_dirs())
    renamed = {db: f"pgplakar_verify_{snapshot_id[:8]}_{n}" for n, db in enumerate(names, 1)}
    pw = password_source(target.conn, password)
    with ssl_files(target.conn) as ssl:
        s = Session(target.conn, ssl, pw, target.pg_bin_dir, extra_dirs)
        with s.connect("postgres") as c:
            c.autocommit = True
            num = server_version_num(c)
            taken = sorted(set(renamed.values()) & set(list_databases(c)))
        report.server = f"PostgreSQL {num // 10000}.{num % 10000} at {target.conn.redacted_uri()}"
        if num // 10000 < min_major:
            raise PgError(f"target: PostgreSQL {num // 10000} is older than the backup's {min_major}: use a "
                          f"PostgreSQL {min_major}+ server")
        if taken:
            raise PgError(f"target: database {taken[0]} exists already (a verify still running or one that was "
                          "killed): drop it or wait; verify never drops databases it did not create")
        _check_extensions(s, expected or {}, names, report)
        if report.errors:
            return
        created: list[str] = []
        try:
            for db in names:
                with s.connect("postgres") as c:
                    c.autocommit = True
                    c.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(renamed[db])))
                created.append(renamed[db])
                opts = RestoreOptions(conn=target.conn, database=renamed[db], databases=(db,), no_globals=True,
                                      no_owner=True, pg_bin_dir=target.pg_bin_dir)
                try:
                    restore_mod.logical_restore(store, snapshot_id, opts, password=password, extra_dirs=extra_dirs)
                except restore_mod.RestoreFailed as e:
                    for r in e.summary.results:
                        if r.status == "failed":
                            report.errors.append(f"restore of {r.path} failed: {' '.join(r.detail.split())[:1000]}")
            _compare_all(s, expected, names, report, renamed)
            if report.amcheck:
                _amcheck(s, [renamed[db] for db in names], report)
        finally:
            with s.connect("postgres") as c:
                c.autocommit = True
                for name in created:
                    c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _amcheck(s: Session, names: list[str], report: VerifyReport) -> None:
    from .process import ToolFailed, run_tool

    tool = str(s.tool("pg_amcheck", 0).path)
    for db in names:
        argv = [tool, "--no-password", "--install-missing", "--heapallindexed", f"--database={db}"]
        try:
            with run_tool(argv, s.env(), stdout=None) as t:
                t.finish()
        except ToolFailed as e:
            report.errors.append(f"pg_amcheck of database {db}: {' '.join(e.stderr.split())[:1000]}")


# -- the report in the store -----------------------------------------------------------------------------------------

def store_report(store: Store, report: VerifyReport, *, labels: dict[str, str] | None = None,
                 tags: Sequence[str] = (), idempotency_key: str | None = None) -> str:
    """Commit the report as a small snapshot labelled ``verifies=<snapshot id>``; returns its ID."""
    status = "passed" if report.ok else "failed"
    all_labels = {**(labels or {}), VERIFIES_LABEL: report.snapshot_id, "verify_status": status,
                  "verify_level": report.level}
    with store.writer(source={"kind": VERIFY_KIND, "origin": f"verify of {report.snapshot_id}"}, tags=list(tags),
                      labels=all_labels, meta={"status": status, "server": report.server},
                      idempotency_key=idempotency_key) as w:
        w.add_bytes(REPORT_PATH, json.dumps(report.as_dict(), indent=1, default=str).encode(), mode=0o444,
                    meta={"type": "verify-report"})
    report.report_snapshot = w.snapshot_id
    return w.snapshot_id


def verifications(store: Store, *, errors: list[str] | None = None) -> dict[str, list[Snapshot]]:
    """``{snapshot id: [verify report snapshots, oldest first]}`` from the labels (no record is read)."""
    out: dict[str, list[Snapshot]] = {}
    for snap in store.snapshots(errors=errors):
        if (snap.header.get("source") or {}).get("kind") == VERIFY_KIND:
            target = (snap.header.get("labels") or {}).get(VERIFIES_LABEL)
            if isinstance(target, str):
                out.setdefault(target, []).append(snap)
    for snaps in out.values():
        snaps.sort(key=lambda s: s.time)
    return out


def newest_per_source(store: Store, *, errors: list[str] | None = None) -> list[str]:
    """The newest logical or physical backup of each source (manifest-only snapshots and verify reports are not
    backups): what a restore drill verifies."""
    newest: dict[str, Snapshot] = {}
    for snap in store.snapshots(errors=errors):
        source = snap.header.get("source") or {}
        if source.get("kind") not in (LOGICAL_KIND, PHYSICAL_KIND):
            continue
        key = f"{source.get('kind')} {source.get('origin')}"
        if key not in newest or snap.time > newest[key].time:
            newest[key] = snap
    return [newest[k].id for k in sorted(newest)]
