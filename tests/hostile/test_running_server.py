"""A running server's directories are never restored over (issue 9 §2), even with overwrite and an explicit
tablespace mapping: its data directory, a directory holding it, and a tablespace linked from its ``pg_tblspc``
(found through ``/proc``). Real server; the refusal comes before anything is deleted."""

from __future__ import annotations

import pytest

from airflow_provider_pgplakar.pg.datadir import PhysicalRestoreError, physical_restore, running_servers
from tests.hostile.test_physical_restore import TS_OID, phys_snapshot
from tests.hostile.trees import listing
from tests.physical.conftest import make_tablespace_dir


def test_running_server_targets_are_refused(pg_factory, pg_manager, store, sandbox) -> None:
    src = pg_factory(15)
    live_ts = make_tablespace_dir(pg_manager, "live-ts")
    with src.connect() as c:
        c.execute(f"CREATE TABLESPACE live LOCATION '{live_ts}'")
        c.execute("CREATE TABLE t TABLESPACE live AS SELECT generate_series(1, 1000) g")
    found = {str(path) for _, path, _ in running_servers()}
    assert str(src.datadir.resolve()) in found and str(live_ts.resolve()) in found

    sid = phys_snapshot(store, tablespaces=[(TS_OID, live_ts)])
    ts_files, data_files = listing(live_ts), listing(src.datadir)
    with pytest.raises(PhysicalRestoreError, match=f"tablespace {TS_OID} directory {live_ts} overlaps .*, tablespace "
                                                   "[0-9]+ of a running PostgreSQL server"):
        physical_restore(store, sid, sandbox.target, verify=False, overwrite=True,
                         tablespace_mapping={str(live_ts): str(live_ts)})
    for target in (src.datadir, src.datadir.parent):
        with pytest.raises(PhysicalRestoreError, match="the data directory of a running PostgreSQL server"):
            physical_restore(store, sid, target, verify=False, overwrite=True,
                             tablespace_mapping={str(live_ts): str(sandbox.root / "ts")})
    assert listing(live_ts) == ts_files and listing(src.datadir) == data_files
    assert not sandbox.target.exists() and not (sandbox.root / "ts").exists()
    with src.connect() as c:
        assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 1000
