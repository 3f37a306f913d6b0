"""What an on-demand restore will do, before it does it: the snapshot picked, each target and what happens to it.

Used by ``example_dags/pgplakar_restore_on_demand.py``: its plan task logs :meth:`RestorePlan.text` (exactly what
will be dropped, cleaned, created and restored) and refuses a confirmation that does not repeat the targets
(:func:`check_confirmation`), so nothing destructive runs on a typo or on the wrong snapshot. Everything here only
reads: the store, and the target server's ``pg_database`` (or the target directory). The restore itself is
:func:`.restore.logical_restore` / :func:`.datadir.physical_restore` with the snapshot ID this plan resolved, so
``latest`` cannot move between the approval and the restore.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..store.sizes import human_bytes
from . import PgError
from .iam import password_source
from .options import RestoreOptions
from .restore import NEVER_DROPPED, _plan
from .secrets import ssl_files
from .session import LOGICAL_KIND, PHYSICAL_KIND, PasswordSource, Session

if TYPE_CHECKING:
    from ..store.repo import Snapshot, Store

LOGICAL_KINDS = (LOGICAL_KIND,)  # source.kind of logical backups (postgres:// and postgres+aws://)
PHYSICAL_KINDS = (PHYSICAL_KIND,)


class ConfirmationMismatch(PgError):
    """The confirmation does not repeat the restore's targets: nothing was changed."""


@dataclass
class PlannedTarget:
    """One database (logical) or the data directory (physical) the restore writes."""

    target: str
    source: str  # the database in the snapshot, or "cluster"
    action: str  # drop+create | create | clean | restore-into | clean-in-place | write-directory
    exists: bool
    size_bytes: int | None = None

    @property
    def destructive(self) -> bool:
        return self.action in ("drop+create", "clean", "clean-in-place")

    def line(self) -> str:
        size = f" ({human_bytes(self.size_bytes)} now)" if self.size_bytes is not None else ""
        what = {
            "drop+create": f"DROP DATABASE {self.target!r}{size} and create it from the snapshot: everything in it "
                           "now is lost",
            "create": f"CREATE DATABASE {self.target!r} (absent on the target) from the snapshot",
            "clean": f"in {self.target!r}{size}: DROP every object the dump contains (--clean --if-exists), then "
                     "restore them; other objects stay",
            "clean-in-place": f"in {self.target!r}{size} (never dropped): DROP every object the dump contains, then "
                              "restore them",
            "restore-into": f"restore into the existing {self.target!r}{size}: objects are added, nothing is "
                            "dropped (an object that already exists fails the restore)",
            "write-directory": f"write a new data directory {self.target!r} ({'empty' if self.exists else 'absent'}"
                               " now; nothing is overwritten)",
        }[self.action]
        return f"{what}   <- {self.source}"


@dataclass
class RestorePlan:
    snapshot_id: str
    kind: str  # logical | physical
    time: str
    origin: str
    size_bytes: int
    targets: list[PlannedTarget] = field(default_factory=list)
    globals: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def destructive(self) -> bool:
        return any(t.destructive for t in self.targets)

    def target_names(self) -> list[str]:
        return [t.target for t in self.targets]

    def text(self) -> str:
        lines = [f"restore plan: {self.kind} snapshot {self.snapshot_id[:8]} of {self.origin} taken {self.time} "
                 f"({human_bytes(self.size_bytes)})"]
        if self.globals:
            lines.append(f"  roles/tablespaces: {self.globals}")
        lines += [f"  {t.line()}" for t in self.targets]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  DESTRUCTIVE: data on the target is dropped or replaced" if self.destructive
                     else "  not destructive: nothing on the target is dropped")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "destructive": self.destructive, "target_names": self.target_names(),
                "text": self.text()}


def pick_snapshot(store: Store, ref: str, *, kind: str, source_contains: str = "", tag: str = "") -> Snapshot:
    """The snapshot to restore: ``ref`` (an ID or unambiguous prefix) or ``latest``, the newest ``kind`` backup
    (``logical`` or ``physical``) whose origin contains ``source_contains`` and which has ``tag``. An explicit ID of
    the other kind, or one the filters exclude, is refused rather than silently replaced."""
    kinds = LOGICAL_KINDS if kind == "logical" else PHYSICAL_KINDS
    ref = (ref or "").strip()

    def matches(snap: Snapshot) -> bool:
        source = snap.header.get("source") or {}
        return (source.get("kind") in kinds and source_contains in str(source.get("origin") or "")
                and (not tag or tag in (snap.header.get("tags") or [])))

    if ref == "latest":
        found = [s for s in store.snapshots() if matches(s)]
        if not found:
            raise PgError(f"no {kind} snapshot in the store matches source_contains={source_contains!r}, "
                          f"tag={tag!r}: check the filters (`pgplakar at STORE ls`)")
        return found[-1]
    snap = store.load_snapshot(store.resolve(ref))
    if not matches(snap):
        source = snap.header.get("source") or {}
        raise PgError(f"snapshot {snap.id[:8]} ({source.get('kind')} of {source.get('origin')}, tags "
                      f"{snap.header.get('tags') or []}) is not a {kind} backup matching source_contains="
                      f"{source_contains!r}, tag={tag!r}")
    return snap


def _header_fields(snap: Snapshot) -> dict[str, Any]:
    source = snap.header.get("source") or {}
    return {"snapshot_id": snap.id, "time": snap.time, "origin": str(source.get("origin") or "?"),
            "size_bytes": int((snap.header.get("stats") or {}).get("bytes") or 0)}


def plan_logical_restore(store: Store, snap: Snapshot, opts: RestoreOptions, *,
                         password: PasswordSource | None = None) -> RestorePlan:
    """Each dump of ``snap`` selected by ``opts`` with what happens to its target database on the server of
    ``opts`` (looked up in ``pg_database``). A target that is absent without ``recreate`` is refused here (the
    restore would fail on it)."""
    globals_rec, dumps = _plan(list(store.records(snap)), opts)
    if not dumps:
        raise PgError(f"snapshot {snap.id[:8]} holds no database dump to restore")
    plan = RestorePlan(kind="logical", **_header_fields(snap))
    if globals_rec is None:
        plan.globals = "none in the snapshot"
    elif opts.no_globals or opts.data_only:
        plan.globals = "skipped (no_globals)" if opts.no_globals else "skipped (data_only)"
    else:
        plan.globals = ("CREATE ROLE for roles the target lacks, ALTER ROLE (attributes and password hashes of the "
                        "source) for those it has, except the role this restore logs in as; set no_globals=true "
                        "to leave roles alone")
    pw = password_source(opts.conn, password)
    with ssl_files(opts.conn) as ssl:
        s = Session(opts.conn, ssl, pw, opts.pg_bin_dir)
        with s.connect("postgres") as c:
            sizes = {r[0]: r[1] for r in c.execute(
                "SELECT datname::text, CASE WHEN datallowconn THEN pg_catalog.pg_database_size(oid) END "
                "FROM pg_catalog.pg_database")}
    for _, db in dumps:
        target = opts.database or db
        exists = target in sizes
        if opts.recreate and target not in NEVER_DROPPED:
            action = "drop+create" if exists else "create"
        elif not exists:
            raise PgError(f"database {target!r} does not exist on the target server: set recreate=true to create "
                          "it from the snapshot (or create it first)")
        elif opts.recreate:
            action = "clean-in-place"
        else:
            action = "clean" if opts.clean else "restore-into"
        plan.targets.append(PlannedTarget(target, db, action, exists, sizes.get(target)))
    if opts.schema_only or opts.data_only:
        plan.notes.append("schema only" if opts.schema_only else "data only")
    if opts.tables or opts.schemas:
        plan.notes.append(f"only tables={list(opts.tables)} schemas={list(opts.schemas)}")
    return plan


def plan_physical_restore(snap: Snapshot, target_dir: str,
                          tablespace_mapping: dict[str, str] | None = None) -> RestorePlan:
    """The data directory a physical restore writes (it must be empty or absent: nothing is overwritten) and where
    each tablespace goes."""
    if not target_dir or not os.path.isabs(target_dir):
        raise PgError(f"target_dir: give an absolute directory for the restored cluster, got {target_dir!r}")
    exists = os.path.lexists(target_dir)
    if exists and (not os.path.isdir(target_dir) or os.path.islink(target_dir) or os.listdir(target_dir)):
        raise PgError(f"target_dir {target_dir!r} exists and is not an empty directory: choose a new one (an "
                      "on-demand restore never overwrites)")
    plan = RestorePlan(kind="physical", **_header_fields(snap))
    plan.targets.append(PlannedTarget(target_dir, "cluster", "write-directory", exists))
    mapping = tablespace_mapping or {}
    for ts in (snap.header.get("meta") or {}).get("tablespaces") or []:
        location = ts.get("location")
        plan.notes.append(f"tablespace {ts.get('oid')}: {location} -> {mapping.get(location, location)}"
                          + ("" if location in mapping else " (original location: must be empty or absent)"))
    return plan


def check_confirmation(plan: RestorePlan, confirm: str) -> None:
    """``confirm`` must name exactly the plan's targets (comma separated, any order): the database names, or the
    target directory of a physical restore."""
    given = sorted({p.strip() for p in (confirm or "").split(",") if p.strip()})
    wanted = sorted(set(plan.target_names()))
    if given != wanted:
        raise ConfirmationMismatch(
            f"confirm: type the restore's target(s) exactly to confirm: {', '.join(wanted)!s} (got "
            f"{confirm!r}); nothing was changed")
