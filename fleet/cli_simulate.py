"""`edgefleet fleet simulate`: simulated devices against a controller (fleet/simulate.py).

``register(sub, client_args)`` adds the command to ``fleet``'s subparsers; ``run(args)`` runs it. Every option is
checked here and a bad one is one line, exit 2 (an ``EdgefleetError``), as is a controller that cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from agent.errors import EdgefleetError

_PREFIX = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")
MAX_DEVICES = 100_000


def register(sub: argparse._SubParsersAction, client_args) -> None:
    s = sub.add_parser(
        "simulate", help="run N simulated devices against a controller (load tests, rollout rehearsals)",
        description="Run N simulated devices in this process, each enrolled with its own identity (a key, a CSR, "
        "a certificate from the fleet CA) and holding its own mutual-TLS MQTT connection, speaking the devices' "
        "contract: a retained state, a telemetry window every --interval, events; a desired model is checked "
        "(the controller's signature) and answered with downloading, verifying, activating, active, or failed "
        "at --rate-errors. No model runs. The identities stay in --state, so a rerun enrolls nobody again. "
        "New devices enroll with a provisioning token the command makes with the admin token (--token, "
        "EDGEFLEET_TOKEN or --data), or with --provision-token and --ca-fingerprint (`edgefleet fleet "
        "provision --count N --prefix sim-`). Progress goes to stderr every 2 s, a summary to stdout at the end "
        "(--duration, or Ctrl-C; --json: the summary as JSON), with the CPU time and peak memory of the process.")
    s.add_argument("--devices", metavar="N", help="how many devices: PREFIX00001 .. (required)")
    s.add_argument("--interval", default="10", metavar="SECONDS",
                   help="seconds between a device's telemetry windows (default %(default)s; 10s, 1m also work)")
    s.add_argument("--rate-errors", default="0.01", metavar="P",
                   help="the probability that an update (a rollback too) fails: an event `failed` at a random "
                        "step (default %(default)s)")
    s.add_argument("--prefix", default="sim-", metavar="TEXT",
                   help="device ids start with this (default %(default)s)")
    s.add_argument("--state", type=Path, metavar="DIR",
                   help="where identities, seq counters and active models are kept (default "
                        "$XDG_STATE_HOME/edgefleet/simulate, i.e. ~/.local/state/edgefleet/simulate); keep one per "
                        "controller")
    s.add_argument("--connect-rate", default="50", metavar="PER_S",
                   help="new MQTT connections a second, at most (default %(default)s)")
    s.add_argument("--duration", metavar="SECONDS", help="stop after this long (default: run until Ctrl-C)")
    s.add_argument("--update-time", default="1", metavar="SECONDS",
                   help="how long downloading, verifying and activating take together (default %(default)s)")
    s.add_argument("--download", action="store_true",
                   help="really download each bundle (over HTTPS with the device's certificate, hashed, not kept): "
                        "thousands of devices fetching one bundle is a test of the controller too")
    s.add_argument("--inferences", default="5", metavar="PER_S",
                   help="inferences a second each device reports once it runs a model (default %(default)s)")
    s.add_argument("--provision-token", metavar="TOKEN",
                   help="enroll new devices with this provisioning token (its prefix must allow --prefix)")
    s.add_argument("--ca-fingerprint", metavar="SHA256",
                   help="with --provision-token: the fleet CA's fingerprint, as `fleet provision` prints it")
    s.add_argument("--ack-timeout", default="30", metavar="SECONDS",
                   help="send a window or event again when the controller has not acknowledged it (stored "
                        "it) after this long, the wait doubling up to 10 min (default 30, as the agent)")
    s.add_argument("--seed", metavar="N", help="seed the random choices (failures, jitter)")
    client_args(s)


def _number(text: str | None, what: str, lo: float, hi: float, integer: bool = False) -> float:
    try:
        value = int(text) if integer else float(text)
    except (TypeError, ValueError):
        raise EdgefleetError(f"{what} {text!r}: expected {'a whole number' if integer else 'a number'}") from None
    if not lo <= value <= hi:
        raise EdgefleetError(f"{what} {text!r}: expected {lo:g} to {hi:g}")
    return value


def _seconds(text: str, what: str, lo: float, hi: float) -> float:
    from fleet.retention import parse_duration

    try:
        value = float(text)
    except ValueError:
        value = parse_duration(text, what)
    if not lo <= value <= hi:
        raise EdgefleetError(f"{what} {text!r}: expected {lo:g} to {hi:g} seconds")
    return value


def run(args: argparse.Namespace) -> int:
    from fleet.simdevice import Settings
    from fleet.simulate import Provisioning, Simulator, default_state_dir, summary_text

    if args.devices is None:
        raise EdgefleetError("simulate: give --devices N")
    count = int(_number(args.devices, "--devices", 1, MAX_DEVICES, integer=True))
    if not _PREFIX.fullmatch(args.prefix):
        raise EdgefleetError(f"--prefix {args.prefix!r}: up to 32 of a-z, 0-9, '.', '_', '-', starting with a "
                             f"letter or digit")
    settings = Settings(
        interval=_seconds(args.interval, "--interval", 0.1, 3600),
        rate_errors=_number(args.rate_errors, "--rate-errors", 0, 1),
        update_s=_seconds(args.update_time, "--update-time", 0, 3600) if args.update_time not in ("0", "0s")
        else 0.0,
        download=args.download,
        inferences_per_s=_number(args.inferences, "--inferences", 0, 1e6),
        ack_timeout=_seconds(args.ack_timeout, "--ack-timeout", 0.1, 86400))
    connect_rate = _number(args.connect_rate, "--connect-rate", 0.01, 1e5)
    duration = _seconds(args.duration, "--duration", 0.1, 365 * 86400) if args.duration else None
    seed = int(_number(args.seed, "--seed", 0, 2**63, integer=True)) if args.seed is not None else None
    if (args.provision_token is None) != (args.ca_fingerprint is None):
        raise EdgefleetError("--provision-token and --ca-fingerprint go together (both from `edgefleet fleet "
                             "provision`)")
    state = args.state or default_state_dir()
    if state.exists() and not state.is_dir():
        raise EdgefleetError(f"--state {state}: not a directory")

    def provisioning(missing: int) -> Provisioning:
        from fleet.client import FleetClient

        if args.provision_token is not None:
            from agent.identity import normalize_fingerprint

            client = FleetClient.configured(args.server, None, args.ca, args.data)
            return Provisioning(client.server_url, args.provision_token, normalize_fingerprint(args.ca_fingerprint))
        client = FleetClient.configured(args.server, args.token, args.ca, args.data)
        doc = client.create_provisioning(missing, ttl_s=3600.0, prefix=args.prefix)
        return Provisioning(client.server_url, doc["token"], doc["ca_fingerprint"])

    if args.provision_token is not None:  # a bad fingerprint is a bad argument: say so before anything runs
        from agent.identity import normalize_fingerprint

        normalize_fingerprint(args.ca_fingerprint)
    sim = Simulator(state, count, args.prefix, settings, connect_rate, provisioning,
                    progress=lambda line: print(line, file=sys.stderr, flush=True), seed=seed)
    summary = sim.run(duration)
    print(json.dumps(summary, indent=2) if args.json else summary_text(summary))
    return 0
