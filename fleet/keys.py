"""The release keys the fleet accepts bundles from, and the trust statements it pushes to devices.

A release key lives on a build host, never here: the fleet keeps only public keys (``release_keys`` in the
store). ``edgefleet fleet keys add KEY.pub [--statement FILE]`` lists one; with a statement (made offline by
``edgefleet keys rotate``: the old key's signed word that devices should trust the new one) the statement must
be for that key and verify with a key the fleet lists, and it then goes to every device in each desired's
``trust`` list. ``remove`` marks a key removed and adds the controller's signed ``remove`` statement. After
either, every device whose desired carried another trust list gets its desired signed again and republished.

``check_upload`` is the upload policy: a bundle must be signed (``manifest.sig``) by a listed, unremoved key and
the signature must verify over its exact manifest bytes, unless the controller runs with ``--allow-unsigned``
(for experiments; a signature present is still checked: one from a listed key that does not verify is refused).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from agent import protocol, signing
from agent.errors import EdgefleetError

if TYPE_CHECKING:
    from fleet.signer import Signer
    from fleet.store import Store

log = logging.getLogger("edgefleet.fleet.keys")

SIGN_HINT = "sign it with `edgefleet sign BUNDLE --key KEY`"


class KeysError(EdgefleetError):
    """A refused key operation or upload; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def view(row: dict[str, Any]) -> dict[str, Any]:
    """A key as the API shows it."""
    return {"keyid": row["keyid"], "name": row["name"], "pem": row["pem"], "added": row["added"],
            "removed": row["removed"], "status": "removed" if row["removed"] is not None else "active",
            "statement": row["statement"], "removal": row["removal"]}


class Keys:
    """List, add and remove release keys. ``republish()`` is called after a change to the trust statements (the
    controller signs every affected device's desired again); it returns how many it published."""

    def __init__(self, store: "Store", signer: "Signer", republish: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.signer = signer
        self.republish = republish
        self.clock = clock

    def list(self) -> list[dict[str, Any]]:
        return [view(r) for r in self.store.release_keys()]

    def _active(self) -> dict[str, dict[str, Any]]:
        return {r["keyid"]: r for r in self.store.release_keys(include_removed=False)}

    def add(self, pem: str, name: str | None = None, statement: Any = None) -> dict[str, Any]:
        """List the public key ``pem`` (a PEM string); ``statement``: a signed ``add`` statement (a dict) that
        devices get to learn the key. Returns the key, and ``republished``: how many desireds went out again."""
        key = _parse(pem)
        st = _statement(statement) if statement is not None else None
        if st is not None:
            self._check_statement(st, key)
        name = name or (st.name if st is not None else f"key-{key.keyid[:8]}")
        if not signing.KEY_NAME_RE.fullmatch(name):
            raise KeysError(f"invalid key name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        old = self.store.release_key(key.keyid)
        if old is not None:
            if old["removed"] is not None:
                raise KeysError(f"key {old['name']} ({key.keyid}) was removed from this fleet on "
                                f"{_when(old['removed'])} and devices were told so: a removal is final, make a new "
                                f"key with `edgefleet keys generate`", 409)
            raise KeysError(f"key {old['name']} ({key.keyid}) is already listed", 409)
        doc = msgspec.to_builtins(st) if st is not None else None
        self.store.add_release_key(key.keyid, name, key.pem, self.clock(), doc)
        log.info("release key %s (%s) listed%s", name, key.keyid, " with a trust statement" if st else "")
        n = self.republish() if st is not None and self.republish else 0
        return {**view(self.store.release_key(key.keyid)), "republished": n}

    def remove(self, keyid: str) -> dict[str, Any]:
        """Stop accepting bundles signed by ``keyid``; devices get the controller's signed removal."""
        row = self.store.release_key(keyid)
        if row is None:
            raise KeysError(f"no release key {keyid!r} is listed: see `edgefleet fleet keys list`", 404)
        if row["removed"] is not None:
            raise KeysError(f"key {row['name']} ({keyid}) was removed already, on {_when(row['removed'])}", 409)
        now = self.clock()
        st = self.signer.remove_statement(keyid, now)
        self.store.remove_release_key(keyid, now, msgspec.to_builtins(st))
        log.warning("release key %s (%s) removed: its bundles are refused from now on", row["name"], keyid)
        n = self.republish() if self.republish else 0
        return {**view(self.store.release_key(keyid)), "republished": n}

    def ensure(self, paths: list[str | Path]) -> None:
        """List these public key files if they are not (``fleet serve --release-key``; idempotent). A key that
        was removed stays removed."""
        for path in paths:
            key = signing.load_public(path)
            row = self.store.release_key(key.keyid)
            if row is None:
                self.store.add_release_key(key.keyid, key.name, key.pem, self.clock())
                log.info("release key %s (%s) listed from %s", key.name, key.keyid, path)
            elif row["removed"] is not None:
                log.warning("release key %s (%s) from %s was removed from this fleet: it stays removed", key.name,
                            key.keyid, path)

    def _check_statement(self, st: protocol.TrustStatement, key: signing.PublicKey) -> None:
        if st.op != "add":
            raise KeysError(f"the statement is a {st.op!r} statement: `keys add` takes an 'add' statement "
                            f"(made by `edgefleet keys rotate`)")
        if st.keyid != key.keyid or st.key is None or _parse(st.key).keyid != key.keyid:
            raise KeysError(f"the statement is for key {st.keyid}, not for this key ({key.keyid})")
        signer = self._active().get(st.by)
        if signer is None:
            raise KeysError(f"the statement is signed by key {st.by or '(none)'}, which this fleet does not list "
                            f"(or removed): add that key first, or sign the statement with a listed one")
        if not _parse(signer["pem"]).verify(st.sig, signing.statement_bytes(st)):
            raise KeysError(f"the statement's signature does not verify with key {signer['name']} ({st.by}): it "
                            f"was forged or changed after signing")

    # -- the upload policy ---------------------------------------------------------------------------
    def check_upload(self, sig_bytes: bytes | None, manifest_bytes: bytes,
                     allow_unsigned: bool = False) -> tuple[str | None, str | None]:
        """(key id, key name) of the listed key whose signature over ``manifest_bytes`` verifies; KeysError with
        the reason otherwise. With ``allow_unsigned``: an unsigned bundle or one signed by an unlisted or
        removed key is taken (its key id recorded, no name); a bad signature from a listed key is not."""
        if sig_bytes is None:
            if allow_unsigned:
                return None, None
            raise KeysError(f"bundle is not signed: {SIGN_HINT}")
        try:
            sig = signing.decode_manifest_sig(sig_bytes)
        except signing.SigningError as e:
            raise KeysError(f"bundle signature is unreadable: {e}") from None
        row = self.store.release_key(sig.keyid)
        if row is None or row["removed"] is not None:
            if allow_unsigned:
                return sig.keyid, None
            if row is None:
                raise KeysError(f"bundle is signed by key {sig.keyid}, which this fleet does not list: if you trust "
                                f"it, add its public key with `edgefleet fleet keys add KEY.pub`")
            raise KeysError(f"bundle is signed by key {row['name']} ({sig.keyid}), which was removed from this fleet "
                            f"on {_when(row['removed'])}: {SIGN_HINT} with a current release key")
        if not _parse(row["pem"]).verify(sig.sig, manifest_bytes):
            raise KeysError(f"bundle signature does not verify with key {row['name']} ({sig.keyid}): the manifest "
                            f"was changed after signing, or the signature is another manifest's")
        return sig.keyid, row["name"]


def _parse(pem: str) -> signing.PublicKey:
    try:
        return signing.parse_public(pem, "key", "the key")
    except signing.SigningError as e:
        raise KeysError(str(e)) from None


def _statement(doc: Any) -> protocol.TrustStatement:
    try:
        return msgspec.convert(doc, protocol.TrustStatement)
    except msgspec.ValidationError as e:
        raise KeysError(f"the statement is not a trust statement: {e}") from None
