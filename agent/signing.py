"""Ed25519 signatures: release keys over bundle manifests, trust statements, and the controller's signature
over every ``desired`` and ``cmd``. The agent verifies; the converter, ``edgefleet sign``/``keys`` and the
controller sign. Only the ``cryptography`` package is used.

Files (PEM, readable by ``openssl pkey``):

- ``NAME.key``: the private key, PKCS#8, 0600, optionally encrypted with a passphrase;
- ``NAME.pub``: the public key, SubjectPublicKeyInfo. Its *key id* is the first 16 hex digits of the sha256
  of the 32 raw public-key bytes; its *name* is the file's stem.

What is signed (each its own context, so that a signature made for one can never pass for another):

- a bundle: the exact bytes of ``manifest.json`` as they are in the tar; ``manifest.sig`` holds
  ``{"v": 1, "keyid": ..., "sig": base64}`` (:class:`ManifestSig`);
- a trust statement (:class:`agent.protocol.TrustStatement`): ``b"edgefleet trust v1\\n"`` + its JSON
  with sorted keys and ``sig`` empty;
- a ``desired`` / ``cmd``: ``b"edgefleet desired v1\\n"`` / ``b"edgefleet cmd v1\\n"`` + the message's JSON
  with sorted keys and ``sig`` empty (:func:`message_bytes`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent import protocol
from agent.errors import EdgefleetError
from agent.files import write_new

SIG = "manifest.sig"
MAX_SIG_BYTES = 4096
KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TRUST_CONTEXT = b"edgefleet trust v1\n"
CONTEXTS = {protocol.Desired: b"edgefleet desired v1\n", protocol.Cmd: b"edgefleet cmd v1\n"}
PASSPHRASE_ENV = "EDGEFLEET_KEY_PASSPHRASE"


class SigningError(EdgefleetError):
    """A key that cannot be read or made, or a signature that does not verify; the message says which."""


class ManifestSig(msgspec.Struct, forbid_unknown_fields=True):
    keyid: protocol.KeyId
    sig: protocol.Signature
    algorithm: str = "ed25519"
    v: int = 1


def keyid(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@dataclass(frozen=True)
class PublicKey:
    """A public key with its id and a name (a file's stem, or what a statement called it)."""

    name: str
    key: Ed25519PublicKey

    @property
    def keyid(self) -> str:
        return keyid(self.key)

    @property
    def pem(self) -> str:
        return public_pem(self.key)

    def verify(self, signature: str, data: bytes) -> bool:
        try:
            self.key.verify(_unb64(signature), data)
            return True
        except (InvalidSignature, ValueError):
            return False


def parse_public(pem: str | bytes, name: str, where: str = "public key") -> PublicKey:
    """An ed25519 public key from PEM text; SigningError names ``where`` when it is not one."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise SigningError(f"{where} is not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{where} is a {type(key).__name__.lstrip('_')}, not an ed25519 public key")
    return PublicKey(name, key)


def load_public(path: str | os.PathLike) -> PublicKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SigningError(f"cannot read public key {path}: {e.strerror or e}") from None
    return parse_public(data, path.stem if path.suffix == ".pub" else path.name, str(path))


def load_private(path: str | os.PathLike, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """The private key in ``path``; an encrypted one takes ``passphrase`` (default: $EDGEFLEET_KEY_PASSPHRASE)."""
    path = Path(path)
    if passphrase is None and os.environ.get(PASSPHRASE_ENV):
        passphrase = os.environ[PASSPHRASE_ENV].encode()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SigningError(f"cannot read key {path}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError:
        if passphrase:
            raise SigningError(f"key {path} is not encrypted: give no passphrase") from None
        raise SigningError(f"key {path} is encrypted: give its passphrase (--passphrase-file, or "
                           f"${PASSPHRASE_ENV})") from None
    except ValueError as e:
        if b"ENCRYPTED" in data:
            raise SigningError(f"key {path}: wrong passphrase") from None
        raise SigningError(f"key {path} is not a PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"key {path} is a {type(key).__name__.lstrip('_')}, not an ed25519 private key")
    return key


def generate(out_dir: str | os.PathLike, name: str, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """Make ``out_dir/NAME.key`` (0600, encrypted when a passphrase is given) and ``out_dir/NAME.pub``; refuses
    to overwrite either. Returns their paths."""
    if not KEY_NAME_RE.fullmatch(name or ""):
        raise SigningError(f"invalid key name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (key_path, pub_path):
        if p.exists():
            raise SigningError(f"{p} already exists: choose another --name or --out")
    key = Ed25519PrivateKey.generate()
    enc = (serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    write_private(key_path, pem)
    write_new(pub_path, public_pem(key.public_key()).encode(), 0o644)
    return key_path, pub_path


def write_private(path: Path, pem: bytes) -> None:
    write_new(path, pem, 0o600)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


# --- bundles -----------------------------------------------------------------------------------------
def sign_manifest(key: Ed25519PrivateKey, manifest_bytes: bytes) -> bytes:
    """``manifest.sig`` for these exact manifest bytes."""
    sig = ManifestSig(keyid=keyid(key.public_key()), sig=b64(key.sign(manifest_bytes)))
    return msgspec.json.encode(sig) + b"\n"


def decode_manifest_sig(data: bytes) -> ManifestSig:
    if len(data) > MAX_SIG_BYTES:
        raise SigningError(f"{SIG} is {len(data)} bytes, more than {MAX_SIG_BYTES}")
    try:
        sig = msgspec.json.decode(data, type=ManifestSig)
    except (msgspec.DecodeError, RecursionError) as e:
        raise SigningError(f"{SIG} is not valid: {e}") from None
    if sig.v != 1 or sig.algorithm != "ed25519":
        raise SigningError(f"{SIG}: unsupported signature (v {sig.v}, {sig.algorithm})")
    return sig


# --- messages and statements ---------------------------------------------------------------------------
_SORTED = msgspec.json.Encoder(order="sorted")


def message_bytes(msg: protocol.Desired | protocol.Cmd) -> bytes:
    """What the controller signs for a desired or a cmd: its context and its JSON (sorted keys, no signature)."""
    return CONTEXTS[type(msg)] + _SORTED.encode(msgspec.structs.replace(msg, sig=""))


def sign_message(key: Ed25519PrivateKey, msg):
    """``msg`` (a Desired or Cmd with its device, counter and expiry set) with ``keyid`` and ``sig`` filled in."""
    msg = msgspec.structs.replace(msg, keyid=keyid(key.public_key()), sig="")
    return msgspec.structs.replace(msg, sig=b64(key.sign(message_bytes(msg))))


def statement_bytes(st: protocol.TrustStatement) -> bytes:
    return TRUST_CONTEXT + _SORTED.encode(msgspec.structs.replace(st, sig=""))


def sign_statement(key: Ed25519PrivateKey, st: protocol.TrustStatement) -> protocol.TrustStatement:
    st = msgspec.structs.replace(st, by=keyid(key.public_key()), sig="")
    return msgspec.structs.replace(st, sig=b64(key.sign(statement_bytes(st))))


def add_statement(signer: Ed25519PrivateKey, new: PublicKey, time: float) -> protocol.TrustStatement:
    """A statement by ``signer`` (a release key devices trust) that devices should trust ``new`` too."""
    return sign_statement(signer, protocol.TrustStatement(op="add", keyid=new.keyid, name=new.name, key=new.pem,
                                                          time=time))


def remove_statement(signer: Ed25519PrivateKey, key_id: str, time: float) -> protocol.TrustStatement:
    """A statement by ``signer`` (a release key, or the controller's key) that devices stop trusting ``key_id``."""
    return sign_statement(signer, protocol.TrustStatement(op="remove", keyid=key_id, time=time))
