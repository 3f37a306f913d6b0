"""The CLI's command handlers, thin wrappers over :mod:`airflow_provider_pgplakar.store` and ``pg/``, and the table
:data:`COMMANDS` that names them (the arguments they get are defined in :mod:`.parser`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..pg.location import SCHEME_RE, SCHEMES
from ..store.errors import StoreError
from . import output
from .parser import UsageError, parse_duration, parse_kv, parse_labels
from .secrets import passphrase as get_passphrase
from .secrets import raw_key

if TYPE_CHECKING:  # each handler imports what it needs: a command's start-up pays for its own modules only
    from ..store.opening import OpeningStore
    from ..store.prune import PruneReport
    from ..store.record import Record
    from ..store.repo import Store

_opened: list[Store | OpeningStore] = []  # closed by run(): a store holds a read lease from its first read until closed


def _open(location: str, args: argparse.Namespace) -> Store:
    from ..store.repo import Store

    key = raw_key(args.key_file)
    pw = None if key else get_passphrase(args.passphrase_file)
    st = Store.open(location, pw, key=key, cache_dir=args.cache_dir)
    _opened.append(st)
    return st


def _opening(location: str, args: argparse.Namespace) -> OpeningStore:
    """:func:`_open` on a helper thread (store/opening.py): a backup connects and starts its tools meanwhile. The
    passphrase is read here, on this thread (it may prompt)."""
    from ..store.repo import Store

    key = raw_key(args.key_file)
    pw = None if key else get_passphrase(args.passphrase_file)
    st = Store.opening(location, pw, key=key, cache_dir=args.cache_dir)
    _opened.append(st)
    return st


def _split_target(target: str) -> tuple[str, str | None]:
    snap, sep, path = target.partition(":")
    return snap, (path or "/") if sep else None


def run(location: str, args: argparse.Namespace) -> int:
    handler = COMMANDS[args.command]
    try:
        return handler(location, args) or 0
    finally:
        while _opened:
            _opened.pop().close()


def cmd_create(location: str, args: argparse.Namespace) -> int:
    from ..store.repo import Store

    pw = None if args.plaintext else get_passphrase(args.passphrase_file, confirm=True)
    if not args.plaintext and not pw:
        raise UsageError("an encrypted store needs a passphrase: set PGPLAKAR_PASSPHRASE, use --passphrase-file, "
                         "or pass --plaintext")
    st = Store.create(location, pw, plaintext=args.plaintext, compression_level=args.compression_level,
                      cache_dir=args.cache_dir)
    _opened.append(st)
    if args.json:
        output.emit_json({"location": st.location, "repo_id": st.config.repo_id, "encryption": st.config.encryption})
    else:
        print(f"created {st.config.encryption} store {st.config.repo_id} at {st.location}")
    return 0


PG_SCHEMES = tuple(f"{scheme}://" for scheme in SCHEMES)  # postgres://, postgresql://, postgres+aws://, ...


def _refuse_unknown_scheme(text: str, expected: str) -> None:
    """``postgress://…`` (a typo) is not a local path: refused before a directory of that name is read or made."""
    scheme = SCHEME_RE.match(text)
    if scheme and not os.path.exists(text):
        raise UsageError(f"unknown scheme {scheme.group(1)!r} in {scheme.group(0)}…: {expected}")


def _snapshot_among_options(items: list[str], command: str, example: str) -> tuple[str, list[str]]:
    """The one SNAPSHOT among a command's ``key=value`` options, before or after them (an ID never holds ``=``)."""
    words = [i for i in items if "=" not in i]
    if not words:
        raise UsageError(f"{command} needs a SNAPSHOT (an ID, a unique prefix of one, or latest) besides its "
                         "key=value options")
    if len(words) > 1:
        raise UsageError(f"{command}: {' and '.join(map(repr, words))} are not key=value: give one SNAPSHOT, and "
                         f"options as key=value (e.g. {example})")
    return words[0], [i for i in items if "=" in i]


def _pg_options(items: list[str], location: str = "") -> dict[str, str]:
    opts = parse_kv(items)
    if "password" in opts:
        print("pgplakar: warning: a password on the command line is visible to other users (ps); "
              "prefer PGPASSWORD", file=sys.stderr)
    elif os.environ.get("PGPASSWORD") and not location.partition("://")[0].lower().endswith("+aws"):
        # (not for postgres+aws, whose password is always a fresh IAM token)
        opts["password"] = os.environ["PGPASSWORD"]
    return opts


def cmd_backup(location: str, args: argparse.Namespace) -> int:
    if args.path.startswith(PG_SCHEMES):
        return _pg_backup(location, args)
    _refuse_unknown_scheme(args.path, "a source is a directory, a file, or a postgres://, postgres+aws:// or "
                                      "postgres+bin:// location")
    if args.pg_options:
        raise UsageError("key=value options are for postgres:// sources only")
    from ..store import files

    st = _open(location, args)
    src = os.path.abspath(args.path)
    with st.writer(source={"kind": "files", "origin": src}, tags=args.tag, labels=parse_labels(args.label),
                   idempotency_key=args.idempotency_key) as w:
        n = files.backup_path(w, src)
    snap = st.load_snapshot(w.snapshot_id)
    if args.json:
        output.emit_json(snap.summary())
    else:
        s = snap.header["stats"]
        print(f"snapshot {w.snapshot_id[:8]} created: {n} records, {output.human_bytes(s['bytes'])}, "
              f"{output.human_bytes(s['new_stored_bytes'])} stored")
    return 0


def cmd_ls(location: str, args: argparse.Namespace) -> int:
    st = _open(location, args)
    if args.target:
        snap_ref, path = _split_target(args.target)
        snap = st.load_snapshot(st.resolve(snap_ref))
        recs = list(st.records(snap, path))
        if not recs and path not in (None, "/"):
            raise StoreError(f"no record {path!r} in snapshot {snap.short_id}")
        if args.json:
            output.emit_json([_record_view(r) for r in recs])
        else:
            output.table(["mode", "size", "kind", "path"],
                         [[oct(r.mode or 0), "" if r.size is None else r.size, r.kind, r.path] for r in recs])
        return 0
    if args.verified:
        return _ls_verified(st, args)
    from ..store.forget import source_label

    errors: list[str] = []
    snaps = [s for s in st.snapshots(errors=errors) if not args.tag or args.tag in s.header["tags"]]
    for e in errors:
        print(f"pgplakar: warning: {e}", file=sys.stderr)
    if args.json:
        output.emit_json([s.summary() for s in snaps])
    else:
        output.table(
            ["id", "time", "source", "size", "stored", "tags"],
            [[s.short_id, s.time[:19].replace("T", " "), source_label(s.header["source"]),
              output.human_bytes(s.header["stats"]["bytes"]), output.human_bytes(s.header["stats"]["new_stored_bytes"]),
              ",".join(s.header["tags"])] for s in snaps],
        )
    return 0


def _ls_verified(st: Store, args: argparse.Namespace) -> int:
    from ..pg.verify import verifications
    from ..store.forget import source_label

    errors: list[str] = []
    proofs = verifications(st, errors=errors)
    for e in errors:
        print(f"pgplakar: warning: {e}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for s in st.snapshots():
        if s.id in proofs and (not args.tag or args.tag in s.header["tags"]):
            last = proofs[s.id][-1]
            labels = last.header.get("labels") or {}
            rows.append({"id": s.id, "time": s.time, "source": source_label(s.header["source"]),
                         "verify": last.id, "verified_at": last.time, "status": labels.get("verify_status"),
                         "level": labels.get("verify_level"), "verifies": len(proofs[s.id])})
    if args.json:
        output.emit_json(rows)
    else:
        output.table(["id", "time", "source", "status", "verified", "fingerprint", "report"],
                     [[r["id"][:8], r["time"][:19].replace("T", " "), r["source"], r["status"],
                       r["verified_at"][:19].replace("T", " "), r["level"], r["verify"][:8]] for r in rows])
    return 0


def cmd_verify(location: str, args: argparse.Namespace) -> int:
    from ..pg.iam import password_source
    from ..pg.options import parse_restore_options
    from ..pg.verify import parse_verify_options, store_report, verify_snapshot

    snapshot, options = _snapshot_among_options([args.snapshot, *args.verify_options], "verify", "databases=a,b")
    opts = parse_verify_options(parse_kv(options))
    # target=: a scratch server given as a location; its password from $PGPASSWORD (never on the command line)
    target = password = None
    if opts.target:
        extra = {"pg_bin_dir": opts.pg_bin_dir} if opts.pg_bin_dir else {}
        target = parse_restore_options(opts.target, {**_pg_options([], opts.target), **extra})
        password = password_source(target.conn)  # postgres+aws: its region is resolved before the store opens
    st = _open(location, args)
    sid = st.resolve(snapshot)
    report = verify_snapshot(st, sid, databases=opts.databases, amcheck=opts.amcheck, pg_bin_dir=opts.pg_bin_dir,
                             target=target, password=password)
    if not args.no_store:
        store_report(st, report)
    if args.json:
        output.emit_json(report.as_dict())
    else:
        print(report.text())
        if report.report_snapshot:
            print(f"report stored as snapshot {report.report_snapshot[:8]} (verifies={sid[:8]})")
    return 0 if report.ok else 3


def _record_view(r: Record) -> dict[str, Any]:
    out = {"path": r.path, "kind": r.kind, "size": r.size, "mode": r.mode, "mtime_ns": r.mtime_ns, "uid": r.uid,
           "gid": r.gid, "link_target": r.link_target, "meta": dict(r.meta) or None, "error": r.error}
    if r.sha256 is not None:
        out["sha256"] = r.sha256.hex()
    if r.blake3 is not None:
        out["blake3"] = r.blake3.hex()
    return {k: v for k, v in out.items() if v is not None}


def cmd_cat(location: str, args: argparse.Namespace) -> int:
    st = _open(location, args)
    snap_ref, path = _split_target(args.target)
    if not path or path == "/":
        raise UsageError("cat needs SNAPSHOT:/path")
    rec = st.find_record(st.resolve(snap_ref), path)
    out = sys.stdout.buffer
    with st.open_record(rec) as src:
        for piece in src.iter_chunks():
            out.write(piece)
    out.flush()
    return 0


def _pg_backup(location: str, args: argparse.Namespace) -> int:
    from ..pg.iam import password_source
    from ..pg.logical import logical_backup
    from ..pg.options import LogicalSourceOptions, parse_source_options

    opts = parse_source_options(args.path, _pg_options(args.pg_options, args.path))
    password = password_source(opts.conn)  # postgres+aws: its region is resolved now, before the store opens
    st = _opening(location, args)  # unlocked while the backup connects and starts its tools
    if not isinstance(opts, LogicalSourceOptions):
        return _pg_physical_backup(st, opts, args)
    res = logical_backup(st, opts, tags=args.tag, labels=parse_labels(args.label),
                         idempotency_key=args.idempotency_key, password=password)
    for w in res.warnings:
        print(f"pgplakar: warning: {w}", file=sys.stderr)
    if args.json:
        output.emit_json({"snapshot": res.snapshot_id, "databases": res.databases, "bytes": res.bytes,
                          "new_bytes": res.new_bytes, "new_stored_bytes": res.new_stored_bytes,
                          "per_database": res.per_database, "warnings": res.warnings})
    else:
        from ..pg.backup_stats import database_line

        print(f"snapshot {res.snapshot_id[:8]} created: {len(res.databases)} database(s), "
              f"{output.human_bytes(res.bytes)}, {output.human_bytes(res.new_bytes)} new "
              f"({output.human_bytes(res.new_stored_bytes)} stored)")
        for row in res.per_database:
            print(f"  {row['database']}: {database_line(row)}")
    return 0


def _pg_physical_backup(st: OpeningStore, opts: Any, args: argparse.Namespace) -> int:
    from ..pg.physical import physical_backup

    res = physical_backup(st, opts, tags=args.tag, labels=parse_labels(args.label),
                          idempotency_key=args.idempotency_key)
    for w in res.warnings:
        print(f"pgplakar: warning: {w}", file=sys.stderr)
    if args.json:
        output.emit_json({"snapshot": res.snapshot_id, **res.as_dict()})
    else:
        spaces = f" + {len(res.tablespaces)} tablespace(s)" if res.tablespaces else ""
        print(f"snapshot {res.snapshot_id[:8]} created: physical backup of PostgreSQL {res.major}{spaces}, "
              f"{res.files} files, {output.human_bytes(res.bytes)}, {output.human_bytes(res.new_stored_bytes)} stored")
    return 0


def _physical_restore(st: Store, sid: str, args: argparse.Namespace) -> int:
    from ..pg.datadir import physical_restore

    res = physical_restore(st, sid, args.to, tablespace_mapping=args.tablespace_mapping, overwrite=args.overwrite,
                           pg_bin_dir=args.pg_bin_dir, verify=not args.no_verify,
                           require_verify=args.require_verify, owner=args.owner, sync=not args.no_sync,
                           clean=not args.no_clean)
    for w in res.warnings:
        print(f"pgplakar: warning: {w}", file=sys.stderr)
    if args.json:
        output.emit_json(res.as_dict())
    else:
        print(res.text())
    return 0


def _physical_flags(args: argparse.Namespace) -> list[str]:
    """The options given that only a whole physical snapshot restored to a directory understands."""
    given = {"--tablespace-mapping": args.tablespace_mapping, "--pg-bin-dir": args.pg_bin_dir,
             "--no-verify": args.no_verify, "--require-verify": args.require_verify, "--owner": args.owner,
             "--no-clean": args.no_clean}
    return [flag for flag, value in given.items() if value]


def _pg_restore(location: str, args: argparse.Namespace) -> int:
    from ..pg.iam import password_source
    from ..pg.options import parse_restore_options
    from ..pg.restore import RestoreFailed, logical_restore

    directory_only = _physical_flags(args) + [f for f, v in (("--overwrite", args.overwrite),
                                                              ("--no-sync", args.no_sync)) if v]
    if directory_only:  # silently ignored before: a user who meant a data directory would get a database restore
        raise UsageError(f"{', '.join(directory_only)}: for a directory destination only; a postgres:// "
                         "destination takes key=value options (e.g. recreate=true, clean=true)")
    snapshot, options = _snapshot_among_options(args.items, "restore", "recreate=true")
    opts = parse_restore_options(args.to, _pg_options(options, args.to))
    password = password_source(opts.conn)  # postgres+aws: its region is resolved now, before the store opens
    st = _open(location, args)
    sid = st.resolve(snapshot)
    try:
        summary = logical_restore(st, sid, opts, password=password)
    except RestoreFailed as e:  # one line; -v has logged every record's result with the tools' full output
        if args.verbose:
            raise
        raise RestoreFailed(e.summary, note="-v shows the tools' full output") from None
    if args.json:
        output.emit_json(summary.as_dict())
    else:
        print(summary.text())
    return 0


def cmd_restore(location: str, args: argparse.Namespace) -> int:
    if args.to.startswith(PG_SCHEMES):
        return _pg_restore(location, args)
    _refuse_unknown_scheme(args.to, "-to is a directory or a postgres:// or postgres+aws:// location")
    if len(args.items) != 1:
        raise UsageError("key=value options are for postgres:// destinations only")
    st = _open(location, args)
    snap_ref, path = _split_target(args.items[0])
    sid = st.resolve(snap_ref)
    from ..pg.datadir import is_physical_snapshot

    if path is None and is_physical_snapshot(st, sid):  # a whole physical snapshot: a startable data directory
        return _physical_restore(st, sid, args)
    if _physical_flags(args):
        raise UsageError("--tablespace-mapping, --pg-bin-dir, --no-verify, --require-verify, --owner and --no-clean "
                         "apply to a whole physical (postgres+bin) snapshot only")
    from ..store import files

    n = files.restore_records(st, lambda: st.records(sid, path), args.to, overwrite=args.overwrite,
                              sync=not args.no_sync)
    if args.json:
        output.emit_json({"snapshot": sid, "files": n, "to": os.path.abspath(args.to)})
    else:
        print(f"restored {n} file(s) from {sid[:8]} to {args.to}")
    return 0


def cmd_check(location: str, args: argparse.Namespace) -> int:
    from ..store import check as check_mod

    subset = None
    if args.read_data_subset is not None:  # refused before the store is opened
        if args.read_data:
            raise UsageError("give --read-data or --read-data-subset, not both")
        try:
            subset = check_mod.parse_subset(args.read_data_subset)
        except ValueError as e:
            raise UsageError(f"--read-data-subset: {str(e).split(': ', 1)[1]}") from None
    st = _open(location, args)
    rep = check_mod.check(st, read_data=args.read_data, read_data_subset=subset,
                          progress=(lambda m: print(f"pgplakar: {m}", file=sys.stderr)) if args.verbose else None)
    if args.json:
        output.emit_json(rep.as_dict())
    else:
        for p in rep.problems:
            print(f"ERROR {p}")
        for n in rep.notes:
            print(f"note: {n}")
        print(f"{'ok' if rep.ok else 'FAILED'}: {rep.snapshots} snapshots, {rep.records} records, {rep.packs} packs"
              + (f", {rep.blobs_read} blobs / {output.human_bytes(rep.bytes_read)} read" if rep.read_data else "")
              + (f" ({rep.packs_read} packs of subset {rep.subset})" if rep.subset else ""))
    return 0 if rep.ok else 3


def cmd_forget(location: str, args: argparse.Namespace) -> int:
    from ..store import forget as forget_mod
    from ..store import prune as prune_mod
    from ..store.retention import Policy

    within = parse_duration(args.keep_within) if args.keep_within is not None else None  # refused before opening
    policy_given = any(getattr(args, f"keep_{r}") for r in ("last", "hourly", "daily", "weekly", "monthly", "yearly"))
    policy_given = policy_given or within is not None or bool(args.keep_tag)
    if args.ids and policy_given:
        raise UsageError("give snapshot IDs or a --keep-* policy, not both")
    if not args.ids and not policy_given:
        raise UsageError("forget needs snapshot IDs or at least one --keep-* rule")
    policy = None
    if policy_given:
        policy = Policy(
            keep_last=args.keep_last, keep_hourly=args.keep_hourly, keep_daily=args.keep_daily,
            keep_weekly=args.keep_weekly, keep_monthly=args.keep_monthly, keep_yearly=args.keep_yearly,
            keep_within=within,
            keep_tags=tuple(args.keep_tag), tz=args.tz,
        )
    group_by = _group_by(args.group_by)
    st = _open(location, args)
    res = forget_mod.forget(st, policy, ids=args.ids, group_by=group_by, dry_run=args.dry_run)
    result: dict[str, Any] = res.as_dict()
    if not args.json:
        for g in res.groups:
            print(f"group {g['group']}: keep {len(g['keep'])}, remove {len(g['remove'])}")
            for k in g["keep"]:
                print(f"  keep   {k['id'][:8]} {k['time']}  ({', '.join(k['reasons'])})")
            for sid in g["remove"]:
                print(f"  remove {sid[:8]}")
    pruned = prune_mod.prune(st) if not args.dry_run and args.prune else None
    if pruned is not None:
        result["prune"] = pruned.as_dict()
    if args.json:
        output.emit_json(result)
        return 0
    print(f"{'would remove' if args.dry_run else 'removed'} {len(res.removed)} snapshot(s)")
    if pruned is not None:
        print(_prune_sentence(pruned, dry_run=False))
    return 0


def _prune_sentence(rep: PruneReport, *, dry_run: bool) -> str:
    verb = "would delete" if dry_run else "deleted"
    return (f"prune: {verb} {rep.packs_deleted} pack(s) ({rep.packs_repacked} repacked), "
            f"{output.human_bytes(rep.bytes_freed)} freed; {rep.snapshots} snapshot(s) kept")


def cmd_prune(location: str, args: argparse.Namespace) -> int:
    from ..store import prune as prune_mod

    st = _open(location, args)
    rep = prune_mod.prune(st, dry_run=args.dry_run, lock_wait=args.wait)
    if args.json:
        output.emit_json(rep.as_dict())
    else:
        print(_prune_sentence(rep, dry_run=args.dry_run))
    return 0


def _group_by(text: str) -> tuple[str, ...]:
    from ..store.retention import parse_group_by

    try:
        return parse_group_by(text)
    except ValueError as e:
        raise UsageError(f"--group-by: {e}") from None


def cmd_stats(location: str, args: argparse.Namespace) -> int:
    from ..store.stats import age_text, store_stats

    group_by = _group_by(args.group_by)
    st = _open(location, args)
    rep = store_stats(st, group_by=group_by)
    for e in rep.unreadable:
        print(f"pgplakar: warning: {e}", file=sys.stderr)
    if args.json:
        output.emit_json(rep.as_dict())
        return 0
    hb = output.human_bytes
    output.table(["source", "snapshots", "newest", "time", "age", "size", "new", "stored (all)"],
                 [[s.source, s.snapshots, s.newest[:8], s.newest_time[:19].replace("T", " "), age_text(s.age_s),
                   hb(s.bytes), hb(s.new_stored_bytes), hb(s.stored_bytes_total)] for s in rep.sources])
    print(f"store: {rep.snapshots} snapshots, {hb(rep.logical_bytes)} logical, {hb(rep.stored_bytes)} stored in "
          f"{rep.packs} packs, dedup ratio {rep.dedup_ratio:.2f}")
    return 0


def cmd_freshness(location: str, args: argparse.Namespace) -> int:
    from ..store.stats import age_text, freshness, parse_max_age

    try:
        max_age = parse_max_age(args.max_age)
    except ValueError as e:
        raise UsageError(f"--max-age: {str(e).split(': ', 1)[1]}") from None
    group_by = _group_by(args.group_by)
    st = _open(location, args)
    rep = freshness(st, max_age, group_by=group_by)
    if args.json:
        output.emit_json(rep.as_dict())
    else:
        stale = {id(s) for s in rep.stale}
        for s in rep.sources:
            print(f"{'STALE' if id(s) in stale else 'ok   '} {s.source}: newest {s.newest[:8]} at "
                  f"{s.newest_time[:19].replace('T', ' ')} ({age_text(s.age_s)} old)")
    if not rep.ok:
        print(f"pgplakar: {rep.failure_text()}", file=sys.stderr)
        return 3
    return 0


def cmd_info(location: str, args: argparse.Namespace) -> int:
    st = _open(location, args)
    if args.target:
        snap = st.load_snapshot(st.resolve(args.target))
        h = {k: v for k, v in snap.header.items() if k != "manifest"}
        if args.json:
            output.emit_json(h)
        else:
            rows = output.snapshot_rows(h)
            width = max(len(label) for label, _ in rows)
            for label, text in rows:
                print(f"{label:{width}}  {text}")
        return 0
    c = st.config
    info = {"location": st.location, "format": c.format, "repo_id": c.repo_id, "encryption": c.encryption,
            "chunker": c.chunker,
            "compression": c.compression, "pack_target": c.pack_target, "created": c.created,
            "snapshots": len(st.snapshot_ids())}
    if args.json:
        output.emit_json(info)
    else:
        ch, comp = c.chunker, c.compression
        human = {**info,
                 "chunker": f"{ch.get('alg')} {output.human_bytes(ch.get('min', 0))} / "
                            f"{output.human_bytes(ch.get('avg', 0))} / {output.human_bytes(ch.get('max', 0))} "
                            f"(min / average / max; {ch.get('lib')})",
                 "compression": f"{comp.get('alg')} level {comp.get('level')}" if comp.get("level") else "none",
                 "pack_target": output.human_bytes(c.pack_target)}
        for k, v in human.items():
            print(f"{k:12} {v}")
    return 0


def cmd_key(location: str, args: argparse.Namespace) -> int:
    st = _open(location, args)
    if args.action == "list":
        keys = st.list_keys()
        if args.json:
            output.emit_json(keys)
        else:
            output.table(["id", "created", "host", "comment"],
                         [[k["id"], k["created"][:19], k["host"], k["comment"]] for k in keys])
        return 0
    if args.action == "export":
        print(st.export_key())
        return 0
    if args.action == "remove":
        if not args.key_id:
            raise UsageError("key remove needs a key ID (see `key list`)")
        st.remove_key(args.key_id)
        print(f"removed key {args.key_id}")
        return 0
    new = get_passphrase(args.new_passphrase_file, prompt="new passphrase", confirm=True,
                         env="PGPLAKAR_NEW_PASSPHRASE")
    if not new:
        raise UsageError("no new passphrase: use --new-passphrase-file or $PGPLAKAR_NEW_PASSPHRASE")
    key_id = st.add_key(new, comment=args.action)
    if args.action == "passwd":
        old = _unlocking_key(st, args)
        if old and old != key_id:
            st.remove_key(old)
    print(f"added key {key_id}")
    return 0


def _unlocking_key(st: Store, args: argparse.Namespace) -> str | None:
    """The key file that the current passphrase opens (removed by ``passwd``)."""
    from ..store.keyfiles import unwrap_key_file

    pw = get_passphrase(args.passphrase_file)
    if not pw:
        return None
    for obj in st.backend.list("keys/"):
        if unwrap_key_file(st.config, st.backend.get(obj.key), obj.key, pw.encode()) is not None:
            return obj.key.rsplit("/", 1)[-1]
    return None


def cmd_repair(location: str, args: argparse.Namespace) -> int:
    from ..store import prune as prune_mod

    st = _open(location, args)
    n = prune_mod.repair_index(st)
    print(f"index rebuilt from {n} pack(s)")
    return 0


Handler = Callable[[str, argparse.Namespace], int]
# every command of cli/parser.py's build_parser, and no other (tests/test_cli_structure.py)
COMMANDS: dict[str, Handler] = {
    "create": cmd_create, "backup": cmd_backup, "ls": cmd_ls, "verify": cmd_verify, "cat": cmd_cat,
    "restore": cmd_restore, "check": cmd_check, "forget": cmd_forget, "prune": cmd_prune, "stats": cmd_stats,
    "freshness": cmd_freshness, "info": cmd_info, "key": cmd_key, "repair": cmd_repair,
}

__all__ = ["COMMANDS", "run", "StoreError"]
