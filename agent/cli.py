"""`edgefleet agent`: run the device agent, or send it an inference the way an application would."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from agent.config import DEFAULT_API
from agent.errors import EdgefleetError

CONFIG = "/etc/edgefleet/agent.toml"  # where `agent install` puts it
NO_TRUST = ("this device trusts no release key, so it will refuse every bundle until one is added "
            "(edgefleet agent trust add KEY.pub)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefleet agent", description="The edgefleet device agent.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run", help="run the agent in the foreground (what the systemd service runs)",
        description="Connect to the broker, reconcile toward the desired model, serve local inference "
        "and publish telemetry until SIGTERM/SIGINT; SIGHUP re-reads the config (telemetry_interval_s applies "
        "at once, other keys at the next restart). The device must be enrolled first (`edgefleet agent enroll`). "
        "Config keys: state_dir, device_id, broker (mqtts://HOST:PORT) and controller (https://HOST:PORT) (these "
        "three from the enrollment unless set), tls_ca, tls_cert, tls_key (TLS files from elsewhere), "
        "provision_token_file and ca_fingerprint (enroll at first boot, device_id may then be a template such as "
        "cam-{mac}), insecure (plaintext, no identity: experiments only), "
        "api (unix:/path or HOST:PORT; default: the Unix socket $RUNTIME_DIRECTORY/agent.sock under systemd, "
        "i.e. /run/edgefleet/agent.sock, else state_dir/agent.sock), "
        "telemetry_interval_s (default 10), keepalive_s (default 15), outbox_max_bytes (default 64 MiB), "
        "outbox_max_age_s (default 7 days), rollback_window_s (default 300), rollback_min_inferences "
        "(default 20), rollback_max_error_rate (default 0.05), rollback_max_p95_ms (default: the bundle's "
        "latency budget), max_bundle_bytes (default 2 GiB: a larger desired bundle is refused), min_free_bytes "
        "(default outbox_max_bytes + 8 MiB: a bundle whose download and unpack would leave less free in the state "
        "dir is refused before a byte of it is written), bundle_origins "
        "(default []: bundles are downloaded only from the controller's origin; list other "
        "http(s)://HOST[:PORT] origins here), api_group (the socket's group, default edgefleet-api), api_token_file (a "
        "file holding the bearer token every API request must then carry; required for a non-loopback HOST:PORT), "
        "api_max_body_bytes (default 64 MiB), api_max_connections (default 64), api_workers (default 2). "
        "README.md explains each.",
    )
    run.add_argument("--config", required=True, type=Path, help="the agent's TOML config file")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    enroll = sub.add_parser(
        "enroll", help="enroll this device with its fleet: make its key, get its certificate",
        description="Make this device's private key (it never leaves STATE_DIR/identity), fetch the controller's "
        "CA and accept it only if its sha256 is --ca-fingerprint, send a certificate signing request with the "
        "enrollment --token from `edgefleet fleet enroll` (or `fleet provision`), and keep the certificate, the CA "
        "and the broker's URL in STATE_DIR/identity. `agent run` then needs no broker or controller in its config. "
        "The agent renews the certificate by itself before it expires.",
    )
    enroll.add_argument("--controller", required=True, metavar="https://HOST:PORT", help="the controller's URL")
    enroll.add_argument("--token", required=True, help="the enrollment token ('-': read it from stdin)")
    enroll.add_argument("--ca-fingerprint", required=True, metavar="SHA256",
                        help="the fleet CA's sha256 fingerprint, as `edgefleet fleet enroll` prints it")
    enroll.add_argument("--config", required=True, type=Path, help="the agent's TOML config (for its state_dir)")
    enroll.add_argument("--device-id", help="the id to enroll as (a provisioning token needs one; a template such as "
                        "cam-{mac} is filled in here; default: the config's device_id)")
    enroll.add_argument("--force", action="store_true", help="enroll again although this device is enrolled")
    enroll.add_argument("--trust", action="append", default=[], type=Path, metavar="KEY.pub",
                        help="a release key this device runs bundles signed by: copied into the config's trust_dir "
                        "(repeatable; more later with `edgefleet agent trust add`)")
    enroll.add_argument("--json", action="store_true", help="print the enrollment as JSON")
    infer = sub.add_parser(
        "infer", help="send one inference to a running agent's local API",
        description="Send the arrays of an .npz (one per model input, keyed by input name) to the agent "
        "and print the outputs.",
    )
    infer.add_argument("--api", default=DEFAULT_API, help=f"the agent's api address: unix:/path or HOST:PORT "
                       f"(default {DEFAULT_API}, the service's socket)")
    infer.add_argument("--token", help="the API's bearer token when the agent has api_token_file "
                       "(default: $EDGEFLEET_AGENT_TOKEN)")
    infer.add_argument("--input", required=True, type=Path, help=".npz (or .npy for a single-input model)")
    infer.add_argument("--output", type=Path, help="also write the outputs to this .npz")
    infer.add_argument("--json", action="store_true", help="print the outputs as JSON")
    devices = sub.add_parser(
        "devices", help="list the devices each installed runtime can use on this machine",
        description="What the agent may run a model on here: ONNX Runtime's execution providers, OpenVINO's devices "
        "(and AUTO), LiteRT's CPU and the delegates whose libraries load. A bundle's `accelerators` setting names "
        "these, in order of preference; the agent reports what really runs each model (`agent status`, and the "
        "state and telemetry it sends).",
    )
    devices.add_argument("--json", action="store_true", help="print {runtime: [device, ...]} as JSON")
    status = sub.add_parser("status", help="show what a running agent serves")
    status.add_argument("--api", default=DEFAULT_API, help=f"the agent's api address (default {DEFAULT_API})")
    status.add_argument("--token", help="the API's bearer token (default: $EDGEFLEET_AGENT_TOKEN)")
    install = sub.add_parser(
        "install", help="install the agent as the systemd service edgefleet-agent (root)",
        description="Create the venv /opt/edgefleet with edgefleet[agent], the system user edgefleet, "
        "the group edgefleet-api (the local API socket's), /etc/edgefleet/agent.toml, "
        "/etc/systemd/system/edgefleet-agent.service and its drop-in network.conf (the only addresses the agent may "
        "reach: localhost, the controller, the broker, the nameservers); where systemd runs, "
        "enable and start the service. A second run changes nothing.",
    )
    install.add_argument("--device-id", help="the config's device_id")
    install.add_argument("--broker", help="the config's broker: mqtts://HOST:PORT")
    install.add_argument("--controller", help="the config's controller: https://HOST:PORT")
    install.add_argument("--token", help="enroll the device with this token from `edgefleet fleet enroll` (then "
                         "--device-id and --broker come from the enrollment)")
    install.add_argument("--ca-fingerprint", metavar="SHA256", help="with --token: the fleet CA's fingerprint")
    install.add_argument("--api", help=f"the config's api: unix:/path or HOST:PORT (default {DEFAULT_API})")
    install.add_argument("--telemetry-interval", type=float, help="the config's telemetry_interval_s (default 10)")
    install.add_argument("--config", type=Path, dest="config_file",
                         help="copy this agent.toml instead (its state_dir must be /var/lib/edgefleet)")
    install.add_argument("--trust", action="append", default=[], type=Path, metavar="KEY.pub",
                         help="a release key the device runs bundles signed by: copied into /etc/edgefleet/trust "
                         "(root-owned, read-only to the agent; repeatable)")
    install.add_argument("--force", action="store_true", help="overwrite an existing, different config")
    install.add_argument("--source", metavar="PATH_OR_REQUIREMENT",
                         help="what to pip install: a source tree, a wheel or a requirement (default: the "
                         "checkout this edgefleet runs from, else edgefleet from the package index)")
    install.add_argument("--extra", action="append", default=[], dest="extras", metavar="EXTRA",
                         help="another extra besides agent, e.g. openvino or litert (repeatable)")
    install.add_argument("--python", help="the venv's base interpreter (default /usr/bin/python3)")
    install.add_argument("--wheels", type=Path, metavar="DIR",
                         help="install offline from this wheelhouse (from `edgefleet agent bundle-wheels`, made for "
                         "this machine's platform): pip --no-index --find-links DIR")
    install.add_argument("--accelerator", action="append", dest="accelerators",
                         choices=["none", "auto", "nvidia", "dri", "npu"],
                         help="what accelerators the agent may use (repeatable; default auto: those whose device "
                         "nodes /dev has: /dev/nvidia*, /dev/dri/renderD*, /dev/accel/accel*): the drop-in "
                         "accelerators.conf opens their nodes alone instead of PrivateDevices=yes; none: no drop-in")
    install.add_argument("--root", default="/", type=Path,
                         help="install under this directory, e.g. an image's root filesystem: no user, no systemctl; "
                         "the venv is made by the root's own python3 (chroot, or emulated for an aarch64 root on an "
                         "x86_64 host) so that it runs at boot")
    bundle = sub.add_parser(
        "bundle-wheels", help="make a wheelhouse for `agent install --wheels` on devices without internet",
        description="On a host with internet, from a source checkout: write into --out every wheel the agent needs "
        "on a device of --platform (edgefleet's own wheel built from the checkout, the agent's dependencies and "
        "the chosen runtimes, binary wheels for glibc 2.17..2.36 and CPython --python-version) and "
        "edgefleet-wheels.json (the platform, the Python version, each file's sha256). Copy DIR to the device "
        "and run `edgefleet agent install --wheels DIR ...` there. 32-bit ARM (armv7/armhf) is not a platform: "
        "PyPI has no runtime wheels for it.")
    bundle.add_argument("--platform", required=True, help="aarch64 (arm64) or x86_64 (amd64)")
    bundle.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="the wheelhouse directory (new, empty, or an earlier wheelhouse: replaced)")
    bundle.add_argument("--runtimes", default="onnxruntime", metavar="LIST",
                        help="comma-separated: onnxruntime (always), tflite, openvino (default onnxruntime)")
    bundle.add_argument("--python-version", default="3.11", metavar="X.Y",
                        help="the device's CPython (default 3.11: Debian 12 / Raspberry Pi OS bookworm)")
    uninstall = sub.add_parser(
        "uninstall", help="stop and remove the service and the venv (root)",
        description="Stop and disable the service, remove the unit and /opt/edgefleet; with --purge also "
        "/etc/edgefleet, /var/lib/edgefleet, the edgefleet user and the edgefleet-api group.",
    )
    uninstall.add_argument("--purge", action="store_true", help="also remove the config, the state and the user")
    uninstall.add_argument("--root", default="/", type=Path, help="uninstall from under this directory")
    trust = sub.add_parser(
        "trust", help="the release keys whose signed bundles this device runs: list, add, remove",
        description="The device's trust store: the release keys (*.pub) in the config's trust_dir (default "
        "/etc/edgefleet/trust, root-owned, read-only to the agent), and keys the controller passed on as statements "
        "signed by a trusted key (state_dir/trust.json). The agent reads it at every update: a key added or removed "
        "counts from the next bundle on, without a restart. A device that trusts no key refuses every bundle.")
    tsub = trust.add_subparsers(dest="trust_cmd", required=True, metavar="COMMAND")
    tlist = tsub.add_parser("list", help="the trusted and removed keys: key id, name, source")
    tadd = tsub.add_parser("add", help="trust a release key: copy KEY.pub into trust_dir (root)")
    tadd.add_argument("pub", type=Path, metavar="KEY.pub", help="the public key (from `edgefleet keys generate`)")
    tremove = tsub.add_parser("remove", help="stop trusting a release key: delete its file from trust_dir (root)")
    tremove.add_argument("key", metavar="KEYID", help="the key's id (or its name), as `agent trust list` shows")
    for t in (tlist, tadd, tremove):
        t.add_argument("--config", type=Path, default=Path(CONFIG),
                       help=f"the agent's TOML config, for its trust_dir and state_dir (default {CONFIG})")
        t.add_argument("--json", action="store_true", help="print the result as JSON")
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


def _token(token: str | None) -> str | None:
    if token == "-":
        token = sys.stdin.readline().strip()
        if not token:
            raise EdgefleetError("--token -: nothing on stdin")
    return token


def _enroll(args: argparse.Namespace) -> int:
    import time

    from agent import config, identity, trustdir

    cfg = config.load(args.config)
    existing = identity.Identity.load(cfg.state_dir)
    if existing is not None and not args.force:
        raise EdgefleetError(f"already enrolled as {existing.device_id} (certificate until "
                             f"{identity.utc(existing.not_after)}); --force enrolls again")
    # the keys first: a bad key file, or a trust_dir this user cannot write, is refused before the token is spent
    added = [(key, *trustdir.add(cfg.trust_dir, key)) for key in trustdir.read_keys(args.trust)]
    ident = identity.enroll(cfg.state_dir, args.controller, _token(args.token), args.ca_fingerprint,
                            args.device_id or cfg.device_id)
    doc = {"device_id": ident.device_id, "broker": ident.broker, "controller": ident.controller,
           "ca_fingerprint": ident.ca_fingerprint, "not_after": ident.not_after,
           "identity": str(ident.root),
           "trust": [{"keyid": k.keyid, "name": k.name, "path": str(p)} for k, p, _ in added]}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"enrolled as {ident.device_id}: key and certificate in {ident.root} (valid until "
              f"{identity.utc(ident.not_after)}, {identity.expires_in(ident, time.time())}); broker {ident.broker}")
        for key, path, new in added:
            print(f"trusts release key {key.name} ({key.keyid}): {path}{'' if new else ' (there already)'}")
    if not trustdir.trusted_files(Path(cfg.trust_dir)):
        print(f"warning: {NO_TRUST}", file=sys.stderr)
    return 0


def _trust(args: argparse.Namespace) -> int:
    from agent import config, trust, trustdir

    cfg = config.load(args.config)
    store = trust.for_config(cfg)
    if args.trust_cmd == "add":
        key = trustdir.read_keys([args.pub])[0]
        path, new = trustdir.add(cfg.trust_dir, key)
        doc = {"keyid": key.keyid, "name": key.name, "path": str(path), "added": new}
        text = (f"trusts release key {key.name} ({key.keyid}): {path}" if new else
                f"release key {key.keyid} is trusted already: {path}")
    elif args.trust_cmd == "remove":
        gone = trustdir.remove(cfg.trust_dir, args.key)
        if not gone:
            rows = store.listing()
            row = next((r for r in rows if args.key in (r["keyid"], r["name"]) and r["trusted"]), None)
            if row is not None:
                raise EdgefleetError(f"release key {row['keyid']} was added by a {row['source']} passed on by the "
                                     f"controller, not by a file in {cfg.trust_dir}: remove it fleet-wide with "
                                     f"`edgefleet fleet keys remove {row['keyid']}`")
            have = ", ".join(f"{r['keyid']} ({r['name']})" for r in rows if r["trusted"]) or "none"
            raise EdgefleetError(f"no trusted release key {args.key} in {cfg.trust_dir} (trusted: {have})")
        doc = {"removed": [{"keyid": k.keyid, "name": k.name, "path": str(p)} for p, k in gone]}
        text = "\n".join(f"removed release key {k.name} ({k.keyid}): deleted {p}; bundles signed by it are refused "
                         f"from the next update on" for p, k in gone)
    else:
        rows = store.listing()
        doc = {"trust_dir": cfg.trust_dir, "keys": rows, "problems": store.problems}
        width = max([len(r["name"]) for r in rows] + [4])
        text = "\n".join([f"{'KEYID':<16}  {'NAME':<{width}}  STATE    SOURCE"] +
                         [f"{r['keyid']:<16}  {r['name'] or '-':<{width}}  {'trusted' if r['trusted'] else 'removed':<7}"
                          f"  {r['source']}" for r in rows]) if rows else f"no trusted release key in {cfg.trust_dir}"
    print(json.dumps(doc, indent=2) if args.json else text)
    trusted = any(r["trusted"] for r in store.listing())
    for line in store.problems:
        print(f"warning: {line}", file=sys.stderr)
    if not trusted:
        print(f"warning: {NO_TRUST}", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "run":
        from agent import config
        from agent.daemon import Agent

        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        Agent(config.load(args.config)).run(config_path=args.config)
        return 0
    if args.cmd in ("install", "uninstall"):
        from agent import install

        def say(line: str) -> None:
            print(f"{args.cmd}: {line}", flush=True)

        if args.cmd == "uninstall":
            install.uninstall(root=args.root, purge=args.purge, say=say)
            return 0
        install.install(root=args.root, device_id=args.device_id, broker=args.broker, controller=args.controller,
                        api=args.api, telemetry_interval=args.telemetry_interval, config_file=args.config_file,
                        force=args.force, source=args.source, extras=args.extras, python=args.python,
                        token=_token(args.token), ca_fingerprint=args.ca_fingerprint, trust=args.trust,
                        wheels=args.wheels, accelerators=args.accelerators, say=say)
        return 0
    if args.cmd == "bundle-wheels":
        from agent import wheels

        wheels.bundle(platform=args.platform, out=args.out, python=args.python_version,
                      runtimes=[r.strip() for r in args.runtimes.split(",") if r.strip()],
                      say=lambda line: print(f"bundle-wheels: {line}", flush=True))
        return 0
    if args.cmd == "enroll":
        return _enroll(args)
    if args.cmd == "trust":
        return _trust(args)
    if args.cmd == "devices":
        from agent import runtimes

        found = runtimes.devices()
        if args.json:
            print(json.dumps(found))
        else:
            for name, devs in found.items():
                print(f"{name:<12} {', '.join(devs) or '(none)'}")
            if not found:
                print("no runtime is installed: pip install 'edgefleet[agent]' (or [openvino], [litert])")
        return 0
    from agent.api import AgentClient

    client = AgentClient(args.api, token=args.token or os.environ.get("EDGEFLEET_AGENT_TOKEN") or None)
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
