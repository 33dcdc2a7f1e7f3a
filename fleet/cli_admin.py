"""`edgefleet fleet token create|list|revoke` and `edgefleet fleet audit`: the admin's commands.

``register(sub, client_args)`` adds them to ``fleet``'s subparsers; ``run(client, args)`` handles them, or
returns None for any other command. They speak the admin API (``fleet.api_admin``), so they need an admin
token (``--data DIR`` reads the first one, ``DIR/admin.token``).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

from fleet.tables import table

ROLES = ("read", "operator", "admin")


def register(sub: argparse._SubParsersAction, client_args: Callable[[argparse.ArgumentParser], None]) -> None:
    t = sub.add_parser("token", help="create, list and revoke API tokens (admin)",
                       description="API tokens: read (GETs, the dashboard), operator (deploy, rollouts, tags), "
                                   "admin (tokens, the audit trail). A token is shown once, when it is created; "
                                   "the controller keeps only its sha256.")
    ts = t.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    c = ts.add_parser("create", help="create a token and print it (once)")
    c.add_argument("--role", required=True, choices=ROLES)
    c.add_argument("--name", metavar="N", help="a unique name for it (default: the role and 6 hex digits)")
    client_args(c)
    client_args(ts.add_parser("list", help="every token, active and revoked (never their secrets)"))
    r = ts.add_parser("revoke", help="revoke a token: it and its dashboard sessions stop working at once")
    r.add_argument("name", metavar="NAME")
    client_args(r)
    a = sub.add_parser("audit", help="the audit trail: writes, sign-ins, tokens made and revoked (admin)")
    a.add_argument("--limit", type=int, default=50, metavar="N", help="how many entries, newest first (default 50)")
    client_args(a)


def run(client: Any, args: argparse.Namespace) -> int | None:
    if args.command == "audit":
        if not 1 <= args.limit <= 1000:
            from agent.errors import EdgefleetError

            raise EdgefleetError(f"--limit {args.limit}: give a number from 1 to 1000")
        doc = client.audit(limit=args.limit)
        print(json.dumps(doc, indent=2) if args.json else audit_table(doc["entries"]))
        return 0
    if args.command != "token":
        return None
    if args.token_command == "create":
        doc = client.create_token(args.role, args.name)
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            print(f"token {doc['name']} ({doc['role']}); it is shown only now, keep it:\n{doc['token']}")
    elif args.token_command == "list":
        doc = client.tokens()
        print(json.dumps(doc, indent=2) if args.json else tokens_table(doc))
    else:
        doc = client.revoke_token(args.name)
        print(json.dumps(doc, indent=2) if args.json else f"token {doc['name']} ({doc['role']}) revoked")
    return 0


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def tokens_table(tokens: list[dict[str, Any]]) -> str:
    rows = [[t["name"], t["role"], _when(t["created"]), _when(t["last_used"]),
             "revoked " + _when(t["revoked"]) if t["revoked"] else "active"] for t in tokens]
    return table(["name", "role", "created", "last used", "status"], rows, "no tokens")


def audit_table(entries: list[dict[str, Any]]) -> str:
    rows = [[_when(e["time"]), e["actor"], e["action"], e["target"], "-" if e["status"] is None else str(e["status"]),
             e["remote"] or "-", e["detail"]] for e in entries]
    return table(["time", "actor", "action", "target", "status", "from", "detail"], rows, "no audit entries yet")
