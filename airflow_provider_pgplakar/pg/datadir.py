"""Restore a physical (``postgres+bin``) snapshot as a startable data directory.

Everything that can be refused is checked before the first byte is written (:func:`plan_restore`): the snapshot
kind, the PostgreSQL major of ``pg_bin_dir`` against the one that made the backup (from ``/manifest.json``), the
``tablespace_mapping`` entries, and emptiness of the data directory and of every tablespace directory. Then:

- the data directory is created with mode 0700 (the server refuses anything looser than 0750); modes, mtimes,
  symlinks and hard links come from the records;
- ``pg_tblspc/<oid>`` symlinks point at the tablespace's new location (``tablespace_mapping`` ``OLD=NEW``, as
  ``pg_basebackup -T``; unmapped tablespaces go back to their original location, which must then be empty);
- ``backup_manifest`` lands in the data directory and ``pg_verifybackup`` of the backup's major checks the result
  (with ``--no-parse-wal`` only when that installation has no ``pg_waldump``). A failed verification raises; the
  files are left in place for inspection.

Files are owned by the user running the restore (as ``pg_basebackup`` does); when that is root, ``chown -R`` the
directories to the server's OS user before starting it. The server must be the same major version as the backup;
it recovers from ``backup_label`` and the WAL included in ``pg_wal/`` on first start.

``overwrite`` empties a non-empty data directory or tablespace directory first; a directory holding
``postmaster.pid`` is always refused (a server may be running on it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from . import PgError, ToolError
from .physical import DATA_PREFIX, MANIFEST_PATH, SOURCE_KIND, TABLESPACES_PREFIX
from .process import check_cancelled, spawn, untrack_process
from .secrets import base_tool_env
from .tools import DEBIAN_BIN_GLOB, probe_version

log = logging.getLogger(__name__)

__all__ = ["PhysicalRestoreError", "PhysicalRestoreResult", "parse_tablespace_mapping", "physical_restore",
           "plan_restore"]

VERIFY_TIMEOUT_S = 3600


class PhysicalRestoreError(PgError):
    """A physical restore was refused (before writing) or failed (files written so far stay for inspection)."""


@dataclass(frozen=True)
class TablespaceTarget:
    oid: int
    location: str
    target: str


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

    @property
    def major(self) -> int:
        return self.server_version_num // 10000


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        lines = [f"restored snapshot {self.snapshot_id[:8]} (PostgreSQL {self.server_version}) to {self.target_dir}: "
                 f"{self.files} files, {self.bytes / 2**20:.1f} MiB"]
        for ts in self.tablespaces:
            lines.append(f"tablespace {ts['oid']}: {ts['location']} -> {ts['restored_to']}")
        lines.append(f"pg_verifybackup: {self.verify_note}")
        lines.append(f"start it with PostgreSQL {self.major} (same major version as the backup), e.g. "
                     f"pg_ctl -D {self.target_dir} start; it recovers from the included WAL on first start")
        if os.geteuid() == 0:
            lines.append("files are owned by root: chown -R them to the server's OS user before starting it")
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
    store: Any,
    snapshot_id: str,
    target_dir: str | os.PathLike[str],
    *,
    tablespace_mapping: Mapping[str, str] | Iterable[str] | None = None,
    overwrite: bool = False,
    pg_bin_dir: str | None = None,
    verify: bool = True,
) -> RestorePlan:
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
    mapping = parse_tablespace_mapping(tablespace_mapping)
    tablespaces = _plan_tablespaces(meta.get("tablespaces") or [], mapping)
    target = Path(os.path.abspath(target_dir))
    _check_targets(target, tablespaces, overwrite)
    tool, note = _find_verifier(major, pg_bin_dir) if verify else (None, "skipped (verify disabled)")
    return RestorePlan(snap.id, target, version, num, tablespaces, tool, note, overwrite)


def _server_version(store: Any, snap: Any, meta: Mapping[str, Any]) -> tuple[int, str]:
    """Server version from ``/manifest.json`` (the snapshot header's copy when the manifest lacks it)."""
    manifest: dict[str, Any] = {}
    try:
        rec = next(store.records(snap, MANIFEST_PATH), None)
        if rec is not None and rec.get("k") == "f":
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
        out.append(TablespaceTarget(int(t["oid"]), t["location"], mapping.get(location, location)))
    return out


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _check_targets(target: Path, tablespaces: list[TablespaceTarget], overwrite: bool) -> None:
    dirs = [("data directory", target)] + [(f"tablespace {t.oid} directory", Path(t.target)) for t in tablespaces]
    for i, (what, path) in enumerate(dirs):
        for other_what, other in dirs[i + 1 :]:
            if _is_within(path, other) or _is_within(other, path):
                raise PhysicalRestoreError(f"the {what} {path} and the {other_what} {other} overlap: map the "
                                           "tablespace elsewhere (tablespace_mapping OLD=NEW)")
        _check_empty(what, path, overwrite)


def _check_empty(what: str, path: Path, overwrite: bool) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise PhysicalRestoreError(f"the {what} {path} exists and is not a directory")
    if not path.exists():
        return
    try:
        entries = os.listdir(path)
    except OSError as exc:
        raise PhysicalRestoreError(f"the {what} {path} cannot be read: {exc.strerror}") from None
    if "postmaster.pid" in entries:
        raise PhysicalRestoreError(f"the {what} {path} holds postmaster.pid: a server may be running on it; stop it "
                                   "(or remove a stale postmaster.pid) first")
    if entries and not overwrite:
        hint = ("map the tablespace to an empty directory (tablespace_mapping OLD=NEW) or "
                if what.startswith("tablespace") else "")
        raise PhysicalRestoreError(f"the {what} {path} is not empty: {hint}restore into an empty directory, or "
                                   "pass overwrite (--force) to empty it first")


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
    store: Any,
    snapshot_id: str,
    target_dir: str | os.PathLike[str],
    *,
    tablespace_mapping: Mapping[str, str] | Iterable[str] | None = None,
    overwrite: bool = False,
    pg_bin_dir: str | None = None,
    verify: bool = True,
) -> PhysicalRestoreResult:
    """Restore ``snapshot_id`` into ``target_dir`` (see the module docstring); raise on any refusal or failure."""
    plan = plan_restore(store, snapshot_id, target_dir, tablespace_mapping=tablespace_mapping, overwrite=overwrite,
                        pg_bin_dir=pg_bin_dir, verify=verify)
    roots = [plan.target_dir] + [Path(t.target) for t in plan.tablespaces]
    for root in roots:
        if plan.overwrite:
            _empty(root)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)
    writer = _Writer(store, plan)
    try:
        for rec in store.records(plan.snapshot_id):
            check_cancelled()
            writer.add(rec)
        writer.finish()
    except BaseException:
        log.error("restore into %s failed after %d files: the directory is incomplete; remove it or retry with "
                  "overwrite", plan.target_dir, writer.files)
        raise
    result = PhysicalRestoreResult(
        plan.snapshot_id, str(plan.target_dir), plan.server_version, plan.major, writer.files, writer.bytes,
        [{"oid": t.oid, "location": t.location, "restored_to": t.target} for t in plan.tablespaces],
        verify_note=plan.verify_note,
    )
    if plan.verify_tool is not None:
        result.verified, result.verify_note = _verify(plan.verify_tool, plan.target_dir)
    log.info("%s", result.text())
    return result


def _empty(root: Path) -> None:
    if not root.exists():
        return
    log.warning("overwrite: removing the contents of %s", root)
    for entry in os.scandir(root):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


class _Writer:
    """Writes records below the data directory and the tablespace directories; directory attributes last."""

    def __init__(self, store: Any, plan: RestorePlan) -> None:
        self.store = store
        self.root = plan.target_dir
        self.ts_roots = {str(t.oid): Path(t.target) for t in plan.tablespaces}
        self.ts_links = {f"pg_tblspc/{t.oid}": t.target for t in plan.tablespaces}
        self.dirs: list[tuple[Path, dict[str, Any]]] = []
        self.files = 0
        self.bytes = 0
        self.seen_manifest = False

    def _dest(self, snap_path: str) -> tuple[Path | None, str]:
        """Where a snapshot path goes, and its path relative to its root (None: not written)."""
        parts = PurePosixPath(snap_path).parts
        if any(p in ("..", ".") for p in parts[1:]):
            raise PhysicalRestoreError(f"refusing record {snap_path!r}: it escapes its directory")
        rel = "/".join(parts[2:])
        if snap_path == MANIFEST_PATH or snap_path in (DATA_PREFIX, TABLESPACES_PREFIX):
            return None, ""
        if parts[1] == DATA_PREFIX[1:]:
            return self.root.joinpath(*parts[2:]), rel
        if parts[1] == TABLESPACES_PREFIX[1:] and len(parts) >= 3 and parts[2] in self.ts_roots:
            return (None, "") if len(parts) == 3 else (self.ts_roots[parts[2]].joinpath(*parts[3:]),
                                                       "/".join(parts[3:]))
        raise PhysicalRestoreError(f"record {snap_path!r} does not belong to the physical snapshot layout")

    def add(self, rec: dict[str, Any]) -> None:
        dest, rel = self._dest(rec["p"])
        if dest is None:
            return
        kind = rec.get("k")
        if kind == "d":
            dest.mkdir(mode=0o700, exist_ok=True)
            self.dirs.append((dest, rec))
        elif kind == "f":
            self._write(dest, rec)
        elif kind == "l":
            target = self.ts_links.get(rel, rec["lt"]) if rec["p"].startswith(DATA_PREFIX + "/") else rec["lt"]
            os.symlink(target, dest)
            if "t" in rec:
                os.utime(dest, ns=(rec["t"], rec["t"]), follow_symlinks=False)
        elif kind == "h":
            linked, _ = self._dest(rec["lt"])
            if linked is None:
                raise PhysicalRestoreError(f"hard link {rec['p']!r} points at {rec['lt']!r}, which is not a file")
            os.link(linked, dest)
        elif kind == "e":
            raise PhysicalRestoreError(f"{rec['p']} was not backed up ({rec.get('e')}): the snapshot is incomplete")
        else:
            raise PhysicalRestoreError(f"record {rec['p']!r} has unknown kind {kind!r}")

    def _write(self, dest: Path, rec: dict[str, Any]) -> None:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with self.store.open_record(rec) as src:
                for piece in src.iter_chunks():
                    view = memoryview(piece)
                    while view:
                        view = view[os.write(fd, view):]
            os.fchmod(fd, rec.get("m", 0o600) & 0o7777)
        finally:
            os.close(fd)
        if "t" in rec:
            os.utime(dest, ns=(rec["t"], rec["t"]))
        self.files += 1
        self.bytes += rec.get("s", 0)

    def finish(self) -> None:
        for path, rec in reversed(self.dirs):
            os.chmod(path, rec.get("m", 0o700) & 0o7777)
            if "t" in rec:
                os.utime(path, ns=(rec["t"], rec["t"]))
        os.chmod(self.root, 0o700)
        if not (self.root / "PG_VERSION").is_file() or not (self.root / "backup_label").is_file():
            raise PhysicalRestoreError(f"the snapshot did not contain a complete data directory "
                                       f"(no PG_VERSION or backup_label in {self.root})")


def _verify(tool: str, target: Path) -> tuple[bool, str]:
    """Run pg_verifybackup; WAL is parsed too when this installation has pg_waldump."""
    argv = [tool]
    parse_wal = os.path.isfile(os.path.join(os.path.dirname(tool), "pg_waldump"))
    if not parse_wal:
        argv.append("--no-parse-wal")
    argv.append(str(target))
    check_cancelled()
    try:  # spawn: cancel() kills it, and it dies with the task process
        proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                     errors="replace", env=base_tool_env())
    except OSError as exc:
        raise PhysicalRestoreError(f"pg_verifybackup could not run: {exc}") from None
    try:
        out, err = proc.communicate(timeout=VERIFY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise PhysicalRestoreError(f"pg_verifybackup did not finish within {VERIFY_TIMEOUT_S} s") from None
    finally:
        untrack_process(proc)
    check_cancelled()
    output = (out + err).strip()
    if proc.returncode != 0:
        raise PhysicalRestoreError(f"pg_verifybackup found problems in {target} (the files are left there for "
                                   f"inspection): {output[-2000:]}")
    how = "files and WAL" if parse_wal else "files only (--no-parse-wal: no pg_waldump next to it)"
    return True, f"passed ({how}; {tool})"


def is_physical_snapshot(store: Any, snapshot_id: str) -> bool:
    """Whether a snapshot was made by :func:`.physical.physical_backup` (its source kind)."""
    return (store.load_snapshot(snapshot_id).header.get("source") or {}).get("kind") == SOURCE_KIND


__all__ += ["RestorePlan", "TablespaceTarget", "is_physical_snapshot"]
