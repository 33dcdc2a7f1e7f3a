"""Benchmark: what the controller holds, as ratios against a baseline measured in the same run.

    .venv/bin/python bench/fleet.py [--messages 50000] [--devices 10000] [--store sqlite|postgresql|both]
        [--section ingest,store,workers,sim] [--workers 1,2]

1. Ingest: the same backlog of telemetry windows (``--messages`` for ``--devices`` device ids, queued by the broker
   for a persistent session while its consumer is away) drained by a bare paho subscriber (receive and acknowledge,
   nothing else) and by the controller's link (validate, store, acknowledge after the store committed), one after
   the other against the same mosquitto. Rate = messages / time from connect to the last one taken in; the ratio
   controller / bare is the figure (1.0: the controller keeps up with what the broker can hand out).

2. Store: ``Store.record_many`` alone (no broker), the same windows in batches of ``--batch`` (the link's batch size),
   per backend: msg/s, and the ratio PostgreSQL / SQLite when both run.

1b. Workers (``--section workers``): the same backlog, published over mutual TLS to an external mosquitto (the ACL
   as workers run with), drained by a bare paho subscriber and then by ``--workers`` controller workers (``fleet
   serve --worker``, processes of their own, on one PostgreSQL database) sharing the stream through
   ``$share/edgefleet/...``; each worker's session kept while it is away so that the broker queues its share. Rates
   from the first message (bare) or first stored window (workers, polling the database) to the last; ratio workers /
   bare. Every window must be stored once (checked by (device, boot, seq)).

3. Sim (``--section sim``): a controller with its embedded broker (mutual TLS) and ``--sim-devices`` simulated devices
   (``edgefleet fleet simulate`` in a process of its own: enrolled identities, real TLS connections) sending a window
   every ``--sim-interval`` s: the lag from each message's first send to the controller's ack of it (stored, end to
   end), p50/p99, over ``--sim-seconds`` once all are online; then a rollout to all of them in waves ``1,10%,100%``
   (no soak), the time from its creation to done.

``--store postgresql`` starts a throwaway PostgreSQL cluster (``tests/pgcluster.py``: Debian's server binaries, a temp
dir, a free port) and gives each run a fresh database; ``--store both`` runs SQLite and PostgreSQL in one run.

The broker is the controller's embedded mosquitto in insecure mode (plain MQTT on 127.0.0.1: the cost measured is the
consumer's, not TLS's). One publisher connection stands in for all the devices.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import protocol  # noqa: E402


def windows(messages: int, devices: int) -> list[tuple[str, bytes]]:
    """``messages`` telemetry windows spread over ``devices`` ids, each device's seqs counting from 1."""
    out = []
    now = time.time()
    for i in range(messages):
        device = f"bench-{i % devices:06d}"
        seq = i // devices + 1
        msg = protocol.Telemetry(device_id=device, boot_id="b1", seq=seq, time=now - 10 * (messages - i) / devices,
                                 interval_s=10.0, inferences=100, errors={"runtime": i % 3},
                                 latency_ms=protocol.Latency(p50=2.0, p95=3.5, p99=4.0, max=5.0, mean=2.2),
                                 histogram=[0, 10, 80, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0], cpu_percent=12.5,
                                 rss_bytes=90 << 20, memory_percent=4.2, disk_free_bytes=1 << 30)
        out.append((protocol.topic(device, protocol.TELEMETRY), protocol.encode(msg)))
    return out


def publish(url: str, payloads: list[tuple[str, bytes]], tls=None) -> float:
    """Publish every payload at QoS 1 from one connection; seconds until the broker acknowledged the last."""
    from agent.transport import make_client, parse_url

    client = make_client(parse_url(url), f"bench-pub-{os.getpid()}", tls)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    parsed = protocol_url(url)
    client.connect(*parsed)
    client.loop_start()
    t0 = time.perf_counter()
    infos = [client.publish(topic, payload, qos=1) for topic, payload in payloads]
    for info in infos:
        info.wait_for_publish(120)
    elapsed = time.perf_counter() - t0
    client.disconnect()
    client.loop_stop()
    return elapsed


def protocol_url(url: str) -> tuple[str, int]:
    from agent.transport import parse_url

    u = parse_url(url)
    return u.host, u.port


class Bare:
    """A bare paho subscriber with a persistent session: receives and acknowledges, nothing else."""

    def __init__(self, url: str, tls=None) -> None:
        from agent.transport import connect_properties, make_client, parse_url

        self.url = url
        self.got = 0
        self.done = threading.Event()
        self.want = 0
        self.first = self.last = 0.0  # when the first and the last message came in (perf_counter)
        self.client = make_client(parse_url(url), "bench-bare", tls)
        self.client.on_message = self._on_message
        self.props = connect_properties(3600)

    def _on_message(self, client, userdata, message) -> None:
        self.got += 1
        self.last = time.perf_counter()
        if self.got == 1:
            self.first = self.last
        if self.got >= self.want:
            self.done.set()

    def subscribe(self) -> None:
        """Make the session and its subscription, then go away (the broker queues from now on)."""
        self.client.connect(*protocol_url(self.url), clean_start=False, properties=self.props)
        self.client.loop_start()
        self.client.subscribe(protocol.subscription(protocol.TELEMETRY), qos=1)[1]
        time.sleep(0.5)
        self.client.disconnect()
        self.client.loop_stop()

    def drain(self, want: int, timeout: float) -> float:
        self.want, self.got = want, 0
        self.done.clear()
        t0 = time.perf_counter()
        self.client.connect(*protocol_url(self.url), clean_start=False, properties=self.props)
        self.client.loop_start()
        if not self.done.wait(timeout):
            raise SystemExit(f"bench: the bare subscriber got {self.got} of {want} in {timeout:g} s")
        elapsed = time.perf_counter() - t0
        self.client.disconnect()
        self.client.loop_stop()
        return elapsed


def controller_drain(fleet, want: int, timeout: float) -> float:
    """Start the controller's link again and wait until it has taken in ``want`` more messages."""
    link = fleet.link
    before = link.received + sum(link.invalid.values())
    t0 = time.perf_counter()
    link.start()
    deadline = time.monotonic() + timeout
    while link.received + sum(link.invalid.values()) - before < want:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: the controller took in {link.received - before} of {want} in {timeout:g} s")
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    if link.invalid:
        raise SystemExit(f"bench: the controller refused messages: {link.invalid}")
    return elapsed


def ingest(args: argparse.Namespace, store: str, store_url: str | None) -> dict:
    """The ingest section for one store (``store_url``: None for SQLite in the temp dir)."""
    from fleet.app import Fleet
    from fleet.broker import free_port

    payloads = windows(args.messages, args.devices)
    out = {"messages": args.messages, "devices": args.devices}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        fleet = Fleet(Path(tmp) / "fleet", http_port=free_port(), insecure=True, sweep_every_s=3600,
                      compact_every_s=3600, store_url=store_url).start()
        try:
            url = fleet.broker_url
            bare = Bare(url)
            bare.subscribe()
            fleet.link.stop()  # the controller's session stays: the broker queues for it too
            print(f"publishing {args.messages} windows of {args.devices} devices ...", flush=True)
            out["publish_s"] = publish(url, payloads)
            bare_s = bare.drain(args.messages, args.timeout)
            print(f"bare paho subscriber: {args.messages / bare_s:,.0f} msg/s", flush=True)
            ctl_s = controller_drain(fleet, args.messages, args.timeout)
            print(f"controller ({store}): {args.messages / ctl_s:,.0f} msg/s", flush=True)
            out.update(bare_msg_s=args.messages / bare_s, controller_msg_s=args.messages / ctl_s,
                       ratio=bare_s / ctl_s, store=store)
            print(f"ratio controller / bare: {bare_s / ctl_s:.2f}", flush=True)
        finally:
            fleet.stop()
    return out


def store_bench(args: argparse.Namespace, store: str, store_url: str | None) -> dict:
    """record_many alone: the same windows in batches of ``--batch``, into a fresh store; msg/s."""
    from fleet.store import Store

    msgs = [protocol.decode(protocol.TELEMETRY, payload) for _, payload in windows(args.messages, args.devices)]
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        st = Store(store_url or Path(tmp) / "fleet.db").open()
        try:
            now = time.time()
            t0 = time.perf_counter()
            for i in range(0, len(msgs), args.batch):
                st.record_many([(m, now, False) for m in msgs[i:i + args.batch]])
            elapsed = time.perf_counter() - t0
            stored = st.query("SELECT count(*) FROM telemetry")[0][0]
        finally:
            st.close()
    if stored != len(msgs):
        raise SystemExit(f"bench: the store holds {stored} of {len(msgs)} windows")
    rate = len(msgs) / elapsed
    print(f"record_many ({store}, batches of {args.batch}): {rate:,.0f} msg/s", flush=True)
    return {"store": store, "messages": len(msgs), "batch": args.batch, "msg_s": rate}



# -- 1b. ingest by controller workers ------------------------------------------------------------------------------
def enroll(store_url: str, devices: int) -> None:
    """Record the bench's device ids as enrolled (a certificate each, as enrollment records it): a controller with
    mutual TLS drops what a device it never enrolled sends. One publisher stands in for them all."""
    from fleet.store import open_store

    store, now = open_store(store_url), time.time()
    try:
        for i in range(devices):
            store.add_certificate(1_000_000 + i, f"bench-{i:06d}", f"{i:064x}", now - 60, now + 86400, "enroll")
    finally:
        store.close()


def workers_ingest(args: argparse.Namespace, count: int, store_url: str) -> dict:
    """The same queued backlog drained by a bare paho subscriber and by ``count`` controller workers on one
    PostgreSQL database, against an external mosquitto with mutual TLS and the ACL (as workers run): the workers
    share the stream through ``$share/edgefleet/...``; their rate is taken from the first window stored to the last
    (polling the database), the bare one's from its first message to its last. Checks that every window is stored
    once."""
    import psycopg

    from agent import signing
    from fleet.broker import Mosquitto
    from fleet.pki import PKI, default_hosts

    tests_on_path()
    from workerproc import WorkerProcess

    names = [f"w{i + 1}" for i in range(count)]
    payloads = windows(args.messages, args.devices)
    out = {"store": "postgresql", "workers": count, "messages": args.messages, "devices": args.devices}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-workers-") as tmp:
        data = Path(tmp) / "fleet"
        data.mkdir(mode=0o700)
        pki = PKI(data / "pki").ensure(default_hosts())
        _, release = signing.generate(Path(tmp) / "keys", "bench")
        broker = Mosquitto(Path(tmp) / "mosquitto", port=0, pki=pki, workers=[*names, "bare", "pub"]).start()
        # each worker's session kept an hour after it goes, so the broker queues its share while it is away
        workers = [WorkerProcess(n, data, store_url, broker.url, release, Path(tmp) / f"worker-{n}.log",
                                 ["--session-expiry", "3600"]) for n in names]
        try:
            bare = Bare(broker.url, pki.worker_tls("bare", default_hosts()))
            bare.subscribe()
            for w in workers:  # one at a time: the first makes the data dir's admin token
                try:
                    w.start().ready(args.timeout)
                except AssertionError as e:
                    raise SystemExit(f"bench: {e}\n{w.tail()}") from None
            for w in workers:
                w.stop()
            enroll(store_url, args.devices)
            print(f"publishing {args.messages} windows of {args.devices} devices (mutual TLS) ...", flush=True)
            out["publish_s"] = publish(broker.url, payloads, pki.worker_tls("pub", default_hosts()))
            bare.drain(args.messages, args.timeout)
            bare_rate = (args.messages - 1) / (bare.last - bare.first)
            print(f"bare paho subscriber: {bare_rate:,.0f} msg/s", flush=True)
            with psycopg.connect(store_url, autocommit=True) as db:
                def stored() -> int:
                    return db.execute("SELECT count(*) FROM telemetry").fetchone()[0]

                for w in workers:
                    w.start()
                deadline = time.monotonic() + args.timeout
                first_n, first_t = 0, 0.0
                while (n := stored()) < args.messages:
                    if n and not first_n:
                        first_n, first_t = n, time.perf_counter()
                    if time.monotonic() > deadline:
                        raise SystemExit(f"bench: {count} worker(s) stored {n} of {args.messages} in "
                                         f"{args.timeout:g} s\n" + workers[0].tail())
                    time.sleep(0.02)
                last_t = time.perf_counter()
                time.sleep(2.0)  # anything stored twice would show now
                distinct = db.execute("SELECT count(*) FROM (SELECT DISTINCT device_id, boot_id, seq "
                                      "FROM telemetry) AS d").fetchone()[0]
                total = stored()
            if first_n == 0 or last_t <= first_t:
                raise SystemExit("bench: the workers stored the backlog too fast to time; raise --messages")
            if total != args.messages or distinct != args.messages:
                raise SystemExit(f"bench: stored {total} windows, {distinct} distinct, of {args.messages}")
            rate = (args.messages - first_n) / (last_t - first_t)
            out.update(bare_msg_s=bare_rate, controller_msg_s=rate, ratio=rate / bare_rate)
            print(f"{count} worker(s) (postgresql): {rate:,.0f} msg/s; ratio workers / bare: {rate / bare_rate:.2f}; "
                  f"every window stored once", flush=True)
        finally:
            for w in workers:
                w.stop()
            broker.stop()
    return out


# -- 2. lag and 3. a rollout, with simulated devices ---------------------------------------------------------------
def simulated(args: argparse.Namespace, store: str, store_url: str | None) -> dict:
    """A controller (this process: its embedded broker with mutual TLS, the store ``--store``) and ``--sim-devices``
    simulated devices (``edgefleet fleet simulate``, a process of its own: real enrolled identities, real TLS
    connections) sending a window every ``--sim-interval`` for ``--sim-seconds``: the lag from each message's first
    send to the controller's ack of it (stored, end to end), p50/p99. Then a rollout to all of them in waves
    ``1,10%,100%`` (no soak): the time from its creation to done."""
    from bench.ocr import ocr_cls_bundle
    from fleet import aggregate
    from fleet.app import Fleet
    from fleet.client import FleetClient

    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-sim-"))
    state = work / "sim"
    tar, manifest, pub = ocr_cls_bundle(work)
    out: dict = {"devices": args.sim_devices, "interval_s": args.sim_interval, "seconds": args.sim_seconds}
    data = work / "fleet"
    fleet = Fleet(data, release_keys=[pub], http_port=0, mqtt_listen="127.0.0.1:0",
                  store_url=store_url, sweep_every_s=5.0).start_background()
    out["store"] = store
    sim = None
    try:
        env = {**os.environ, "EDGEFLEET_DATA": str(data)}
        cmd = [sys.executable, "-m", "edgefleet.cli", "fleet", "simulate", "--devices", str(args.sim_devices),
               "--interval", str(args.sim_interval), "--rate-errors", "0", "--connect-rate", "200",
               "--update-time", "0.5", "--state", str(state), "--json"]
        print(f"simulating {args.sim_devices} devices (enrolling those new to {state}) ...", flush=True)
        sim = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client = FleetClient(fleet.http_url, token=(data / "admin.token").read_text().strip(),
                             ca=str(data / "pki" / "ca.crt"))
        deadline, shown = time.monotonic() + args.timeout, time.monotonic()
        # counted by the database as the overview and /metrics count them (every device here is simulated)
        while (online := aggregate.from_store(fleet.store, time.time()).all.online) < args.sim_devices:
            if time.monotonic() > deadline or sim.poll() is not None:
                raise SystemExit(f"bench: {online} of the {args.sim_devices} simulated devices came online: "
                                 f"{(sim.stderr.read() if sim.poll() is not None else '')[-500:]}")
            if time.monotonic() - shown > 30:
                print(f"  {online} of {args.sim_devices} online", flush=True)
                shown = time.monotonic()
            time.sleep(2)
        print(f"all {args.sim_devices} online; measuring for {args.sim_seconds:g} s ...", flush=True)
        cpu0, t0 = time.process_time(), time.monotonic()
        time.sleep(args.sim_seconds)
        out["controller_cpu_percent"] = round((time.process_time() - cpu0) / (time.monotonic() - t0) * 100, 1)
        sha = client.upload_bundle(tar)["sha256"]
        t0 = time.monotonic()
        ro = client.create_rollout(sha, ["all"], waves="1,10%,100%", soak="0s")
        while (doc := client.rollout(ro["id"]))["status"] not in ("completed", "halted", "aborted"):
            if time.monotonic() > deadline + args.timeout:
                raise SystemExit(f"bench: the rollout did not finish: {doc['status']}")
            time.sleep(0.5)
        out["rollout_s"] = round(time.monotonic() - t0, 1)
        out["rollout_status"] = doc["status"]
        print(f"rollout to {args.sim_devices} devices in waves 1,10%,100%: {doc['status']} in "
              f"{out['rollout_s']} s", flush=True)
        sim.send_signal(signal.SIGINT)
        stdout = sim.communicate(timeout=args.timeout)[0]
        summary = json.loads(stdout[stdout.index("{"):])
        out.update(ack_lag_ms=summary["ack_lag_ms"], acked=summary["acked"], sent=summary["telemetry"],
                   simulator_cpu_percent=summary["cpu_percent_all_connected"],
                   simulator_rss_mib=summary["max_rss_mib"])
        print(f"lag from send to the controller's ack: p50 {summary['ack_lag_ms']['p50']} ms, p99 "
              f"{summary['ack_lag_ms']['p99']} ms ({summary['acked']} acknowledged); controller "
              f"{out['controller_cpu_percent']} % of a core", flush=True)
    finally:
        if sim is not None and sim.poll() is None:
            sim.kill()
        fleet.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000, help="telemetry windows in the backlog")
    parser.add_argument("--devices", type=int, default=10_000, help="device ids the windows are spread over")
    parser.add_argument("--store", default="sqlite", choices=("sqlite", "postgresql", "both"),
                        help="the controller's store: sqlite (a file in a temp dir, the default), postgresql "
                             "(a throwaway cluster started for the run) or both, one after the other")
    parser.add_argument("--section", default="ingest,store",
                        help="comma-separated sections to run: ingest (broker -> controller), store (record_many), "
                             "workers (broker -> --workers controller workers on PostgreSQL), sim (lag and a rollout "
                             "with --sim-devices simulated devices)")
    parser.add_argument("--workers", default="1,2",
                        help="the workers section's runs: comma-separated numbers of workers (default 1,2)")
    parser.add_argument("--batch", type=int, default=None, help="the store section's batch size "
                        "(default: the link's BATCH_MAX)")
    parser.add_argument("--sim-devices", type=int, default=1000, help="the sim section's simulated devices")
    parser.add_argument("--sim-interval", type=float, default=10.0, help="their telemetry interval (s)")
    parser.add_argument("--sim-seconds", type=float, default=60.0,
                        help="how long the sim section measures once every device is online")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a drain may take")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object at the end")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.devices < 1:
        parser.error("--messages and --devices must be positive")
    sections = [s.strip() for s in args.section.split(",") if s.strip()]
    unknown = set(sections) - {"ingest", "store", "workers", "sim"}
    if unknown or not sections:
        parser.error(f"--section: unknown section(s) {', '.join(sorted(unknown)) or '(none)'}; "
                     f"expected ingest, store, workers, sim")
    try:
        counts = [int(c) for c in args.workers.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or max(counts) > 8:
        parser.error("--workers: comma-separated numbers of workers, 1 to 8")
    if args.batch is None:
        from fleet.link import BATCH_MAX
        args.batch = BATCH_MAX
    if args.batch < 1:
        parser.error("--batch must be positive")
    stores = ["sqlite", "postgresql"] if args.store == "both" else [args.store]
    result: dict = {"cpu": cpu_name(), "ingest": [], "store": [], "workers": [], "sim": []}
    cluster = None
    try:
        if "postgresql" in stores or "workers" in sections:
            cluster = pg_cluster()
        for store in stores:
            for section, run in (("ingest", ingest), ("store", store_bench), ("sim", simulated)):
                if section in sections:
                    url = cluster.new_database() if store == "postgresql" else None
                    result[section].append(run(args, store, url))
        if "workers" in sections:  # workers need PostgreSQL, whatever --store says
            for count in counts:
                result["workers"].append(workers_ingest(args, count, cluster.new_database()))
    finally:
        if cluster is not None:
            cluster.close()
    by = {r["store"]: r for r in result["store"]}
    if len(by) == 2:
        result["store_ratio_postgresql_sqlite"] = by["postgresql"]["msg_s"] / by["sqlite"]["msg_s"]
        print(f"record_many postgresql / sqlite: {result['store_ratio_postgresql_sqlite']:.2f}", flush=True)
    if args.json:
        print(json.dumps(result))
    return 0


def tests_on_path() -> None:
    """The test helpers the bench shares (tests/pgcluster.py, tests/workerproc.py) importable."""
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def pg_cluster():
    """A throwaway PostgreSQL cluster (tests/pgcluster.py), started."""
    tests_on_path()
    from pgcluster import Cluster

    try:
        return Cluster().start()
    except RuntimeError as e:
        raise SystemExit(f"bench: cannot start PostgreSQL: {e}") from None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
