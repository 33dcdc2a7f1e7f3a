"""`edgefleet keys`: make, show and rotate release keys (ed25519; agent/signing.py does the cryptography).

A release key signs bundles (``edgefleet sign``, ``edgefleet convert --sign-key``). Its private half stays on
the host that signs (a CI or a laptop), never on the controller; its public half goes into each device's trust
store (``agent install/enroll --trust``, ``agent trust add``) and the fleet's list (``fleet keys add``).

Passphrases, for a key that has one: ``--passphrase-file FILE`` (its first line), else
$EDGEFLEET_KEY_PASSPHRASE, else a prompt, but only when stdin is a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from agent.errors import EdgefleetError

PASSPHRASE_HELP = ("a file whose first line is the key's passphrase (default: $EDGEFLEET_KEY_PASSPHRASE, else a "
                   "prompt when stdin is a terminal)")


def read_passphrase(path: str | os.PathLike) -> bytes:
    """The first line of ``path``, without its line ending; an empty one is refused."""
    from agent.signing import SigningError

    try:
        with open(path, "rb") as f:
            line = f.readline(4096).rstrip(b"\r\n")
    except OSError as e:
        raise SigningError(f"cannot read passphrase file {path}: {e.strerror or e}") from None
    if not line:
        raise SigningError(f"passphrase file {path} is empty")
    return line


def passphrase_for_new_key(passphrase_file: str | os.PathLike | None) -> bytes | None:
    from agent.signing import PASSPHRASE_ENV

    if passphrase_file is not None:
        return read_passphrase(passphrase_file)
    return os.environ.get(PASSPHRASE_ENV, "").encode() or None


def load_signing_key(path: str | os.PathLike, passphrase_file: str | os.PathLike | None = None):
    """The ed25519 private key in ``path``: decrypted with --passphrase-file, $EDGEFLEET_KEY_PASSPHRASE or (only
    when stdin is a terminal) a prompt. A key that cannot be used is one SigningError line."""
    from agent.signing import PASSPHRASE_ENV, load_private

    passphrase = read_passphrase(passphrase_file) if passphrase_file is not None else None
    if passphrase is None and not os.environ.get(PASSPHRASE_ENV) and _encrypted(path) and sys.stdin.isatty():
        import getpass

        passphrase = getpass.getpass(f"passphrase for {path}: ").encode() or None
    return load_private(path, passphrase)


def _encrypted(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return b"ENCRYPTED PRIVATE KEY" in f.read(64 << 10)
    except OSError:
        return False  # load_private names the problem


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefleet keys", description="Release keys: the ed25519 keys that sign "
                                "bundles. The private key stays where bundles are signed; devices and the fleet "
                                "get the public one.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="make a release key pair: DIR/NAME.key (0600) and DIR/NAME.pub",
                         description="Make an ed25519 key pair: DIR/NAME.key (PKCS#8 PEM, 0600; encrypted with a "
                         "passphrase from --passphrase-file or $EDGEFLEET_KEY_PASSPHRASE when given) and DIR/NAME.pub "
                         "(the public key, for `agent trust add`, `agent install --trust` and `fleet keys add`). "
                         "Refuses to overwrite either file.")
    gen.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write the two files")
    gen.add_argument("--name", default="release", help="the key's name: the files' stem (default release)")
    gen.add_argument("--passphrase-file", type=Path, metavar="FILE",
                     help="encrypt the private key with the first line of FILE (default: $EDGEFLEET_KEY_PASSPHRASE "
                     "if set, else unencrypted)")
    gen.add_argument("--json", action="store_true", help="print the paths and key id as JSON")
    show = sub.add_parser("show", help="print a public key's name and key id",
                          description="Print the name (the file's stem) and the key id (16 hex digits of the "
                          "sha256 of the raw public key: what manifest.sig and `agent trust list` name).")
    show.add_argument("pub", type=Path, metavar="PUB", help="a public key file (NAME.pub)")
    show.add_argument("--json", action="store_true", help="print it as JSON (with the PEM)")
    rot = sub.add_parser("rotate", help="write a statement by which an old release key vouches for a new one",
                         description="Sign, with the old release key (one devices trust now), a statement that "
                         "devices should trust NEW.pub too. `edgefleet fleet keys add NEW.pub --statement FILE` "
                         "passes it on to the devices, which then accept bundles signed by either key. Remove the old "
                         "key afterwards with `edgefleet fleet keys remove`.")
    rot.add_argument("--key", required=True, type=Path, metavar="OLD.key", help="the old (trusted) private key")
    rot.add_argument("--new", required=True, type=Path, metavar="NEW.pub", help="the new public key")
    rot.add_argument("--out", required=True, type=Path, metavar="FILE", help="where to write the statement (JSON)")
    rot.add_argument("--passphrase-file", type=Path, metavar="FILE", help=PASSPHRASE_HELP)
    rot.add_argument("--json", action="store_true", help="print the statement's summary as JSON")
    return p


def _generate(args: argparse.Namespace) -> int:
    from agent import signing

    passphrase = passphrase_for_new_key(args.passphrase_file)
    key_path, pub_path = signing.generate(args.out, args.name, passphrase)
    pub = signing.load_public(pub_path)
    doc = {"key": str(key_path), "pub": str(pub_path), "name": pub.name, "keyid": pub.keyid,
           "encrypted": passphrase is not None}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"private key {key_path} (0600, {'encrypted' if passphrase else 'not encrypted'}): keep it where bundles "
          f"are signed, never on the controller")
    print(f"public key  {pub_path}: give it to devices (agent trust add) and the fleet (fleet keys add)")
    print(f"key id      {pub.keyid}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from agent import signing

    pub = signing.load_public(args.pub)
    if args.json:
        print(json.dumps({"name": pub.name, "keyid": pub.keyid, "path": str(args.pub), "pem": pub.pem}, indent=2))
    else:
        print(f"{pub.name}  {pub.keyid}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    import msgspec

    from agent import signing

    new = signing.load_public(args.new)  # the cheap check first: no passphrase asked for a wrong --new
    old = load_signing_key(args.key, args.passphrase_file)
    old_id = signing.keyid(old.public_key())
    if old_id == new.keyid:
        raise signing.SigningError(f"{args.new} is the public half of {args.key}: rotate to a new key "
                                   f"(edgefleet keys generate)")
    statement = signing.add_statement(old, new, time.time())
    _write_atomic(args.out, msgspec.json.encode(statement) + b"\n")
    if args.json:
        print(json.dumps({"statement": str(args.out), "op": "add", "keyid": new.keyid, "name": new.name,
                          "by": old_id, "time": statement.time}, indent=2))
    else:
        print(f"wrote {args.out}: release key {old_id} vouches for {new.name} ({new.keyid}); pass it on with "
              f"`edgefleet fleet keys add {args.new} --statement {args.out}`")
    return 0


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise EdgefleetError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return {"generate": _generate, "show": _show, "rotate": _rotate}[args.cmd](args)
