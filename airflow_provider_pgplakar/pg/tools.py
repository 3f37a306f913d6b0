"""Find PostgreSQL client tools and the major version each one really is.

pg_dump, pg_dumpall and pg_basebackup refuse servers newer than themselves ("aborting because of server version
mismatch"), and pg_restore must be at least as new as the pg_dump that wrote an archive. The reference trusted
``$PATH`` and found out at run time; we probe every candidate's ``--version`` and pick the newest, so the error
happens before anything runs and says which directory to use.

Search order: ``pg_bin_dir`` alone when given; otherwise caller-supplied ``extra_dirs`` (tests, wheels), Debian's
``/usr/lib/postgresql/*/bin`` and ``$PATH``. Among the candidates the newest version wins; ties go to the earlier
directory in that order.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from airflow_provider_pgplakar.pg import ToolBroken, ToolNotFound, ToolVersionError
from airflow_provider_pgplakar.pg.secrets import base_tool_env

__all__ = [
    "DEBIAN_BIN_GLOB",
    "Tool",
    "ToolVersion",
    "find_tool",
    "parse_version",
    "probe_version",
    "server_major",
]

DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"
PROBE_TIMEOUT_S = 10

# "pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)", "pg_dump (PostgreSQL) 18devel", "psql (PostgreSQL) 9.6.24",
# "pg_restore (PostgreSQL) 17rc1". The parenthesised distribution is not checked (EDB and others print their own).
_VERSION_RE = re.compile(
    r"(?P<tool>\S+) \((?P<dist>[^)]*)\) (?P<major>[0-9]+)(?:\.(?P<minor>[0-9]+))?(?:\.(?P<patch>[0-9]+))?"
    r"(?P<stage>[A-Za-z]+[0-9]*)?(?:\s|$)"
)
# What each tool does with the minimum version, for error messages.
_PURPOSE = {
    "pg_dump": "dump server",
    "pg_dumpall": "dump server",
    "pg_basebackup": "back up server",
    "pg_verifybackup": "verify a backup of server",
    "pg_restore": "restore an archive made by PostgreSQL",
    "psql": "replay a script made by PostgreSQL",
}


@dataclass(frozen=True)
class ToolVersion:
    """A parsed ``--version`` line. ``major`` is 9 for every 9.x (older than any server we support)."""

    major: int
    minor: int
    patch: int
    stage: str  # "" for a release, else "devel", "beta1", "rc1", ...
    text: str  # the line as printed, for manifests and messages

    @property
    def sort_key(self) -> tuple[int, int, int, int]:
        """Orders 18devel < 18beta1 < 18.0 (any pre-release sorts before every release of its major)."""
        return (self.major, self.minor, self.patch, 0 if self.stage else 1)


@dataclass(frozen=True)
class Tool:
    """An executable client tool and the version it reported."""

    name: str
    path: str
    version: ToolVersion

    @property
    def major(self) -> int:
        return self.version.major

    @property
    def bin_dir(self) -> str:
        return os.path.dirname(self.path)


def parse_version(output: str, tool: str | None = None) -> ToolVersion:
    """Parse the first line of ``TOOL --version``; raise ValueError if it is not a PostgreSQL tool version.

    When ``tool`` is given the printed program name must match, so a renamed or wrapped binary is not mistaken for
    the tool we asked for.
    """
    line = output.strip().splitlines()[0].strip() if output.strip() else ""
    match = _VERSION_RE.match(line)
    if match is None:
        raise ValueError(f"not a PostgreSQL version line: {line[:200]!r}")
    if tool is not None and match["tool"] != tool:
        raise ValueError(f"reports itself as {match['tool']!r}, not {tool!r}")
    return ToolVersion(
        major=int(match["major"]),
        minor=int(match["minor"] or 0),
        patch=int(match["patch"] or 0),
        stage=match["stage"] or "",
        text=line,
    )


def server_major(server_version_num: int) -> int:
    """Major version from ``server_version_num`` (170002 -> 17; 90624 -> 9, like :attr:`ToolVersion.major`)."""
    return server_version_num // 10000


# Keyed by the file's identity, so a replaced binary (package upgrade) is probed again.
_cache: dict[tuple[str, int, int, int, int], ToolVersion] = {}
_cache_lock = threading.Lock()


def probe_version(path: str, tool: str | None = None) -> ToolVersion:
    """Run ``path --version`` once per file version (cached) and parse it; raise :class:`ToolBroken` on failure."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as exc:
        raise ToolBroken(f"{path}: {exc.strerror}") from None
    key = (real, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    try:
        proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=PROBE_TIMEOUT_S,
            check=False,
            env=base_tool_env(),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolBroken(f"{path} --version failed: {exc}") from None
    if proc.returncode != 0:
        raise ToolBroken(f"{path} --version exited with status {proc.returncode}: {proc.stderr.strip()[:200]}")
    try:
        version = parse_version(proc.stdout, tool)
    except ValueError as exc:
        raise ToolBroken(f"{path} --version: {exc}") from None
    with _cache_lock:
        _cache[key] = version
    return version


def _is_debian_wrapper(path: str) -> bool:
    # /usr/bin/pg_dump on Debian is a link to pg_wrapper, which picks a version per call from PGCLUSTER, PGHOST and
    # PGPORT; probing it would not predict what runs. The real binaries live in /usr/lib/postgresql/N/bin.
    return os.path.basename(os.path.realpath(path)) == "pg_wrapper"


def _debian_dirs(pattern: str) -> list[str]:
    def major(d: str) -> int:
        name = os.path.basename(os.path.dirname(d))
        return int(name) if name.isdigit() else -1

    return sorted(glob.glob(pattern), key=major, reverse=True)


def _candidates(name: str, dirs: Iterable[str]) -> list[str]:
    """Executable ``dir/name`` files, first occurrence of each real file only, wrappers skipped."""
    seen: set[str] = set()
    found: list[str] = []
    for d in dirs:
        if not d:
            continue
        path = os.path.join(d, name)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)) or _is_debian_wrapper(path):
            continue
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            found.append(path)
    return found


def _too_old(name: str, best: Tool, found: Sequence[Tool], min_major: int) -> ToolVersionError:
    dirs = ", ".join(dict.fromkeys(t.bin_dir for t in found))
    purpose = _PURPOSE.get(name, "work with PostgreSQL")
    return ToolVersionError(
        f"{name} {best.major} cannot {purpose} {min_major}: set pg_bin_dir to a PostgreSQL {min_major}+ "
        f"bin directory (found: {dirs})"
    )


def find_tool(
    name: str,
    *,
    min_major: int | None = None,
    pg_bin_dir: str | None = None,
    extra_dirs: Sequence[str] = (),
    search_path: str | None = None,
    system_glob: str | None = DEBIAN_BIN_GLOB,
) -> Tool:
    """The newest ``name`` we can find, checked to be at least ``min_major`` (usually the server's major).

    ``pg_bin_dir`` restricts the search to that directory. ``search_path`` defaults to ``$PATH``; pass ``""`` and
    ``system_glob=None`` for a hermetic search of ``extra_dirs`` only.
    """
    if pg_bin_dir is not None:
        dirs: list[str] = [pg_bin_dir]
    else:
        path_env = os.environ.get("PATH", os.defpath) if search_path is None else search_path
        system = _debian_dirs(system_glob) if system_glob else []
        dirs = [*extra_dirs, *system, *path_env.split(os.pathsep)]
    paths = _candidates(name, dirs)
    if not paths:
        if pg_bin_dir is not None:
            if _is_debian_wrapper(os.path.join(pg_bin_dir, name)):
                raise ToolNotFound(
                    f"{name} in pg_bin_dir {pg_bin_dir} is Debian's pg_wrapper, which picks a version per call: "
                    "set pg_bin_dir to /usr/lib/postgresql/<major>/bin"
                )
            raise ToolNotFound(f"{name} not found in pg_bin_dir {pg_bin_dir}")
        searched = ", ".join(dict.fromkeys(d for d in dirs if d))
        raise ToolNotFound(
            f"{name} not found (searched: {searched}): install the PostgreSQL client tools or set pg_bin_dir"
        )
    tools: list[Tool] = []
    broken: list[str] = []
    for path in paths:
        try:
            tools.append(Tool(name, path, probe_version(path, name)))
        except ToolBroken as exc:
            broken.append(str(exc))
    if not tools:
        raise ToolBroken(f"no working {name}: " + "; ".join(broken))
    best = max(tools, key=lambda t: t.version.sort_key)  # max() keeps the first of equals: search order wins ties
    if min_major is not None and best.major < min_major:
        raise _too_old(name, best, tools, min_major)
    return best
