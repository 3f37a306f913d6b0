"""The ``pgplakar`` console script with a physical source: backup, restore -to DIR with -T, refusals.

Every failure is one ``pgplakar:`` line on stderr without the server password or the passphrase.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import need
from tests.physical.conftest import make_tablespace_dir, scratch_dir

PGPLAKAR = Path(sys.executable).with_name("pgplakar")
PASSPHRASE = "physical cli passphrase"


def cli(store: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PGPLAKAR), "at", str(store), *args], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *secrets: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgplakar: ") and "Traceback" not in proc.stderr, proc.stderr
    for secret in secrets:
        assert secret not in proc.stderr and secret not in proc.stdout
    return lines[0]


def new_store(src, tmp_path: Path) -> tuple[dict[str, str], Path, str]:
    """A CLI environment without the caller's PG*/PGPLAKAR_* variables, a new store in it, and ``src``'s
    replication location."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGPLAKAR_"))}
    env.update(PGPLAKAR_PASSPHRASE=PASSPHRASE, PGPLAKAR_KDF="1,8192,1", PGPLAKAR_CACHE_DIR=str(tmp_path / "cache"),
               HOME=str(tmp_path / "home"), PGPASSWORD=src.password)
    store = tmp_path / "store"
    assert cli(store, env, "create").returncode == 0
    return env, store, f"postgres+bin://{src.superuser}@{src.host}:{src.port}"


def test_cli_backup_and_restore_to_dir(pg_factory, pg_manager, tmp_path) -> None:
    need(PGPLAKAR.exists(), f"the pgplakar console script next to {sys.executable} (pip install -e .)")
    src = pg_factory(15)
    ts_dir = make_tablespace_dir(pg_manager, "ts")
    with src.connect() as c:
        c.execute(f"CREATE TABLESPACE extra LOCATION '{ts_dir}'")
        c.execute("CREATE TABLE t TABLESPACE extra AS SELECT generate_series(1, 1000) g")
    env, store, location = new_store(src, tmp_path)

    proc = cli(store, env, "--json", "backup", location, "checkpoint=fast", f"pg_bin_dir={src.bin_dir}",
               "--tag", "weekly")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    sid = summary["snapshot"]
    assert summary["major"] == 15 and summary["tablespaces"][0]["location"] == str(ts_dir)
    assert src.password not in proc.stdout + proc.stderr

    err = one_line_error(cli(store, env, "backup", f"{location}/postgres"), 1, src.password)
    assert "postgres+bin backs up the whole cluster; remove the database path /postgres" in err

    target = scratch_dir(pg_manager, "cli-restore")
    new_ts = scratch_dir(pg_manager, "cli-ts")
    proc = cli(store, env, "restore", "-to", str(target), "-T", f"{ts_dir}={new_ts}", "--pg-bin-dir",
               str(src.bin_dir), "--require-verify", "--no-sync", sid[:10])
    assert proc.returncode == 0, proc.stderr
    assert "start it with PostgreSQL 15" in proc.stdout and "pg_verifybackup: passed" in proc.stdout
    assert "not synced to disk (--no-sync)" in proc.stdout
    assert (target / "PG_VERSION").read_text().strip() == "15"
    assert os.readlink(target / "pg_tblspc" / str(summary["tablespaces"][0]["oid"])) == str(new_ts)

    err = one_line_error(cli(store, env, "restore", "-to", str(target), "-T", f"{ts_dir}={new_ts}", sid), 1)
    assert "is not empty" in err and "--force" in err
    err = one_line_error(cli(store, env, "restore", "-to", str(tmp_path / "x"), "-T", f"{ts_dir}={new_ts}",
                             f"{sid}:/data"), 2)
    assert "apply to a whole physical" in err
    err = one_line_error(cli(store, env, "restore", "-to", str(tmp_path / "x"), "--owner", "nobody",
                             f"{sid}:/data"), 2)
    assert "--owner and --no-clean apply to a whole physical" in err

    # the reference's way still works: the /data subtree as plain files
    plain = tmp_path / "plain"
    proc = cli(store, env, "restore", "-to", str(plain), f"{sid}:/data")
    assert proc.returncode == 0, proc.stderr
    assert (plain / "data" / "PG_VERSION").read_text().strip() == "15"


def test_cli_physical_backup_with_a_wrong_passphrase(pg_factory, tmp_path) -> None:
    """The store unlocks on a thread while the replication connection and its temporary slot are set up: a wrong
    passphrase is still one line, commits nothing, and leaves no slot or walsender on the server."""
    need(PGPLAKAR.exists(), f"the pgplakar console script next to {sys.executable} (pip install -e .)")
    src = pg_factory(15)
    env, store, location = new_store(src, tmp_path)
    wrong = {**env, "PGPLAKAR_PASSPHRASE": "not the physical passphrase"}
    err = one_line_error(cli(store, wrong, "backup", location, "checkpoint=fast", f"pg_bin_dir={src.bin_dir}"), 1,
                         src.password, "not the physical passphrase", PASSPHRASE)
    assert err.startswith("pgplakar: error: wrong passphrase for "), err
    with src.connect() as c:
        assert c.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM pg_stat_replication").fetchone()[0] == 0
    from airflow_provider_pgplakar.store.repo import Store

    with Store.open(str(store), PASSPHRASE, cache_dir=tmp_path / "cache2") as st:
        assert st.snapshot_ids() == [] and list(st.backend.list("packs/")) == []
        assert list(st.backend.list("locks/")) == []
