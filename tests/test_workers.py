"""Several controller workers (`fleet serve --worker NAME`) on one PostgreSQL store (a throwaway cluster) and one
external mosquitto (mutual TLS, the ACL), each a real process that a test SIGKILLs; devices are `fleet simulate`
devices (real MQTT connections with enrolled identities) that keep each window until the controller acknowledges
it end to end. A worker killed mid-stream loses and doubles nothing (checked by seq); the leader killed mid-rollout
hands the rollout to the other worker, which completes it; `--worker` without what it needs is one line, exit 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.cli import main as edgefleet_main
from fleet.broker import Mosquitto
from fleet.pki import PKI, default_hosts
from fleet.simulate import Provisioning, device_ids
from util import SimRun, release_pub, wait_for
from workerproc import WorkerProcess

TIMEOUT = 120.0


class Cluster:
    """One data dir shared by the workers (its CA, signing key, bundles), a PostgreSQL database, a mosquitto whose
    ACL admits workers a and b."""

    def __init__(self, tmp_path: Path, store_url: str) -> None:
        self.tmp, self.store_url = tmp_path, store_url
        self.data = tmp_path / "fleet"
        self.data.mkdir(mode=0o700)
        pki = PKI(self.data / "pki").ensure(default_hosts())
        self.broker = Mosquitto(tmp_path / "mosquitto", port=0, pki=pki, workers=["a", "b"]).start()
        self.workers: list[WorkerProcess] = []

    def start(self, name: str) -> WorkerProcess:
        w = WorkerProcess(name, self.data, self.store_url, self.broker.url, release_pub(),
                          self.tmp / f"worker-{name}.log").start()
        self.workers.append(w)
        return w

    def rows(self, sql: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.store_url) as db:
            return db.execute(sql).fetchall()

    def stored(self) -> int:
        return self.rows("SELECT count(*) FROM telemetry WHERE device_id LIKE 'sim-%'")[0][0]

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.broker.stop()

    def logs(self) -> str:
        return "\n".join(f"--- worker {w.name}\n" + w.tail(4000) for w in self.workers)


@pytest.fixture
def cluster(tmp_path, pg_cluster):
    c = Cluster(tmp_path, pg_cluster.new_database())
    try:
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


def Running(worker: WorkerProcess, state: Path, count: int, **settings) -> SimRun:
    """A Simulator in a thread, enrolling through ``worker``'s API with a provisioning token."""
    def provisioning(missing: int) -> Provisioning:
        tok = worker.client().create_provisioning(missing, prefix="sim-")
        return Provisioning(worker.url, tok["token"], tok["ca_fingerprint"])

    return SimRun(state, count, provisioning, TIMEOUT, **settings)


@pytest.mark.slow
def test_a_worker_killed_mid_stream_loses_and_doubles_nothing(cluster, tmp_path):
    a, b = cluster.start("a"), cluster.start("b")
    a.ready(TIMEOUT), b.ready(TIMEOUT)
    run = Running(b, tmp_path / "sim", 20, interval=0.2, rate_errors=0.0, ack_timeout=2.0)
    wait_for(lambda: len(run.sim.devices) == 20 and cluster.stored() >= 200, TIMEOUT, what="200 windows stored")
    # the broker splits the stream between the two (shared subscriptions): each stored some
    wait_for(lambda: (a.status() or {}).get("received", 0) > 50 and (b.status() or {}).get("received", 0) > 50,
             TIMEOUT, what="both workers storing")
    a.kill()  # mid-stream: what it had taken from the broker and not stored (nor acknowledged) is lost there
    before = cluster.stored()
    wait_for(lambda: cluster.stored() >= before + 200, TIMEOUT, what="b storing on alone")
    run.settle()
    summary = run.stop()
    assert summary["unacked_dropped"] == 0
    rows = {r[0]: r[1:] for r in cluster.rows(
        "SELECT t.device_id, count(*), count(DISTINCT t.seq), min(t.seq), max(t.seq), sum(t.inferences), "
        "max(d.inferences) FROM telemetry t JOIN devices d ON d.id = t.device_id "
        "WHERE t.device_id LIKE 'sim-%' GROUP BY t.device_id")}
    assert sorted(rows) == device_ids("sim-", 20)
    for device, (count, distinct, lo, hi, inferences, counted) in rows.items():
        # no gap, no window twice; and the device's running totals counted each window once
        assert (count, distinct, lo) == (hi, hi, 1), (device, count, distinct, lo, hi)
        assert inferences == counted, device
    assert sum(r[0] for r in rows.values()) == summary["telemetry"]
    gaps = cluster.rows("SELECT count(*) FROM devices WHERE id LIKE 'sim-%' AND seq_count != seq_max")[0][0]
    assert gaps == 0


def finished(client, rollout_id: str, status: str):
    doc = client.rollout(rollout_id)
    if doc["status"] in ("running", "paused"):
        return None
    assert doc["status"] == status, doc
    return doc


@pytest.mark.slow
def test_the_leader_killed_mid_rollout_hands_it_to_the_other_worker(cluster, tmp_path, bundles):
    a = cluster.start("a")
    s = a.ready(TIMEOUT)
    assert s["leader"] is True and s["worker"] == "a"
    b = cluster.start("b")
    s = b.ready(TIMEOUT)
    assert s["leader"] is False and s["worker"] == "b"
    run = Running(b, tmp_path / "sim", 6, interval=0.5, rate_errors=0.0, update_s=0.2, ack_timeout=2.0)
    client = b.client()  # the rollout is made and followed through the worker that does not lead
    wait_for(lambda: len(client.health(prefix="sim-")) == 6,
             TIMEOUT, what="6 devices in the registry")
    v1 = client.upload_bundle(bundles["v1"])["sha256"]
    ro = client.create_rollout(v1, ["all"], waves="1,50%,100%", soak="4s")
    doc = wait_for(lambda: (d := client.rollout(ro["id"]))["waves"][0]["status"] == "passed" and d, TIMEOUT,
                   what="the first wave passed")
    assert doc["status"] == "running" and doc["waves"][-1]["status"] != "passed"
    a.kill()
    wait_for(lambda: (b.status() or {}).get("leader"), TIMEOUT, what="b to take the lead")
    doc = wait_for(lambda: finished(client, ro["id"], "completed"), TIMEOUT, what="the rollout to complete")
    assert [w["status"] for w in doc["waves"]] == ["passed"] * 3
    assert {d["phase"] for w in doc["waves"] for d in w["devices"]} == {"active"}
    summary = run.stop()
    assert summary["updates"]["active"] == 6 and summary["updates"]["failed"] == 0


@pytest.mark.parametrize("args, needle", [
    (["--store", "postgresql://u@127.0.0.1:1/db"], "--worker needs an external --broker"),
    (["--broker", "mqtts://127.0.0.1:1"], "--worker needs a PostgreSQL store"),
    (["--broker", "mqtts://127.0.0.1:1", "--store", "sqlite:///tmp/x.db"], "--worker needs a PostgreSQL store"),
    (["--worker", "Bad Name", "--broker", "mqtts://127.0.0.1:1", "--store", "postgresql://u@h/db"],
     "invalid --worker 'Bad Name'"),
])
def test_a_worker_without_its_broker_or_postgresql_is_one_line_and_exit_2(args, needle, tmp_path, capsys):
    worker = [] if "--worker" in args else ["--worker", "a"]
    code = edgefleet_main(["fleet", "serve", "--data", str(tmp_path / "fleet"), *worker, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "fleet").exists()  # refused before anything was made


def stored_once_without_gaps(cluster: Cluster, count: int, sent: int) -> None:
    rows = {r[0]: r[1:] for r in cluster.rows(
        "SELECT device_id, count(*), count(DISTINCT seq), min(seq), max(seq) FROM telemetry "
        "WHERE device_id LIKE 'sim-%' GROUP BY device_id")}
    assert sorted(rows) == device_ids("sim-", count)
    for device, (n, distinct, lo, hi) in rows.items():
        assert (n, distinct, lo) == (hi, hi, 1), (device, n, distinct, lo, hi)
    assert sum(r[0] for r in rows.values()) == sent


@pytest.mark.slow
def test_postgresql_restarted_under_load_the_workers_reconnect_and_lose_nothing(cluster, pg_cluster, tmp_path):
    a, b = cluster.start("a"), cluster.start("b")
    a.ready(TIMEOUT), b.ready(TIMEOUT)
    run = Running(a, tmp_path / "sim", 10, interval=0.2, rate_errors=0.0, ack_timeout=2.0)
    wait_for(lambda: len(run.sim.devices) == 10 and cluster.stored() >= 100, TIMEOUT, what="100 windows stored")
    pg_cluster.restart()  # every session ends: the pools' connections, the leader's lock
    before = cluster.stored()
    wait_for(lambda: cluster.stored() >= before + 200, TIMEOUT, what="the workers storing again")
    # one leader again (the lock went with the old session; a worker takes it on a new one)
    wait_for(lambda: sorted(bool((w.status() or {}).get("leader")) for w in (a, b)) == [False, True], TIMEOUT,
             what="one leader after the restart")
    run.settle()
    summary = run.stop()
    stored_once_without_gaps(cluster, 10, summary["telemetry"])
    assert summary["unacked_dropped"] == 0


def test_the_leader_lock_is_dropped_with_its_session_and_taken_by_another(pg_cluster):
    from fleet.leader import LOCK
    from fleet.store import open_store

    url = pg_cluster.new_database()
    one, two = open_store(url), open_store(url)
    try:
        assert one.try_leader(LOCK) and not two.try_leader(LOCK)
        assert one.try_leader(LOCK)  # still: its session answers
        # the server probes the holder's connection, so a partitioned holder's session (and lock) ends in seconds
        conn = one.backend._leader
        assert [conn.execute(f"SHOW {k}").fetchone()[0] for k in ("tcp_keepalives_idle", "tcp_keepalives_interval",
                                                                    "tcp_keepalives_count")] == ["5", "2", "3"]
        two.query("SELECT pg_terminate_backend(?)", (conn.info.backend_pid,))  # its session ends (as on a restart)
        assert not one.try_leader(LOCK)  # it notices, and says it no longer leads
        assert two.try_leader(LOCK) and not one.try_leader(LOCK)
        two.release_leader()
        assert one.try_leader(LOCK)
    finally:
        one.close(), two.close()


def test_workers_share_a_data_dir_but_not_a_name_and_the_acl_admits_each(tmp_path, capsys):
    import fcntl

    from agent.errors import EdgefleetError
    from fleet.app import Fleet

    data = tmp_path / "fleet"
    data.mkdir()
    with open(data / ".lock-worker-a", "a+") as held:  # worker a runs on this dir
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(EdgefleetError, match=f"another worker a is using {data}"):
            Fleet(data, worker="a", broker_url="mqtts://127.0.0.1:1", store_url="postgresql://u@h/db").start()
        assert not (data / ".lock").exists()  # a lone controller's lock is another file: b would take its own
    assert edgefleet_main(["fleet", "broker-config", "--data", str(data), "--worker", "a", "--worker", "b"]) == 0
    acl = (data / "broker" / "acl").read_text()
    for user in ("controller@edgefleet", "controller-a@edgefleet", "controller-b@edgefleet"):
        assert f"user {user}\ntopic readwrite edgefleet/v1/#\n" in acl
    assert "pattern read edgefleet/v1/%u/ack" in acl


def test_only_the_leader_records_states_and_a_new_leader_starts_from_the_retained_ones(mosquitto, tmp_path):
    """States go to the leader alone (several workers recording each would race: an older state recorded after a
    newer one). A follower's link takes telemetry through the shared subscription but no state; when it is elected
    its new state subscription brings every device's retained state, so it starts from the latest."""
    from test_fleet import Device

    from fleet.link import Link
    from fleet.store import Store
    from util import issue_tls

    store = Store(tmp_path / "fleet.db").open()
    link = Link(mosquitto.url, store, client_id="controller-under-test", tls=mosquitto.pki.controller_tls(),
                share="edgefleet", states=False).start()
    dev = Device(mosquitto.url, "cam-1", issue_tls(mosquitto.pki, "cam-1", tmp_path))
    try:
        dev.state(agent_version="9.9.9")  # retained
        dev.telemetry(1)
        wait_for(lambda: store.devices() and store.devices()[0]["seq_count"] == 1, TIMEOUT,
                 what="the window stored through the shared subscription")
        assert not store.devices()[0]["agent_version"]  # the state was not taken: this worker does not lead
        assert link.follow_states(True)  # elected: subscribed once this returns
        wait_for(lambda: store.devices()[0]["agent_version"] == "9.9.9", TIMEOUT,
                 what="the retained state recorded by the new leader")
        assert link.follow_states(False)  # deposed: unsubscribed once this returns
        dev.state(agent_version="9.9.10")
        dev.telemetry(2)
        wait_for(lambda: store.devices()[0]["seq_count"] == 2, TIMEOUT, what="the second window stored")
        assert store.devices()[0]["agent_version"] == "9.9.9"
    finally:
        dev.client.disconnect()
        link.stop()
        store.close()
