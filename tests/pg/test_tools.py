"""Client-tool discovery: probe ``--version``, pick the newest, refuse tools older than the server up front.

Most tests use fake tools (tiny shell scripts printing a version line) in temp dirs, with ``search_path=""`` and
``system_glob=None`` so the host's installed PostgreSQL cannot change the outcome.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_provider_pgplakar.pg import ToolBroken, ToolNotFound, ToolVersionError, tools
from airflow_provider_pgplakar.pg.tools import find_tool, parse_version, probe_version, server_major
from tests.helpers import need

DEBIAN_15 = Path("/usr/lib/postgresql/15/bin")
TOOL_NAMES = ("pg_dump", "pg_dumpall", "pg_restore", "psql", "pg_basebackup", "pg_verifybackup")


def clear_version_cache() -> None:
    with tools._cache_lock:
        tools._cache.clear()


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_version_cache()
    yield
    clear_version_cache()


def fake_tool(directory: Path, name: str, output: str, *, status: int = 0, counter: Path | None = None) -> Path:
    """An executable ``directory/name`` that prints ``output`` (optionally logging each run to ``counter``)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    count = f"echo run >> '{counter}'\n" if counter else ""
    path.write_text(f"#!/bin/sh\n{count}cat <<'EOF'\n{output}\nEOF\nexit {status}\n")
    path.chmod(0o755)
    return path


def pg(name: str, version: str) -> str:
    return f"{name} (PostgreSQL) {version}"


def hermetic(name: str, *dirs: Path, **kwargs) -> tools.Tool:
    return find_tool(name, extra_dirs=[str(d) for d in dirs], search_path="", system_glob=None, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Version parsing


@pytest.mark.parametrize(
    ("line", "major", "minor", "patch", "stage"),
    [
        ("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)", 15, 18, 0, ""),
        ("pg_dump (PostgreSQL) 17.2", 17, 2, 0, ""),
        ("pg_dump (PostgreSQL) 18devel", 18, 0, 0, "devel"),
        ("pg_dump (PostgreSQL) 18beta2", 18, 0, 0, "beta2"),
        ("pg_dump (PostgreSQL) 17rc1", 17, 0, 0, "rc1"),
        ("pg_dump (PostgreSQL) 16.4 (Homebrew)\n", 16, 4, 0, ""),
        ("pg_dump (PostgreSQL) 9.6.24", 9, 6, 24, ""),
        ("pg_dump (EnterpriseDB) 15.2.0", 15, 2, 0, ""),
    ],
)
def test_parse_version(line: str, major: int, minor: int, patch: int, stage: str) -> None:
    version = parse_version(line, "pg_dump")
    assert (version.major, version.minor, version.patch, version.stage) == (major, minor, patch, stage)
    assert version.text == line.strip()


@pytest.mark.parametrize(
    "output",
    ["", "pg_dump 15.2", "pg_dump (PostgreSQL) x15", "Usage: pg_dump [OPTION]...", "psql (PostgreSQL) 15.2"],
)
def test_parse_version_rejects(output: str) -> None:
    with pytest.raises(ValueError):
        parse_version(output, "pg_dump")


def test_prereleases_sort_before_the_release() -> None:
    keys = [parse_version(pg("pg_dump", v)).sort_key for v in ("17.9", "18devel", "18beta1", "18.0", "18.1")]
    assert keys == sorted(keys)
    assert parse_version(pg("pg_dump", "18devel")).sort_key < parse_version(pg("pg_dump", "18.0")).sort_key


@pytest.mark.parametrize(("num", "major"), [(150018, 15), (170002, 17), (180000, 18), (90624, 9)])
def test_server_major(num: int, major: int) -> None:
    assert server_major(num) == major


# --------------------------------------------------------------------------------------------------------------------
# Probing and its cache


def test_probe_is_cached_per_file_version(tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    path = fake_tool(tmp_path / "bin", "pg_dump", pg("pg_dump", "17.2"), counter=counter)
    assert probe_version(str(path), "pg_dump").major == 17
    assert probe_version(str(path), "pg_dump").major == 17
    assert counter.read_text().count("run") == 1
    # A replaced binary (package upgrade) is a new file version: probed again.
    fake_tool(tmp_path / "bin", "pg_dump", pg("pg_dump", "18.10"), counter=counter)
    assert probe_version(str(path), "pg_dump").major == 18
    assert counter.read_text().count("run") == 2


def test_probe_failures_raise_tool_broken(tmp_path: Path) -> None:
    failing = fake_tool(tmp_path / "a", "pg_dump", "boom", status=3)
    with pytest.raises(ToolBroken, match="exited with status 3"):
        probe_version(str(failing))
    garbage = fake_tool(tmp_path / "b", "pg_dump", "hello")
    with pytest.raises(ToolBroken, match="not a PostgreSQL version line"):
        probe_version(str(garbage))
    with pytest.raises(ToolBroken):
        probe_version(str(tmp_path / "missing"))


def test_probe_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tools, "PROBE_TIMEOUT_S", 0.2)
    path = tmp_path / "pg_dump"
    path.write_text("#!/bin/sh\nexec sleep 5\n")
    path.chmod(0o755)
    with pytest.raises(ToolBroken, match="--version failed"):
        probe_version(str(path))


# --------------------------------------------------------------------------------------------------------------------
# Discovery


def test_newest_major_wins(tmp_path: Path) -> None:
    for v in ("15.8", "18.1", "17.6"):
        fake_tool(tmp_path / v, "pg_dump", pg("pg_dump", v))
    tool = hermetic("pg_dump", tmp_path / "15.8", tmp_path / "18.1", tmp_path / "17.6", min_major=16)
    assert (tool.name, tool.path, tool.major) == ("pg_dump", str(tmp_path / "18.1" / "pg_dump"), 18)
    assert tool.bin_dir == str(tmp_path / "18.1")
    assert tool.version.text == "pg_dump (PostgreSQL) 18.1"


def test_release_beats_devel_of_same_major(tmp_path: Path) -> None:
    fake_tool(tmp_path / "dev", "pg_dump", pg("pg_dump", "18devel"))
    fake_tool(tmp_path / "rel", "pg_dump", pg("pg_dump", "18.0"))
    assert hermetic("pg_dump", tmp_path / "dev", tmp_path / "rel").bin_dir == str(tmp_path / "rel")


def test_tie_goes_to_earlier_directory(tmp_path: Path) -> None:
    fake_tool(tmp_path / "first", "psql", pg("psql", "17.2"))
    fake_tool(tmp_path / "second", "psql", pg("psql", "17.2"))
    assert hermetic("psql", tmp_path / "first", tmp_path / "second").bin_dir == str(tmp_path / "first")


def test_only_older_tools_is_a_clear_version_error(tmp_path: Path) -> None:
    fake_tool(tmp_path / "15" / "bin", "pg_dump", pg("pg_dump", "15.18 (Debian 15.18-0+deb12u1)"))
    with pytest.raises(ToolVersionError) as info:
        hermetic("pg_dump", tmp_path / "15" / "bin", min_major=18)
    assert str(info.value) == (
        f"pg_dump 15 cannot dump server 18: set pg_bin_dir to a PostgreSQL 18+ bin directory "
        f"(found: {tmp_path / '15' / 'bin'})"
    )


def test_version_error_lists_every_directory_found(tmp_path: Path) -> None:
    fake_tool(tmp_path / "a", "pg_basebackup", pg("pg_basebackup", "16.1"))
    fake_tool(tmp_path / "b", "pg_basebackup", pg("pg_basebackup", "15.1"))
    with pytest.raises(ToolVersionError, match=r"pg_basebackup 16 cannot back up server 17: .*\(found: .*a, .*b\)"):
        hermetic("pg_basebackup", tmp_path / "a", tmp_path / "b", min_major=17)


def test_pg_restore_version_error_wording(tmp_path: Path) -> None:
    fake_tool(tmp_path, "pg_restore", pg("pg_restore", "15.1"))
    with pytest.raises(ToolVersionError, match="pg_restore 15 cannot restore an archive made by PostgreSQL 17"):
        hermetic("pg_restore", tmp_path, min_major=17)


def test_broken_candidates_are_skipped(tmp_path: Path) -> None:
    fake_tool(tmp_path / "fails", "pg_dump", "x", status=1)
    fake_tool(tmp_path / "garbage", "pg_dump", "not a version")
    fake_tool(tmp_path / "renamed", "pg_dump", pg("pg_dumpall", "19.0"))
    fake_tool(tmp_path / "good", "pg_dump", pg("pg_dump", "16.3"))
    dirs = [tmp_path / d for d in ("fails", "garbage", "renamed", "good")]
    assert hermetic("pg_dump", *dirs).bin_dir == str(tmp_path / "good")


def test_only_broken_candidates_is_tool_broken(tmp_path: Path) -> None:
    fake_tool(tmp_path / "fails", "pg_dump", "x", status=1)
    with pytest.raises(ToolBroken, match="no working pg_dump"):
        hermetic("pg_dump", tmp_path / "fails")


def test_nothing_found_is_tool_not_found(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "noexec").mkdir()
    (tmp_path / "noexec" / "pg_dump").write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 18.0'\n")  # mode 0644
    with pytest.raises(ToolNotFound, match=r"pg_dump not found \(searched: .*empty, .*noexec\)"):
        hermetic("pg_dump", tmp_path / "empty", tmp_path / "noexec")


def test_debian_pg_wrapper_links_are_skipped(tmp_path: Path) -> None:
    # /usr/bin/pg_dump -> pg_wrapper chooses a version per call, so its probe predicts nothing.
    wrapper = fake_tool(tmp_path / "share", "pg_wrapper", pg("pg_dump", "99.0"))
    (tmp_path / "usrbin").mkdir()
    (tmp_path / "usrbin" / "pg_dump").symlink_to(wrapper)
    fake_tool(tmp_path / "real", "pg_dump", pg("pg_dump", "15.2"))
    assert hermetic("pg_dump", tmp_path / "usrbin", tmp_path / "real").major == 15


def test_pg_bin_dir_pointing_at_the_debian_wrapper(tmp_path: Path) -> None:
    wrapper = fake_tool(tmp_path / "share", "pg_wrapper", pg("pg_dump", "99.0"))
    (tmp_path / "usrbin").mkdir()
    (tmp_path / "usrbin" / "pg_dump").symlink_to(wrapper)
    with pytest.raises(ToolNotFound, match="is Debian's pg_wrapper.*/usr/lib/postgresql/<major>/bin"):
        find_tool("pg_dump", pg_bin_dir=str(tmp_path / "usrbin"))


def test_same_file_via_two_directories_is_probed_once(tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    fake_tool(tmp_path / "real", "pg_dump", pg("pg_dump", "17.1"), counter=counter)
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    assert hermetic("pg_dump", tmp_path / "alias", tmp_path / "real").major == 17
    assert counter.read_text().count("run") == 1


def test_path_search(tmp_path: Path) -> None:
    fake_tool(tmp_path / "p1", "psql", pg("psql", "16.0"))
    fake_tool(tmp_path / "p2", "psql", pg("psql", "17.0"))
    search = os.pathsep.join([str(tmp_path / "p1"), "", str(tmp_path / "p2")])
    assert find_tool("psql", search_path=search, system_glob=None).major == 17


def test_system_glob_debian_layout(tmp_path: Path) -> None:
    for major in ("13", "15", "18"):
        fake_tool(tmp_path / "postgresql" / major / "bin", "pg_dumpall", pg("pg_dumpall", f"{major}.1"))
    tool = find_tool("pg_dumpall", search_path="", system_glob=str(tmp_path / "postgresql" / "*" / "bin"))
    assert tool.bin_dir == str(tmp_path / "postgresql" / "18" / "bin")


def test_pg_bin_dir_is_the_only_place_searched(tmp_path: Path) -> None:
    fake_tool(tmp_path / "newer", "pg_dump", pg("pg_dump", "18.0"))
    fake_tool(tmp_path / "chosen", "pg_dump", pg("pg_dump", "17.0"))
    tool = find_tool(
        "pg_dump",
        pg_bin_dir=str(tmp_path / "chosen"),
        extra_dirs=[str(tmp_path / "newer")],
        search_path=str(tmp_path / "newer"),
    )
    assert tool.bin_dir == str(tmp_path / "chosen")


def test_pg_bin_dir_missing_tool(tmp_path: Path) -> None:
    fake_tool(tmp_path / "elsewhere", "pg_dump", pg("pg_dump", "18.0"))
    (tmp_path / "chosen").mkdir()
    with pytest.raises(ToolNotFound, match=f"pg_dump not found in pg_bin_dir {tmp_path / 'chosen'}"):
        find_tool("pg_dump", pg_bin_dir=str(tmp_path / "chosen"), search_path=str(tmp_path / "elsewhere"))


def test_pg_bin_dir_too_old(tmp_path: Path) -> None:
    fake_tool(tmp_path, "pg_dump", pg("pg_dump", "16.2"))
    with pytest.raises(ToolVersionError, match=f"pg_dump 16 cannot dump server 17: .*found: {tmp_path}"):
        find_tool("pg_dump", pg_bin_dir=str(tmp_path), min_major=17)


def test_pg_bin_dir_broken_tool(tmp_path: Path) -> None:
    fake_tool(tmp_path, "pg_dump", "segfault", status=139)
    with pytest.raises(ToolBroken, match="exited with status 139"):
        find_tool("pg_dump", pg_bin_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------------------------------
# Real tools


def test_real_debian_15_tools() -> None:
    need(all((DEBIAN_15 / name).is_file() for name in TOOL_NAMES), f"PostgreSQL 15 client tools in {DEBIAN_15}")
    for name in TOOL_NAMES:
        tool = find_tool(name, pg_bin_dir=str(DEBIAN_15), min_major=15)
        assert (tool.name, tool.major, tool.path) == (name, 15, str(DEBIAN_15 / name))
        assert tool.version.text.startswith(f"{name} (PostgreSQL) 15.")
    with pytest.raises(ToolVersionError) as info:
        find_tool("pg_dump", pg_bin_dir=str(DEBIAN_15), min_major=18)
    assert str(info.value) == (
        f"pg_dump 15 cannot dump server 18: set pg_bin_dir to a PostgreSQL 18+ bin directory (found: {DEBIAN_15})"
    )
