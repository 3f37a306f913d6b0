"""The real ``pgplakar`` console script, run as a subprocess the way an operator would.

Every failure must be exactly one line on stderr starting ``pgplakar: `` (exit 1 for errors, 2 for usage), with no
traceback and never a passphrase or key. Most tests use a local store; one smoke test runs on S3 (moto over HTTP).
"""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import pytest

from tests.helpers import need
from tests.s3_server import s3_location

PGPLAKAR = Path(sys.executable).with_name("pgplakar")
PASSPHRASE = "cli passphrase 5e1d"
NEW = "new passphrase 83b0"
NEWER = "newer passphrase c41f"
SECRETS = (PASSPHRASE, NEW, NEWER)


@dataclass
class Cli:
    location: str
    env: dict[str, str]
    secrets: list[str] = field(default_factory=lambda: list(SECRETS))

    def run(self, *args: str, env: dict[str, str | None] | None = None, at: bool = True,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        full_env = dict(self.env)
        for k, v in (env or {}).items():
            if v is None:
                full_env.pop(k, None)
            else:
                full_env[k] = v
        argv = [str(PGPLAKAR), *(["at", self.location] if at else []), *args]
        return subprocess.run(argv, env=full_env, capture_output=True, stdin=subprocess.DEVNULL, timeout=120, cwd=cwd)

    def ok(self, *args: str, **kw: Any) -> str:
        r = self.run(*args, **kw)
        assert r.returncode == 0, f"{args}: exit {r.returncode}: {r.stderr.decode(errors='replace')}"
        return r.stdout.decode()

    def json(self, *args: str, **kw: Any) -> Any:
        return json.loads(self.ok("--json", *args, **kw))

    def fails(self, code: int, *args: str, **kw: Any) -> str:
        """Run, expect exit ``code`` and one clean line on stderr; return that line."""
        r = self.run(*args, **kw)
        err = r.stderr.decode(errors="replace")
        assert r.returncode == code, f"{args}: expected exit {code}, got {r.returncode}: {err}"
        assert_one_error_line(err, self.secrets)
        assert not any(s.encode() in r.stdout for s in self.secrets)
        return err.rstrip("\n")


def assert_one_error_line(stderr: str, secrets: list[str]) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("pgplakar: "), lines[0]
    assert "Traceback" not in stderr
    for s in secrets:
        assert s not in stderr, "a passphrase or key leaked into an error message"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PGPLAKAR_KEY", "PGPLAKAR_STORE", "PGPLAKAR_NEW_PASSPHRASE", "PGPLAKAR_FAILPOINT")}
    env.update({
        "PGPLAKAR_KDF": "1,8192,1",
        "PGPLAKAR_PASSPHRASE": PASSPHRASE,
        "PGPLAKAR_CACHE_DIR": str(tmp_path / "cache"),
        "HOME": str(tmp_path / "home"),  # the default store ~/.pgplakar must never be the developer's
    })
    return env


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    need(PGPLAKAR.exists(), f"the pgplakar console script next to {sys.executable} (pip install -e .)")
    return Cli(str(tmp_path / "store"), _env(tmp_path))


@pytest.fixture
def created(cli: Cli) -> Cli:
    out = cli.ok("create")
    assert out.startswith("created aes256gcm store ") and cli.location in out
    return cli


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("hello\n")
    (root / "empty").write_bytes(b"")
    (root / "sub" / "b.bin").write_bytes(random.Random(1).randbytes(300_000))
    (root / "sub" / "deeper" / "c.txt").write_text("deep\n" * 100)
    (root / "sub" / "deeper" / "c.txt").chmod(0o600)
    os.symlink("a.txt", root / "link")
    return root


def tree(root: Path) -> dict[str, Any]:
    """Everything below ``root``: files with content and mode, symlinks with target, directories."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d",)
            else:
                out[rel] = ("f", p.read_bytes(), stat.S_IMODE(st.st_mode))
    return out


def backup(cli: Cli, src: Path, *extra: str) -> str:
    summary = cli.json("backup", str(src), *extra)
    return summary["id"]


def flip_middle_of_largest_pack(location: str) -> str:
    from airflow_provider_pgplakar.store.location import open_backend

    backend = open_backend(location)
    obj = max(backend.list("packs/"), key=lambda o: o.size)
    data = bytearray(backend.get(obj.key))
    data[len(data) // 2] ^= 0x01
    backend.put(obj.key, bytes(data), create_only=False)
    return obj.key


# -- create / backup / ls / cat / restore ------------------------------------------------------------------------------
def test_backup_ls_cat_restore(created: Cli, src: Path, tmp_path: Path) -> None:
    cli = created
    line = cli.fails(1, "create")
    assert line.startswith("pgplakar: error: ") and "already holds a store" in line and cli.location in line

    out = cli.ok("backup", str(src))
    assert out.startswith("snapshot ") and " created: " in out
    (listed,) = cli.json("ls")
    sid = listed["id"]
    assert len(sid) == 32 and out.startswith(f"snapshot {sid[:8]} created: 8 records")
    assert listed["source"] == {"kind": "files", "origin": str(src)}

    table = cli.ok("ls").splitlines()
    assert table[0].split() == ["id", "time", "source", "size", "stored", "tags"]
    assert len(table) == 2 and table[1].startswith(sid[:8]) and f"files:{src}" in table[1]
    assert listed["stats"]["records"] == 8 and listed["stats"]["bytes"] == 300_000 + 6 + 500

    records = cli.json("ls", f"{sid[:8]}:/sub")
    assert [r["path"] for r in records] == ["/sub", "/sub/b.bin", "/sub/deeper", "/sub/deeper/c.txt"]
    assert records[1]["size"] == 300_000 and records[1]["kind"] == "f"
    # the record digest ls shows is what b3sum prints for the file (SHA-256 only for older snapshots' records)
    assert records[1]["blake3"] == blake3.blake3((src / "sub" / "b.bin").read_bytes()).hexdigest()
    assert "sha256" not in records[1] and "blake3" not in records[0]
    sub_table = cli.ok("ls", f"{sid[:8]}:/sub/deeper").splitlines()
    assert sub_table[0].split() == ["mode", "size", "kind", "path"]
    assert [line.split()[-1] for line in sub_table[1:]] == ["/sub/deeper", "/sub/deeper/c.txt"]

    r = cli.run("cat", f"{sid[:8]}:/sub/b.bin")
    assert r.returncode == 0 and r.stdout == (src / "sub" / "b.bin").read_bytes()
    assert cli.run("cat", f"{sid}:/a.txt").stdout == b"hello\n"
    assert "no record '/nope'" in cli.fails(1, "cat", "latest:/nope")

    out_dir = tmp_path / "restored"
    assert f"restored 4 file(s) from {sid[:8]}" in cli.ok("restore", "-to", str(out_dir), sid[:8])
    assert tree(out_dir) == tree(src)

    # a subpath is restored with its snapshot path kept below the target (only that subtree is written)
    part = tmp_path / "part"
    cli.ok("restore", "-to", str(part), f"{sid[:8]}:/sub/deeper")
    assert tree(part) == {"sub": ("d",), "sub/deeper": ("d",),
                          "sub/deeper/c.txt": ("f", b"deep\n" * 100, 0o600)}

    assert "already exists" in cli.fails(1, "restore", "-to", str(out_dir), sid[:8])


# -- check -------------------------------------------------------------------------------------------------------------
def test_check_exit_codes(created: Cli, src: Path) -> None:
    cli = created
    backup(cli, src)
    assert cli.ok("check").splitlines()[-1].startswith("ok: 1 snapshots, 8 records")
    assert cli.ok("check", "--read-data").splitlines()[-1].startswith("ok: ")

    pack = flip_middle_of_largest_pack(cli.location)
    assert cli.run("check").returncode == 0  # data damage is only visible by reading data
    r = cli.run("check", "--read-data")
    assert r.returncode == 3, r.stderr
    out = r.stdout.decode()
    assert f"ERROR {pack}: " in out and out.splitlines()[-1].startswith("FAILED: ")
    assert "Traceback" not in r.stderr.decode()

    r = cli.run("--json", "check", "--read-data")
    assert r.returncode == 3
    rep = json.loads(r.stdout)
    assert rep["ok"] is False and pack in {p["object"] for p in rep["problems"]}
    assert any("record '/sub/b.bin'" in a for p in rep["problems"] for a in p["affects"])

    # cat of the damaged file fails cleanly; whatever it wrote before failing is a correct prefix
    r = cli.run("cat", "latest:/sub/b.bin")
    assert r.returncode == 1
    assert_one_error_line(r.stderr.decode(), cli.secrets)
    assert pack in r.stderr.decode()
    good = (src / "sub" / "b.bin").read_bytes()
    assert good.startswith(r.stdout) and len(r.stdout) < len(good)
    assert cli.run("cat", "latest:/a.txt").stdout == b"hello\n"  # other files are unaffected


# -- forget / prune ----------------------------------------------------------------------------------------------------
def test_forget_and_prune(created: Cli, src: Path, tmp_path: Path) -> None:
    cli = created
    ids = []
    for i in range(3):
        (src / "sub" / "b.bin").write_bytes(random.Random(100 + i).randbytes(200_000))
        ids.append(backup(cli, src, "--tag", f"t{i}"))
    assert [s["id"] for s in cli.json("ls")] == ids

    assert "would remove 1 snapshot(s)" in cli.ok("forget", "--dry-run", ids[0][:8])
    assert "removed 1 snapshot(s)" in cli.ok("forget", ids[0][:8])
    assert [s["id"] for s in cli.json("ls")] == ids[1:]

    plan = cli.ok("forget", "--keep-last", "1", "--dry-run")
    assert "would remove 1 snapshot(s)" in plan
    assert f"keep   {ids[2][:8]}" in plan and f"remove {ids[1][:8]}" in plan
    result = cli.json("forget", "--keep-last", "1")
    assert result["removed"] == [ids[1]] and result["dry_run"] is False
    assert [s["id"] for s in cli.json("ls")] == [ids[2]]

    dry = cli.json("prune", "--dry-run")
    assert dry["dry_run"] is True and dry["packs_deleted"] >= 1
    out = cli.ok("prune")
    assert out.startswith("prune: deleted ") and "1 snapshot(s) kept" in out and "{" not in out
    again = cli.json("prune", "--dry-run")  # a second prune has nothing left to do
    assert again["packs_deleted"] == 0 and again["packs_repacked"] == 0, again
    cli.ok("check", "--read-data")
    restored = tmp_path / "after-prune"
    cli.ok("restore", "-to", str(restored), "latest")
    assert tree(restored) == tree(src)


# -- info --------------------------------------------------------------------------------------------------------------
def test_forget_with_prune_says_what_prune_freed(created: Cli, src: Path) -> None:
    cli = created
    for _ in range(2):
        (src / "a.txt").write_text(f"changed {random.random()}\n")
        backup(cli, src)
    out = cli.ok("forget", "--keep-last", "1", "--prune").splitlines()
    assert out[-2] == "removed 1 snapshot(s)"
    assert out[-1].startswith("prune: deleted ") and " freed; 1 snapshot(s) kept" in out[-1], out


def test_info(created: Cli, src: Path) -> None:
    cli = created
    sid = backup(cli, src, "--tag", "nightly", "--label", "db=main")
    lines = cli.ok("info").splitlines()
    fields = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in lines}
    assert fields["encryption"] == "aes256gcm" and fields["snapshots"] == "1" and fields["location"] == cli.location
    info = cli.json("info")
    assert info["repo_id"] == fields["repo_id"] and info["encryption"] == "aes256gcm" and info["format"] == 2
    header = cli.json("info", sid[:8])
    assert header["id"] == sid and header["tags"] == ["nightly"] and header["labels"] == {"db": "main"}
    assert "manifest" not in header
    human = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in cli.ok("info", sid[:8]).splitlines()}
    assert human["id"] == sid and human["tags"] == "nightly" and human["labels"] == "db=main", human
    assert human["source"] == f"files {src}" and human["idempotent"] == "no", human
    assert human["contents"].startswith(f"{header['stats']['records']} records, "), human
    assert not any(c in text for text in human.values() for c in "{}[]'"), human  # no Python reprs


# -- keys --------------------------------------------------------------------------------------------------------------
def test_key_management(created: Cli, src: Path, tmp_path: Path) -> None:
    cli = created
    backup(cli, src)
    table = cli.ok("key", "list").splitlines()
    assert table[0].split() == ["id", "created", "host", "comment"] and len(table) == 2
    (first,) = cli.json("key", "list")
    assert first["comment"] == "initial"

    out = cli.ok("key", "add", env={"PGPLAKAR_NEW_PASSPHRASE": NEW})
    assert out.startswith("added key ")
    assert len(cli.json("ls", env={"PGPLAKAR_PASSPHRASE": NEW})) == 1

    # passwd: the key file that NEW opens is replaced by one for NEWER
    new_file = tmp_path / "newer.txt"
    new_file.write_text(NEWER + "\n")
    cli.ok("key", "passwd", "--new-passphrase-file", str(new_file), env={"PGPLAKAR_PASSPHRASE": NEW})
    assert "wrong passphrase" in cli.fails(1, "ls", env={"PGPLAKAR_PASSPHRASE": NEW})
    assert len(cli.json("ls", env={"PGPLAKAR_PASSPHRASE": NEWER})) == 1
    assert len(cli.json("ls")) == 1
    keys = cli.json("key", "list")
    assert sorted(k["comment"] for k in keys) == ["initial", "passwd"]

    # export: the raw key opens the store without any passphrase, from the environment or a file
    raw = cli.ok("key", "export").strip()
    cli.secrets.append(raw)
    no_pw = {"PGPLAKAR_PASSPHRASE": None}
    assert len(cli.json("ls", env={**no_pw, "PGPLAKAR_KEY": raw})) == 1
    key_file = tmp_path / "store.key"
    key_file.write_text(raw + "\n")
    assert len(cli.json("ls", "--key-file", str(key_file), env=no_pw)) == 1
    assert "does not belong" in cli.fails(1, "ls", env={**no_pw, "PGPLAKAR_KEY": "A" * 86 + "=="})

    # remove: one of two works, the last one is refused
    passwd_id = next(k["id"] for k in keys if k["comment"] == "passwd")
    assert cli.ok("key", "remove", passwd_id).strip() == f"removed key {passwd_id}"
    assert "wrong passphrase" in cli.fails(1, "ls", env={"PGPLAKAR_PASSPHRASE": NEWER})
    assert "last key" in cli.fails(1, "key", "remove", first["id"])
    assert "no key file" in cli.fails(1, "key", "remove", "0123456789abcdef")


# -- passphrase sources ------------------------------------------------------------------------------------------------
def test_passphrase_file(cli: Cli, src: Path, tmp_path: Path) -> None:
    pw_file = tmp_path / "pw.txt"
    pw_file.write_text(PASSPHRASE + "\n")
    no_env = {"PGPLAKAR_PASSPHRASE": None}
    cli.ok("create", "--passphrase-file", str(pw_file), env=no_env)
    backup(cli, src)  # the environment's passphrase is the same one

    assert "is encrypted: give a passphrase" in cli.fails(1, "ls", env=no_env)
    # the option works after the command, between `at STORE` and the command, and before `at`
    assert len(cli.json("ls", "--passphrase-file", str(pw_file), env=no_env)) == 1
    assert len(cli.json("--passphrase-file", str(pw_file), "ls", env=no_env)) == 1
    r = cli.run("--json", "--passphrase-file", str(pw_file), "at", cli.location, "ls", env=no_env, at=False)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == 1

    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not the passphrase 0d9e\n")
    cli.secrets.append("not the passphrase 0d9e")
    assert cli.fails(1, "ls", "--passphrase-file", str(wrong), env=no_env).startswith(
        "pgplakar: error: wrong passphrase for ")
    # the file wins over the environment
    assert "wrong passphrase" in cli.fails(1, "ls", "--passphrase-file", str(wrong))
    assert "cannot read passphrase file" in cli.fails(1, "ls", "--passphrase-file", str(tmp_path / "missing"))


def test_forget_keep_within_counts_months(created: Cli, tmp_path: Path) -> None:
    """``--keep-within 6m`` is six months, as in restic (it used to be six minutes and forgot five months of data)."""
    import pendulum

    from airflow_provider_pgplakar.store.repo import Store

    times = ["2025-10-01T00:00:00+00:00", "2025-11-15T00:00:00+00:00", "2026-03-01T00:00:00+00:00",
             "2026-04-30T23:00:00+00:00", "2026-05-01T00:00:00+00:00"]
    ids = {}
    with Store.open(created.location, PASSPHRASE, cache_dir=tmp_path / "inproc-cache") as st:
        for t in times:
            with st.writer(source={"kind": "test", "origin": "months"}) as w:
                w._start = pendulum.parse(t)  # a snapshot taken at t (the writer's start time, set on entering)
                w.add_bytes("/f", t.encode())
            ids[w.snapshot_id] = t
    plan = created.json("forget", "--keep-within", "6m", "--dry-run")
    # newest 2026-05-01: six calendar months back is 2025-11-01, so only 2025-10-01 goes
    assert [ids[i] for i in plan["removed"]] == ["2025-10-01T00:00:00+00:00"]
    [group] = plan["groups"]
    assert sorted(ids[k["id"]] for k in group["keep"]) == times[1:]
    assert all(k["reasons"] == ["within 6m"] for k in group["keep"])
    assert len(created.json("ls")) == 5  # a dry run removes nothing
    result = created.json("forget", "--keep-within", "1y")
    assert result["removed"] == [] and len(created.json("ls")) == 5
    for bad in ("6 months", "6M", "", "30s"):
        line = created.fails(2, "forget", "--keep-within", bad)
        assert line.startswith("pgplakar: usage: --keep-within: ") and "m months" in line, line
    assert len(created.json("ls")) == 5


# -- snapshot references -----------------------------------------------------------------------------------------------
@pytest.fixture
def twin_prefixes(created: Cli, tmp_path: Path) -> Iterator[tuple[Cli, list[str]]]:
    """Two snapshots whose IDs share the prefix ``abcd`` (IDs are random; the writer lets us pick them)."""
    from airflow_provider_pgplakar.store.repo import Store

    ids = ["abcd" + "1" * 28, "abcd" + "2" * 28]
    with Store.open(created.location, PASSPHRASE, cache_dir=tmp_path / "inproc-cache") as st:
        for i, sid in enumerate(ids):
            w = st.writer(source={"kind": "test", "origin": "twins"})
            w.snapshot_id = sid
            with w:
                w.add_bytes("/f", f"twin {i}\n".encode())
    yield created, ids


def test_snapshot_prefixes(twin_prefixes: tuple[Cli, list[str]], tmp_path: Path) -> None:
    cli, ids = twin_prefixes
    assert cli.run("cat", "abcd1:/f").stdout == b"twin 0\n"
    assert cli.run("cat", f"{ids[1]}:/f").stdout == b"twin 1\n"
    assert cli.run("cat", "latest:/f").returncode == 0

    line = cli.fails(1, "cat", "abcd:/f")
    assert line.startswith("pgplakar: error: ") and "matches 2 snapshots" in line
    line = cli.fails(1, "ls", "abce")
    assert line.startswith("pgplakar: error: ") and "no snapshot matches 'abce'" in line
    assert "not a snapshot ID" in cli.fails(1, "restore", "-to", str(tmp_path / "target"), "xyz")
    assert "not a snapshot ID" in cli.fails(1, "info", "abc")
    assert "no snapshot matches" in cli.fails(1, "forget", "dead")
    assert len(cli.json("ls")) == 2  # nothing was forgotten by the failed command


def test_missing_store(cli: Cli, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-store-here")
    for args in (("ls",), ("backup", str(tmp_path))):
        r = cli.run("at", missing, *args, at=False)
        assert r.returncode == 1
        err = r.stderr.decode()
        assert_one_error_line(err, cli.secrets)
        assert err.startswith(f"pgplakar: error: no store at {missing}")
    assert not Path(missing).exists(), "a read command must not create the store directory"


# -- usage errors ------------------------------------------------------------------------------------------------------
USAGE_ERRORS = [
    [],
    ["bogus"],
    ["restore", "latest"],
    ["check", "--bad-flag"],
    ["key", "frob"],
    ["create", "--compression-level", "high"],
    ["prune", "--wait", "x"],
    # these are found after the store is opened
    ["forget"],
    ["forget", "abcd", "--keep-last", "1"],
    ["forget", "--keep-within", "soon"],
    ["cat", "latest"],
    ["backup", "{src}", "--label", "no-equals-sign"],
    ["key", "remove"],
]


def test_bad_usage(created: Cli, src: Path) -> None:
    for args in USAGE_ERRORS:
        line = created.fails(2, *(a.format(src=src) for a in args))
        assert line.startswith("pgplakar: usage: "), (args, line)
    assert created.json("ls") == []  # nothing happened


def test_at_without_location(cli: Cli) -> None:
    assert cli.fails(2, "at", at=False) == "pgplakar: usage: `at` needs a store location"


def test_help_exits_zero(cli: Cli) -> None:
    r = cli.run("--help", at=False)
    assert r.returncode == 0 and r.stdout.startswith(b"usage: pgplakar [options] at STORE COMMAND [ARGS]\n")


def test_help_of_backup_and_restore_lists_every_option_with_its_default(cli: Cli) -> None:
    from airflow_provider_pgplakar.pg.options import LogicalSourceOptions, PhysicalSourceOptions, RestoreOptions

    backup_help = cli.ok("backup", "--help", at=False)
    restore_help = cli.ok("restore", "--help", at=False)
    assert backup_help.startswith("usage: pgplakar [options] at STORE backup")
    assert "seed" not in backup_help + restore_help
    flat = " ".join(backup_help.split())
    for cls in (LogicalSourceOptions, PhysicalSourceOptions):
        for name in cls.__dataclass_fields__:
            assert name == "conn" or name in flat, name
    assert "compress [false]" in flat and "checkpoint [spread]" in flat
    assert "ssl_mode [prefer; postgres+aws: require]" in flat
    flat = " ".join(restore_help.split())
    assert all(name in flat for name in RestoreOptions.__dataclass_fields__ if name != "conn")
    assert "recreate [false]" in flat and "jobs [1]" in flat


def test_a_newcomers_mistakes_get_one_line_that_says_what_to_do(created: Cli, src: Path, tmp_path: Path) -> None:
    cli = created
    assert cli.fails(2, cli.location, "ls", at=False) == (
        f"pgplakar: usage: {cli.location!r} is not a command; to name a store write `pgplakar at {cli.location} ls …`")
    line = cli.fails(2, "backup", "postgress://db.example.com/sales")
    assert "unknown scheme 'postgress'" in line and "postgres://" in line
    sid = backup(cli, src)
    assert cli.fails(1, "ls", f"{sid[:8]}:/missing") == cli.fails(1, "cat", f"{sid[:8]}:/missing") == \
        f"pgplakar: error: no record '/missing' in snapshot {sid[:8]}"
    empty = tmp_path / "empty-passphrase"
    empty.write_text("")
    assert cli.fails(1, "--passphrase-file", str(empty), "ls", env={"PGPLAKAR_PASSPHRASE": None}) == (
        f"pgplakar: error: the passphrase file {empty} is empty: write the passphrase into it (one line)")
    info = cli.ok("info")
    assert "{" not in info and "compression  zstd level 1" in info and "pack_target  16.0 MiB" in info


def test_a_snapshot_before_or_after_the_options_is_understood(created: Cli, src: Path, tmp_path: Path) -> None:
    cli = created
    sid = backup(cli, src)[:8]
    server = "postgres://nobody@db.invalid:1/"
    # understood in either place: the command gets as far as the snapshot (a files snapshot, refused as such)
    for items in ((sid, "recreate=true"), ("recreate=true", sid)):
        assert cli.fails(1, "restore", "-to", server, *items) == (
            f"pgplakar: error: snapshot {sid} is a 'files' snapshot, not a logical PostgreSQL backup")
    for items in ((sid, "databases=a"), ("databases=a", sid)):
        assert f"snapshot {sid} is a 'files' snapshot: verify handles PostgreSQL" in cli.fails(1, "verify", *items)
    # explained when it is not one word among key=value options
    assert cli.fails(2, "restore", "-to", server, sid, "recreate") == (
        f"pgplakar: usage: restore: '{sid}' and 'recreate' are not key=value: give one SNAPSHOT, and options as "
        "key=value (e.g. recreate=true)")
    assert cli.fails(2, "verify", "databases=a") == (
        "pgplakar: usage: verify needs a SNAPSHOT (an ID, a unique prefix of one, or latest) besides its key=value "
        "options")


def test_a_scheme_typo_in_a_restore_target_is_not_a_directory(created: Cli, src: Path, tmp_path: Path) -> None:
    sid = backup(created, src)[:8]
    work = tmp_path / "cwd"
    work.mkdir()
    line = created.fails(2, "restore", "-to", "postgress://db.example.com/sales", sid, cwd=work)
    assert line == ("pgplakar: usage: unknown scheme 'postgress' in postgress://…: -to is a directory or a "
                    "postgres:// or postgres+aws:// location")
    assert list(work.iterdir()) == []  # no directory "postgress:" was made


def test_ctrl_d_at_the_passphrase_prompt_is_an_interrupt(created: Cli) -> None:
    """Through a real terminal (a pty): getpass reads /dev/tty, where Ctrl-D ends the input."""
    import pty
    import select
    import time

    env = {k: v for k, v in created.env.items() if k != "PGPLAKAR_PASSPHRASE"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal
        try:
            os.execve(str(PGPLAKAR), [str(PGPLAKAR), "at", created.location, "ls"], env)
        finally:
            os._exit(127)
    out = b""
    sent = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], 1.0)[0]:
                continue
            try:
                piece = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not piece:
                break
            out += piece
            if not sent and out.rstrip().endswith(b"passphrase:"):
                os.write(fd, b"\x04")
                sent = True
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert sent, text
    assert os.waitstatus_to_exitcode(status) == 130, text
    assert text.replace("\r\n", "\n").rstrip().endswith("passphrase: \npgplakar: interrupted"), text
    assert "Traceback" not in text and "internal error" not in text and "EOFError" not in text


def test_a_failing_write_is_one_line_without_pipeline_noise(created: Cli, tmp_path: Path) -> None:
    """An upload fails inside the write pipeline (every packs/XX is a file, not a directory): the uploader's failure
    is reported once, by the command, not again as a log line (not even with -v)."""
    root = tmp_path / "big"
    root.mkdir()
    (root / "data.bin").write_bytes(random.Random(7).randbytes(3_000_000))
    packs = Path(created.location) / "packs"
    packs.mkdir(exist_ok=True)
    for i in range(256):
        (packs / f"{i:02x}").write_bytes(b"")
    line = created.fails(1, "backup", str(root))
    assert line.startswith(f"pgplakar: error: writing to {created.location} failed: ") and "Not a directory" in line
    verbose = created.run("-v", "backup", str(root)).stderr.decode()
    assert "pipeline" not in verbose and "aborted" not in verbose, verbose
    assert verbose.splitlines()[-1].startswith("pgplakar: error: writing to "), verbose
    for i in range(256):
        (packs / f"{i:02x}").unlink()
    assert created.json("ls") == []  # nothing was committed


# -- S3 ----------------------------------------------------------------------------------------------------------------
def test_s3_smoke(s3_bucket: tuple[str, str], src: Path, tmp_path: Path) -> None:
    need(PGPLAKAR.exists(), f"the pgplakar console script next to {sys.executable} (pip install -e .)")
    endpoint, bucket = s3_bucket
    cli = Cli(s3_location(endpoint, bucket, f"cli-{uuid.uuid4().hex[:6]}"), _env(tmp_path))
    assert f"at s3://{bucket}/cli-" in cli.ok("create")
    sid = backup(cli, src)
    assert [s["id"] for s in cli.json("ls")] == [sid]
    out_dir = tmp_path / "restored"
    cli.ok("restore", "-to", str(out_dir), sid[:8])
    assert tree(out_dir) == tree(src)

    missing = Cli(s3_location(endpoint, bucket, "nothing-here"), cli.env)
    assert f"no store at s3://{bucket}/nothing-here" in missing.fails(1, "ls")
