"""Benchmark: what the fleet's reads cost at N registered devices (issue 15, item 7), as ratios against another
tree of edgefleet (main) measured in the same run.

    .venv/bin/python bench/reads.py [--devices 10000] [--store sqlite|postgresql|both] [--against /work/main]

A real controller (embedded broker, HTTPS; a SQLite file, or a database in a throwaway PostgreSQL cluster) whose
registry holds N devices registered through the store's own ``record_many`` (tests/bigfleet.py: a state and a
telemetry window each, tags, 15 model versions, a tenth offline), then the bytes and the median time of 3 GETs of: ``/api/health`` (the first page; on a
tree without pages, every device), every device's health as ``FleetClient.health()`` reads it (following pages),
``/api/devices`` (the first page), the overview page ``/`` and ``/metrics``. With ``--against``, the same in a
child process on that tree, and the ratios this / that. With ``--store both``: SQLite, then PostgreSQL, and the
ratios PostgreSQL / SQLite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
TESTS = HERE / "tests"


def measure(n: int, store_url: str | None = None) -> dict[str, tuple[int, float]]:
    from bigfleet import OFFLINE_AFTER, populate
    from util import admin_token, fleet_client, release_pub, ssl_context

    from fleet.app import Fleet

    with tempfile.TemporaryDirectory() as tmp:
        at = {"store_url": store_url} if store_url else {}  # a tree from before the store URL takes none
        fleet = Fleet(Path(tmp) / "fleet", release_keys=[release_pub()], http_port=0, mqtt_listen="127.0.0.1:0",
                      offline_after=OFFLINE_AFTER, **at).start_background()
        try:
            populate(fleet.store, n)
            token, ctx = admin_token(fleet), ssl_context(fleet)

            def get(path: str) -> int:
                req = urllib.request.Request(fleet.http_url + path, headers={"Authorization": f"Bearer {token}"})
                with urllib.request.urlopen(req, timeout=600, context=ctx) as resp:
                    return len(resp.read())

            def everything() -> int:
                return len(json.dumps(fleet_client(fleet).health()))

            out = {}
            for name, call in (("GET /api/health", lambda: get("/api/health")),
                               ("all health (client)", everything),
                               ("GET /api/devices", lambda: get("/api/devices")),
                               ("GET / (overview)", lambda: get("/")),
                               ("GET /metrics", lambda: get("/metrics"))):
                times, size = [], 0
                for _ in range(3):
                    t = time.perf_counter()
                    size = call()
                    times.append(time.perf_counter() - t)
                out[name] = (size, statistics.median(times))
            return out
        finally:
            fleet.stop()


def table(title: str, ours: dict, theirs: dict | None, label: str = "before") -> None:
    print(title)
    other = f"{'bytes ' + label:>16}{'s ' + label:>12}{'bytes x':>10}{'time x':>9}" if theirs else ""
    print(f"{'read':<22}{'bytes':>12}{'s':>9}{other}")
    for name, (size, secs) in ours.items():
        line = f"{name:<22}{size:>12,}{secs:>9.3f}"
        if theirs:
            b, t = theirs[name]
            line += f"{b:>16,}{t:>12.3f}{size / b:>10.4f}{secs / t:>9.3f}"
        print(line)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--store", default="sqlite", choices=("sqlite", "postgresql", "both"),
                   help="the controller's store: sqlite (default), postgresql (a throwaway cluster) or both")
    p.add_argument("--against", type=Path, help="another edgefleet tree (e.g. main) to measure in the same run")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the child's output
    p.add_argument("--store-url", help=argparse.SUPPRESS)  # the child's store
    args = p.parse_args()
    # tests/ for its helpers; not bench/, whose agent.py and fleet.py would stand in for the packages
    sys.path[:] = [str(TESTS), *(p for p in sys.path if Path(p or ".").resolve() != HERE / "bench")]
    if args.json:
        print(json.dumps(measure(args.devices, args.store_url)))
        return 0
    cluster = None
    if args.store != "sqlite":
        from pgcluster import Cluster
        cluster = Cluster().start()
    try:
        results = {}
        for store in (["sqlite", "postgresql"] if args.store == "both" else [args.store]):
            url = cluster.new_database() if store == "postgresql" else None
            ours = measure(args.devices, url)
            theirs = None
            if args.against:
                env = {**os.environ, "PYTHONPATH": str(args.against)}
                cmd = [sys.executable, __file__, "--devices", str(args.devices), "--json"]
                if store == "postgresql":
                    cmd += ["--store-url", cluster.new_database()]
                proc = subprocess.run(cmd, env=env, cwd=args.against, capture_output=True, text=True, check=True)
                theirs = json.loads(proc.stdout.strip().splitlines()[-1])
            table(f"{args.devices} devices, {store}", ours, theirs)
            results[store] = ours
        if len(results) == 2:
            table(f"{args.devices} devices, postgresql against sqlite", results["postgresql"], results["sqlite"],
                  "sqlite")
    finally:
        if cluster is not None:
            cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
