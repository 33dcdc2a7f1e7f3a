"""The store package: batched recording (``record_many``), the store URL, and what both backends must do alike.

Every test here takes ``store`` (a fresh database per test) and runs on SQLite and on PostgreSQL."""

import msgspec
import pytest
from util import wait_for

from agent import protocol
from agent.errors import EdgefleetError
from fleet import quality
from fleet.store import Store, open_store
from test_fleet_quality import PROFILE, SHA, bins, manifest, qmsg

T0 = 1_700_000_000.0


def tel(seq: int, t: float, device: str = "cam-1", boot: str = "b1", **kw) -> protocol.Telemetry:
    kw.setdefault("interval_s", 10.0)
    kw.setdefault("inferences", 10)
    return protocol.Telemetry(device_id=device, boot_id=boot, seq=seq, time=t, **kw)


def test_record_many_stores_a_batch_in_one_transaction_and_says_what_each_item_became(store):
    store.add_bundle(SHA, 1000, manifest(), profile=msgspec.json.encode(PROFILE))
    birth = protocol.State(device_id="cam-1", online=True, time=T0, boot_id="b1")
    refused = qmsg("cam-1", 5, T0 + 40, profile="00" * 32)
    items = [(birth, T0, False), (tel(1, T0 + 10), T0 + 10, False), (tel(2, T0 + 20), T0 + 20, False),
             (tel(1, T0 + 10), T0 + 21, False),  # the broker sent seq 1 again: a duplicate in the same batch
             (protocol.Event(device_id="cam-1", boot_id="b1", seq=3, time=T0 + 25, kind="loaded"), T0 + 25, False),
             (qmsg("cam-1", 4, T0 + 30, bins((40, 10, 0))), T0 + 30, False), (refused, T0 + 40, False)]
    out = store.record_many(items)
    assert out == [True, True, True, False, True, True, quality.WRONG_PROFILE]
    [d] = store.devices()
    assert (d["seq_max"], d["seq_count"], d["duplicates"], d["inferences"]) == (4, 4, 1, 20)
    assert quality.refused(store) == {quality.WRONG_PROFILE: 1}
    # a redelivery of the whole batch later changes nothing but the duplicate count
    again = store.record_many(items[1:6])
    assert again == [False, False, False, False, False]
    [d] = store.devices()
    assert (d["seq_max"], d["seq_count"], d["duplicates"], d["inferences"]) == (4, 4, 6, 20)
    assert [p["inferences"] for p in store.series("cam-1", T0, T0 + 100)] == [10, 10]


def test_a_batch_that_fails_stores_nothing(store):
    with pytest.raises(TypeError, match="cannot store"):
        store.record_many([(tel(1, T0 + 10), T0 + 10, False), (object(), T0 + 11, False)])
    assert store.devices() == []
    assert store.record_many([(tel(1, T0 + 10), T0 + 12, False)]) == [True]  # not taken as a duplicate


def test_the_single_message_methods_keep_their_contract(store):
    assert store.record_telemetry(tel(1, T0 + 10), received=T0 + 10) is True
    assert store.record_telemetry(tel(1, T0 + 10), received=T0 + 11) is False
    store.add_bundle(SHA, 1000, manifest(), profile=msgspec.json.encode(PROFILE))
    with pytest.raises(quality.Refused, match="profile"):
        store.record_quality(qmsg("cam-1", 2, T0 + 20, profile="00" * 32), received=T0 + 20)
    assert store.record_quality(qmsg("cam-1", 3, T0 + 30), received=T0 + 30) is True


def test_the_registry_reads_back_what_was_written(store):
    assert store.add_token("ci", "admin", "h" * 64, T0)["name"] == "ci"
    assert store.add_token("ci", "read", "g" * 64, T0) is None  # an active token has that name
    assert store.revoke_token("ci", T0 + 1)["revoked"] == T0 + 1
    store.add_certificate(0xABC, "cam-1", "f" * 64, T0, T0 + 3600, "device")
    assert store.revoke_device("cam-1", "admin", now=T0 + 2) == ["abc"]
    assert store.revoked_device_ids() == ["cam-1"]
    store.record_state(protocol.State(device_id="cam-1", online=True, time=T0, boot_id="b1"), received=T0)
    assert store.set_tags("cam-1", add=["lab", "lab", "roof"]) == ["lab", "roof"]
    assert store.next_counter("cam-1", T0) < store.next_counter("cam-1", T0)
    assert store.add_release_key("k1", "rel", "pem", T0) and not store.add_release_key("k1", "rel", "pem", T0)
    assert store.sweep(T0 + 1000) == 1 and store.health(now=T0 + 1000)[0]["status"] == "offline"


def test_leadership(store):
    assert store.try_leader("rollouts") and store.try_leader("rollouts")  # held: asking again keeps it
    store.release_leader()
    assert store.try_leader("rollouts")


@pytest.mark.parametrize("url, says", [
    ("mysql://db/fleet", "the scheme must be sqlite:// or postgresql://"),
    ("sqlite://", "expected sqlite:///ABSOLUTE/PATH"),
    ("postgresql://localhost:1/fleet", "cannot connect to the store postgresql://localhost:1/fleet"),
    ("postgresql://user:secret@localhost:1/fleet", "cannot connect to the store postgresql://user:***@localhost:1"),
    ("postgresql://localhost:5432", "names no database"),
])
def test_a_bad_or_unreachable_store_url_is_one_clear_error(url, says):
    with pytest.raises(EdgefleetError) as e:
        open_store(url, connect_timeout=2)
    assert says in str(e.value) and "\n" not in str(e.value) and "secret" not in str(e.value)


def test_a_sqlite_url_and_a_plain_path_are_the_same_file(tmp_path):
    s = open_store(f"sqlite:///{tmp_path}/a.db")
    s.record_state(protocol.State(device_id="cam-1", online=True, time=T0, boot_id="b1"), received=T0)
    s.close()
    s = Store(tmp_path / "a.db").open()
    assert s.device_ids() == ["cam-1"]
    s.close()


@pytest.fixture
def store(store_url):
    s = Store(store_url).open()
    yield s
    s.close()


@pytest.mark.parametrize("url, says", [
    ("mysql://db/fleet", "the scheme must be sqlite:// or postgresql://"),
    ("postgresql://edgefleet:pw@127.0.0.1:1/fleet", "cannot connect to the store postgresql://edgefleet:***@"),
])
def test_fleet_serve_with_a_bad_store_exits_2_with_one_line(tmp_path, url, says):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "edgefleet.cli", "fleet", "serve", "--data", str(tmp_path / "d"),
                           "--insecure", "--store", url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines[-1:]) == 1 and says in lines[-1] and "Traceback" not in done.stderr, done.stderr


def test_one_leader_among_controllers_sharing_a_database(store_url):
    a, b = Store(store_url).open(), Store(store_url).open()
    try:
        assert a.try_leader("rollouts")
        if a.backend.name == "sqlite":
            assert b.try_leader("rollouts")  # one controller per SQLite file: always the leader
            return
        assert not b.try_leader("rollouts") and b.try_leader("sweep")  # each name has its own leader
        a.release_leader()
        assert b.try_leader("rollouts") and not a.try_leader("rollouts")
        b.backend._leader.close()  # b's session ends, as when its process dies: the server frees the lock
        wait_for(lambda: a.try_leader("rollouts"), 30, what="a to take the leadership over")
    finally:
        a.close()
        b.close()


def test_a_missing_database_or_an_unknown_role_is_one_clear_error(pg_cluster):
    port = pg_cluster.port
    for url, says in ((f"postgresql://edgefleet@127.0.0.1:{port}/nosuchdb", 'database "nosuchdb" does not exist'),
                      (f"postgresql://nobody@127.0.0.1:{port}/postgres", 'role "nobody" does not exist')):
        with pytest.raises(EdgefleetError) as e:
            open_store(url)
        assert str(e.value).startswith(f"cannot connect to the store {url}: ") and says in str(e.value), str(e.value)
        assert "\n" not in str(e.value)


def test_a_file_that_is_no_database_is_one_clear_error(tmp_path):
    (tmp_path / "junk.db").write_bytes(b"not a database, " * 100)
    with pytest.raises(EdgefleetError, match="cannot open the fleet database .*junk.db: file is not a database"):
        open_store(tmp_path / "junk.db")
    (tmp_path / "file").write_text("")
    with pytest.raises(EdgefleetError, match="cannot open the fleet database"):
        open_store(tmp_path / "file" / "x.db")  # its directory cannot be made


def test_the_store_carries_on_after_postgresql_restarts(pg_cluster):
    s = open_store(pg_cluster.new_database())
    try:
        assert s.record_many([(tel(1, T0 + 10), T0 + 10, False)]) == [True]
        pg_cluster.restart("immediate")  # as after a crash: what was committed is kept
        assert s.record_many([(tel(1, T0 + 10), T0 + 11, False), (tel(2, T0 + 20), T0 + 20, False)]) \
            == [False, True]
        [d] = s.devices()
        assert (d["seq_count"], d["duplicates"]) == (2, 1)
    finally:
        s.close()


def test_both_backends_have_the_same_tables_and_columns(tmp_path, pg_cluster):
    lite, pg = open_store(tmp_path / "fleet.db"), open_store(pg_cluster.new_database())
    try:
        ours = {}
        for (table,) in lite.query("SELECT name FROM sqlite_master WHERE type = 'table'"):
            ours[table] = [r["name"] for r in lite.query(f"PRAGMA table_info({table})")]
        theirs: dict[str, list[str]] = {}
        for r in pg.query("SELECT c.table_name, c.column_name FROM information_schema.columns c "
                          "JOIN pg_class k ON k.relname = c.table_name WHERE c.table_schema = 'public' "
                          "AND NOT k.relispartition ORDER BY c.table_name, c.ordinal_position"):
            theirs.setdefault(r[0], []).append(r[1])
        assert theirs.pop("telemetry_keys") == ["device_id", "boot_id", "seq", "time"]  # PostgreSQL's dedupe key
        assert theirs == ours  # in the same order: INSERT INTO deployments VALUES (...) relies on it
        assert pg.query("SELECT version FROM schema_version")[0][0] == lite.query(
            "SELECT version FROM schema_version")[0][0]
    finally:
        lite.close()
        pg.close()


def test_two_controllers_sweeping_at_once_record_one_transition(store_url):
    import threading

    a, b = Store(store_url).open(), Store(store_url).open()
    try:
        a.record_many([(tel(i, T0 + 10 * i, device=f"cam-{i}"), T0 + 10 * i, False) for i in range(1, 21)])
        went = []
        threads = [threading.Thread(target=lambda s=s: went.append(s.sweep(T0 + 10_000))) for s in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(went) >= 20  # each saw them due; the row lock let one record each
        assert a.query("SELECT count(*) FROM transitions WHERE online = 0")[0][0] == 20
    finally:
        a.close()
        b.close()


def _tricky_batch() -> list:
    """Telemetry exercising every branch the set-based path folds: duplicates (in the batch and of stored rows),
    a late seq, a clock step, a retained window, a second boot reusing seqs, errors, storage and disk reports, a
    device silent long enough to go offline and back, and devices new and known."""
    t = T0 + 1000
    return [
        (tel(3, t + 30, errors={"runtime": 2}, storage="ok", disk_free_bytes=5 << 20), t + 31, False),
        (tel(1, t + 10, device="cam-2"), t + 12, False),
        (tel(4, t + 40, storage="full", clock_synced=True), t + 41, False),
        (tel(3, t + 30), t + 42, False),  # a redelivery in the batch
        (tel(2, t + 20), t + 43, False),  # late: fills a gap, filed with its regime's estimate
        (tel(5, t + 40 + 400 * 86400), t + 51, False),  # the clock stepped
        (tel(6, t + 50 + 400 * 86400, errors={"runtime": 1, "oom": 1}), t + 500, False),  # a long silence
        (tel(1, t + 5, boot="b2"), t + 501, True),  # a new boot starting seq again, replayed retained
        (tel(2, t + 20, device="cam-2", disk_free_bytes=7), t + 22, False),
        (tel(1, t + 10, device="cam-2"), t + 23, False),
        (tel(1, t - 5, device="cam-3"), t - 2, True),  # a new device's first window, retained
    ]


def _snapshot(st: Store) -> dict:
    tables = {"devices": "SELECT * FROM devices ORDER BY id",
              "telemetry": "SELECT device_id, boot_id, seq, time, device_time, received, interval_s, inferences, "
                           "errors, payload FROM telemetry ORDER BY device_id, boot_id, seq",
              "clocks": "SELECT device_id, boot_id, offset_s, jumps, updated, dirty, state FROM clocks "
                        "ORDER BY device_id, boot_id",
              "transitions": "SELECT device_id, time, online, reason FROM transitions ORDER BY device_id, time",
              "device_errors": "SELECT * FROM device_errors ORDER BY device_id, kind"}
    return {name: [dict(r) for r in st.query(sql)] for name, sql in tables.items()}


def test_the_set_based_batch_stores_what_one_message_at_a_time_stores(store_url, request, tmp_path):
    """record_many stores a run of telemetry-only devices set-based (fleet.store.core.Store._windows); the same
    messages stored one by one on the per-message path must leave every table the same, and say the same."""
    other = f"sqlite:///{tmp_path}/other.db" if store_url.startswith("sqlite") \
        else request.getfixturevalue("pg_cluster").new_database()
    fast, slow = Store(store_url).open(), Store(other).open()
    try:
        for st in (fast, slow):  # cam-1 and cam-2 known before the batch, with a stored window each
            st.record_many([(tel(1, T0 + 1000 + 10), T0 + 1000 + 11, False),
                            (tel(7, T0 + 900, device="cam-2"), T0 + 901, False)])
        batch = _tricky_batch()
        got = fast.record_many(batch)
        want: list = [None] * len(batch)
        with slow.tx() as db:
            for i in sorted(range(len(batch)), key=lambda i: batch[i][0].device_id):
                slow._message(db, batch[i], {}, want, {}, i)
        assert got == want == [True, True, True, False, True, True, True, True, True, False, True]
        assert _snapshot(fast) == _snapshot(slow)
        assert fast.refile() == slow.refile() and _snapshot(fast) == _snapshot(slow)
    finally:
        fast.close()
        slow.close()


def test_controllers_storing_batches_of_the_same_devices_at_once_lose_and_double_count_nothing(store_url):
    """Two controllers (a shared subscription splits one stream between them, and the broker redelivers to either)
    store overlapping batches of the same devices at once: no deadlock, every window stored once, each repeat
    counted as a duplicate."""
    import random
    import threading

    stores = [Store(store_url).open(), Store(store_url).open()]
    devices, seqs = [f"cam-{i}" for i in range(12)], 30
    errors: list = []
    try:
        stores[0].record_many([(protocol.State(device_id="cam-0", online=True, time=T0, boot_id="b1"), T0, False)])

        def work(st: Store, seed: int) -> None:
            rnd = random.Random(seed)
            try:
                for start in range(1, seqs + 1, 5):
                    batch = [(tel(s, T0 + 10 * s, device=d), T0 + 10 * s + 1, False)
                             for d in rnd.sample(devices, len(devices)) for s in range(start, start + 5)]
                    if start == 11:  # a state in the batch: that device goes the per-message way
                        batch.append((protocol.State(device_id="cam-5", online=True, time=T0 + 100, boot_id="b1"),
                                      T0 + 101, False))
                    rnd.shuffle(batch)
                    st.record_many(batch)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(st, n)) for n, st in enumerate(stores)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        assert stores[0].query("SELECT count(*) FROM telemetry")[0][0] == len(devices) * seqs
        for d in stores[1].devices():
            assert (d["seq_max"], d["seq_count"], d["duplicates"], d["inferences"]) == (seqs, seqs, seqs, 10 * seqs)
    finally:
        for st in stores:
            st.close()
