"""Enrollment, renewal and revocation of device identities (the fleet CA's certificates, ``fleet.pki``).

An administrator makes an enrollment token: for one device id (``edgefleet fleet enroll cam-7``: one use,
expiring, like Mender's preauthorisation) or for first-boot provisioning of many (``edgefleet fleet provision
--count 50``: N uses, expiring, ids chosen by the devices within an optional prefix, like Greengrass fleet
provisioning). Only the token's sha256 is stored; the secret is shown once. A device makes its own key,
sends a CSR with the token (``POST /enroll``) and gets a certificate whose CN is its id, the CA and the
broker URL. It renews before expiry by proving it holds its current certificate (``POST /enroll/renew``
over mutual TLS). Revoking a device lists its certificates in the CRL, denies its id everything in the
broker's ACL, drops its live connection, and stops its bundle downloads and renewals.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from agent import protocol
from agent.errors import EdgefleetError
from fleet.pki import PKI, PkiError, common_name, fingerprint, pem
from fleet.store import Store

log = logging.getLogger("edgefleet.fleet.enroll")

TOKEN_PREFIX = "efe_"
CERT_LIFETIME_S = 90 * 86400.0
MAX_TTL_S = 365 * 86400.0
MAX_COUNT = 100_000
_PREFIX = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")


class EnrollError(EdgefleetError):
    """A refused enrollment request; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Enrollment:
    """Issues and revokes device identities. ``on_revoke(device_id, kick)`` is told after a revocation was
    stored and the CRL written (the controller then reloads the broker and, with ``kick``, drops the device's
    connection);
    ``broker_url()`` and ``public_url()`` are what enrolled devices are told to use, ``controller_key`` (PEM) the
    public key the controller signs their desired and cmd messages with."""

    def __init__(self, store: Store, pki: PKI, broker_url: Callable[[], str], public_url: Callable[[], str],
                 cert_lifetime_s: float = CERT_LIFETIME_S,
                 on_revoke: Callable[[str, bool], None] | None = None, controller_key: str | None = None) -> None:
        self.store = store
        self.controller_key = controller_key  # PEM: the key that signs every desired and cmd (fleet/signer.py)
        self.pki = pki
        self.broker_url = broker_url
        self.public_url = public_url
        self.cert_lifetime_s = cert_lifetime_s
        self.on_revoke = on_revoke
        self._lock = threading.Lock()
        self._enrolled: set[str] | None = None  # cached store.enrolled_ids()
        self._enrolled_at = 0.0

    # -- tokens -------------------------------------------------------------------------------------
    def create_token(self, *, device_id: str | None = None, ttl_s: float = 3600.0, count: int = 1,
                     prefix: str = "", by: str = "") -> dict[str, Any]:
        """A new enrollment token: for ``device_id`` (one use), or a provisioning token (``count`` uses, ids
        chosen by the devices, starting with ``prefix``). The secret is in the answer and nowhere else."""
        if not 60 <= ttl_s <= MAX_TTL_S:
            raise EnrollError(400, f"ttl: between 1 minute and {MAX_TTL_S / 86400:.0f} days (got {ttl_s:g} s)")
        if device_id is not None:
            try:
                protocol.check_device_id(device_id)
            except protocol.ProtocolError as e:
                raise EnrollError(400, f"device_id: {e}") from None
            if count != 1 or prefix:
                raise EnrollError(400, "a token for one device id has one use and no prefix")
        else:
            if not 1 <= count <= MAX_COUNT:
                raise EnrollError(400, f"count: a provisioning token enrolls 1 to {MAX_COUNT} devices (got {count})")
            if prefix and not _PREFIX.fullmatch(prefix):
                raise EnrollError(400, f"prefix {prefix!r}: up to 32 of a-z, 0-9, '.', '_', '-', starting with a "
                                       f"letter or digit")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = _hash(token)[:12]
        expires = time.time() + ttl_s
        kind = "device" if device_id is not None else "provision"
        self.store.add_enrollment(token_id, _hash(token), kind, device_id, prefix, count, expires, by)
        return {"id": token_id, "token": token, "kind": kind, "device_id": device_id, "prefix": prefix,
                "count": count, "expires": expires, "ca_fingerprint": self.pki.ca_fingerprint,
                "controller": self.public_url()}

    def tokens(self) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        for t in self.store.enrollments():
            state = ("revoked" if t["revoked"] is not None else "expired" if t["expires"] <= now
                     else "used" if t["uses_left"] <= 0 else "open")
            out.append({**t, "state": state})
        return out

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        if not self.store.revoke_enrollment(token_id):
            raise EnrollError(404, f"no open enrollment token {token_id!r}")
        return {"id": token_id, "revoked": True}

    # -- devices ------------------------------------------------------------------------------------
    def enroll(self, token: str, csr_pem: str, device_id: str | None = None) -> dict[str, Any]:
        """Issue a certificate for the CSR's key to the device the token allows; EnrollError otherwise."""
        now = time.time()
        if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
            raise EnrollError(401, "token: not an edgefleet enrollment token")
        row = self.store.take_enrollment(_hash(token), now)
        if row is None:
            raise EnrollError(401, "token: unknown, expired, revoked or already used")
        try:
            if row["kind"] == "device":
                if device_id is not None and device_id != row["device_id"]:
                    raise EnrollError(403, f"device_id: this token enrolls {row['device_id']!r}, not {device_id!r}")
                device_id = row["device_id"]
            else:
                if device_id is None:
                    raise EnrollError(400, "device_id: a provisioning token needs the id the device chose")
                try:
                    protocol.check_device_id(device_id)
                except protocol.ProtocolError as e:
                    raise EnrollError(400, f"device_id: {e}") from None
                if row["prefix"] and not device_id.startswith(row["prefix"]):
                    raise EnrollError(403, f"device_id: this token enrolls ids starting with {row['prefix']!r}")
                if device_id in self.store.revoked_device_ids():
                    raise EnrollError(403, f"device_id: {device_id!r} was revoked; an administrator can enroll it "
                                           f"again with `edgefleet fleet enroll {device_id}`")
                if device_id in self.store.enrolled_ids(now):
                    raise EnrollError(409, f"device_id: {device_id!r} is already enrolled by another device (a "
                                           f"cloned image?): derive the id from something unique to each device")
            cert = self._issue(csr_pem, device_id, "enroll")
        except (EnrollError, PkiError) as e:
            self.store.return_enrollment(row["id"])
            if isinstance(e, PkiError):
                raise EnrollError(400, str(e)) from None
            raise
        if row["kind"] == "device":  # an administrator named this id: it replaces any earlier identity
            self.store.readmit_device(device_id)
            if self.store.revoke_certificates(device_id, "replaced by a new enrollment", keep=cert.serial_number):
                self._after_revoke(device_id, kick=False)
        log.info("enrolled %s (certificate %x, token %s)", device_id, cert.serial_number, row["id"])
        return self._answer(device_id, cert)

    def renew(self, device_id: str, csr_pem: str) -> dict[str, Any]:
        """A new certificate for a device that proved (over mutual TLS) that it holds a valid one."""
        try:
            cert = self._issue(csr_pem, device_id, "renew")
        except PkiError as e:
            raise EnrollError(400, str(e)) from None
        log.info("renewed the certificate of %s (%x)", device_id, cert.serial_number)
        return self._answer(device_id, cert)

    def _issue(self, csr_pem: str, device_id: str, kind: str):
        cert = self.pki.sign_csr(csr_pem, device_id, self.cert_lifetime_s)
        self.store.add_certificate(cert.serial_number, device_id, fingerprint(cert),
                                   cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp(), kind)
        self._forget()
        return cert

    def _answer(self, device_id: str, cert) -> dict[str, Any]:
        return {"device_id": device_id, "certificate": pem(cert), "ca": self.pki.ca_pem(),
                "broker": self.broker_url(), "controller": self.public_url(),
                "not_after": cert.not_valid_after_utc.timestamp(), "serial": format(cert.serial_number, "x"),
                "controller_key": self.controller_key}

    def device_identity(self, der: bytes | None) -> str | None:
        """The device id a TLS client certificate proves: issued by this CA, valid now, not revoked, a device's
        (not the controller's). None otherwise."""
        if not der:
            return None
        try:
            cert = self.pki.verify_issued(der)
        except PkiError:
            return None
        cn = common_name(cert)
        row = self.store.certificate(cert.serial_number)
        if cn is None or row is None or row["revoked"] is not None or row["device_id"] != cn or row["kind"] == "kick":
            return None
        return cn

    def is_enrolled(self, device_id: str) -> bool:
        """Whether messages from this id are taken: a cached view of the enrolled ids (dropped on every change
        here, refreshed every 10 s as certificates expire); an id not in it is looked up in the store (only a
        device the broker let in can send, so misses are rare)."""
        with self._lock:
            if self._enrolled is None or time.monotonic() - self._enrolled_at > 10:
                self._enrolled, self._enrolled_at = self.store.enrolled_ids(), time.monotonic()
            if device_id in self._enrolled:
                return True
        if device_id in self.store.enrolled_ids(device_id=device_id):
            with self._lock:
                if self._enrolled is not None:
                    self._enrolled.add(device_id)
            return True
        return False

    def _forget(self) -> None:
        with self._lock:
            self._enrolled = None

    def revoke(self, device_id: str, by: str = "") -> dict[str, Any]:
        """Revoke every certificate of the device and deny its id; the controller drops its connection."""
        try:
            protocol.check_device_id(device_id)
        except protocol.ProtocolError as e:
            raise EnrollError(400, str(e)) from None
        known = self.store.certificates(device_id)
        if not known:
            raise EnrollError(404, f"unknown device {device_id!r}: it has no certificate from this fleet")
        serials = self.store.revoke_device(device_id, by)
        self._after_revoke(device_id, kick=True)
        log.warning("revoked %s (%d certificate(s)) by %s", device_id, len(serials), by or "?")
        return {"device_id": device_id, "revoked_certificates": serials}

    def _after_revoke(self, device_id: str, kick: bool) -> None:
        self._forget()
        self.pki.write_crl(self.store.revoked_serials())
        if self.on_revoke is not None:
            self.on_revoke(device_id, kick)
