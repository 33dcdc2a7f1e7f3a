"""The controller's signing key, and the signature on every ``desired`` and ``cmd`` it publishes.

The key is made at the controller's first start, ``DATA/keys/controller.key`` (0600, in a 0700 dir) with its
``controller.pub`` beside it, and kept afterwards; devices get the public key at enrollment
(``fleet.enroll``). ``fleet.link.Link.publish_desired`` / ``publish_cmd`` are the one place messages are
signed: each gets its device id, the time it was issued, an expiry (the desired TTL, ``fleet serve
--desired-ttl``, 1 day by default; 5 minutes for a cmd), a per-device counter that only grows (desired and
cmd alike; persisted, and at least the time in ms, so a restart or a restored database never goes back), the
fleet's trust statements (``fleet.keys``) and the signature (``agent.signing.sign_message``).

A retained desired must not expire on a device that is offline for a while: the store keeps each device's
last desired unsigned, and ``resign()`` (run by the controller's periodic sweep) signs it again and republishes
it when less than half its TTL is left, or when the trust statements changed since it was signed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from agent import protocol, signing

if TYPE_CHECKING:
    from fleet.link import Link
    from fleet.store import Store

log = logging.getLogger("edgefleet.fleet.signer")

KEYS_DIR = "keys"
KEY_NAME = "controller"
DESIRED_TTL_S = 86400.0
CMD_TTL_S = 300.0
MIN_DESIRED_TTL_S = 60.0


def ensure_key(keys_dir: Path) -> signing.Ed25519PrivateKey:
    """The controller's private key in ``keys_dir`` (made there, 0600 in a 0700 dir, when there is none)."""
    keys_dir = Path(keys_dir)
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    key_path, pub_path = keys_dir / f"{KEY_NAME}.key", keys_dir / f"{KEY_NAME}.pub"
    if not key_path.exists():
        pub_path.unlink(missing_ok=True)  # a public key without its private key is of no use
        signing.generate(keys_dir, KEY_NAME)
        log.debug("made the controller's signing key %s", key_path)
    key = signing.load_private(key_path, passphrase=b"")  # never encrypted: the controller signs unattended
    if not pub_path.exists():
        pub_path.write_text(signing.public_pem(key.public_key()))
    return key


def unsigned(msg):
    """``msg`` without what signing fills in: what the store keeps to sign again."""
    fields = dict(device_id=None, time=0.0, expires=0.0, counter=0, keyid="", sig="")
    if isinstance(msg, protocol.Desired):
        fields["trust"] = []
    return msgspec.structs.replace(msg, **fields)


class Signer:
    """Signs desired and cmd messages for one device at a time with the controller's key."""

    def __init__(self, store: "Store", key: signing.Ed25519PrivateKey, desired_ttl_s: float = DESIRED_TTL_S,
                 cmd_ttl_s: float = CMD_TTL_S, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.key = key
        self.desired_ttl_s = float(desired_ttl_s)
        self.cmd_ttl_s = float(cmd_ttl_s)
        self.clock = clock

    @classmethod
    def open(cls, data_dir: Path, store: "Store", **kw) -> "Signer":
        return cls(store, ensure_key(Path(data_dir) / KEYS_DIR), **kw)

    @property
    def public(self) -> signing.PublicKey:
        return signing.PublicKey(KEY_NAME, self.key.public_key())

    @property
    def keyid(self) -> str:
        return self.public.keyid

    @property
    def pem(self) -> str:
        return self.public.pem

    # -- trust statements ---------------------------------------------------------------------------
    def trust(self) -> list[protocol.TrustStatement]:
        """The fleet's trust statements (each key's add statement, the controller's removals), oldest first."""
        found = []
        for k in self.store.release_keys():
            for doc in (k["statement"], k["removal"]):
                if doc:
                    found.append(msgspec.convert(doc, protocol.TrustStatement))
        found.sort(key=lambda st: (st.time, st.op == "remove"))
        if len(found) > protocol.MAX_STATEMENTS:
            log.warning("the fleet holds %d trust statements; a desired carries the newest %d", len(found),
                        protocol.MAX_STATEMENTS)
            found = found[-protocol.MAX_STATEMENTS:]
        return found

    @staticmethod
    def digest(trust: list[protocol.TrustStatement]) -> str:
        return hashlib.sha256(msgspec.json.encode(trust)).hexdigest()[:16]

    def remove_statement(self, keyid: str, now: float) -> protocol.TrustStatement:
        return signing.remove_statement(self.key, keyid, now)

    # -- messages -----------------------------------------------------------------------------------
    def desired(self, device_id: str, desired: protocol.Desired,
                trust: list[protocol.TrustStatement] | None = None) -> protocol.Desired:
        """``desired`` for ``device_id``: issued now, expiring after the desired TTL, the next counter, the trust
        statements, signed."""
        now = self.clock()
        msg = msgspec.structs.replace(desired, device_id=device_id, time=now, expires=now + self.desired_ttl_s,
                                      counter=self.store.next_counter(device_id, now),
                                      trust=self.trust() if trust is None else trust)
        return signing.sign_message(self.key, msg)

    def cmd(self, device_id: str, cmd: protocol.Cmd) -> protocol.Cmd:
        now = self.clock()
        msg = msgspec.structs.replace(cmd, device_id=device_id, time=now, expires=now + self.cmd_ttl_s,
                                      counter=self.store.next_counter(device_id, now))
        return signing.sign_message(self.key, msg)


def resign(link: "Link", everything: bool = False, now: float | None = None) -> tuple[int, list[str]]:
    """Sign again and republish each device's retained desired that expires within half the TTL or carries
    other trust statements than the fleet's now (``everything``: every one). Returns (how many were published,
    the devices the broker did not take it for: the next sweep tries again)."""
    from agent.errors import EdgefleetError

    signer = link.signer
    if signer is None:
        return 0, []
    now = signer.clock() if now is None else now
    digest = signer.digest(signer.trust())
    rows = link.store.signed_desireds() if everything else link.store.signed_desireds(
        due_before=now + signer.desired_ttl_s / 2, trust_not=digest)
    done, failed = 0, []
    for row in rows:
        with link.desired_lock:  # a deploy in between wins: its desired is the one to keep
            fresh = link.store.signed_desired(row["device_id"])
            if fresh is None or fresh["desired"] != row["desired"]:
                continue
            try:
                link.publish_desired(row["device_id"], msgspec.json.decode(row["desired"], type=protocol.Desired))
                done += 1
            except EdgefleetError as e:
                failed.append(row["device_id"])
                log.warning("could not republish the desired model of %s: %s", row["device_id"], e)
    if done:
        log.info("signed again and republished the desired model of %d device(s)", done)
    return done, failed
