"""The device's identity: a key made here (it never leaves the device), a certificate from the fleet CA whose CN
is the device id, the CA itself, and what the enrollment said (broker and controller URLs).

    STATE_DIR/identity/            mode 0700
        enrollment.json            device id, broker, controller, CA fingerprint, which key/cert files are current
        device-<serial>.key        the private key (0600)
        device-<serial>.crt        its certificate
        ca.crt                     the fleet CA, pinned by the fingerprint the administrator gave
        controller.pub             the controller's ed25519 public key: it signs every desired and cmd
                                   (from the enrollment answer; kept on renewal)

``enroll()`` fetches the controller's CA over an unverified TLS connection and accepts it only if its sha256
is the fingerprint given (``edgefleet fleet enroll`` prints it), then speaks to the controller with that CA
only: a man in the middle cannot give the device another CA. ``renew()`` gets a new certificate on a new key
before the old one expires, proving who it is with the current certificate (mutual TLS). Both swap the
files in by rewriting ``enrollment.json`` atomically, so a crash leaves the old identity or the new one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import secrets
import socket
import ssl
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from agent.errors import EdgefleetError
from agent.files import write_atomic
from agent.protocol import ProtocolError, check_device_id
from agent.transport import Tls

DIR = "identity"
ENROLLMENT = "enrollment.json"
CA = "ca.crt"
CONTROLLER_KEY = "controller.pub"
TEMPLATE_FIELDS = ("mac", "machine_id", "hostname", "random")
_FIELD = re.compile(r"\{([a-z_]+)\}")


class IdentityError(EdgefleetError):
    pass


def normalize_fingerprint(text: str) -> str:
    """``AB:CD:...`` or hex, any case, optionally prefixed ``sha256:`` -> 64 lowercase hex."""
    clean = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", clean):
        raise IdentityError(f"invalid CA fingerprint {text!r}: expected the 64 hex digits of a sha256 "
                            f"(as `edgefleet fleet enroll` prints it)")
    return clean


def is_template(device_id: str) -> bool:
    return "{" in device_id


def check_template(device_id: str) -> str:
    """A device id, or a template of one (``cam-{mac}``) whose fields are known and whose result can be valid."""
    fields = _FIELD.findall(device_id)
    unknown = sorted(set(fields) - set(TEMPLATE_FIELDS))
    if unknown:
        raise IdentityError(f"device_id {device_id!r}: unknown field {{{unknown[0]}}}; use "
                            f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
    sample = _FIELD.sub("0a", device_id)
    if "{" in sample or "}" in sample:
        raise IdentityError(f"device_id {device_id!r}: unbalanced braces")
    try:
        check_device_id(sample)
    except ProtocolError as e:
        raise IdentityError(f"device_id: {e}") from None
    return device_id


def _mac() -> str:
    for iface in sorted(Path("/sys/class/net").glob("*")):
        if iface.name == "lo":
            continue
        try:
            mac = (iface / "address").read_text().strip().lower()
        except OSError:
            continue
        if mac and mac != "00:00:00:00:00:00":
            return mac.replace(":", "")
    raise IdentityError("device_id {mac}: this machine has no network interface with a MAC address")


def _machine_id() -> str:
    try:
        return Path("/etc/machine-id").read_text().strip()[:12] or "unknown"
    except OSError:
        raise IdentityError("device_id {machine_id}: /etc/machine-id cannot be read") from None


def resolve_template(device_id: str) -> str:
    """Fill a device id template from this machine (``{mac}``: the first interface's MAC without colons;
    ``{machine_id}``: the first 12 digits of /etc/machine-id; ``{hostname}``; ``{random}``: 8 hex digits)."""
    check_template(device_id)
    values = {"mac": _mac, "machine_id": _machine_id, "hostname": lambda: socket.gethostname().lower(),
              "random": lambda: secrets.token_hex(4)}
    out = _FIELD.sub(lambda m: values[m.group(1)](), device_id)
    try:
        return check_device_id(out)
    except ProtocolError as e:
        raise IdentityError(f"device_id template {device_id!r} gave {out!r} here: {e}") from None


@dataclass(frozen=True)
class Identity:
    root: Path
    device_id: str
    broker: str
    controller: str
    ca_fingerprint: str
    key_file: str
    cert_file: str
    not_before: float
    not_after: float

    @property
    def tls(self) -> Tls:
        return Tls(str(self.root / CA), str(self.root / self.cert_file), str(self.root / self.key_file))

    @property
    def controller_key_path(self) -> Path | None:
        """The controller's public key (it signs every desired and cmd), or None when the enrollment gave none."""
        path = self.root / CONTROLLER_KEY
        return path if path.is_file() else None

    def renewal_due(self, now: float) -> bool:
        """Less than a third of the certificate's lifetime is left."""
        return now > self.not_after - (self.not_after - self.not_before) / 3

    @classmethod
    def load(cls, state_dir: str | Path) -> "Identity | None":
        root = Path(state_dir) / DIR
        try:
            doc = json.loads((root / ENROLLMENT).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise IdentityError(f"{root / ENROLLMENT} cannot be read ({e}); enroll this device again") from None
        try:
            ident = cls(root=root, **{k: doc[k] for k in cls.__dataclass_fields__ if k != "root"})
        except (KeyError, TypeError) as e:
            raise IdentityError(f"{root / ENROLLMENT} is incomplete ({e}); enroll this device again") from None
        for name in (CA, ident.key_file, ident.cert_file):
            if "/" in name or not (root / name).is_file():
                raise IdentityError(f"{root / name} is missing; enroll this device again")
        return ident


def _post(url: str, body: dict, context: ssl.SSLContext, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return json.loads(resp.read(1 << 20))
    except urllib.error.HTTPError as e:
        try:
            why = json.loads(e.read(65536)).get("error") or e.reason
        except (ValueError, AttributeError, OSError):
            why = e.reason
        raise IdentityError(f"the controller refused: {why} (HTTP {e.code})") from None
    except (urllib.error.URLError, OSError) as e:
        raise IdentityError(f"cannot reach the controller at {url}: {getattr(e, 'reason', e)}") from None
    except ValueError as e:
        raise IdentityError(f"{url} did not answer with JSON: {e}") from None


def fetch_pinned_ca(controller: str, ca_fingerprint: str, timeout: float = 30.0) -> bytes:
    """The controller's CA (PEM), fetched without trusting anything and accepted only if its fingerprint matches."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    want = normalize_fingerprint(ca_fingerprint)
    blind = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    blind.check_hostname = False
    blind.verify_mode = ssl.CERT_NONE  # nothing is trusted from this answer until its fingerprint matched
    url = controller.rstrip("/") + "/enroll/ca.pem"
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=blind) as resp:
            data = resp.read(65536)
        cert = x509.load_pem_x509_certificate(data)
    except (urllib.error.URLError, OSError) as e:
        raise IdentityError(f"cannot reach the controller at {url}: {getattr(e, 'reason', e)}") from None
    except ValueError:
        raise IdentityError(f"{url} did not answer with a PEM certificate") from None
    got = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    if got != want:
        raise IdentityError(f"the controller at {controller} presents a CA with fingerprint {got}, not the "
                            f"expected {want}: refusing it (a wrong address, or someone in between)")
    return cert.public_bytes(serialization.Encoding.PEM)


def _new_key_and_csr(device_id: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key, key_pem, csr.public_bytes(serialization.Encoding.PEM).decode()


def _controller_key(answer: dict) -> str | None:
    """The controller's signing key (PEM) from an enrollment answer, checked to be an ed25519 public key; None
    when the controller sent none (an older one)."""
    pem = answer.get("controller_key")
    if pem is None:
        return None
    from agent import signing

    try:
        return signing.parse_public(str(pem), "controller", "the controller's key").pem
    except signing.SigningError as e:
        raise IdentityError(f"the controller's answer: {e}") from None


def _install(root: Path, answer: dict, key, key_pem: bytes, ca_pem: bytes, ca_fingerprint: str,
             controller: str, renewal: bool = False) -> Identity:
    """Check the controller's answer against our key and CA, and make it the current identity. The controller's
    signing key is stored at enrollment; a renewal keeps the one the device has (it learns one only if it had
    none)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        device_id = check_device_id(str(answer["device_id"]))
        cert = x509.load_pem_x509_certificate(str(answer["certificate"]).encode())
        broker = str(answer["broker"])
    except (KeyError, ValueError, ProtocolError) as e:
        raise IdentityError(f"the controller's answer is not a certificate for this device: {e}") from None
    ours = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = cert.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    ca = x509.load_pem_x509_certificate(ca_pem)
    if ours != theirs or cert.issuer != ca.subject:
        raise IdentityError("the controller's certificate is not for this device's key or not from the pinned CA")
    controller_key = _controller_key(answer)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    serial = format(cert.serial_number, "x")[:16]
    key_file, cert_file = f"device-{serial}.key", f"device-{serial}.crt"
    write_atomic(root / key_file, key_pem, 0o600)
    write_atomic(root / cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    write_atomic(root / CA, ca_pem, 0o644)
    if controller_key is not None and not (renewal and (root / CONTROLLER_KEY).is_file()):
        write_atomic(root / CONTROLLER_KEY, controller_key.encode(), 0o644)
    old = Identity.load(root.parent) if (root / ENROLLMENT).exists() else None
    doc = {"device_id": device_id, "broker": broker, "controller": str(answer.get("controller") or controller),
           "ca_fingerprint": ca_fingerprint, "key_file": key_file, "cert_file": cert_file,
           "not_before": cert.not_valid_before_utc.timestamp(), "not_after": cert.not_valid_after_utc.timestamp()}
    write_atomic(root / ENROLLMENT, json.dumps(doc, indent=2).encode(), 0o600)  # the switch: one rename
    if old is not None and old.key_file != key_file:
        for name in (old.key_file, old.cert_file):
            (root / name).unlink(missing_ok=True)
    return Identity.load(root.parent)


def enroll(state_dir: str | Path, controller: str, token: str, ca_fingerprint: str,
           device_id: str | None = None, timeout: float = 30.0) -> Identity:
    """Enroll this device: make its key, send a CSR with the token, keep the certificate. ``device_id`` is
    required with a provisioning token (an id or a template, resolved here), optional with a device token."""
    parts = urlsplit(controller)
    if parts.scheme != "https" or not parts.hostname:
        raise IdentityError(f"controller {controller!r}: enrollment needs the controller's https:// URL")
    fp = normalize_fingerprint(ca_fingerprint)
    if device_id is not None:
        device_id = resolve_template(device_id) if is_template(device_id) else check_device_id(device_id)
    ca_pem = fetch_pinned_ca(controller, fp, timeout)
    root = Path(state_dir) / DIR
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    with tempfile.NamedTemporaryFile(dir=root, prefix=".ca.", suffix=".pem") as ca_file:
        ca_file.write(ca_pem)
        ca_file.flush()
        context = Tls(ca_file.name).context()
        key, key_pem, csr = _new_key_and_csr(device_id or "pending")
        body = {"token": token, "csr": csr, **({"device_id": device_id} if device_id else {})}
        answer = _post(controller.rstrip("/") + "/enroll", body, context, timeout)
    return _install(root, answer, key, key_pem, ca_pem, fp, controller)


def renew(identity: Identity, timeout: float = 30.0) -> Identity:
    """A new key and certificate, proving who we are with the current ones (mutual TLS)."""
    key, key_pem, csr = _new_key_and_csr(identity.device_id)
    answer = _post(identity.controller.rstrip("/") + "/enroll/renew", {"csr": csr}, identity.tls.context(), timeout)
    if answer.get("device_id") != identity.device_id:
        raise IdentityError(f"the controller renewed {answer.get('device_id')!r}, not {identity.device_id!r}")
    return _install(identity.root, answer, key, key_pem, (identity.root / CA).read_bytes(), identity.ca_fingerprint,
                    identity.controller, renewal=True)


def expires_in(identity: Identity, now: float) -> str:
    left = identity.not_after - now
    return f"{left / 86400:.1f} days" if left > 86400 else f"{left / 3600:.1f} hours"


def utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
