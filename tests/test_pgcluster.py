"""The tests' throwaway PostgreSQL (tests/pgcluster.py) is real: it starts, keeps data across a restart, and
leaves nothing behind."""

from __future__ import annotations

from pgcluster import Cluster


def test_cluster_starts_keeps_data_and_cleans_up():
    with Cluster() as pg:
        root = pg.root
        url = pg.new_database()
        name = url.rsplit("/", 1)[1]
        assert url.startswith(f"postgresql://edgefleet@127.0.0.1:{pg.port}/")
        pg.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)", name)
        pg.restart("immediate")  # as after a crash: recovery at start
        assert pg.psql("SELECT sum(x) FROM t", name) == "3"
        assert pg.psql("SHOW fsync") == "off"
    assert not root.exists()
