"""Verify a physical (``postgres+bin``) snapshot: restore it, start it, compare it with the backup's manifest.

The snapshot is restored into a private temp dir with :func:`.datadir.physical_restore` (every tablespace mapped
below it; ``pg_verifybackup`` checks the files against ``backup_manifest``), started with a server of the same
major (:func:`.scratch.server_bin_dir`) on a unix socket in that dir only, with settings that keep it from acting
on the source's configuration (no TCP, no archiving, no synchronous standbys, no preloaded libraries, its own
``pg_hba``), and it is used once recovery has ended. Then the relations, columns, indexes, constraints and
extensions of every database the manifest details (``/manifest.json``, captured at backup time) are compared with
the running copy, and the rows found are counted: exact counts at the backup's consistency point cannot be taken on
the source, so they are reported, not compared. Unlogged tables are empty after recovery and reported as such.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import TYPE_CHECKING, Any

from . import PgError, fingerprint
from .scratch import PORT, hba_trust_local, private_root, server_bin_dir, server_user, start_server, stop_server
from .secrets import ssl_files
from .session import Session

if TYPE_CHECKING:
    from ..store.repo import Snapshot, Store
    from .verify import VerifyReport

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 256 * 2**20
# What the source's postgresql.conf must not do on the worker.
SETTINGS = {"listen_addresses": "", "port": str(PORT), "archive_mode": "off", "synchronous_standby_names": "",
            "shared_preload_libraries": "", "ssl": "off", "logging_collector": "off", "max_wal_senders": "0",
            "shared_buffers": "128MB", "huge_pages": "off", "fsync": "off", "primary_conninfo": "",
            "restore_command": ""}


def _read_manifest(store: Store, snap: Snapshot) -> dict[str, Any]:
    from .physical import MANIFEST_PATH

    rec = next((r for r in store.records(snap, MANIFEST_PATH) if r.path == MANIFEST_PATH), None)
    if rec is None:
        raise PgError(f"snapshot {snap.short_id} has no {MANIFEST_PATH}: nothing to compare a restore with")
    size = rec.size
    if size is None or not 0 <= size <= MAX_MANIFEST_BYTES:
        raise PgError(f"{MANIFEST_PATH} of snapshot {snap.short_id}: implausible size {size!r}")
    with store.open_record(rec) as src:
        doc = json.loads(b"".join(src.iter_chunks()))
    if not isinstance(doc, dict):
        raise PgError(f"{MANIFEST_PATH} of snapshot {snap.short_id} is not a JSON object")
    return doc


def verify_physical(store: Store, snapshot_id: str, report: VerifyReport, *, databases: tuple[str, ...] = (),
                    amcheck: bool = False, pg_bin_dir: str | None = None, extra_dirs: tuple[str, ...] = ()) -> None:
    """Fill ``report`` (a :class:`.verify.VerifyReport`) for a physical snapshot."""
    from .datadir import physical_restore
    from .verify import _amcheck

    snap = store.load_snapshot(snapshot_id)
    manifest = _read_manifest(store, snap)
    meta = snap.header.get("meta") or {}
    num = manifest.get("server_version_num") or meta.get("server_version_num")
    if not isinstance(num, int):
        raise PgError(f"snapshot {snap.short_id} does not say which PostgreSQL version made it")
    bin_dir = server_bin_dir(num // 10000, pg_bin_dir=pg_bin_dir, extra_dirs=extra_dirs)
    detailed = [d for d in manifest.get("databases") or [] if isinstance(d, dict) and "relations" in d or
                isinstance(d, dict) and "extensions" in d]
    if databases:
        missing = sorted(set(databases) - {d.get("name") for d in detailed})
        if missing:
            raise PgError(f"databases: {', '.join(missing)} not detailed in the snapshot's manifest")
        detailed = [d for d in detailed if d.get("name") in databases]
    run_as = server_user()
    root = private_root()
    proc = None
    try:
        data, sock = os.path.join(root, "data"), os.path.join(root, "sock")
        mapping = {t["location"]: os.path.join(root, f"ts-{int(t['oid'])}")
                   for t in meta.get("tablespaces") or [] if t.get("location")}
        owner = f"{run_as[0]}:{run_as[1]}" if run_as else None  # the throwaway server's user, not the snapshot's
        res = physical_restore(store, snapshot_id, data, tablespace_mapping=mapping, pg_bin_dir=bin_dir, verify=True,
                               owner=owner, sync=False)
        report.server = f"PostgreSQL {res.server_version} ({bin_dir})"
        if res.verified is False:
            report.errors.append(f"pg_verifybackup: {res.verify_note}")
        _prepare(root, data, sock, run_as)
        opts = [a for k, v in SETTINGS.items() for a in ("-c", f"{k}={v}")]
        opts += ["-c", f"unix_socket_directories={sock}", "-c", f"hba_file={os.path.join(root, 'hba.conf')}",
                 "-c", f"ident_file={os.path.join(root, 'ident.conf')}"]
        t0 = time.monotonic()
        proc = start_server(os.path.join(bin_dir, "postgres"), data, root, run_as, opts)
        log.info("restored data directory recovered and accepts connections after %.1f s", time.monotonic() - t0)
        _compare(report, manifest, detailed, sock, bin_dir, amcheck, _amcheck)
    finally:
        if proc is not None:
            stop_server(proc)
        shutil.rmtree(root, ignore_errors=True)


def _prepare(root: str, data: str, sock: str, run_as: tuple[int, int] | None) -> None:
    """Our own socket dir, hba and ident files; no standby/recovery signal (the copy must come up read-write); a
    config file where the source kept it outside the data directory (Debian's /etc/postgresql)."""
    os.mkdir(sock, 0o700)
    hba_trust_local(os.path.join(root, "hba.conf"))
    open(os.path.join(root, "ident.conf"), "w").close()
    for name in ("standby.signal", "recovery.signal", "postmaster.pid"):
        path = os.path.join(data, name)
        if os.path.lexists(path):
            os.unlink(path)
    conf = os.path.join(data, "postgresql.conf")
    if not os.path.lexists(conf):
        open(conf, "w").close()
    if run_as:
        for base, dirs, files in os.walk(root):
            for name in [*dirs, *files]:
                os.lchown(os.path.join(base, name), *run_as)
        os.chown(root, *run_as)


def _superuser(manifest: dict[str, Any]) -> str:
    supers = [r["name"] for r in manifest.get("roles") or [] if isinstance(r, dict) and r.get("superuser")]
    if not supers:
        raise PgError("the snapshot's manifest lists no superuser to connect to the restored copy as")
    return "postgres" if "postgres" in supers else supers[0]


def _compare(report: Any, manifest: dict[str, Any], detailed: list[dict[str, Any]], sock: str, bin_dir: str,
             amcheck: bool, run_amcheck: Any) -> None:
    from .options import ConnOptions
    from .verify import compare

    conn = ConnOptions(host=sock, port=PORT, username=_superuser(manifest), ssl_mode="disable")
    with ssl_files(conn) as ssl:
        s = Session(conn, ssl, lambda: None, bin_dir)
        for entry in detailed:
            db = entry["name"]
            with s.connect(db) as c:
                c.autocommit = True
                c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                expected = _expected(c, entry)
                found = fingerprint.collect(c, "counts", members=True)
                c.execute("ROLLBACK")
            rep = compare(db, expected, found)
            rep.level = "manifest"
            report.databases.append(rep)
        if amcheck:
            run_amcheck(s, [d["name"] for d in detailed], report)


def _expected(conn: Any, entry: dict[str, Any]) -> dict[str, Any]:
    """The manifest's view of one database in the shape :func:`.fingerprint.collect` gives (catalog level)."""
    names: set[str] = set()
    for rel in entry.get("relations") or []:
        names.update([rel["schema"], rel["name"]])
        names.update(c["name"] for c in rel.get("columns") or [])
        names.update(i["name"] for i in rel.get("indexes") or [])
    names.update(s["name"] for s in entry.get("schemas") or [])
    ordered = sorted(names)
    quoted = dict(zip(ordered, [r[0] for r in conn.execute(
        "SELECT pg_catalog.quote_ident(x) FROM unnest(%s::text[]) WITH ORDINALITY AS u(x, i) ORDER BY i",
        (ordered,))], strict=True))
    relations: dict[str, dict[str, Any]] = {}
    indexes, constraints = [], []
    for rel in entry.get("relations") or []:
        kind = rel.get("kind")
        if kind not in fingerprint.RELATION_KINDS:
            continue
        schema, name = quoted[rel["schema"]], quoted[rel["name"]]
        item: dict[str, Any] = {"kind": fingerprint.RELATION_KINDS[kind], "schema": rel["schema"], "name": rel["name"]}
        if rel.get("persistence") == "u":
            item["unlogged"] = True
        if kind != "S":
            cols = sorted(rel.get("columns") or [], key=lambda c: c.get("position", 0))
            item["columns"] = [f"{quoted[c['name']]} {c['type']}" for c in cols]
        if kind in ("r", "m"):
            item["estimate"] = rel.get("row_estimate")
        relations[f"{schema}.{name}"] = item
        indexes += [f"{schema}.{quoted[i['name']]}" for i in rel.get("indexes") or []]
        constraints += [f"{schema}.{name} {k['type']} {k['name']}" for k in rel.get("constraints") or []]
    return {"level": "catalog", "relations": relations, "indexes": indexes, "constraints": constraints,
            "schemas": [quoted[s["name"]] for s in entry.get("schemas") or []],
            "extensions": {e["name"]: e.get("version") for e in entry.get("extensions") or []
                           if e.get("name") != "plpgsql"}}
