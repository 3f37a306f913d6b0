"""Physical backup (``postgres+bin://``): one snapshot holding every file of the cluster, streamed from the server's
base-backup archives straight into the store (nothing is staged on local disk).

Record layout of a physical snapshot (``source.kind`` = ``postgres+bin``)::

    /manifest.json                      the cluster manifest (written first, as for logical backups)
    /data                               the main data directory (a directory record, mode 0700)
    /data/<path>                        every file, directory and symlink of base.tar, WAL under /data/pg_wal/
    /data/pg_tblspc/<oid>               symlink records whose target is the tablespace's original location
    /data/backup_manifest               the server's backup manifest, where pg_verifybackup expects it
    /tablespaces/<oid>                  one directory record per user tablespace (its location directory)
    /tablespaces/<oid>/<path>           the tablespace's files (PG_<major>_<catversion>/<dboid>/<relfilenode>...)

Every record keeps the tar member's mode, mtime, uid/gid (and user/group names when the server sent them);
symlinks are ``l`` records with their target and hard links ``h`` records pointing at the snapshot path of the
file they link to. ``/data`` alone is what the reference wrote; a plain ``restore SNAPSHOT:/data`` therefore still
gives a data directory (without tablespaces), and :mod:`.datadir` restores the whole layout.

Dedup: PostgreSQL relation files change page by page in place and never shift, so files under ``base/`` and
``global/`` and all tablespace files are cut into fixed page-aligned blocks (:data:`RELATION_BLOCK_SIZE`); an
unchanged region of a relation dedups exactly whatever changed elsewhere in it. Everything else (WAL, SLRUs,
configuration) uses the store's content-defined chunker.

Speed (``bench/physical_bench.py``; issue 5 wants at most 2.5x a raw ``pg_basebackup``): the server compresses the
stream with lz4 when it can (``server_compression``), which spares a network nine bytes in ten and this process as
many messages; on loopback it is a wash (its walsender spent 0.2-0.3 CPU s more per 786 MiB than for raw bytes, this
process 0.05-0.2 less: README, issue 13 §3); a reader thread receives and decompresses the stream while this thread
parses tar members (:mod:`.basebackup`, "Two threads"); relation blocks reach the store as views of the reader's
buffers (:meth:`.TarReader.read_block`: no copy on this thread) and are hashed, deduplicated and compressed in the
store's pool a batch per task; and relation files carry no whole-file digest — every block keeps its verified BLAKE3
ID, and the server's ``backup_manifest`` (CRC32C of every file, computed as the server read it) is kept and checked
by ``pg_verifybackup`` after each restore, an end-to-end check independent of this tool.

The WAL needed for consistency is protected for the whole run by a temporary slot (see :mod:`.basebackup`), and
success is judged only after the server sent the end of the backup: any failure raises inside the snapshot writer,
so no snapshot is committed (uploaded packs become orphans for prune).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from ..store.progress import Progress, heartbeat
from ..store.record import RecordKind
from ..store.sizes import human_bytes
from . import PgError
from .basebackup import Archive, BaseBackupStream, CompressionUnsupported, ReplicationConnection, Tablespace
from .connect import PgConnectError
from .manifest import ManifestError
from .options import OptionError, PhysicalSourceOptions
from .process import TaskCancelled, cancelled, check_cancelled
from .secrets import ssl_files
from .session import MANIFEST_PATH, PHYSICAL_KIND, Session
from .tarstream import Member, TarFormatError, TarReader

if TYPE_CHECKING:
    from ..store.chunker import Chunking
    from ..store.opening import OpeningStore
    from ..store.repo import Store
    from ..store.writer import SnapshotWriter

log = logging.getLogger(__name__)

__all__ = [
    "BACKUP_MANIFEST_PATH",
    "DATA_PREFIX",
    "LAYOUT_VERSION",
    "MANIFEST_PATH",
    "RELATION_BLOCK_SIZE",
    "SOURCE_KIND",
    "TABLESPACES_PREFIX",
    "PhysicalBackupResult",
    "physical_backup",
]

SOURCE_KIND = PHYSICAL_KIND
LAYOUT_VERSION = 1
DATA_PREFIX = "/data"
TABLESPACES_PREFIX = "/tablespaces"
BACKUP_MANIFEST_PATH = f"{DATA_PREFIX}/backup_manifest"
# 32 pages of 8 KiB. Measured with bench/physical_bench.py (pgbench scale 50, clustered 1 % UPDATE; README table):
# 128 KiB blocks made the full backup as fast or up to 9 % slower (per-blob work on 2 cores) for ~3 % fewer bytes
# in the second backup; 64 KiB stored *more* after the change (small blocks compress worse).
RELATION_BLOCK_SIZE = 256 * 1024
_RELATION_DIRS = ("base/", "global/")


class PhysicalBackupError(PgError):
    """The physical backup failed; nothing was committed."""


@dataclass
class PhysicalBackupResult:
    snapshot_id: str
    server_version_num: int
    start_lsn: str
    end_lsn: str
    timeline: int
    tablespaces: list[dict[str, Any]]
    files: int
    bytes: int
    new_stored_bytes: int
    warnings: list[str] = field(default_factory=list)
    already_existed: bool = False

    @property
    def major(self) -> int:
        return self.server_version_num // 10000

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "major": self.major}


def physical_backup(
    store: Store | OpeningStore,
    opts: PhysicalSourceOptions,
    *,
    labels: Mapping[str, str] | None = None,
    tags: list[str] | tuple[str, ...] = (),
    idempotency_key: str | None = None,
    relation_block_size: int = RELATION_BLOCK_SIZE,
    reuse_committed: bool = False,
) -> PhysicalBackupResult:
    """Back up the whole cluster per ``opts`` into ``store``. Any failure raises and commits nothing.

    ``store`` may still be opening (:meth:`Store.opening <..store.repo.Store.opening>`): the replication connection,
    its temporary slot and the manifest's catalog queries run while its passphrase is stretched; the base backup
    starts once it is open (its label names the snapshot, whose ID the store's keys make). ``reuse_committed`` (a
    retried Airflow task): when a snapshot was already committed under ``idempotency_key``, return it instead of
    backing up again, found once the store is open, also when this try failed first (the server is down by then),
    unless it was cancelled."""
    from ..store.opening import resolve

    reuse = reuse_committed and bool(idempotency_key)
    try:
        return _physical_backup(store, opts, dict(labels or {}), tags, idempotency_key, relation_block_size,
                                reuse)
    except Exception as e:
        if not reuse or isinstance(e, TaskCancelled) or cancelled():
            raise
        try:
            earlier = _committed(resolve(store), idempotency_key or "")
        except Exception:  # noqa: BLE001 - the store did not open either: this try's error is the one to report
            earlier = None
        if earlier is None:
            raise
        log.debug("this try stopped with: %s", e)
        return earlier


def _committed(st: Store, key: str) -> PhysicalBackupResult | None:
    """The snapshot an earlier try committed under ``key``, as a result (``already_existed``), or None."""
    sid = st.idempotent_id(key)
    if sid not in st.snapshot_ids():
        return None
    log.info("snapshot %s was already committed by an earlier try of this task: reusing it", sid)
    header = st.load_snapshot(sid).header
    meta = header["meta"]
    return PhysicalBackupResult(sid, int(meta.get("server_version_num") or 0), str(meta.get("start_lsn") or ""),
                                str(meta.get("end_lsn") or ""), int(meta.get("timeline") or 0),
                                list(meta.get("tablespaces") or []), int(meta.get("files") or 0),
                                header["stats"]["bytes"], 0, [], True)


def _physical_backup(store: Store | OpeningStore, opts: PhysicalSourceOptions, labels: dict[str, str],
                     tags: list[str] | tuple[str, ...], idempotency_key: str | None, relation_block_size: int,
                     reuse: bool) -> PhysicalBackupResult:
    from ..store.chunker import Chunking
    from ..store.opening import resolve

    fixed = Chunking.fixed(relation_block_size)
    with ssl_files(opts.conn) as ssl:
        s = Session(opts.conn, ssl, lambda: None, opts.pg_bin_dir)
        with ReplicationConnection.open(opts.conn, ssl) as repl:
            repl.check_supported()
            system = repl.identify_system()
            server_num = repl.server_version
            repl.create_temporary_slot()  # WAL from here on stays until the connection closes
            warnings: list[str] = []
            manifest = _manifest(s, opts, repl, system, relation_block_size, warnings)
            source = {"kind": SOURCE_KIND, "origin": opts.conn.redacted_uri(SOURCE_KIND)}
            meta: dict[str, Any] = {
                "server_version_num": server_num, "server_major": server_num // 10000,
                "system_identifier": system["system_identifier"], "layout": LAYOUT_VERSION,
                "relation_block_size": relation_block_size, "options": _option_summary(opts), "warnings": warnings,
            }
            opened = resolve(store)
            if reuse and (earlier := _committed(opened, idempotency_key or "")) is not None:
                check_cancelled()
                return earlier
            with opened.writer(source=source, tags=tags, labels=labels, meta=meta,
                               idempotency_key=idempotency_key) as w:
                w.add_bytes(MANIFEST_PATH, json.dumps(manifest, indent=2).encode(), mode=0o444,
                            meta={"type": "manifest"})
                bb = _start(repl, opts, f"pgplakar {w.snapshot_id}")
                log.info("base backup started at %s: ~%s to read", bb.start_lsn,
                         human_bytes(_expected_bytes(bb.tablespaces) or 0))
                meta["server_compression"] = bb.compression or "none"
                _check_tablespaces(bb.tablespaces)
                files = _copy_archives(w, bb, fixed)
                check_cancelled()
                bb.finish()  # the server's verdict, before the writer may commit
                assert bb.manifest is not None and bb.start_lsn and bb.end_lsn
                w.add_bytes(BACKUP_MANIFEST_PATH, bb.manifest, mode=0o600, meta={"type": "backup_manifest"})
                tablespaces = [{"oid": t.oid, "location": t.location, "size_kb": t.size_kb}
                               for t in bb.tablespaces if t.oid is not None]
                meta.update(start_lsn=bb.start_lsn, end_lsn=bb.end_lsn, timeline=bb.timeline,
                            tablespaces=tablespaces, files=files)
                w.meta = meta
                check_cancelled()  # a cancelled backup never commits
    stats = opened.load_snapshot(w.snapshot_id).header["stats"]
    result = PhysicalBackupResult(
        w.snapshot_id, server_num, bb.start_lsn, bb.end_lsn, int(bb.timeline or 0), tablespaces, files,
        stats["bytes"], stats["new_stored_bytes"], warnings, w.already_existed,
    )
    log.info("physical snapshot %s: %d files, %s (%s new stored), WAL %s..%s", result.snapshot_id,
             files, human_bytes(result.bytes), human_bytes(result.new_stored_bytes), result.start_lsn, result.end_lsn)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Archives -> records


def _copy_archives(w: SnapshotWriter, bb: BaseBackupStream, fixed: Chunking) -> int:
    from ..store.chunker import Chunking

    files = 0
    progress = Progress("base backup", total=_expected_bytes(bb.tablespaces), estimate=True)
    for archive in bb.archives():
        check_cancelled()
        prefix = _archive_prefix(w, archive)
        relation_archive = archive.tablespace is not None

        def chunking(name: str, relation_archive: bool = relation_archive) -> Chunking:
            return fixed if relation_archive or name.startswith(_RELATION_DIRS) else Chunking()

        files += _copy_archive(w, archive, prefix, chunking, progress)
    progress.finish()
    return files


def _expected_bytes(tablespaces: list[Tablespace]) -> int | None:
    """The server's size estimate for the whole backup (``PROGRESS true``); None when it sent none."""
    sizes = [t.size_kb for t in tablespaces]
    return None if any(s is None for s in sizes) else 1024 * sum(s or 0 for s in sizes)


def _start(repl: ReplicationConnection, opts: PhysicalSourceOptions, label: str) -> BaseBackupStream:
    """BASE_BACKUP with the server compression ``opts`` asks for (``auto``: lz4, falling back to none)."""
    method, level, fallback = opts.compression_request()
    waiting = "waiting for the server's checkpoint"
    if opts.checkpoint == "spread":
        waiting += " (checkpoint=spread paces it over checkpoint_timeout; checkpoint=fast starts at once)"
        log.info("base backup: %s", waiting)
    try:
        with heartbeat("base backup", waiting):
            return repl.base_backup(label=label, checkpoint=opts.checkpoint, max_rate=opts.max_rate,
                                    compression=method, level=level, fallback=fallback)
    except CompressionUnsupported as exc:
        raise OptionError("server_compression", f"the server refused {opts.server_compression!r}: {exc} (use "
                                                "server_compression=auto or none)") from None


def _check_tablespaces(tablespaces: list[Tablespace]) -> None:
    for t in tablespaces:
        if t.oid is not None and not (t.location or "").startswith("/"):
            raise PhysicalBackupError(
                f"tablespace {t.oid} has the relative location {t.location!r} (an in-place tablespace, a developer "
                "option): it cannot be restored elsewhere, so physical backups of this cluster are refused"
            )


def _archive_prefix(w: SnapshotWriter, archive: Archive) -> str:
    if archive.tablespace is None:
        w.add_entry(DATA_PREFIX, RecordKind.DIR, mode=0o700)
        return DATA_PREFIX
    prefix = f"{TABLESPACES_PREFIX}/{archive.tablespace.oid}"
    w.add_entry(prefix, RecordKind.DIR, mode=0o700,
                meta={"type": "tablespace", "location": archive.tablespace.location})
    return prefix


def _copy_archive(w: SnapshotWriter, archive: Archive, prefix: str, chunking: Callable[[str], Chunking],
                  progress: Progress) -> int:
    files = 0
    links: set[str] = set()  # symlink members: nothing may sit below one (a restore would write through it)
    tar = TarReader(archive.stream)
    try:
        for member in tar:
            check_cancelled()
            name = _member_name(archive.name, member.name)
            _check_not_below_link(archive.name, name, links)
            path = f"{prefix}/{name}"
            attrs = _attrs(member)
            if member.isdir():
                w.add_entry(path, RecordKind.DIR, **attrs)
            elif member.issym():
                links.add(name)
                w.add_entry(path, RecordKind.SYMLINK, link_target=member.linkname, **attrs)
            elif member.islnk():
                target = _member_name(archive.name, member.linkname)
                _check_not_below_link(archive.name, target, links, hard_link=name)
                w.add_entry(path, RecordKind.HARDLINK, link_target=f"{prefix}/{target}", **attrs)
            elif member.isreg():
                how = chunking(name)
                # relation files: no whole-file SHA-256, backup_manifest's CRC32C (pg_verifybackup) covers them
                # the writer reads members with readinto only, which TarReader has
                info = w.add_stream(path, cast("BinaryIO", tar), chunking=how, digest=not how.block_size, **attrs)
                if info.size != member.size:
                    raise PhysicalBackupError(f"{archive.name}: {name}: got {info.size} bytes, the archive "
                                              f"header says {member.size}")
                files += 1
                progress.add(info.size)
            else:
                raise PhysicalBackupError(f"{archive.name}: {name}: unsupported tar member type "
                                          f"{member.type!r}")
    except TarFormatError as exc:
        raise PhysicalBackupError(f"reading {archive.name} from the base backup stream: {exc}") from None
    log.info("%s: %d files, %s", archive.name, files, human_bytes(archive.stream.size))
    return files


def _check_not_below_link(archive: str, name: str, links: set[str], hard_link: str | None = None) -> None:
    """Refuse a member (or a hard link's target) at or below a symlink member: such a snapshot could only be
    restored by writing through the link, so it is never made."""
    parts = name.split("/")
    for i in range(1, len(parts) + 1):
        above = "/".join(parts[:i])
        if above in links:
            what = f"hard link {hard_link!r} points at {name!r}" if hard_link else f"member {name!r}"
            raise PhysicalBackupError(f"{archive}: {what}, which lies at or below the symlink member {above!r}: "
                                      "refusing an archive a restore would have to write through a symlink")


def _member_name(archive: str, name: str) -> str:
    """A tar member name as a relative snapshot path; anything that could escape its prefix is refused."""
    clean = name.removeprefix("./").rstrip("/")
    parts = clean.split("/")
    if not clean or clean.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in clean:
        raise PhysicalBackupError(f"{archive}: refusing member name {name!r}")
    return clean


def _attrs(member: Member) -> dict[str, Any]:
    attrs: dict[str, Any] = {"mode": member.mode & 0o7777, "mtime_ns": int(member.mtime) * 1_000_000_000,
                             "uid": member.uid, "gid": member.gid}
    if member.uname:
        attrs["uname"] = member.uname
    if member.gname:
        attrs["gname"] = member.gname
    return attrs


# ----------------------------------------------------------------------------------------------------------------
# Manifest


def _option_summary(opts: PhysicalSourceOptions) -> dict[str, Any]:
    return {"checkpoint": opts.checkpoint, "max_rate": opts.max_rate, "server_compression": opts.server_compression}


def _layout() -> dict[str, str]:
    return {"version": str(LAYOUT_VERSION), "data": DATA_PREFIX, "tablespaces": f"{TABLESPACES_PREFIX}/<oid>",
            "backup_manifest": BACKUP_MANIFEST_PATH}


def _manifest(s: Session, opts: PhysicalSourceOptions, repl: ReplicationConnection, system: dict[str, Any],
              block_size: int, warnings: list[str]) -> dict[str, Any]:
    """The cluster manifest over a normal connection to ``postgres`` (as the reference does).

    A replication-only user may be refused a normal connection by pg_hba; the reference then failed the backup.
    Here the manifest falls back to what the replication connection knows, with the reason in ``errors``.
    """
    from .manifest import collect_manifest

    extra = {"scheme": SOURCE_KIND, "method": "BASE_BACKUP over the replication protocol", "layout": _layout(),
             "relation_block_size": block_size}
    try:
        return collect_manifest(
            s.connect, database=None, connector="postgresql+bin", host=opts.conn.host, port=opts.conn.port,
            dump_format="basebackup", options=_option_summary(opts), tool_versions={}, extra=extra,
        )
    except (PgConnectError, ManifestError) as exc:
        warnings.append(f"cluster manifest reduced to the replication connection's facts: {exc}")
        log.warning("%s", warnings[-1])
        return _minimal_manifest(opts, repl, system, extra, exc)


def _minimal_manifest(opts: PhysicalSourceOptions, repl: ReplicationConnection, system: dict[str, Any],
                      extra: dict[str, Any], exc: Exception) -> dict[str, Any]:
    num = repl.server_version
    return {
        "version": 2, "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "connector": "postgresql+bin", "host": opts.conn.host, "port": str(opts.conn.port),
        "server_version": repl.show("server_version") or f"{num // 10000}.{num % 10000}",
        "server_version_num": num, "cluster_system_identifier": system["system_identifier"],
        "dump_format": "basebackup", "options": _option_summary(opts), "tool_versions": {},
        "errors": [{"database": None, "section": "connect", "sqlstate": getattr(exc, "sqlstate", None),
                    "message": str(exc)}],
        "pgplakar": extra,
    }


__all__ += ["PhysicalBackupError", "Tablespace"]
