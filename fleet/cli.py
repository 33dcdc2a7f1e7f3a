"""`edgefleet fleet`: serve the controller; deploy bundles, tag devices and read their health through its API.

Thin wrappers over ``fleet.app.Fleet`` (serve) and ``fleet.client.FleetClient`` (the rest). Errors are
``EdgefleetError``s, which ``edgefleet.cli`` prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from agent.errors import EdgefleetError
from fleet.tables import table
from fleet import cli_admin, cli_enroll, cli_keys, cli_rollouts, cli_simulate
from fleet.health import SORTS


def client_args(c: argparse.ArgumentParser) -> None:
    """The options every command that talks to the controller takes."""
    c.add_argument("--server", metavar="URL",
                   help="the controller's URL (default: $EDGEFLEET_SERVER, the --data dir's controller.json, "
                        "or https://127.0.0.1:8080)")
    c.add_argument("--token", metavar="TOKEN",
                   help="an API token (default: $EDGEFLEET_TOKEN, or the --data dir's admin.token)")
    c.add_argument("--ca", metavar="FILE",
                   help="the fleet CA the controller's certificate must chain to (default: $EDGEFLEET_CA, or the "
                        "--data dir's pki/ca.crt, or the system's CAs)")
    c.add_argument("--data", metavar="DIR",
                   help="the controller's data dir, on its machine: its URL, admin token and CA are read from "
                        "there (default: $EDGEFLEET_DATA)")
    c.add_argument("--json", action="store_true", help="print the API's JSON")


def parse_size(text: str, what: str) -> int:
    """Bytes from ``2147483648``, ``512M``, ``2G`` or ``2GiB`` (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    number = t[:-1] if scale > 1 else t
    if not number.isdigit() or int(number) < 1:
        raise EdgefleetError(f"invalid {what} {text!r}: a size like 2G, 512M or a number of bytes")
    return int(number) * scale


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefleet fleet", description="The fleet controller and its client.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the controller (HTTP API, embedded mosquitto unless --broker)")
    s.add_argument("--data", required=True, type=Path, metavar="DIR", help="where the controller keeps its state")
    s.add_argument("--store", metavar="URL",
                   help="the database: sqlite:///ABS/PATH (default: DATA/fleet.db) or "
                        "postgresql://USER[:PASSWORD]@HOST:PORT/DB (needs edgefleet[postgresql]; a password may come "
                        "from ~/.pgpass or $PGPASSWORD instead)")
    s.add_argument("--broker", metavar="mqtts://HOST:PORT", help="use this broker instead of starting mosquitto "
                   "(it must trust the fleet CA in DATA/pki and apply the ACL: see `fleet broker-config`)")
    s.add_argument("--worker", metavar="NAME",
                   help="run as one of several controller workers named NAME (a-z 0-9 . _ -): needs an external "
                        "--broker and a postgresql:// --store that all workers share; MQTT v5 shared subscriptions "
                        "split device traffic between them, and one (the leader, elected in PostgreSQL) runs "
                        "rollouts, the offline sweep and retention. Workers on one machine may share --data; each "
                        "needs its own --http port. The broker's ACL must admit controller-NAME@edgefleet "
                        "(`fleet broker-config --worker NAME`)")
    s.add_argument("--session-expiry", type=int, metavar="SECONDS",
                   help="the controller's MQTT session expiry (default: 7 days; 0 for a --worker: a dead worker's "
                        "share then goes to the others at once, and devices re-send what it had not stored)")
    s.add_argument("--ca", metavar="FILE", help="with --broker: the CA its certificate chains to (default: the "
                   "fleet CA)")
    s.add_argument("--cert", metavar="FILE", help="with --broker: the controller's client certificate there "
                   "(default: DATA/pki/controller.crt, CN controller@edgefleet; a --worker: "
                   "DATA/pki/worker-NAME.crt, CN controller-NAME@edgefleet)")
    s.add_argument("--key", metavar="FILE", help="with --cert: its private key")
    s.add_argument("--public-broker", metavar="mqtts://HOST:PORT",
                   help="the broker URL enrolled devices are told (default: --broker, or the embedded broker at "
                        "the --public-url's host)")
    s.add_argument("--hostname", action="append", default=[], metavar="NAME",
                   help="another name or address devices and operators reach this controller by: it goes into "
                        "the broker's and the controller's certificates (repeatable; localhost, 127.0.0.1 and this "
                        "machine's names are always there)")
    s.add_argument("--cert-lifetime", default="90d", metavar="DURATION",
                   help="how long device certificates are valid; agents renew them when a third is left "
                        "(default %(default)s)")
    s.add_argument("--insecure", action="store_true",
                   help="INSECURE: plaintext MQTT and HTTP and a broker anyone may use, no device identities; "
                        "for a local experiment only")
    s.add_argument("--http", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="where the API listens (default %(default)s; port 0: a free port)")
    s.add_argument("--mqtt-listen", metavar="HOST:PORT",
                   help="where the embedded mosquitto listens (default 127.0.0.1:8883, with --insecure "
                        "127.0.0.1:1883; without --broker only)")
    s.add_argument("--public-url", metavar="URL",
                   help="base URL devices download bundles from (default: the --http address)")
    s.add_argument("--offline-after", default="3", metavar="N",
                   help="telemetry intervals of silence after which a device counts as offline (default 3)")
    s.add_argument("--raw-retention", default="7d", metavar="DURATION",
                   help="how long raw telemetry is kept before it is folded into 1-minute and 1-hour rollups "
                        "(default %(default)s; at least 1h)")
    s.add_argument("--rollup-retention", default="90d", metavar="DURATION",
                   help="how long 1-minute rollups are kept (default %(default)s; hourly ones: for ever)")
    s.add_argument("--max-bundle-size", default="2G", metavar="SIZE",
                   help="the largest bundle an upload may be (default %(default)s)")
    s.add_argument("--max-clock-offset", default="5m", metavar="DURATION",
                   help="flag a device whose clock is further off than this from the controller's, as estimated "
                        "from its messages (default %(default)s; its reports are filed at the controller's time "
                        "either way)")
    s.add_argument("--release-key", action="append", default=[], type=Path, metavar="KEY.pub",
                   help="list this release public key at start if it is not (repeatable; the same as `fleet keys "
                        "add`): uploads must be signed by a listed key")
    s.add_argument("--allow-unsigned", action="store_true",
                   help="INSECURE: take bundles no listed release key signed (a signature present is still "
                        "checked); devices that check signatures refuse them. For experiments only")
    s.add_argument("--metrics-per-device", action="store_true",
                   help="/metrics also gives one series per device and figure (by default only the fleet's "
                        "aggregates by model, version, tag and state: a cardinality that does not grow with devices)")
    s.add_argument("--desired-ttl", default="1d", metavar="DURATION",
                   help="how long a signed desired model is valid; the controller signs and republishes it when "
                        "half is left (default %(default)s; at least 1m)")

    b = sub.add_parser(
        "broker-config", help="write the mosquitto config and ACL for running the fleet on your own broker",
        description="Make the fleet CA in DIR/pki if there is none (the one `fleet serve --data DIR` uses) with "
        "certificates for --hostname, and write OUT/mosquitto.conf (a TLS listener that requires a client "
        "certificate from the fleet CA and takes the user name and client id from its CN, the CRL, the packet "
        "cap) and OUT/acl (each device publishes only its own reports and reads only its own desired model and "
        "commands; the controller's identity reads and writes them all). Include mosquitto.conf from the "
        "broker's config, then start the controller with `fleet serve --data DIR --broker mqtts://HOST:PORT`.")
    b.add_argument("--data", required=True, type=Path, metavar="DIR", help="the controller's data dir")
    b.add_argument("--out", type=Path, metavar="OUT", help="where to write the two files (default DIR/broker)")
    b.add_argument("--store", metavar="URL", help="the controller's database, as `fleet serve --store` (default: "
                   "DIR/fleet.db): the revoked devices and certificates come from there")
    b.add_argument("--worker", action="append", default=[], metavar="NAME",
                   help="a controller worker the ACL admits (controller-NAME@edgefleet; repeat for each)")
    b.add_argument("--listen", default="0.0.0.0:8883", metavar="HOST:PORT",
                   help="the listener to configure (default %(default)s)")
    b.add_argument("--hostname", action="append", default=[], metavar="NAME",
                   help="a name or address devices reach the broker by (repeatable)")

    d = sub.add_parser("deploy", help="upload a bundle and deploy it to devices")
    d.add_argument("bundle", type=Path, metavar="BUNDLE")
    d.add_argument("--to", nargs="+", required=True, metavar="DEVICE_ID", dest="devices")
    d.add_argument("--rollback", action="store_true",
                   help="send the devices back to an older bundle on purpose: the desired is signed as a rollback, "
                        "so they take a lower serial (a plain deploy only)")
    client_args(d)
    v = sub.add_parser("devices", help="list the devices (all, or those the targets name)")
    v.add_argument("targets", nargs="*", metavar="TARGET", help="device ids, tag:NAME or all")
    _listing_args(v)
    client_args(v)
    t = sub.add_parser("tag", help="add tags to a device (or --remove them)")
    t.add_argument("device", metavar="DEVICE_ID")
    t.add_argument("tags", nargs="*", metavar="TAG", help="tags to add")
    t.add_argument("--remove", nargs="+", default=[], metavar="TAG", help="tags to remove")
    client_args(t)
    h = sub.add_parser("health", help="the health of every device (a table), or one device's report")
    h.add_argument("device", nargs="?", metavar="DEVICE_ID")
    h.add_argument("--sort", metavar="COLUMN",
                   help=f"sort the table by one of: {', '.join(SORTS)} (figures largest first, "
                        f"last-seen longest silent first)")
    h.add_argument("--order", choices=("asc", "desc"), help="override the column's default order")
    _listing_args(h)
    client_args(h)
    cli_rollouts.register(sub, client_args)  # deploy's rollout options, `rollouts`, `rollout ID [ACTION]`
    cli_enroll.register(sub, client_args)  # enroll, provision, enrollments, revoke, certificates
    cli_admin.register(sub, client_args)  # `token create|list|revoke`, `audit`
    cli_keys.register(sub, client_args)  # `keys add|list|remove`, `bundles`
    cli_simulate.register(sub, client_args)  # `simulate`: simulated devices against a controller
    return p


def _listing_args(p: argparse.ArgumentParser) -> None:
    """The fleet listings' filters and --limit (GET /api/health and /api/devices, a page at a time: the client
    follows the pages, so --json has every entry)."""
    p.add_argument("--tag", metavar="NAME", help="only the devices with this tag")
    p.add_argument("--status", choices=("online", "offline"), help="only the online or offline devices")
    p.add_argument("--model", metavar="NAME", help="only the devices whose active model has this name")
    p.add_argument("--model-version", metavar="VERSION", dest="model_version",
                   help="only the devices whose active model has this version")
    p.add_argument("--prefix", metavar="TEXT", help="only the devices whose id starts with TEXT")
    p.add_argument("--limit", type=_positive, metavar="N", help="only the first N devices (default: all)")


def _positive(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"tag": args.tag, "status": args.status, "model": args.model, "version": args.model_version,
            "prefix": args.prefix, "limit": args.limit}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "broker-config":
        return _broker_config(args)
    if args.command == "simulate":
        return cli_simulate.run(args)
    from fleet.client import FleetClient

    client = FleetClient.configured(args.server, args.token, args.ca, args.data)
    if (code := cli_enroll.run(client, args)) is not None:
        return code
    if (code := cli_admin.run(client, args)) is not None:
        return code
    if (code := cli_keys.run(client, args)) is not None:
        return code
    if args.command == "deploy" and args.rollback and cli_rollouts.is_rollout(args):
        raise EdgefleetError("--rollback sends devices back at once (a plain deploy to device ids): give it without "
                             "rollout options; a rollout's own rollback is `edgefleet fleet rollout ID rollback`")
    if (code := cli_rollouts.run(client, args)) is not None:  # None: a plain deploy, below
        return code
    if args.command == "deploy":
        return _deploy(client, args)
    if args.command == "devices":
        _print(client.devices(args.targets or None, **_filters(args)), args.json, _devices_table)
    elif args.command == "tag":
        if not args.tags and not args.remove:
            raise EdgefleetError("name tags to add, or --remove TAG...")
        doc = client.tag(args.device, args.tags, args.remove)
        _print(doc, args.json, lambda d: f"{d['device_id']}: " + (", ".join(d["tags"]) or "no tags"))
    elif args.device is None:
        doc = client.health(sort=args.sort, order=args.order, **_filters(args))
        _print(doc, args.json, _health_table)
    else:
        if args.sort or args.order or any(v is not None for v in _filters(args).values()):
            raise EdgefleetError("--sort, --order, --tag, --status, --model, --model-version, --prefix and --limit "
                                 "filter the fleet table: give them without a DEVICE_ID")
        _print(client.health(args.device), args.json, _device_report)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from fleet.app import Fleet, parse_hostport
    from fleet.retention import Policy, parse_duration

    host, port = parse_hostport(args.http, "--http address")
    try:
        offline_after = float(args.offline_after)
    except ValueError:
        offline_after = 0.0
    if not 0 < offline_after <= 1000:
        raise EdgefleetError(f"invalid --offline-after {args.offline_after!r}: a number of telemetry "
                             f"intervals, more than 0 and at most 1000")
    policy = Policy(raw_s=parse_duration(args.raw_retention, "--raw-retention"),
                    rollup_s=parse_duration(args.rollup_retention, "--rollup-retention"))
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from agent.transport import Tls

    if (args.ca or args.cert or args.key) and not args.broker:
        raise EdgefleetError("--ca, --cert and --key describe an external --broker: give it too")
    if (args.cert is None) != (args.key is None):
        raise EdgefleetError("--cert and --key go together")
    if args.insecure and (args.ca or args.cert or args.hostname):
        raise EdgefleetError("--insecure has no TLS: --ca, --cert, --key and --hostname mean nothing with it")
    broker_tls = None
    if args.ca or args.cert:
        default = Path(args.data) / "pki"
        broker_tls = Tls(args.ca or str(default / "ca.crt"), args.cert or str(default / "controller.crt"),
                         args.key or str(default / "controller.key"))
    max_bundle = parse_size(args.max_bundle_size, "--max-bundle-size")
    fleet = Fleet(args.data, broker_url=args.broker, http_host=host, http_port=port,
                  public_url=args.public_url, mqtt_listen=args.mqtt_listen, offline_after=offline_after,
                  retention=policy, insecure=args.insecure, hostnames=args.hostname, broker_tls=broker_tls,
                  public_broker=args.public_broker, max_bundle_bytes=max_bundle,
                  cert_lifetime_s=parse_duration(args.cert_lifetime, "--cert-lifetime"),
                  max_clock_offset_s=parse_duration(args.max_clock_offset, "--max-clock-offset"),
                  release_keys=args.release_key, allow_unsigned=args.allow_unsigned,
                  desired_ttl_s=parse_duration(args.desired_ttl, "--desired-ttl"), store_url=args.store,
                  metrics_per_device=args.metrics_per_device, worker=args.worker,
                  session_expiry_s=args.session_expiry)
    if args.allow_unsigned:
        print("edgefleet fleet: WARNING: --allow-unsigned: bundles no listed release key signed are taken. Devices "
              "that check signatures refuse them; anyone with an operator token can upload any model.",
              file=sys.stderr, flush=True)
    if args.insecure:
        print("edgefleet fleet: WARNING: --insecure: plaintext MQTT and HTTP, a broker anyone who reaches it may "
              "use, no device identities. Anyone on this network can read the fleet and push models to it.",
              file=sys.stderr, flush=True)

    def ready(f: Fleet) -> None:
        from fleet.auth import ADMIN_TOKEN

        print(f"edgefleet fleet: serving {f.http_url} (broker {f.broker_url}, data {f.data_dir})", flush=True)
        path = f.data_dir / ADMIN_TOKEN
        if f.new_admin_token:  # the first start: shown this once
            print(f"edgefleet fleet: the first admin token (kept in {path}, mode 0600; the CLI reads it with "
                  f"--data {f.data_dir}):\n{f.new_admin_token}", flush=True)
        elif path.exists():
            print(f"edgefleet fleet: the first admin token is in {path}", flush=True)
        if f.pki is not None:
            print(f"edgefleet fleet: CA {f.pki.ca_crt}, fingerprint {f.pki.ca_fingerprint}", flush=True)
        if f.signer is not None:
            print(f"edgefleet fleet: desired models and commands are signed with {f.data_dir / 'keys'}/controller.key "
                  f"(key id {f.signer.keyid}; devices get controller.pub at enrollment)", flush=True)

    fleet.serve(ready)
    return 0


def _broker_config(args: argparse.Namespace) -> int:
    from fleet.app import DB, PKI_DIR, check_worker, parse_hostport
    from fleet.broker import acl_text, secure_listener
    from fleet.pki import PKI, default_hosts

    host, port = parse_hostport(args.listen, "--listen address")
    for name in args.worker:
        check_worker(name, "-", "postgresql://")
    pki = PKI(args.data / PKI_DIR).ensure(default_hosts() + args.hostname)
    revoked: list[str] = []
    if args.store or (args.data / DB).exists():
        from fleet.store import open_store

        store = open_store(args.store or args.data / DB)
        try:
            revoked = store.revoked_device_ids()
            pki.write_crl(store.revoked_serials())
        finally:
            store.close()
    out = args.out or args.data / "broker"
    out.mkdir(parents=True, exist_ok=True)
    (out / "acl").write_text(acl_text(revoked, args.worker))
    (out / "mosquitto.conf").write_text("# the edgefleet fleet's listener (`edgefleet fleet broker-config`)\n"
                                       + "\n".join(secure_listener(pki, host, port, out / "acl")) + "\n")
    print(f"wrote {out / 'mosquitto.conf'} and {out / 'acl'} (CA {pki.ca_crt}, fingerprint {pki.ca_fingerprint})")
    print(f"then: edgefleet fleet serve --data {args.data} --broker mqtts://HOST:{port}")
    return 0


def _deploy(client: Any, args: argparse.Namespace) -> int:
    from agent.bundle import read_manifest

    if not args.bundle.is_file():
        raise EdgefleetError(f"{args.bundle}: no such bundle file")
    read_manifest(args.bundle)  # a non-bundle fails here, before an upload
    up = client.upload_bundle(args.bundle)
    dep = client.deploy(up["sha256"], args.devices, rollback=args.rollback)
    cli_rollouts.print_warnings(dep)
    if args.json:
        print(json.dumps(dep, indent=2))
    else:
        m = up["manifest"]
        print(f"deployed {m['name']} {m['version']} ({m['runtime']}, {m['precision']}, {up['sha256'][:12]}, "
              f"signed by {cli_keys.signer_text(up.get('signed_by'), up.get('signer'))}) to {len(dep['devices'])} "
              f"device(s) as {dep['id']}{' (a rollback)' if args.rollback else ''}")
    return 0


def _print(doc: Any, as_json: bool, render) -> None:
    print(json.dumps(doc, indent=2) if as_json else render(doc))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    return table(headers, rows, "no devices yet")


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = max(0, int(seconds))
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
             ",".join(d.get("tags", [])) or "-", ago(time.time() - d["last_seen"])] for d in devices]
    return _table(["device", "online", "arch", "agent", "runtimes", "model", "tags", "last seen"], rows)


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.2f}"


def _mib(n: float | None) -> str:
    return _num(None if n is None else n / (1 << 20))


def _latency(lat: dict[str, Any] | None) -> str:
    lat = lat or {}
    return "/".join(_num(lat.get(k), "{:.2f}") for k in ("p50", "p95", "p99"))


def _disk(h: dict[str, Any]) -> str:
    """Free disk, and the storage state when it is not ok (``FULL``, ``READ-ONLY``)."""
    free = "-" if h.get("disk_free_bytes") is None else _size(h["disk_free_bytes"])
    storage = h.get("storage")
    return free if storage in (None, "ok") else f"{storage.upper().replace('_', '-')} {free}"


def _size(n: int) -> str:
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def _clock(c: dict[str, Any] | None) -> str:
    """The clock's offset in words; ``!`` when it is beyond --max-clock-offset."""
    from fleet.clock import describe

    if not c or c.get("offset_s") is None:
        return "-"
    return describe(c["offset_s"]) + (" !" if c.get("exceeds_max") else "")


def _health_row(h: dict[str, Any]) -> list[str]:
    m = h["model"] or {}
    return [h["device_id"], "yes" if h["online"] else "no", m.get("name", "-"), m.get("version", "-"),
            m.get("precision", "-"), str(h["inferences"]), str(h["errors"]), _latency(h["latency_ms"]),
            _num(h.get("inferences_per_min")), _pct(h.get("error_rate")), _num(h["cpu_percent"]),
            _mib(h["rss_bytes"]), _num(h["memory_percent"]), _num(h["temperature_c"], unknown="unknown"),
            _disk(h), _clock(h.get("clock")), *_quality_cells(h.get("quality")),
            (h.get("serving") or {}).get("device", "-"), _accelerator_cells(h.get("accelerators")),
            ago(h["last_seen_ago_s"]), ",".join(h.get("tags", [])) or "-"]


HEALTH_HEADERS = ["device", "online", "model", "version", "precision", "inferences", "errors",
                  "p50/p95/p99 ms", "inf/min", "err %", "CPU %", "RSS MiB", "mem %", "temp °C", "disk free", "clock",
                  "drift PSI", "canary %", "acc % (labels)", "runs on", "accel util", "last seen", "tags"]


def _accelerator_cells(accelerators: list[dict[str, Any]] | None) -> str:
    """``nvidia0 37%,card0 unknown``: each accelerator's utilisation; ``-`` when it reports none."""
    return ",".join(f"{a['name']} " + ("unknown" if a["utilization_percent"] is None else
                                       f"{a['utilization_percent']:g}%") for a in accelerators or []) or "-"


def _serving_line(sv: dict[str, Any] | None) -> str:
    """What really runs the active model: ``serving: CPU via CPUExecutionProvider (fallback: ...)``."""
    if not sv:
        return "serving: not reported (an agent from before accelerators)"
    why = f" (fallback: {sv['fallback']})" if sv["fallback"] else ""
    return f"serving: {sv['device']} via {sv['provider']}{why}"


def _accelerator_line(a: dict[str, Any]) -> str:
    """``card0 gpu i915 util unknown, memory 1.0G of 8.0G``; unknown figures are said to be."""
    util = "unknown" if a["utilization_percent"] is None else f"{a['utilization_percent']:g} %"
    used, total = a["memory_used_bytes"], a["memory_total_bytes"]
    memory = ("unknown" if used is None and total is None else
              f"{'unknown' if used is None else _size(used)} of {'unknown' if total is None else _size(total)}")
    return f"{a['name']} {a['kind']} {a['driver'] or '-'} util {util}, memory {memory}"


def _drift(psi: float | None, band: str) -> str:
    """``0.274 significant``, ``0.041 stable``, ``too few`` (below the minimum of served outputs)."""
    return band if psi is None else f"{psi:.3f} {band}"


def _quality_cells(mq: dict[str, Any] | None) -> list[str]:
    """The table's quality columns (fleet/quality.py, over health's quality window): drift vs the bundle's
    reference with its band, canary agreement, feedback accuracy with the labels it rests on."""
    if not mq:
        return ["-", "-", "-"]
    acc = "-" if mq["accuracy"] is None else f"{mq['accuracy'] * 100:.1f} ({mq['labels']})"
    return [_drift(mq["psi_ref"], mq["band_ref"]), _pct1(mq["canary_agreement"]), acc]


def _pct1(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}"


def _interval(iv: list[float] | None) -> str:
    return "" if not iv else f" (95 % CI {iv[0] * 100:.1f}-{iv[1] * 100:.1f} %)"


def _quality_lines(q: dict[str, Any] | None, now: float) -> list[str]:
    """The device report's quality section (GET /api/health/{id}'s ``quality_report``, fleet.quality.device)."""
    if not q or q["sha256"] is None:
        return ["quality: nothing reported in the last " + (f"{int(q['until'] - q['since']) // 60} min" if q else
                                                            "window")]
    out = [f"quality (the last {int(q['until'] - q['since']) // 60} min, version {q['version']} "
           f"{q['sha256'][:12]}): {q['windows']} window{'' if q['windows'] == 1 else 's'}, {q['served']} outputs served"]
    if q["drift"] is None:
        out.append("  drift: the controller has no reference profile for this bundle")
    else:
        for what, d in (("reference", q["drift"]["reference"]), ("fleet", q["drift"]["fleet"])):
            who = f" ({d['devices']} other device(s))" if what == "fleet" else ""
            if d["psi"] is None:
                out.append(f"  drift vs {what}{who}: too few outputs to judge ({d['served']} here, "
                           f"{d['expected_served'] or 0} expected side; at least {q['min_served']} each)")
            else:
                w = d["worst"]
                out.append(f"  drift vs {what}{who}: PSI {d['psi']:.3f} {d['band']}, JS {d['js']:.3f} bits "
                           f"(worst: {w['output']} {w['feature']})")
    c = q["canary"]
    if c["runs"]:
        last = f", last {ago(now - c['last_time'])}" if c["last_time"] else ""
        out.append(f"  canary: {c['agree']}/{c['runs']} agree with fp32, {_pct1(c['agreement'])} %"
                   f"{_interval(c['interval'])}, max abs error {c['max_abs_err'] or 0:g}{last}")
    else:
        out.append("  canary: no runs")
    f = q["feedback"]
    if f is not None and f["labels"]:
        m = f["macro"]
        macro = "/".join(_num(m[k], "{:.2f}") for k in ("precision", "recall", "f1"))
        out.append(f"  feedback: {f['labels']} labels, accuracy {_pct1(f['accuracy'])} %"
                   f"{_interval(f['accuracy_interval'])}; macro precision/recall/F1 {macro}")
        rows = [[str(k["class"]), *(_num(k[x], "{:.2f}") for x in ("precision", "recall", "f1")), str(k["support"]),
                 str(k["predicted"])] for k in f["per_class"] if k["support"] or k["predicted"]]
        out += ["    " + line for line in table(["class", "precision", "recall", "F1", "labels", "predicted"], rows,
                                                 "").splitlines()]
    elif f is not None:
        out.append("  feedback: no labels")
    if q["refused"]:
        out.append("  feedback the agent refused: " + ", ".join(f"{k} {v}" for k, v in q["refused"].items()))
    return out


def _health_table(health: list[dict[str, Any]]) -> str:
    return _table(HEALTH_HEADERS, [_health_row(h) for h in health])


def _device_report(h: dict[str, Any]) -> str:
    """One device's report, from the API's JSON (GET /api/health/{id})."""
    now = time.time()
    since = f" since {ago(now - h['status_since'])}" if h.get("status_since") else ""
    out = [f"{h['device_id']}: {h['status']}{since}, last seen {ago(h['last_seen_ago_s'])}"
           + (f"; tags {', '.join(h['tags'])}" if h.get("tags") else "; no tags")]
    i = h.get("identity") or {}
    out.append(f"  arch {i.get('arch') or '-'}, agent {i.get('agent_version') or '-'}, runtimes "
               f"{', '.join(i.get('runtimes') or []) or '-'}, boot {i.get('boot_id') or '-'}")
    out.append(f"  CPU flags: {' '.join(i.get('cpu_flags') or []) or '-'}")
    devs = i.get("devices") or {}
    out.append("  runtime devices: " + ("; ".join(f"{rt} {', '.join(ds) or '-'}" for rt, ds in devs.items())
                                        if devs else "not reported"))
    acc = h.get("accelerators")
    if acc is None:
        out.append("  accelerators: not reported")
    else:
        out.append("  accelerators: " + ("none" if not acc else "; ".join(_accelerator_line(a) for a in acc)))
    m = h.get("model")
    out.append("model: " + (f"{m['name']} {m['version']} ({m['precision']}, {m['runtime']}, {m['sha256'][:12]})"
                            if m else "none active"))
    if m:
        out.append("  " + _serving_line(h.get("serving")))
        out.append("  " + _signer_line(h.get("signer")))
    r = h.get("recent") or {}
    window = f"the last {int(r.get('window_s', 0)) // 60} min"
    out.append("figures:")
    out.append(f"  inferences {h['inferences']}, errors {h['errors']} in all; over {window}: "
               f"{_num(h.get('inferences_per_min'))}/min, error rate {_pct(h.get('error_rate'))} %")
    out.append(f"  latency p50/p95/p99 {_latency(h['latency_ms'])} ms (the latest window with inferences)")
    out.append(f"  CPU {_num(h['cpu_percent'])} %, RSS {_mib(h['rss_bytes'])} MiB, memory "
               f"{_num(h['memory_percent'])} %, temperature "
               f"{'unknown' if h['temperature_c'] is None else _num(h['temperature_c']) + ' °C'}")
    out.append(f"  seq gaps {h['seq_gaps']}, duplicates {h['duplicates']}, outbox pending "
               f"{_num(h['outbox_pending'], '{}')}, dropped {_num(h['outbox_dropped'], '{}')}")
    storage = h.get("storage")
    since = f" since {ago(now - h['storage_since'])}" if storage not in (None, "ok") and h.get("storage_since") else ""
    out.append(f"storage: {storage or 'not reported'}{since}"
               + (f", {_size(h['disk_free_bytes'])} free" if h.get("disk_free_bytes") is not None else "")
               + ("" if storage in (None, "ok") else " (the state dir takes no writes: the agent serves from "
                                                     "memory and keeps what it can)"))
    out.append(_clock_line(h.get("clock") or {}))
    out += _quality_lines(h.get("quality_report"), now)
    kinds = h.get("errors_by_kind") or {}
    if kinds:
        recent = r.get("errors_by_kind") or {}
        out.append("errors by kind (telemetry): " + ", ".join(
            f"{k} {v['count']} ({recent.get(k, 0)} in {window}, last {ago(now - v['last_time'])})"
            for k, v in kinds.items()))
    if h.get("recent_errors"):
        out.append("recent errors:")
        out += [f"  {_event(e, now)}" for e in h["recent_errors"]]
    if h.get("deployments"):
        out.append("deployments:")
        for d in h["deployments"]:
            what = f"{d['name']} {d['version']}" if d.get("name") else d["bundle_sha256"][:12]
            out.append(f"  {ago(now - d['created'])}  {d['deployment_id']}  {what}  {d['phase']}"
                       + (f" ({d['reason']})" if d["reason"] else ""))
    if h.get("transitions"):
        out.append("online/offline:")
        out += [f"  {ago(now - t['time'])}  {'online ' if t['online'] else 'offline'}  {t['reason']}"
                for t in h["transitions"]]
    if h.get("events"):
        out.append("recent events:")
        out += [f"  {_event(e, now)}" for e in h["events"]]
    return "\n".join(out)


def _signer_line(sg: dict[str, Any] | None) -> str:
    """Who signed the running bundle, and its serial."""
    if sg is None:
        return "signed by: unknown (the controller does not have this bundle)"
    who = cli_keys.signer_text(sg["keyid"], sg["name"]) + (" (removed from the fleet since)" if sg["removed"] else "")
    serial = f", serial {sg['serial']}" if sg["serial"] else ""
    return f"signed by {who}{serial} (as the {'device reports' if sg['source'] == 'device' else 'upload recorded'})"


def _clock_line(c: dict[str, Any]) -> str:
    from fleet.clock import amount, describe

    synced = {True: "synchronised", False: "not synchronised"}.get(c.get("synced"), "unknown")
    if c.get("offset_s") is None:
        return f"clock: offset not known yet (no window or event of this boot); the OS says {synced}"
    flag = f", beyond the {amount(c['max_offset_s'])} bound" if c.get("exceeds_max") else ""
    jumps = f", {c['jumps']} step(s) seen this boot" if c.get("jumps") else ""
    text = describe(c["offset_s"])
    return (f"clock: {text}{' of' if text.startswith('within') else ''} the controller's{flag} (estimated from "
            f"its messages{jumps}); the OS says {synced}; its windows and events are filed at the controller's time")


def _event(e: dict[str, Any], now: float) -> str:
    what = " ".join(x for x in (e["kind"], e["deployment_id"] or "", e["version"] or "") if x)
    return f"{ago(now - e['time'])}  {what}" + (f": {e['reason']}" if e["reason"] else "")
