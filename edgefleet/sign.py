"""`edgefleet sign`: sign an existing bundle with a release key (a CI that converts on one host and signs on
another). Every file is checked against the manifest first; the result is written atomically, so a refused
bundle leaves the original as it was."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgefleet.keys import PASSPHRASE_HELP, load_signing_key


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgefleet sign", description="Sign a bundle: check every file against its manifest, set the "
        "manifest's serial, and add (or replace) manifest.sig, an ed25519 signature over the exact manifest bytes "
        "with the key's id. Devices run, and the controller accepts, only bundles signed by a key they trust.")
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="the bundle (.tar) to sign; signed in place unless "
                   "--out")
    p.add_argument("--key", required=True, type=Path, metavar="KEY", help="the release key's private key (NAME.key)")
    p.add_argument("--serial", type=int, metavar="N", help="the manifest's serial: must grow with every release of a "
                   "model name (a device refuses a lower one than it ran). Default: the one the bundle has, else "
                   "the time in seconds")
    p.add_argument("--out", type=Path, metavar="OUT", help="write the signed bundle here instead")
    p.add_argument("--passphrase-file", type=Path, metavar="FILE", help=PASSPHRASE_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: list[str]) -> int:
    from agent import bundle, signing

    args = _parser().parse_args(argv)
    if args.serial is not None and not 1 <= args.serial <= 2**53:
        raise signing.SigningError(f"--serial {args.serial}: give a positive integer")
    before = bundle.read_signed(args.bundle)  # a cheap look first: not a bundle -> no passphrase asked
    key = load_signing_key(args.key, args.passphrase_file)
    kid = signing.keyid(key.public_key())
    sha, manifest = bundle.sign_bundle(args.bundle, key, out=args.out, serial=args.serial)
    out = args.out or args.bundle
    replaced = None
    if before.sig is not None:
        try:
            replaced = signing.decode_manifest_sig(before.sig).keyid
        except signing.SigningError:
            replaced = "an unreadable signature"
    doc = {"bundle": str(out), "sha256": sha, "serial": manifest.serial, "keyid": kid, "name": manifest.name,
           "version": manifest.version, "replaced": replaced}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        was = f" (replacing the signature by {replaced})" if replaced and replaced != kid else ""
        print(f"signed {out}: {manifest.name} {manifest.version}, serial {manifest.serial}, release key {kid}{was}")
        print(f"sha256 {sha}")
    return 0
