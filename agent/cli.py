"""`edgefleet agent`: run the device agent, or send it an inference the way an application would."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from agent.errors import EdgefleetError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefleet agent", description="The edgefleet device agent.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run", help="run the agent in the foreground (what the systemd service runs)",
        description="Connect to the broker, reconcile toward the desired model, serve local inference "
        "and publish telemetry until SIGTERM/SIGINT. Config keys: device_id, broker (mqtt://HOST:PORT), "
        "controller (http://HOST:PORT), state_dir, api (HOST:PORT or unix:/path; default 127.0.0.1:8470), "
        "telemetry_interval_s (default 10), keepalive_s (default 15).",
    )
    run.add_argument("--config", required=True, type=Path, help="the agent's TOML config file")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    infer = sub.add_parser(
        "infer", help="send one inference to a running agent's local API",
        description="Send the arrays of an .npz (one per model input, keyed by input name) to the agent "
        "and print the outputs.",
    )
    infer.add_argument("--api", default="127.0.0.1:8470", help="the agent's api address (HOST:PORT or unix:/path)")
    infer.add_argument("--input", required=True, type=Path, help=".npz (or .npy for a single-input model)")
    infer.add_argument("--output", type=Path, help="also write the outputs to this .npz")
    infer.add_argument("--json", action="store_true", help="print the outputs as JSON")
    status = sub.add_parser("status", help="show what a running agent serves")
    status.add_argument("--api", default="127.0.0.1:8470", help="the agent's api address")
    return p


def _load_inputs(path: Path, client) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            active = client.status().get("active") or {}
            names = [i["name"] for i in active.get("inputs", [])]
            if len(names) != 1:
                raise EdgefleetError(f"{path}: an .npy fits a single-input model only; use an .npz keyed by input name")
            return {names[0]: arr}
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise EdgefleetError(f"input file {path} not found") from None
    except (OSError, ValueError) as e:
        raise EdgefleetError(f"{path}: not a numpy .npz/.npy file ({e})") from None


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "run":
        from agent import config
        from agent.daemon import Agent

        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        Agent(config.load(args.config)).run()
        return 0
    from agent.api import AgentClient

    client = AgentClient(args.api)
    if args.cmd == "status":
        print(json.dumps(client.status(), indent=2))
        return 0
    outputs = client.infer(_load_inputs(args.input, client))
    if args.output:
        np.savez(args.output, **outputs)
    if args.json:
        print(json.dumps({k: v.tolist() for k, v in outputs.items()}))
    else:
        for name, value in outputs.items():
            line = f"{name}: {value.dtype}{list(value.shape)}"
            if value.ndim == 2 and value.shape[1] > 1:
                line += f"  top-1 {value.argmax(1).tolist()}"
            print(line + f"  {np.array2string(value.ravel()[:8], precision=4)}")
    return 0
