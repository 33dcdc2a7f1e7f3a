"""Benchmark: what the fleet's reads cost at N registered devices (issue 15, item 7), as ratios against another
tree of edgefleet (main) measured in the same run.

    .venv/bin/python bench/reads.py [--devices 10000] [--against /work/main]

A real controller (embedded broker, HTTPS, SQLite) whose registry holds N devices registered through the
store's own ``record_*`` methods (tests/bigfleet.py: a state and a telemetry window each, tags, 15 model
versions, a tenth offline), then the bytes and the median time of 3 GETs of: ``/api/health`` (the first page; on a
tree without pages, every device), every device's health as ``FleetClient.health()`` reads it (following pages),
``/api/devices`` (the first page), the overview page ``/`` and ``/metrics``. With ``--against``, the same in a
child process on that tree, and the ratios this / that.
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


def measure(n: int) -> dict[str, tuple[int, float]]:
    # tests/ for its helpers; not bench/, whose agent.py would stand in for the agent package
    sys.path[:] = [str(TESTS), *(p for p in sys.path if Path(p or ".").resolve() != HERE / "bench")]
    from bigfleet import OFFLINE_AFTER, populate
    from util import admin_token, fleet_client, release_pub, ssl_context

    from fleet.app import Fleet

    with tempfile.TemporaryDirectory() as tmp:
        fleet = Fleet(Path(tmp) / "fleet", release_keys=[release_pub()], http_port=0, mqtt_listen="127.0.0.1:0",
                      offline_after=OFFLINE_AFTER).start_background()
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--against", type=Path, help="another edgefleet tree (e.g. main) to measure in the same run")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the child's output
    args = p.parse_args()
    ours = measure(args.devices)
    if args.json:
        print(json.dumps(ours))
        return 0
    theirs = None
    if args.against:
        env = {**os.environ, "PYTHONPATH": str(args.against)}
        proc = subprocess.run([sys.executable, __file__, "--devices", str(args.devices), "--json"], env=env,
                              cwd=args.against, capture_output=True, text=True, check=True)
        theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{args.devices} devices")
    print(f"{'read':<22}{'bytes':>12}{'s':>9}" + (f"{'bytes before':>14}{'s before':>10}{'bytes x':>10}{'time x':>9}"
                                                    if theirs else ""))
    for name, (size, secs) in ours.items():
        line = f"{name:<22}{size:>12,}{secs:>9.3f}"
        if theirs:
            b, t = theirs[name]
            line += f"{b:>14,}{t:>10.3f}{size / b:>10.4f}{secs / t:>9.3f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
