"""`edgefleet fleet`: serve the controller; deploy bundles and look at devices through its API.

Thin wrappers over ``fleet.app.Fleet`` (serve) and ``fleet.client.FleetClient`` (the rest). Errors are
``EdgefleetError``s, which ``edgefleet.cli`` prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from agent.errors import EdgefleetError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefleet fleet", description="The fleet controller and its client.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the controller (HTTP API, embedded mosquitto unless --broker)")
    s.add_argument("--data", required=True, type=Path, metavar="DIR", help="where the controller keeps its state")
    s.add_argument("--broker", metavar="mqtt://HOST:PORT", help="use this broker instead of starting mosquitto")
    s.add_argument("--http", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="where the API listens (default %(default)s; port 0: a free port)")
    s.add_argument("--mqtt-listen", default="127.0.0.1:1883", metavar="HOST:PORT",
                   help="where the embedded mosquitto listens (default %(default)s; without --broker only)")
    s.add_argument("--public-url", metavar="URL",
                   help="base URL devices download bundles from (default: the --http address)")

    def client_args(c: argparse.ArgumentParser) -> None:
        c.add_argument("--server", metavar="URL",
                       help="the controller's URL (default: $EDGEFLEET_SERVER or http://127.0.0.1:8080)")
        c.add_argument("--json", action="store_true", help="print the API's JSON")

    d = sub.add_parser("deploy", help="upload a bundle and deploy it to devices")
    d.add_argument("bundle", type=Path, metavar="BUNDLE")
    d.add_argument("--to", nargs="+", required=True, metavar="DEVICE_ID", dest="devices")
    client_args(d)
    client_args(sub.add_parser("devices", help="list the devices"))
    h = sub.add_parser("health", help="the health of every device, or of one")
    h.add_argument("device", nargs="?", metavar="DEVICE_ID")
    client_args(h)
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    from fleet.client import DEFAULT_SERVER, FleetClient

    client = FleetClient(args.server or os.environ.get("EDGEFLEET_SERVER") or DEFAULT_SERVER)
    if args.command == "deploy":
        return _deploy(client, args)
    if args.command == "devices":
        doc = client.devices()
        _print(doc, args.json, _devices_table)
    else:
        doc = client.health(args.device)
        _print(doc, args.json, _health_table if args.device is None else _device_detail)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from fleet.app import Fleet, parse_hostport

    host, port = parse_hostport(args.http, "--http address")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fleet = Fleet(args.data, broker_url=args.broker, http_host=host, http_port=port,
                  public_url=args.public_url, mqtt_listen=args.mqtt_listen)

    def ready(f: Fleet) -> None:
        print(f"edgefleet fleet: serving {f.http_url} (broker {f.broker_url}, data {f.data_dir})", flush=True)

    fleet.serve(ready)
    return 0


def _deploy(client: Any, args: argparse.Namespace) -> int:
    from agent.bundle import read_manifest

    if not args.bundle.is_file():
        raise EdgefleetError(f"{args.bundle}: no such bundle file")
    read_manifest(args.bundle)  # a non-bundle fails here, before an upload
    up = client.upload_bundle(args.bundle)
    dep = client.deploy(up["sha256"], args.devices)
    if args.json:
        print(json.dumps(dep, indent=2))
    else:
        m = up["manifest"]
        print(f"deployed {m['name']} {m['version']} ({m['runtime']}, {m['precision']}, {up['sha256'][:12]}) "
              f"to {len(dep['devices'])} device(s) as {dep['id']}")
    return 0


def _print(doc: Any, as_json: bool, render) -> None:
    print(json.dumps(doc, indent=2) if as_json else render(doc))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "no devices yet"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit} ago"
    return f"{s}s ago"


def _num(value: float | None, fmt: str = "{:.1f}", unknown: str = "-") -> str:
    return unknown if value is None else fmt.format(value)


def _devices_table(devices: list[dict[str, Any]]) -> str:
    rows = [[d["id"], "yes" if d["online"] else "no", d["arch"] or "-", d["agent_version"] or "-",
             ",".join(d["runtimes"]) or "-",
             f"{d['active_name']} {d['active_version']}" if d["active_name"] else "-",
             ago(time.time() - d["last_seen"])] for d in devices]
    return _table(["device", "online", "arch", "agent", "runtimes", "model", "last seen"], rows)


def _health_row(h: dict[str, Any]) -> list[str]:
    m, lat = h["model"] or {}, h["latency_ms"] or {}
    return [h["device_id"], "yes" if h["online"] else "no", m.get("name", "-"), m.get("version", "-"),
            m.get("precision", "-"), str(h["inferences"]), str(h["errors"]),
            "/".join(_num(lat.get(k), "{:.2f}") for k in ("p50", "p95", "p99")),
            _num(h["cpu_percent"]),
            _num(None if h["rss_bytes"] is None else h["rss_bytes"] / (1 << 20)),
            _num(h["memory_percent"]), _num(h["temperature_c"], unknown="unknown"),
            ago(h["last_seen_ago_s"])]


HEALTH_HEADERS = ["device", "online", "model", "version", "precision", "inferences", "errors",
                  "p50/p95/p99 ms", "CPU %", "RSS MiB", "mem %", "temp °C", "last seen"]


def _health_table(health: list[dict[str, Any]]) -> str:
    return _table(HEALTH_HEADERS, [_health_row(h) for h in health])


def _device_detail(h: dict[str, Any]) -> str:
    out = [_table(HEALTH_HEADERS, [_health_row(h)])]
    dep = h.get("deployment")
    if dep:
        out.append(f"\nlatest deployment: {dep['deployment_id']} {dep['phase']}"
                   + (f" ({dep['reason']})" if dep["reason"] else ""))
    if h.get("events"):
        out.append("\nrecent events:")
        for e in h["events"]:
            what = " ".join(x for x in (e["kind"], e["deployment_id"] or "", e["version"] or "") if x)
            out.append(f"  {ago(time.time() - e['time'])}  {what}" + (f": {e['reason']}" if e["reason"] else ""))
    return "\n".join(out)
