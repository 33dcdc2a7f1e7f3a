"""`edgefleet fleet deploy ... --waves ...`, `edgefleet fleet rollouts`, `edgefleet fleet rollout ID [ACTION]`.

``register(sub, client_args)`` adds the rollout options to ``fleet deploy`` and the two commands to ``fleet``'s
subparsers; ``run(client, args)`` handles them, or returns None for a plain deploy (device ids only and no
rollout option), which ``fleet.cli`` publishes directly as before. Errors are ``EdgefleetError``s: one line,
exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from fleet.tables import table

ROLLOUT_OPTIONS = ("waves", "soak", "wave_timeout", "max_error_rate", "max_p95_ms", "max_p95_regression",
                   "min_inferences", "max_drift_psi", "min_canary_agreement", "max_accuracy_drop", "min_labels")


def register(sub: argparse._SubParsersAction, client_args) -> None:
    d = sub.choices["deploy"]
    g = d.add_argument_group(
        "staged rollout",
        "TARGETs are device ids, tag:NAME or all. Any option below, or a tag:NAME or all target, makes the "
        "deploy a rollout: waves published one after another, each waiting until its devices are active and "
        "have soaked, halted (and its wave sent back to the previous model) when a device fails or crosses a "
        "threshold. Follow it with `edgefleet fleet rollout ID`. Without any of these and with device ids only, "
        "deploy publishes to those devices at once as a plain deployment (no waves, no health gate; a device "
        "that has not registered yet gets it when it first connects).")
    g.add_argument("--waves", metavar="N,P%,...",
                   help="cumulative wave sizes, counts or percentages of the targets, ending at 100%% "
                        "(e.g. 1,10%%,50%%,100%%; default: one wave of 100%%)")
    g.add_argument("--soak", metavar="DURATION",
                   help="how long each device must run the bundle before the next wave (30s, 5m, 1h; "
                        "default 0 with one wave, 5m with --waves)")
    g.add_argument("--wave-timeout", metavar="DURATION",
                   help="halt when a wave has not passed this long after it started (default 30m)")
    g.add_argument("--max-error-rate", metavar="PCT", help="halt when a device's error rate exceeds this (e.g. 1%%)")
    p95 = g.add_mutually_exclusive_group()
    p95.add_argument("--max-p95-ms", metavar="MS", help="halt when a device's p95 latency exceeds MS")
    p95.add_argument("--max-p95-regression", metavar="PCT",
                     help="halt when a device's p95 is more than PCT above its p95 on the model being replaced "
                          "(e.g. 20%%)")
    g.add_argument("--min-inferences", metavar="N",
                   help="a device soaks until it has also served N inferences, and is judged from then (default 0)")
    g.add_argument("--max-drift-psi", metavar="X",
                   help="halt when a device's outputs drift further than PSI X from the bundle's reference profile "
                        "(0.1 moderate, 0.25 significant; judged after 50 outputs, and only a shift sampling alone "
                        "would not give)")
    g.add_argument("--min-canary-agreement", metavar="PCT",
                   help="halt when fewer than PCT of the bundle's golden inputs agree with their fp32 outputs on a "
                        "device (it runs them at activation: no traffic needed; e.g. 95%%)")
    g.add_argument("--max-accuracy-drop", metavar="PCT",
                   help="halt when a device's accuracy from its applications' feedback falls more than PCT points "
                        "below its accuracy on the model being replaced (e.g. 5%%)")
    g.add_argument("--min-labels", metavar="N",
                   help="feedback labels needed on each side before --max-accuracy-drop judges (default 30)")
    g.add_argument("--no-auto-rollback", action="store_true",
                   help="on a halt, leave the halted wave's devices on the new bundle")

    client_args(sub.add_parser("rollouts", help="list the rollouts, newest first"))
    r = sub.add_parser("rollout", help="one rollout's waves and each device's phase; or pause, resume, abort, "
                                       "roll it back")
    r.add_argument("rollout_id", metavar="ID")
    r.add_argument("action", nargs="?", metavar="ACTION", choices=("pause", "resume", "abort", "rollback"),
                   help="pause (no new wave starts), resume, abort (stop; devices stay), rollback (send every "
                        "device it touched back to its previous model)")
    client_args(r)


def run(client: Any, args: argparse.Namespace) -> int | None:
    """Handle a rollout command; None when ``args`` is a plain deploy (fleet.cli's own)."""
    if args.command == "rollouts":
        doc = client.rollouts()
        print(json.dumps(doc, indent=2) if args.json else rollouts_table(doc))
        return 0
    if args.command == "rollout":
        if args.action:
            doc = client.rollout_action(args.rollout_id, args.action)
            if not args.json:
                print(f"rollout {doc['id']}: {doc['status']}" + (f" ({doc['reason']})" if doc["reason"] else ""))
        else:
            doc = client.rollout(args.rollout_id)
        if args.json:
            print(json.dumps(doc, indent=2))
        elif not args.action:
            print(rollout_report(doc))
        return 0
    if args.command == "deploy" and is_rollout(args):
        return _deploy(client, args)
    return None


def print_warnings(doc: dict[str, Any]) -> None:
    """A deploy's or rollout's warnings (e.g. too little free disk on a device), one line each on stderr: the
    deploy went ahead."""
    for w in doc.get("warnings") or ():
        print(f"edgefleet fleet: warning: {w}", file=sys.stderr, flush=True)


def is_rollout(args: argparse.Namespace) -> bool:
    return (any(getattr(args, k, None) is not None for k in ROLLOUT_OPTIONS) or args.no_auto_rollback
            or any(t == "all" or t.startswith("tag:") for t in _targets(args)))


def _targets(args: argparse.Namespace) -> list[str]:
    return getattr(args, "targets", None) or args.devices


def _deploy(client: Any, args: argparse.Namespace) -> int:
    from agent.bundle import read_manifest
    from agent.errors import EdgefleetError
    from fleet.rollout import RolloutError, options, parse_fraction

    path = Path(args.bundle)
    if not path.is_file():
        raise EdgefleetError(f"{path}: no such bundle file")
    opts = {"waves": args.waves, "soak": args.soak, "wave_timeout": args.wave_timeout,
            "max_error_rate": args.max_error_rate, "max_p95_ms": args.max_p95_ms,
            "max_p95_regression": args.max_p95_regression, "min_inferences": 0,
            "auto_rollback": not args.no_auto_rollback, "max_drift_psi": None,
            "min_canary_agreement": None, "max_accuracy_drop": args.max_accuracy_drop}
    if args.min_canary_agreement is not None:  # the API takes a fraction
        opts["min_canary_agreement"] = parse_fraction(args.min_canary_agreement, "--min-canary-agreement")
        if not 0 < opts["min_canary_agreement"] <= 1:
            raise RolloutError(f"--min-canary-agreement {args.min_canary_agreement!r}: give a percentage in "
                               f"(0%, 100%], e.g. 95%")
    if args.max_drift_psi is not None:
        try:
            opts["max_drift_psi"] = float(args.max_drift_psi)
        except ValueError:
            raise RolloutError(f"--max-drift-psi {args.max_drift_psi!r}: give a number, e.g. 0.25") from None
    if args.min_labels is not None:
        if not args.min_labels.isdigit() or int(args.min_labels) < 1:
            raise RolloutError(f"--min-labels {args.min_labels!r}: give a count >= 1")
        opts["min_labels"] = int(args.min_labels)
    if args.max_p95_ms is not None:
        try:
            opts["max_p95_ms"] = float(args.max_p95_ms)
        except ValueError:
            raise RolloutError(f"--max-p95-ms {args.max_p95_ms!r}: give a number of milliseconds") from None
    if args.min_inferences is not None:
        if not args.min_inferences.isdigit():
            raise RolloutError(f"--min-inferences {args.min_inferences!r}: give a count >= 0")
        opts["min_inferences"] = int(args.min_inferences)
    options(**opts)  # bad options fail here, before an upload
    read_manifest(path)  # and so does a file that is not a bundle
    up = client.upload_bundle(path)
    doc = client.create_rollout(up["sha256"], _targets(args), **{k: v for k, v in opts.items() if v is not None})
    print_warnings(doc)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    m = up["manifest"]
    sizes = ", ".join(str(len(w["devices"])) for w in doc["waves"])
    first = doc["waves"][0]["devices"]
    names = ", ".join(d["device_id"] for d in first[:5]) + (", ..." if len(first) > 5 else "")
    print(f"rollout {doc['id']}: {m['name']} {m['version']} ({m['runtime']}, {m['precision']}, "
          f"{up['sha256'][:12]}) to {doc['device_count']} device(s) in {doc['wave_count']} wave(s) of {sizes}, "
          f"soak {_dur(doc['options']['soak_s'])}; wave 1 published to {names}")
    print(f"follow it with: edgefleet fleet rollout {doc['id']}")
    return 0


# -- rendering ------------------------------------------------------------------------------------------------


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s != seconds or s < 60:
        return f"{seconds:g}s"
    parts = [(s // 3600, "h"), (s % 3600 // 60, "m"), (s % 60, "s")]
    return "".join(f"{n}{u}" for n, u in parts if n)


def _ago(t: float | None) -> str:
    if t is None:
        return "-"
    return _dur(max(0, int(time.time() - t))) + " ago"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _model(b: dict[str, Any]) -> str:
    name = f"{b['name']} {b['version']} " if b.get("name") else ""
    return f"{name}({b['sha256'][:12]})"


def rollouts_table(rollouts: list[dict[str, Any]]) -> str:
    rows = [[r["id"], _model(r["bundle"]), r["status"], f"{r['current_wave']}/{r['wave_count']}",
             f"{r['phases'].get('active', 0)}/{r['device_count']} active", _ago(r["created"]), r["reason"][:80]]
            for r in rollouts]
    return table(["rollout", "bundle", "status", "wave", "devices", "created", "reason"], rows, "no rollouts yet")


def _options(o: dict[str, Any]) -> str:
    out = [f"waves {','.join(o['waves'])}", f"soak {_dur(o['soak_s'])}", f"wave timeout {_dur(o['wave_timeout_s'])}"]
    if o["max_error_rate"] is not None:
        out.append(f"max error rate {o['max_error_rate']:.2%}")
    if o["max_p95_ms"] is not None:
        out.append(f"max p95 {o['max_p95_ms']:g} ms")
    if o["max_p95_regression"] is not None:
        out.append(f"max p95 regression +{o['max_p95_regression']:.0%}")
    if o["min_inferences"]:
        out.append(f"min inferences {o['min_inferences']}")
    if o.get("max_drift_psi") is not None:
        out.append(f"max drift PSI {o['max_drift_psi']:g}")
    if o.get("min_canary_agreement") is not None:
        out.append(f"min canary agreement {o['min_canary_agreement']:.0%}")
    if o.get("max_accuracy_drop") is not None:
        out.append(f"max accuracy drop {o['max_accuracy_drop'] * 100:g} points (min {o['min_labels']} labels)")
    out.append("auto-rollback" if o["auto_rollback"] else "no auto-rollback")
    return "; ".join(out)


def _note(d: dict[str, Any]) -> str:
    bits = []
    rb = d["rollback"]
    if d["phase"] == "active" and not rb:
        bits.append("soaked" if d["soaked"] else "soaking")
    quality = [f"drift PSI {d['drift_psi']:.2f}" if d.get("drift_psi") is not None else "",
               f"canary {d['canary_agreement']:.0%}" if d.get("canary_agreement") is not None else "",
               f"accuracy {d['accuracy']:.0%} of {d['labels']}" if d.get("accuracy") is not None else ""]
    if any(quality) and not d["verdict"]:
        bits.append(", ".join(q for q in quality if q))
    if d["verdict"]:
        bits.append(d["verdict"])
    elif d["reason"] and d["phase"] in ("failed", "rolled_back"):
        bits.append(d["reason"])
    if rb and rb["sha256"]:
        bits.append(f"sent back to {rb['version'] or ''} ({rb['sha256'][:12]})".replace("to  (", "to (")
                    + (f": {rb['phase']}" if rb["phase"] else ""))
    elif rb:
        bits.append(rb["what"])
    elif d["note"] and d["phase"] != "waiting":
        bits.append(d["note"])
    return "; ".join(bits)


def rollout_report(r: dict[str, Any]) -> str:
    head = [f"rollout {r['id']}  {r['status']}  {_model(r['bundle'])}  wave {r['current_wave']} of "
            f"{r['wave_count']}  created {_ago(r['created'])}",
            f"  targets {' '.join(r['targets'])}; {_options(r['options'])}"]
    if r["reason"]:
        head.append(f"  {r['reason']}")
    if r.get("unpublished"):
        head.append(f"  not yet taken by the broker: {', '.join(r['unpublished'])}")
    rows = []
    for w in r["waves"]:
        for i, d in enumerate(w["devices"]):
            rows.append([str(w["wave"]) if i == 0 else "", w["status"] if i == 0 else "", d["device_id"],
                         d["phase"], "yes" if d["online"] else "no", str(d["inferences"]), _pct(d["error_rate"]),
                         "-" if d["p95_ms"] is None else f"{d['p95_ms']:.2f}", _note(d)])
    body = table(["wave", "status", "device", "phase", "online", "inferences", "error rate", "p95 ms", "note"],
                 rows, "no devices")
    return "\n".join(head) + "\n\n" + body
