"""Restore a physical (``postgres+bin``) snapshot as a startable data directory.

Everything that can be refused is checked before the first byte is deleted or written (:func:`plan_restore`): the
snapshot kind, the PostgreSQL major of ``pg_bin_dir`` against the one that made the backup (from
``/manifest.json``), the ``tablespace_mapping`` entries, the target directories, the owner, and every record of
the snapshot (:mod:`..store.safefs`: no ``..``, no record below a symlink, no kind collision, hard links only to
earlier files of the same directory, symlinks only at ``pg_tblspc/<oid>`` of a tablespace of this backup). Then:

- the data directory is created with mode 0700 (the server refuses anything looser than 0750); modes, mtimes,
  symlinks and hard links come from the records, written through directory fds without following any symlink;
- ``pg_tblspc/<oid>`` symlinks point at the tablespace's new location (``tablespace_mapping`` ``OLD=NEW``, as
  ``pg_basebackup -T``; unmapped tablespaces go back to their original location, which must then be empty);
- as root, files get the snapshot's owner *names* (PostgreSQL's archives say ``postgres``) resolved on this host,
  or ``owner`` (``USER[:GROUP]``); otherwise they belong to the user running the restore;
- file content is written by :mod:`..store.batchrestore` (chunks of many files located, read and verified
  together on one pool, each chunk written (``pwrite``) only once it matched its ID) into files created here;
- every file and directory is fsynced before success is reported (``sync=False`` skips it, as
  ``pg_basebackup --no-sync``); a large file's writeback starts while it is written (every 8 MiB), so
  little is left for the fsyncs at the end;
- ``backup_manifest`` lands in the data directory and ``pg_verifybackup`` of the backup's major checks the result
  (with ``--no-parse-wal`` only when that installation has no ``pg_waldump``). A failed verification raises; the
  files are left in place for inspection. No verifier found: ``verified`` is false with a warning, and
  ``require_verify`` refuses the restore before it starts;
- a failure or cancellation while writing removes what the restore wrote, as ``pg_basebackup`` does (``clean=False``
  keeps it, as ``--no-clean``): a target directory it created goes entirely (with the parents it created, when they
  are empty), one that existed (empty, or emptied by ``overwrite``) is emptied again; nothing is followed through a
  symlink, and a partial data directory a user might start by mistake is not left behind.

Never deleted: ``overwrite`` empties only the data directory target. A tablespace directory that exists and is not
empty is refused unless it is mapped explicitly (``OLD=NEW``) *and* ``overwrite`` is given. A directory a running
server uses (``postmaster.pid``, or found through ``/proc``: a server's data directory or a tablespace linked from
its ``pg_tblspc``, or a directory holding one of those) is always refused.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..store.batchrestore import BatchRestore
from ..store.record import Record, RecordKind
from ..store.safefs import Owner, RecordPlan, SafeTree, UnsafeRecord, split_path, start_writeback
from ..store.sizes import human_bytes
from . import PgError, ToolError
from .physical import DATA_PREFIX, MANIFEST_PATH, SOURCE_KIND, TABLESPACES_PREFIX
from .process import check_cancelled, spawn, untrack_process
from .secrets import base_tool_env
from .tools import DEBIAN_BIN_GLOB, probe_version

if TYPE_CHECKING:
    from ..store.repo import Snapshot, Store

log = logging.getLogger(__name__)

__all__ = ["PhysicalRestoreError", "PhysicalRestoreResult", "parse_tablespace_mapping", "physical_restore",
           "plan_restore"]

VERIFY_TIMEOUT_S = 3600
VERIFY_DISABLED = "skipped (verify disabled)"
DATA = "data"  # the root key of the data directory (tablespace roots are keyed by their oid)


class PhysicalRestoreError(PgError):
    """A physical restore was refused (before writing) or failed (while writing: what it wrote is removed unless
    ``clean=False``; a failed verification leaves the files for inspection)."""


@dataclass(frozen=True)
class TablespaceTarget:
    oid: int
    location: str
    target: str
    mapped: bool = False


@dataclass
class RestorePlan:
    """What :func:`physical_restore` will do; built without writing anything."""

    snapshot_id: str
    target_dir: Path
    server_version: str
    server_version_num: int
    tablespaces: list[TablespaceTarget]
    verify_tool: str | None
    verify_note: str
    overwrite: bool
    owner: Owner | None = None  # explicit owner (as root)
    names: dict[tuple[str, str], int] = field(default_factory=dict)  # ("u"|"g", name) -> id on this host
    root_owner: tuple[int | None, int | None] = (None, None)
    sync: bool = True
    require_verify: bool = False
    clean: bool = True  # a failure while writing removes what was written (pg_basebackup; --no-clean keeps it)

    @property
    def major(self) -> int:
        return self.server_version_num // 10000

    def empties(self) -> list[Path]:
        """The directories ``overwrite`` empties: the data directory, and tablespaces mapped explicitly."""
        if not self.overwrite:
            return []
        return [self.target_dir] + [Path(t.target) for t in self.tablespaces if t.mapped]


@dataclass
class PhysicalRestoreResult:
    snapshot_id: str
    target_dir: str
    server_version: str
    major: int
    files: int
    bytes: int
    tablespaces: list[dict[str, Any]] = field(default_factory=list)
    verified: bool | None = None
    verify_note: str = ""
    owner: str = ""
    synced: bool = True
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        lines = [f"restored snapshot {self.snapshot_id[:8]} (PostgreSQL {self.server_version}) to {self.target_dir}: "
                 f"{self.files} files, {human_bytes(self.bytes)}"]
        for ts in self.tablespaces:
            lines.append(f"tablespace {ts['oid']}: {ts['location']} -> {ts['restored_to']}")
        lines.append(f"pg_verifybackup: {self.verify_note}")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        lines.append(f"start it with PostgreSQL {self.major} (same major version as the backup), e.g. "
                     f"pg_ctl -D {self.target_dir} start; it recovers from the included WAL on first start")
        if self.owner:
            lines.append(f"files are owned by {self.owner}")
        if not self.synced:
            lines.append("not synced to disk (--no-sync): a crash soon after may lose files")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Options


def parse_tablespace_mapping(items: Iterable[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``OLD=NEW`` strings (``\\=`` escapes an ``=`` in a path, as pg_basebackup -T) or a mapping -> {OLD: NEW}.

    Both sides must be absolute; they are normalised (``/a/b/`` and ``/a/./b`` are ``/a/b``).
    """
    if items is None:
        return {}
    pairs: list[tuple[str, str]]
    if isinstance(items, Mapping):
        pairs = [(str(k), str(v)) for k, v in items.items()]
    elif isinstance(items, str):
        raise PhysicalRestoreError("tablespace_mapping: give a list of OLD=NEW strings or a mapping, not one string")
    else:
        pairs = [_split_mapping(item) for item in items]
    out: dict[str, str] = {}
    for old, new in pairs:
        for what, path in (("old", old), ("new", new)):
            if not path or not os.path.isabs(path) or "\0" in path:
                raise PhysicalRestoreError(f"tablespace_mapping: the {what} directory must be an absolute path, "
                                           f"got {path!r}")
        old, new = os.path.normpath(old), os.path.normpath(new)
        if old in out and out[old] != new:
            raise PhysicalRestoreError(f"tablespace_mapping: {old} is mapped twice")
        out[old] = new
    return out


def _split_mapping(item: str) -> tuple[str, str]:
    old: list[str] = []
    i = 0
    while i < len(item):
        ch = item[i]
        if ch == "\\" and i + 1 < len(item) and item[i + 1] == "=":
            old.append("=")
            i += 2
            continue
        if ch == "=":
            new = item[i + 1 :].replace("\\=", "=")
            if "=" in item[i + 1 :].replace("\\=", ""):
                raise PhysicalRestoreError(f"tablespace_mapping: multiple '=' signs in {item!r} (escape with \\=)")
            return "".join(old), new
        old.append(ch)
        i += 1
    raise PhysicalRestoreError(f"tablespace_mapping: {item!r} is not OLD=NEW")


# ----------------------------------------------------------------------------------------------------------------
# Plan: every refusal happens here


def plan_restore(
    store: Store,
    snapshot_id: str,
    target_dir: str | os.PathLike[str],
    *,
    tablespace_mapping: Mapping[str, str] | Iterable[str] | None = None,
    overwrite: bool = False,
    pg_bin_dir: str | None = None,
    verify: bool = True,
    require_verify: bool = False,
    owner: str | None = None,
    sync: bool = True,
    clean: bool = True,
) -> RestorePlan:
    if require_verify and not verify:
        raise PhysicalRestoreError("require_verify and verify=false (--no-verify) contradict each other: drop one")
    snap = store.load_snapshot(snapshot_id)
    source = snap.header.get("source") or {}
    if source.get("kind") != SOURCE_KIND:
        raise PhysicalRestoreError(f"snapshot {snap.short_id} is a {source.get('kind') or 'non-PostgreSQL'} "
                                   "snapshot, not a physical (postgres+bin) backup")
    meta = snap.header.get("meta") or {}
    num, version = _server_version(store, snap, meta)
    major = num // 10000
    if pg_bin_dir is not None:
        _check_bin_dir(pg_bin_dir, major)
    explicit_owner = _parse_owner(owner)
    mapping = parse_tablespace_mapping(tablespace_mapping)
    tablespaces = _plan_tablespaces(meta.get("tablespaces") or [], mapping)
    target = Path(os.path.abspath(target_dir))
    _check_targets(target, tablespaces, overwrite)
    tool, note = _find_verifier(major, pg_bin_dir) if verify else (None, VERIFY_DISABLED)
    if require_verify and tool is None:
        raise PhysicalRestoreError(f"require_verify: {note}; install it or pass pg_bin_dir (--pg-bin-dir) of a "
                                   f"PostgreSQL {major} installation that has it")
    plan = RestorePlan(snap.id, target, version, num, tablespaces, tool, note, overwrite, explicit_owner, sync=sync,
                       require_verify=require_verify, clean=clean)
    _check_records(store, snap, plan)
    return plan


def _parse_owner(owner: str | None) -> Owner | None:
    """``USER[:GROUP]`` (names or numbers) -> ids on this host; only root can give files away."""
    if owner is None or owner == "":
        return None
    if os.geteuid() != 0:
        raise PhysicalRestoreError(f"owner={owner}: only a restore running as root can give files another owner "
                                   "(without it, files belong to the user running the restore)")
    user, _, group = owner.partition(":")
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise PhysicalRestoreError(f"owner={owner}: no user {user!r} on this host") from None
    if not group:
        return Owner(pw.pw_uid, pw.pw_gid)
    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise PhysicalRestoreError(f"owner={owner}: no group {group!r} on this host") from None
    return Owner(pw.pw_uid, gid)


def _server_version(store: Store, snap: Snapshot, meta: Mapping[str, Any]) -> tuple[int, str]:
    """Server version from ``/manifest.json`` (the snapshot header's copy when the manifest lacks it)."""
    manifest: dict[str, Any] = {}
    try:
        rec = next(store.records(snap, MANIFEST_PATH), None)
        if rec is not None and rec.kind == RecordKind.FILE:
            with store.open_record(rec) as src:
                manifest = json.loads(b"".join(src.iter_chunks()))
    except (ValueError, OSError) as exc:
        log.warning("cannot read %s of snapshot %s: %s", MANIFEST_PATH, snap.short_id, exc)
    num = manifest.get("server_version_num") or meta.get("server_version_num")
    if not isinstance(num, int) or num < 100000:
        raise PhysicalRestoreError(f"snapshot {snap.short_id} does not say which PostgreSQL version made it")
    header_num = meta.get("server_version_num")
    if isinstance(header_num, int) and header_num // 10000 != num // 10000:
        raise PhysicalRestoreError(f"snapshot {snap.short_id}: manifest and header disagree on the major version")
    return num, str(manifest.get("server_version") or f"{num // 10000}.{num % 10000}")


def _check_bin_dir(pg_bin_dir: str, major: int) -> None:
    """The binaries that will start (and verify) the restored directory must be the backup's major version."""
    for name in ("postgres", "pg_ctl", "pg_verifybackup"):
        path = os.path.join(pg_bin_dir, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            try:
                found = probe_version(path, name).major
            except ToolError as exc:
                raise PhysicalRestoreError(f"pg_bin_dir: {exc}") from None
            if found != major:
                raise PhysicalRestoreError(
                    f"pg_bin_dir {pg_bin_dir} holds PostgreSQL {found}, but this backup was made by PostgreSQL "
                    f"{major} and only PostgreSQL {major} can start it: use a PostgreSQL {major} bin directory"
                )
            return
    raise PhysicalRestoreError(f"pg_bin_dir {pg_bin_dir} has no postgres, pg_ctl or pg_verifybackup")


def _plan_tablespaces(recorded: list[dict[str, Any]], mapping: dict[str, str]) -> list[TablespaceTarget]:
    by_location = {os.path.normpath(t["location"]): t for t in recorded if t.get("location")}
    unknown = sorted(set(mapping) - set(by_location))
    if unknown:
        known = ", ".join(sorted(by_location)) or "none"
        raise PhysicalRestoreError(f"tablespace_mapping: {', '.join(unknown)} is not a tablespace location of this "
                                   f"backup (its tablespaces: {known})")
    out = []
    for t in recorded:
        location = os.path.normpath(t["location"])
        if not os.path.isabs(location) or "\0" in location:
            raise PhysicalRestoreError(f"tablespace {t.get('oid')} has the location {t['location']!r}, which is not "
                                       "an absolute path: the snapshot is damaged or hostile")
        out.append(TablespaceTarget(int(t["oid"]), t["location"], mapping.get(location, location),
                                    location in mapping))
    return out


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _check_targets(target: Path, tablespaces: list[TablespaceTarget], overwrite: bool) -> None:
    dirs = [("data directory", target, True)] + [(f"tablespace {t.oid} directory", Path(t.target), t.mapped)
                                                   for t in tablespaces]
    busy = running_servers()
    for i, (what, path, _) in enumerate(dirs):
        for other_what, other, _ in dirs[i + 1 :]:
            if _is_within(path, other) or _is_within(other, path):
                raise PhysicalRestoreError(f"the {what} {path} and the {other_what} {other} overlap: map the "
                                           "tablespace elsewhere (tablespace_mapping OLD=NEW)")
        _check_not_in_use(what, path, busy)
    _check_empty("data directory", target, overwrite)
    for t in tablespaces:
        _check_tablespace(t, overwrite)


def _check_not_in_use(what: str, path: Path, busy: list[tuple[int, Path, str]]) -> None:
    real = Path(os.path.realpath(path))
    for pid, used, how in busy:
        if _is_within(real, used) or _is_within(used, real):
            raise PhysicalRestoreError(f"the {what} {path} overlaps {used}, {how} of a running PostgreSQL server "
                                       f"(pid {pid}): a running server's files are never restored over; restore "
                                       "elsewhere (or map the tablespace elsewhere with tablespace_mapping OLD=NEW)")


def _check_empty(what: str, path: Path, overwrite: bool) -> None:
    entries = _entries(what, path)
    if "postmaster.pid" in entries:
        raise PhysicalRestoreError(f"the {what} {path} holds postmaster.pid: a server may be running on it"
                                   f"{_pid_state(path / 'postmaster.pid')}; stop it (or remove a stale "
                                   "postmaster.pid) first")
    if entries and not overwrite:
        raise PhysicalRestoreError(f"the {what} {path} is not empty: restore into an empty directory, or pass "
                                   "overwrite (--force) to empty it first")


def _pid_state(pidfile: Path) -> str:
    """Whether the pid in a ``postmaster.pid`` is alive here (either way the directory is refused: a server in
    another pid namespace, such as a container, looks dead from here)."""
    try:
        with open(pidfile, "rb") as f:
            pid = int(f.read(64).split(b"\n", 1)[0])
        os.kill(pid, 0)
    except (OSError, ValueError) as exc:
        if isinstance(exc, PermissionError):
            return f" (pid {pid} is running)"
        if isinstance(exc, ProcessLookupError):
            return f" (pid {pid} is not running on this host: stale, or a server in another container)"
        return ""
    return f" (pid {pid} is running)"


def _check_tablespace(t: TablespaceTarget, overwrite: bool) -> None:
    what = f"tablespace {t.oid} directory"
    entries = _entries(what, Path(t.target))
    if not entries or (t.mapped and overwrite):
        return
    if t.mapped:
        raise PhysicalRestoreError(f"the {what} {t.target} (tablespace_mapping {t.location}={t.target}) is not "
                                   "empty: map the tablespace to an empty directory, or pass overwrite (--force) to "
                                   "empty this mapped directory first")
    raise PhysicalRestoreError(
        f"the {what} {t.target} (its original location, not mapped) is not empty: map the tablespace to an empty "
        f"directory (tablespace_mapping / -T {t.location}=NEW), or, to replace what is there, map it explicitly "
        f"(-T {t.location}={t.location}) and pass overwrite (--force); overwrite alone never empties a tablespace"
    )


def _entries(what: str, path: Path) -> list[str]:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise PhysicalRestoreError(f"the {what} {path} exists and is not a directory")
    if not path.exists():
        return []
    try:
        return os.listdir(path)
    except OSError as exc:
        raise PhysicalRestoreError(f"the {what} {path} cannot be read: {exc.strerror}") from None


def running_servers(proc: str = "/proc") -> list[tuple[int, Path, str]]:
    """(pid, directory, what) for PostgreSQL servers visible in ``/proc``: each server's data directory (its
    processes' working directory holds ``postmaster.pid``) and every tablespace its ``pg_tblspc`` links to."""
    seen: set[str] = set()
    out: list[tuple[int, Path, str]] = []
    try:
        pids = [e.name for e in os.scandir(proc) if e.name.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            cwd = os.readlink(f"{proc}/{pid}/cwd")
        except OSError:
            continue
        if cwd in seen or not os.path.isfile(os.path.join(cwd, "postmaster.pid")):
            continue
        seen.add(cwd)
        tblspc = os.path.join(cwd, "pg_tblspc")
        if not os.path.isdir(tblspc):
            continue
        out.append((int(pid), Path(os.path.realpath(cwd)), "the data directory"))
        try:
            links = os.listdir(tblspc)
        except OSError:
            continue
        for name in links:
            link = os.path.join(tblspc, name)
            if os.path.islink(link):
                out.append((int(pid), Path(os.path.realpath(link)), f"tablespace {name}"))
    return out


def _check_records(store: Store, snap: Snapshot, plan: RestorePlan) -> None:
    """Validate every record before anything is written; resolve the owner names (as root) on this host."""
    layout = _Layout(plan)
    names: set[tuple[str, str]] = set()
    first: Record | None = None  # the first data directory record with an owner: owns the roots
    for rec in store.records(snap):
        where = layout.locate(rec)
        if where is None:
            continue
        for key, name in (("u", rec.uname), ("g", rec.gname)):
            if name is not None:
                names.add((key, name))
        if first is None and where[0] == DATA and (rec.uid is not None or rec.uname is not None):
            first = rec
    if os.geteuid() == 0 and plan.owner is None:
        for key, name in sorted(names):
            try:
                plan.names[(key, name)] = pwd.getpwnam(name).pw_uid if key == "u" else grp.getgrnam(name).gr_gid
            except KeyError:
                what = "user" if key == "u" else "group"
                raise PhysicalRestoreError(
                    f"the snapshot's files belong to the {what} {name!r}, which does not exist on this host: create "
                    "it, or pass owner=USER[:GROUP] (--owner) naming the server's OS user") from None
    if first is not None:
        ids = record_owner(plan, first)
        plan.root_owner = (ids["uid"], ids["gid"])


def record_owner(plan: RestorePlan, rec: Record) -> dict[str, int | None]:
    """uid/gid for a record: its owner names resolved on this host (as root), else its numeric ids."""
    uid = plan.names.get(("u", rec.uname)) if rec.uname is not None else rec.uid
    gid = plan.names.get(("g", rec.gname)) if rec.gname is not None else rec.gid
    return {"uid": uid if isinstance(uid, int) and uid >= 0 else None,
            "gid": gid if isinstance(gid, int) and gid >= 0 else None}


class _Layout:
    """Maps snapshot records to (root, path parts) and validates them (one :class:`RecordPlan` per root)."""

    def __init__(self, plan: RestorePlan) -> None:
        self.ts = {str(t.oid): t for t in plan.tablespaces}
        self.plans = {DATA: RecordPlan(), **{oid: RecordPlan() for oid in self.ts}}

    def where(self, path: str) -> tuple[str, tuple[str, ...]] | None:
        parts = split_path(path)
        if path == MANIFEST_PATH or parts == (TABLESPACES_PREFIX[1:],):
            return None
        if parts and parts[0] == DATA_PREFIX[1:]:
            return DATA, parts[1:]
        if len(parts) >= 2 and parts[0] == TABLESPACES_PREFIX[1:] and parts[1] in self.ts:
            return parts[1], parts[2:]
        raise UnsafeRecord(str(path), "it does not belong to the physical snapshot layout (/data/..., "
                                      "/tablespaces/<oid of a tablespace of this backup>/...)")

    def locate(self, rec: Record) -> tuple[str, tuple[str, ...]] | None:
        p = rec.path
        where = self.where(p)
        if where is None:
            return None
        root, parts = where
        kind = rec.kind
        if kind == RecordKind.ERROR:
            raise PhysicalRestoreError(f"{p} was not backed up ({rec.error}): the snapshot is incomplete")
        if kind == RecordKind.SYMLINK and not (root == DATA and len(parts) == 2 and parts[0] == "pg_tblspc"
                                and parts[1] in self.ts):
            raise UnsafeRecord(str(p), "a physical restore accepts symlinks only at pg_tblspc/<oid> of a "
                                       "tablespace of this backup")
        link_to = None
        if kind == RecordKind.HARDLINK:
            target = self.where(rec.link_target) if rec.link_target is not None else None
            if target is None or target[0] != root:
                raise UnsafeRecord(str(p), f"its hard link target {rec.link_target!r} is not a file of the same "
                                           "directory")
            link_to = target[1]
        self.plans[root].add(parts, kind or "?", str(p), link_to=link_to)
        return root, parts


def _find_verifier(major: int, pg_bin_dir: str | None) -> tuple[str | None, str]:
    """A ``pg_verifybackup`` of exactly the backup's major version (newer ones may read manifests differently)."""
    if pg_bin_dir is not None:
        dirs = [pg_bin_dir]
    else:
        dirs = [DEBIAN_BIN_GLOB.replace("*", str(major)), *os.environ.get("PATH", os.defpath).split(os.pathsep)]
    for d in dirs:
        path = os.path.join(d, "pg_verifybackup")
        if not d or not os.path.isfile(path) or os.path.basename(os.path.realpath(path)) == "pg_wrapper":
            continue
        try:
            if probe_version(path, "pg_verifybackup").major == major:
                return path, "pending"
        except ToolError:
            continue
    where = pg_bin_dir or "the standard locations"
    return None, f"skipped: no pg_verifybackup of PostgreSQL {major} in {where}"


# ----------------------------------------------------------------------------------------------------------------
# Restore


def physical_restore(
    store: Store,
    snapshot_id: str,
    target_dir: str | os.PathLike[str],
    *,
    tablespace_mapping: Mapping[str, str] | Iterable[str] | None = None,
    overwrite: bool = False,
    pg_bin_dir: str | None = None,
    verify: bool = True,
    require_verify: bool = False,
    owner: str | None = None,
    sync: bool = True,
    clean: bool = True,
) -> PhysicalRestoreResult:
    """Restore ``snapshot_id`` into ``target_dir`` (see the module docstring); raise on any refusal or failure.

    ``clean=False`` keeps what a failed restore wrote, for debugging (``pg_basebackup --no-clean``)."""
    plan = plan_restore(store, snapshot_id, target_dir, tablespace_mapping=tablespace_mapping, overwrite=overwrite,
                        pg_bin_dir=pg_bin_dir, verify=verify, require_verify=require_verify, owner=owner, sync=sync,
                        clean=clean)
    for root in plan.empties():
        _empty(root)
    writer = _Writer(store, plan)
    try:
        writer.open()
        for rec in store.records(plan.snapshot_id):
            check_cancelled()
            writer.add(rec)
        writer.finish()
        writer.close()
    except BaseException:
        writer.close(success=False)
        _after_failure(plan, writer)
        raise
    result = PhysicalRestoreResult(
        plan.snapshot_id, str(plan.target_dir), plan.server_version, plan.major, writer.files, writer.bytes,
        [{"oid": t.oid, "location": t.location, "restored_to": t.target} for t in plan.tablespaces],
        verify_note=plan.verify_note, owner=writer.owner_text(), synced=plan.sync,
    )
    if plan.verify_tool is not None:
        result.verified, result.verify_note = _verify(plan.verify_tool, plan.target_dir)
    else:
        result.verified = False
    if not result.verified and result.verify_note != VERIFY_DISABLED:  # not asked for: no warning
        result.warnings.append(f"the restored directory was not verified: pg_verifybackup {result.verify_note}")
        if plan.require_verify:
            raise PhysicalRestoreError(f"require_verify: {result.warnings[-1]} (the files are left in "
                                       f"{plan.target_dir})")
        log.warning("%s", result.warnings[-1])
    log.info("%s", result.text())
    return result


def _after_failure(plan: RestorePlan, writer: _Writer) -> None:
    """Remove what a failed restore wrote (``plan.clean``), or say what was left; never raises (the restore's own
    exception is the one to report)."""
    roots = [t.root for t in writer.trees.values()]
    if not plan.clean:
        log.error("restore into %s failed after %d files; kept as asked (clean=False, --no-clean): %s %s "
                  "incomplete and must not be started; remove %s, or retry with overwrite", plan.target_dir,
                  writer.files, ", ".join(roots) or "nothing was written", "is" if len(roots) == 1 else "are",
                  "it" if len(roots) == 1 else "them")
        return
    removed, failed = [], []
    for tree in sorted(writer.trees.values(), key=lambda t: t.root == str(plan.target_dir)):  # data directory last
        try:
            _discard(tree, writer.found.get(tree.root, set()))
        except Exception as exc:  # noqa: BLE001 (logged; the restore's own exception follows)
            failed.append(f"{tree.root} ({getattr(exc, 'strerror', None) or exc})")
        else:
            removed.append(tree.root if tree.root in tree.created else f"the contents of {tree.root}")
    log.error("restore into %s failed after %d files; removed what it wrote: %s", plan.target_dir, writer.files,
              ", ".join(removed) or "nothing")
    if failed:
        log.error("could not remove %s: incomplete, never start it; remove it by hand", "; ".join(failed))


def _discard(tree: SafeTree, keep: set[str]) -> None:
    """Remove what is below a (closed) tree's root but ``keep`` (entries found there when it was opened: not ours);
    then the root and the parents it made, if it made them.

    Through a directory fd opened ``O_NOFOLLOW``: entries that are symlinks (``pg_tblspc/<oid>``) are unlinked,
    never followed (``shutil.rmtree`` with ``dir_fd`` works through fds too)."""
    fd = os.open(tree.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for name in os.listdir(fd):
            if name in keep:
                log.warning("left %s in %s: it was there before this restore wrote anything", name, tree.root)
            elif stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                shutil.rmtree(name, dir_fd=fd)
            else:
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    if tree.root not in tree.created or keep:
        return
    os.rmdir(tree.root)
    for parent in reversed(tree.created[:-1]):  # mkdir -p'd parents, innermost first, while nothing else is there
        try:
            os.rmdir(parent)
        except OSError:
            break


def _empty(root: Path) -> None:
    """Remove what is inside ``root`` (never following a symlink: rmtree works through directory fds)."""
    if not root.exists():
        return
    log.warning("overwrite: removing the contents of %s", root)
    for entry in os.scandir(root):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def _mode(rec: Record, default: int) -> int:
    return default if rec.mode is None else rec.mode


class _Writer:
    """Writes records below the data directory and the tablespace directories; directory attributes last."""

    def __init__(self, store: Store, plan: RestorePlan) -> None:
        self.store = store
        self.plan = plan
        self.layout = _Layout(plan)
        self.ts_links = {t.oid: t.target for t in plan.tablespaces}
        self.trees: dict[str, SafeTree] = {}
        self.dirs: list[tuple[str, tuple[str, ...], Record]] = []
        self.files = 0
        self.bytes = 0
        self.batch: BatchRestore | None = None
        self.found: dict[str, set[str]] = {}  # root -> entries in it before the first write (none, unless raced)

    def open(self) -> None:
        """Create (or open) the roots; ``self.trees`` holds each as soon as it exists, for the cleanup."""
        roots = {DATA: self.plan.target_dir, **{str(t.oid): Path(t.target) for t in self.plan.tablespaces}}
        for key, path in roots.items():
            self.trees[key] = SafeTree(path, root_mode=0o700, sync=self.plan.sync, owner=self.plan.owner)
            self.found[self.trees[key].root] = set(os.listdir(self.trees[key].root))
            uid, gid = self.plan.root_owner
            self.trees[key].set_attrs((), mode=0o700, uid=uid, gid=gid)
        self.batch = BatchRestore(self.store, self._file_done, tick=check_cancelled,
                                  writeback=start_writeback if self.plan.sync else None)

    def _owner(self, rec: Record) -> dict[str, Any]:
        return record_owner(self.plan, rec)

    def owner_text(self) -> str:
        if os.geteuid() != 0:
            return ""
        uid: int | None
        gid: int | None
        if self.plan.owner is not None:
            uid, gid = self.plan.owner.uid, self.plan.owner.gid
        else:
            uid, gid = self.plan.root_owner
        if uid is None:
            return "root (the snapshot has no owners): chown -R them to the server's OS user before starting it"
        return f"uid {uid}, gid {gid}" + (f" ({_name(uid)})" if _name(uid) else "")

    def add(self, rec: Record) -> None:
        where = self.layout.locate(rec)
        if where is None:
            return
        root, parts = where
        if not parts:
            return
        tree = self.trees[root]
        kind = rec.kind
        owner = self._owner(rec)
        if kind == RecordKind.DIR:
            tree.mkdir(parts)
            self.dirs.append((root, parts, rec))
        elif kind == RecordKind.FILE:
            assert self.batch is not None
            self.batch.add(rec, tree.create_file(parts), (tree, owner))  # the batch owns the fd from here
        elif kind == RecordKind.SYMLINK:
            tree.symlink(parts, self.ts_links[int(parts[1])], mtime_ns=rec.mtime_ns, **owner)
        elif kind == RecordKind.HARDLINK:
            tree.hardlink(parts, split_path(rec.link_target or "")[1 if root == DATA else 2:])  # checked by locate

    def _file_done(self, context: tuple[SafeTree, dict[str, Any]], rec: Record, fd: int) -> None:
        """A file's content is written and verified (:mod:`..store.batchrestore`): its attributes, then fsync."""
        tree, owner = context
        tree.file_done(fd, mode=_mode(rec, 0o600), mtime_ns=rec.mtime_ns, **owner)
        self.files += 1
        self.bytes += rec.size or 0

    def finish(self) -> None:
        assert self.batch is not None
        self.batch.finish()
        for root, parts, rec in reversed(self.dirs):
            self.trees[root].set_attrs(parts, mode=_mode(rec, 0o700), mtime_ns=rec.mtime_ns, **self._owner(rec))
        data = self.trees[DATA]
        if data.probe(("PG_VERSION",)) != "f" or data.probe(("backup_label",)) != "f":
            raise PhysicalRestoreError(f"the snapshot did not contain a complete data directory "
                                       f"(no PG_VERSION or backup_label in {self.plan.target_dir})")

    def close(self, success: bool = True) -> None:
        errors = []
        if self.batch is not None:
            self.batch.close(success=success)  # before the trees: no worker writes once their fds may close
        for tree in self.trees.values():
            try:
                tree.close(success=success)
            except OSError as exc:
                errors.append(exc)
        if errors and success:
            raise PhysicalRestoreError(f"syncing the restored files failed: {errors[0]}")


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


def _verify(tool: str, target: Path) -> tuple[bool, str]:
    """Run pg_verifybackup; WAL is parsed too when this installation has pg_waldump."""
    argv = [tool]
    parse_wal = os.path.isfile(os.path.join(os.path.dirname(tool), "pg_waldump"))
    if not parse_wal:
        argv.append("--no-parse-wal")
    argv.append(str(target))
    check_cancelled()
    if not os.access(tool, os.X_OK):  # checked here: behind the parent-death wrapper it would be an exit status
        return False, f"could not run ({tool}: not an executable file)"
    try:  # spawn: cancel() kills it, and it dies with the task process
        proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                     errors="replace", env=base_tool_env())
    except OSError as exc:
        return False, f"could not run ({tool}: {exc})"
    try:
        out, err = proc.communicate(timeout=VERIFY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False, f"could not run ({tool}: no result within {VERIFY_TIMEOUT_S} s)"
    finally:
        untrack_process(proc)
    check_cancelled()
    output = (out + err).strip()
    if proc.returncode != 0:
        raise PhysicalRestoreError(f"pg_verifybackup found problems in {target} (the files are left there for "
                                   f"inspection): {output[-2000:]}")
    how = "files and WAL" if parse_wal else "files only (--no-parse-wal: no pg_waldump next to it)"
    return True, f"passed ({how}; {tool})"


def is_physical_snapshot(store: Store, snapshot_id: str) -> bool:
    """Whether a snapshot was made by :func:`.physical.physical_backup` (its source kind)."""
    return (store.load_snapshot(snapshot_id).header.get("source") or {}).get("kind") == SOURCE_KIND


__all__ += ["RestorePlan", "TablespaceTarget", "is_physical_snapshot"]
