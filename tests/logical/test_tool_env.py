"""What the client tools of a real backup see in their environment: the allowlist of pg/secrets.py, nothing else.

``pg_bin_dir`` points at wrappers that record their environment and then exec the real PostgreSQL 15 tool, so the
backup runs exactly as in production (version probes, pg_dumpall, pg_dump) and each process's environment is kept.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from airflow_provider_pgplakar.pg.logical import logical_backup
from airflow_provider_pgplakar.pg.options import parse_source_options
from airflow_provider_pgplakar.store.repo import Store
from tests.logical.conftest import src_opts
from tests.pgservers import PgServer

# Credentials a worker may hold (ECS task role, IRSA, Airflow config, ours) and a random one.
LEAKS = {
    "AWS_CONTAINER_AUTHORIZATION_TOKEN": "ecs-container-token-123",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials",
    "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/eks/token",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-456",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://airflow:airflowpw@meta/airflow",
    "PGPLAKAR_PASSPHRASE": "store-passphrase",
    "SECRET_X": "random-secret-789",
    "PGOPTIONS": "-c default_transaction_read_only=off",
}


def _wrappers(dest: Path, real_bin: Path, record: Path) -> Path:
    dest.mkdir()
    for name in ("pg_dump", "pg_dumpall"):
        script = dest / name
        script.write_text(f'#!/bin/sh\nenv -0 > "{record}/{name}.$$"\nexec "{real_bin / name}" "$@"\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return dest


def test_tools_get_only_the_allowlisted_environment(pg15: PgServer, store: Store, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "envs"
    record.mkdir()
    bin_dir = _wrappers(tmp_path / "bin", pg15.bin_dir, record)
    for k, v in LEAKS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TZ", "UTC")
    loc, opts = src_opts(pg15, database="postgres", pg_bin_dir=str(bin_dir))
    result = logical_backup(store, parse_source_options(loc, opts))
    assert result.databases == ["postgres"]

    seen: dict[str, list[dict[str, str]]] = {}
    for f in sorted(record.iterdir()):
        pairs = [entry.split("=", 1) for entry in f.read_text().split("\0") if entry]
        seen.setdefault(f.name.split(".")[0], []).append(dict(pairs))
    # the version probes and the real runs of both tools were recorded
    assert len(seen["pg_dump"]) >= 2 and len(seen["pg_dumpall"]) >= 2, seen.keys()
    runs = [env for envs in seen.values() for env in envs]
    for env in runs:
        assert not set(env) & set(LEAKS), sorted(set(env) & set(LEAKS))
        assert not any(v in env.values() for v in LEAKS.values())
        assert env.get("PATH") == os.environ["PATH"] and env.get("TZ") == "UTC"
        extra = {k for k in env if not k.startswith(("PG", "LC_"))} - {"PATH", "LANG", "LANGUAGE", "TZ", "HOME",
                                                                       "TMPDIR", "PWD", "SHLVL", "_"}
        assert not extra, extra  # PWD/SHLVL/_ are what the recording shell itself adds
    dump_runs = [env for env in runs if "PGPASSWORD" in env]
    assert len(dump_runs) == 2  # pg_dumpall --globals-only and pg_dump of the one database
    for env in dump_runs:
        assert env["PGPASSWORD"] == pg15.password and env["PGHOST"] == pg15.host
        assert "PGOPTIONS" not in env
