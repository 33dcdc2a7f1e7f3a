"""`edgefleet fleet keys add|list|remove` (admin) and `edgefleet fleet bundles`.

``register(sub, client_args)`` adds them to ``fleet``'s subparsers; ``run(client, args)`` handles them, or
returns None for any other command. They speak ``/api/keys`` (fleet/api_keys.py) and ``GET /api/bundles``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

from agent.errors import EdgefleetError
from fleet.tables import table


def register(sub: argparse._SubParsersAction, client_args: Callable[[argparse.ArgumentParser], None]) -> None:
    k = sub.add_parser("keys", help="the release keys the fleet accepts bundles from (admin)",
                       description="Release keys sign bundles on a build host (`edgefleet keys generate`); the fleet "
                                   "keeps only their public keys and refuses uploads no listed key signed. A key "
                                   "added with --statement (from `edgefleet keys rotate`) is pushed to devices as a "
                                   "signed statement; a removed key's bundles are refused, and devices are told.")
    ks = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    a = ks.add_parser("add", help="list a release public key")
    a.add_argument("key", type=Path, metavar="KEY.pub")
    a.add_argument("--name", metavar="N", help="its name here (default: the statement's, else the file's name "
                                               "without .pub)")
    a.add_argument("--statement", type=Path, metavar="FILE",
                   help="the signed statement `edgefleet keys rotate` wrote: devices learn the key from it")
    client_args(a)
    client_args(ks.add_parser("list", help="every release key, active and removed"))
    r = ks.add_parser("remove", help="stop accepting a key's bundles; devices are told to stop trusting it")
    r.add_argument("keyid", metavar="KEYID")
    client_args(r)
    b = sub.add_parser("bundles", help="the uploaded bundles, who signed each, and its serial")
    client_args(b)


def run(client: Any, args: argparse.Namespace) -> int | None:
    if args.command == "bundles":
        doc = client.bundles()
        print(json.dumps(doc, indent=2) if args.json else bundles_table(doc))
        return 0
    if args.command != "keys":
        return None
    if args.keys_command == "add":
        from agent import signing

        key = signing.load_public(args.key)  # one clear line for a file that is not an ed25519 public key
        statement = None
        if args.statement is not None:
            try:
                statement = json.loads(_read(args.statement, "statement"))
            except ValueError as e:
                raise EdgefleetError(f"{args.statement}: not a JSON statement ({e})") from None
        doc = client.add_key(key.pem, args.name or (None if statement is not None else key.name), statement)
        print(json.dumps(doc, indent=2) if args.json else
              f"release key {doc['name']} ({doc['keyid']}) listed"
              + (f"; its statement goes to devices ({doc['republished']} desired model(s) republished)"
                 if doc["statement"] else ""))
    elif args.keys_command == "list":
        doc = client.keys()
        print(json.dumps(doc, indent=2) if args.json else keys_table(doc))
    else:
        doc = client.remove_key(args.keyid)
        print(json.dumps(doc, indent=2) if args.json else
              f"release key {doc['name']} ({doc['keyid']}) removed: its bundles are refused; devices are told "
              f"({doc['republished']} desired model(s) republished)")
    return 0


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise EdgefleetError(f"cannot read the {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise EdgefleetError(f"{path}: not a text file (expected a PEM {what})") from None


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def keys_table(keys: list[dict[str, Any]]) -> str:
    rows = [[k["keyid"], k["name"], _when(k["added"]), "removed " + _when(k["removed"]) if k["removed"] else "active",
             "yes" if k["statement"] else "-"] for k in keys]
    return table(["key id", "name", "added", "status", "statement"], rows,
                 "no release keys: add one with `edgefleet fleet keys add KEY.pub`")


def signer_text(keyid: str | None, name: str | None) -> str:
    if keyid is None:
        return "unsigned"
    return f"{name} ({keyid})" if name else keyid


def bundles_table(bundles: list[dict[str, Any]]) -> str:
    rows = [[b["sha256"][:12], b["name"], b["version"], b["target"], b["runtime"], b["precision"],
             "-" if not b["serial"] else str(b["serial"]), signer_text(b["signed_by"], b["signer"]),
             _when(b["uploaded"])] for b in bundles]
    return table(["sha256", "name", "version", "target", "runtime", "precision", "serial", "signed by", "uploaded"],
                 rows, "no bundles yet")
