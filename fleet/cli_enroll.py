"""`edgefleet fleet enroll|provision|enrollments|revoke|certificates`: device identities, through the API.

``register(sub, client_args)`` adds the commands to ``fleet``'s subparsers; ``run(client, args)`` handles them
(or returns None for a command that is not one of these). Errors are ``EdgefleetError``s: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from agent.errors import EdgefleetError
from fleet.tables import table

COMMANDS = ("enroll", "provision", "enrollments", "revoke", "certificates")


def register(sub: argparse._SubParsersAction, client_args) -> None:
    e = sub.add_parser(
        "enroll", help="make a one-time enrollment token for a device (admin)",
        description="Print a one-time, expiring enrollment token for DEVICE_ID (only its hash is stored) and the "
        "fleet CA's fingerprint, and the command the device runs with them: `edgefleet agent enroll --controller "
        "URL --token TOKEN --ca-fingerprint SHA256 --config agent.toml`. The device makes its own key and gets a "
        "certificate whose CN is DEVICE_ID. Enrolling an id again replaces its earlier certificate.")
    e.add_argument("device", metavar="DEVICE_ID")
    e.add_argument("--ttl", default="1h", metavar="DURATION", help="how long the token is valid (default 1h)")
    client_args(e)
    p = sub.add_parser(
        "provision", help="make a provisioning token for devices flashed from one image (admin)",
        description="Print a token that enrolls up to --count devices until it expires, each under an id it "
        "makes at first boot (the agent config's device_id, e.g. cam-{mac}), starting with --prefix. Put it in "
        "the image as the agent's provision_token_file with ca_fingerprint and controller: no key is baked into "
        "the image, each device makes its own. An id that is already enrolled is refused (a cloned identity).")
    p.add_argument("--count", type=int, required=True, metavar="N", help="how many devices may enroll with it")
    p.add_argument("--ttl", default="7d", metavar="DURATION", help="how long the token is valid (default 7d)")
    p.add_argument("--prefix", default="", metavar="TEXT", help="device ids must start with this")
    client_args(p)
    n = sub.add_parser("enrollments", help="list enrollment tokens (or revoke one) (admin)")
    n.add_argument("action", nargs="?", choices=("revoke",), metavar="revoke", help="revoke the token TOKEN_ID")
    n.add_argument("token_id", nargs="?", metavar="TOKEN_ID")
    client_args(n)
    r = sub.add_parser(
        "revoke", help="revoke a device's identity: disconnect it and keep it out (admin)",
        description="Revoke every certificate of DEVICE_ID: the broker's CRL and ACL refuse it from now on, its "
        "live connection is dropped, its bundle downloads and renewals are refused and the controller ignores "
        "its messages. `edgefleet fleet enroll DEVICE_ID` admits it again.")
    r.add_argument("device", metavar="DEVICE_ID")
    client_args(r)
    c = sub.add_parser("certificates", help="the device certificates the fleet CA issued")
    c.add_argument("device", nargs="?", metavar="DEVICE_ID", help="only this device's")
    client_args(c)


def run(client: Any, args: argparse.Namespace) -> int | None:
    if args.command not in COMMANDS:
        return None
    from fleet.retention import parse_duration

    if args.command == "enroll":
        doc = client.create_enrollment(args.device, ttl_s=parse_duration(args.ttl, "--ttl"))
        _print(doc, args.json, _token_text)
    elif args.command == "provision":
        doc = client.create_provisioning(args.count, ttl_s=parse_duration(args.ttl, "--ttl"), prefix=args.prefix)
        _print(doc, args.json, _token_text)
    elif args.command == "enrollments":
        if args.action == "revoke":
            if not args.token_id:
                raise EdgefleetError("enrollments revoke: name the TOKEN_ID (see `edgefleet fleet enrollments`)")
            doc = client.revoke_enrollment(args.token_id)
            _print(doc, args.json, lambda d: f"revoked enrollment token {d['id']}")
        else:
            _print(client.enrollments(), args.json, _enrollments_table)
    elif args.command == "revoke":
        doc = client.revoke(args.device)
        _print(doc, args.json, lambda d: f"revoked {d['device_id']}: {len(d['revoked_certificates'])} "
                                         f"certificate(s) in the CRL; disconnected and refused from now on")
    else:
        _print(client.certificates(args.device), args.json, _certificates_table)
    return 0


def _print(doc: Any, as_json: bool, render) -> None:
    print(json.dumps(doc, indent=2) if as_json else render(doc))


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def _token_text(d: dict) -> str:
    who = (f"device {d['device_id']}" if d["kind"] == "device"
           else f"up to {d['count']} devices" + (f" with ids starting {d['prefix']!r}" if d["prefix"] else ""))
    lines = [f"enrollment token {d['id']} for {who}, valid until {_when(d['expires'])} UTC (shown once):",
             f"  {d['token']}",
             f"CA fingerprint (sha256): {d['ca_fingerprint']}"]
    if d["kind"] == "device":
        lines += ["on the device:",
                  f"  edgefleet agent enroll --controller {d['controller']} --token {d['token']} \\",
                  f"      --ca-fingerprint {d['ca_fingerprint']} --config agent.toml"]
    else:
        lines += ["in the image's agent.toml (and the token in the file it names):",
                  f'  controller = "{d["controller"]}"', f'  ca_fingerprint = "{d["ca_fingerprint"]}"',
                  '  provision_token_file = "/etc/edgefleet/provision.token"',
                  f'  device_id = "{d["prefix"] or "dev-"}{{mac}}"']
    return "\n".join(lines)


def _enrollments_table(rows: list[dict]) -> str:
    return table(["id", "kind", "for", "used", "left", "state", "expires (UTC)", "created by"],
                  [[r["id"], r["kind"], r["device_id"] or (f"{r['prefix']}*" if r["prefix"] else "any id"),
                    str(r["used"]), str(r["uses_left"]), r["state"], _when(r["expires"]), r["created_by"] or "-"]
                   for r in rows], "no enrollment tokens")


def _certificates_table(rows: list[dict]) -> str:
    return table(["device", "serial", "kind", "issued (UTC)", "expires (UTC)", "revoked"],
                  [[r["device_id"], r["serial"][:16], r["kind"], _when(r["issued"]), _when(r["not_after"]),
                    _when(r["revoked"]) + (f" ({r['reason']})" if r["reason"] else "") if r["revoked"] else "no"]
                   for r in rows], "no certificates")
