"""The device's trust store: which release keys may sign the bundles it runs.

Two sources, evaluated on every verification (so a key file removed is refused from the next update on):

- ``trust_dir`` (default ``/etc/edgefleet/trust``): ``*.pub`` files put there by root (``agent enroll`` /
  ``agent install --trust KEY.pub``); the agent only reads them;
- ``state_dir/trust.json``: trust statements the controller passed on in a signed ``desired``
  (``agent.protocol.TrustStatement``), kept once they verified. An ``add`` must be signed by a release key
  trusted at that point (a rotation: the old key vouches for the new); a ``remove`` by a trusted release key
  or by the controller's key (removing trust can only stop updates, which a controller can do anyway).
  Statements apply in time order, starting from the keys in ``trust_dir``.

A bundle is trusted when its ``manifest.sig`` names a trusted key and verifies over the exact bytes of its
``manifest.json`` (agent/signing.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from agent import protocol, signing
from agent.errors import EdgefleetError
from agent.files import write_atomic

log = logging.getLogger("edgefleet.agent.trust")

DEFAULT_DIR = "/etc/edgefleet/trust"
STATEMENTS = "trust.json"
MAX_KEYS = 64


class Untrusted(EdgefleetError):
    """A bundle or statement that no trusted key signed; the message says why."""


@dataclass(frozen=True)
class Trusted:
    key: signing.PublicKey
    source: str  # the .pub file, or "statement by KEYID"
    since: float | None = None  # a statement's time

    @property
    def keyid(self) -> str:
        return self.key.keyid

    @property
    def name(self) -> str:
        return self.key.name


class TrustStore:
    def __init__(self, trust_dir: str | os.PathLike, state_dir: str | os.PathLike | None = None,
                 controller: Callable[[], signing.PublicKey | None] = lambda: None) -> None:
        self.dir = Path(trust_dir)
        self.controller = controller  # the controller's public key (it may sign removals), read when needed
        self.file = Path(state_dir) / STATEMENTS if state_dir is not None else None
        self.problems: list[str] = []  # what could not be read or did not verify, at the last load

    # --- reading ---------------------------------------------------------------------------------
    def roots(self) -> dict[str, Trusted]:
        """The keys in trust_dir. A file that is not an ed25519 public key is skipped (and named in problems)."""
        out: dict[str, Trusted] = {}
        try:
            files = sorted(p for p in self.dir.iterdir() if p.suffix == ".pub")[:MAX_KEYS]
        except FileNotFoundError:
            return out
        except OSError as e:
            self.problems.append(f"cannot read {self.dir}: {e.strerror or e}")
            return out
        for p in files:
            try:
                key = signing.load_public(p)
            except signing.SigningError as e:
                self.problems.append(str(e))
                continue
            out.setdefault(key.keyid, Trusted(key, str(p)))
        return out

    def statements(self) -> list[protocol.TrustStatement]:
        if self.file is None:
            return []
        try:
            data = self.file.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            self.problems.append(f"cannot read {self.file}: {e.strerror or e}")
            return []
        try:
            return msgspec.json.decode(data, type=list[protocol.TrustStatement])
        except (msgspec.DecodeError, RecursionError) as e:
            self.problems.append(f"{self.file} is not valid ({e}); its statements are ignored")
            return []

    def evaluate(self, statements: list[protocol.TrustStatement] | None = None
                 ) -> tuple[dict[str, Trusted], dict[str, protocol.TrustStatement]]:
        """(trusted keys, removed key ids -> the statement that removed them): trust_dir's keys, then the
        statements that verify, in time order."""
        keys, removed, _ = self._evaluate(statements)
        return keys, removed

    def _evaluate(self, statements):
        self.problems = []
        controller = self.controller()
        keys = self.roots()
        removed: dict[str, protocol.TrustStatement] = {}
        applied: list[protocol.TrustStatement] = []
        for st in sorted(self.statements() if statements is None else statements, key=lambda s: s.time):
            why = _check(st, keys, controller)
            if why:
                self.problems.append(why)
                continue
            applied.append(st)
            if st.op == "add":
                keys[st.keyid] = Trusted(signing.parse_public(st.key, st.name, "statement key"),
                                         f"statement by {st.by}", st.time)
                removed.pop(st.keyid, None)
            else:
                keys.pop(st.keyid, None)
                removed[st.keyid] = st
        return keys, removed, applied

    # --- verifying ---------------------------------------------------------------------------------
    def verify_manifest(self, manifest_bytes: bytes, sig: bytes | None) -> Trusted:
        """The trusted key whose signature ``sig`` (manifest.sig) is over exactly ``manifest_bytes``; Untrusted
        names why not."""
        if sig is None:
            raise Untrusted("bundle is not signed (it has no manifest.sig): sign it with `edgefleet sign`")
        try:
            ms = signing.decode_manifest_sig(sig)
        except signing.SigningError as e:
            raise Untrusted(str(e)) from None
        keys, removed = self.evaluate()
        key = keys.get(ms.keyid)
        if key is None:
            if ms.keyid in removed:
                raise Untrusted(f"bundle is signed by release key {ms.keyid}, which was removed from this "
                                f"device's trust store")
            if not keys:
                raise Untrusted(f"bundle is signed by release key {ms.keyid}, but this device trusts no "
                                f"release key (none in {self.dir})")
            raise Untrusted(f"bundle is signed by release key {ms.keyid}, which this device does not trust "
                            f"(it trusts {', '.join(sorted(keys))})")
        if not key.key.verify(ms.sig, manifest_bytes):
            raise Untrusted(f"manifest.sig does not verify with release key {key.name} ({ms.keyid}): the "
                            f"manifest was changed after signing, or the signature is another manifest's")
        return key

    # --- updating ----------------------------------------------------------------------------------
    def update(self, statements: list[protocol.TrustStatement]) -> list[str]:
        """Keep the statements among ``statements`` that are new and verify (in order, from what is trusted
        now); returns what changed, one line each. Writes state_dir/trust.json atomically when it changed."""
        if self.file is None or not statements:
            return []
        have = self.statements()
        seen = {s.sig for s in have}
        new = [s for s in statements if s.sig not in seen]
        if not new:
            return []
        before, before_removed = self.evaluate(have)
        keys, removed, applied = self._evaluate(have + new)
        for why in self.problems:
            log.warning("ignored: %s", why)
        changes = [f"trusts release key {keys[k].name} ({k}), vouched for by {keys[k].source.split()[-1]}"
                   for k in keys if k not in before]
        changes += [f"no longer trusts release key {k}" for k in removed if k not in before_removed]
        if [s.sig for s in applied] != [s.sig for s in sorted(have, key=lambda s: s.time)]:
            self._write(applied)  # only what verified is kept
        return changes

    def _write(self, statements: list[protocol.TrustStatement]) -> None:
        try:
            write_atomic(self.file, msgspec.json.encode(statements), 0o644)
        except OSError as e:  # a full or read-only state dir: applied now, kept on disk once it takes writes
            log.warning("cannot write %s (%s)", self.file, e.strerror or e)

    def listing(self) -> list[dict]:
        """Every trusted and removed key, for `agent trust list`."""
        keys, removed = self.evaluate()
        rows = [{"keyid": k.keyid, "name": k.name, "trusted": True, "source": k.source} for k in keys.values()]
        rows += [{"keyid": kid, "name": "", "trusted": False, "source": f"removed by {st.by}"}
                 for kid, st in removed.items()]
        return rows


def _check(st: protocol.TrustStatement, keys: dict[str, Trusted], controller: signing.PublicKey | None) -> str:
    """Why ``st`` does not apply given the keys trusted at its turn ('' if it does)."""
    signer = keys.get(st.by)
    if signer is None and st.op == "remove" and controller is not None and st.by == controller.keyid:
        signer = Trusted(controller, "controller")
    if signer is None:
        return f"a trust statement ({st.op} {st.keyid}) is signed by {st.by or 'nobody'}, not a trusted key"
    if not signer.key.verify(st.sig, signing.statement_bytes(st)):
        return f"a trust statement ({st.op} {st.keyid}) does not verify with key {st.by}"
    if st.op == "add":
        if st.key is None:
            return f"a trust statement adds {st.keyid} without its key"
        try:
            key = signing.parse_public(st.key, st.name, "statement key")
        except signing.SigningError as e:
            return str(e)
        if key.keyid != st.keyid:
            return f"a trust statement adds {st.keyid} with a key whose id is {key.keyid}"
    return ""


def controller_key(cfg) -> signing.PublicKey | None:
    """The controller's public key for an AgentConfig: its ``controller_key``, else the one the enrollment gave
    (state_dir/identity/controller.pub); None when there is none (an error is logged for a bad file)."""
    from agent import identity

    path = (Path(cfg.controller_key) if cfg.controller_key else
            Path(cfg.state_dir) / identity.DIR / identity.CONTROLLER_KEY)
    try:
        return signing.load_public(path)
    except signing.SigningError as e:
        if path.exists() or cfg.controller_key:
            log.error("%s", e)
        return None


def for_config(cfg) -> TrustStore:
    """The trust store of the device this AgentConfig describes."""
    return TrustStore(cfg.trust_dir, cfg.state_dir, controller=lambda: controller_key(cfg))
