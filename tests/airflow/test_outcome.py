"""Asset URIs and the summary of a backup task (pure functions; the events themselves are asserted in the operator
and example-DAG tests)."""

from __future__ import annotations

from airflow.sdk import Asset

from airflow_provider_pgplakar.operators.outcome import source_uri, summary_lines


def test_source_uris_are_valid_assets_for_awkward_hosts_and_names() -> None:
    cases = {
        ("pgplakar", "db.example.com", 5432, "sales"): "pgplakar://db.example.com:5432/sales",
        ("pgplakar", "/var/run/postgresql", 5433, 'we"ird =db'): "pgplakar://%2Fvar%2Frun%2Fpostgresql:5433/we%22ird%20%3Ddb",
        ("pgplakar", "::1", 5432, "-lead/x"): "pgplakar://[::1]:5432/-lead%2Fx",
        ("pgplakar+bin", "10.0.0.5", 5432, None): "pgplakar+bin://10.0.0.5:5432/",
    }
    for args, uri in cases.items():
        assert source_uri(*args) == uri
        assert Asset(uri).uri == uri  # Airflow accepts it unchanged (no normalisation surprise)


def test_summary_is_human() -> None:
    stats = {"snapshot_id": "ab" * 16, "kind": "postgres", "store": "/srv/store", "bytes": 3 * 2**30,
             "new_bytes": 40 * 2**10, "new_stored_bytes": 512, "duration_s": 12.34,
             "databases": [{"database": "sales", "bytes": 3 * 2**30, "new_bytes": 40 * 2**10, "new_stored_bytes": 500,
                            "seconds": 11.01},
                           {"database": "hr", "bytes": 2**20, "new_bytes": 0, "new_stored_bytes": 0, "seconds": 0.2},
                           {"database": "old", "bytes": 2**20, "new_bytes": None, "new_stored_bytes": None,
                            "seconds": None}],  # a snapshot from before per-database new bytes
             "skipped_databases": ["tmp_scratch"]}
    assert summary_lines(stats) == [
        f"snapshot {'ab' * 16} (postgres) in /srv/store: 3.0 GiB, 40.0 KiB new (512 B stored) in 12.3 s",
        "  sales: 3.0 GiB, 40.0 KiB new (500 B stored) in 11.0 s",
        "  hr: 1.0 MiB, 0 B new (0 B stored) in 0.2 s",
        "  old: 1.0 MiB",
        "  tmp_scratch: skipped (dropped during the backup)",
    ]
