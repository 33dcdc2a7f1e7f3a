"""The fleet's own certificate authority, made once in the controller's data dir (``DATA/pki``, mode 0700).

    ca.crt ca.key                 the fleet CA (ECDSA P-256); its sha256 fingerprint is what a device pins
    broker.crt broker.key         the embedded mosquitto's server certificate (the fleet's host names)
    controller.crt controller.key the controller: HTTPS server certificate and its MQTT client identity
                                  (CN ``controller@edgefleet``, which no device id can be: ids have no ``@``)
    crl.pem                       revoked device certificates; mosquitto reads it (reloaded on SIGHUP)

Device certificates are issued from a CSR (the key is made on the device and never leaves it) with the device
id as CN. Keys are written 0600 and every file atomically. The CA and server certificates start two years in
the past: a device without a real-time clock that boots far behind must still accept the broker (its own
certificate is checked with the broker's clock).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import socket
from pathlib import Path

from agent.errors import EdgefleetError
from agent.files import write_atomic
from agent.transport import Tls

CONTROLLER_CN = "controller@edgefleet"
WORKER_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # a worker's name (fleet serve --worker NAME)


def worker_cn(name: str) -> str:
    """The MQTT identity (certificate CN, so user name and client id on the broker) of controller worker
    ``name``: a broker that makes the CN the client id (mosquitto's use_username_as_clientid) would have workers
    sharing ``controller@edgefleet`` take each other's session over; like it, no device id can be this (no @)."""
    return f"controller-{name}@edgefleet"
BROKER_CN = "broker@edgefleet"
CA_CN = "edgefleet fleet CA"
CA_LIFETIME = dt.timedelta(days=20 * 365)
SERVER_LIFETIME = dt.timedelta(days=5 * 365)
REISSUE_BEFORE = dt.timedelta(days=365)  # a server certificate with less left is reissued at start
BACKDATE = dt.timedelta(days=2 * 365)  # CA and server certificates: valid for devices whose clock is behind
CRL_LIFETIME = dt.timedelta(days=365)  # rewritten at every start and revocation, long before it lapses
_HOSTNAME = re.compile(r"(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?",
                       re.IGNORECASE)


class PkiError(EdgefleetError, ValueError):
    pass


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def fingerprint(cert) -> str:
    """The sha256 of a certificate's DER bytes, 64 lowercase hex digits."""
    from cryptography.hazmat.primitives import serialization

    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def pem(cert) -> str:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM).decode()


def default_hosts() -> list[str]:
    """Names a controller on this machine is reached by when nothing else is said."""
    names = ["localhost", "127.0.0.1", "::1"]
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in names and _HOSTNAME.fullmatch(name):
            names.append(name)
    return names


def check_host(name: str) -> str:
    """A host name or IP address a certificate can name; PkiError otherwise."""
    name = name.strip().strip("[]")
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(name):
        raise PkiError(f"invalid host name {name!r}: letters, digits, '-', '.' (or an IP address)")
    return name.lower().rstrip(".")


class PKI:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.ca_crt, self.ca_key = self.root / "ca.crt", self.root / "ca.key"
        self.broker_crt, self.broker_key = self.root / "broker.crt", self.root / "broker.key"
        self.controller_crt, self.controller_key = self.root / "controller.crt", self.root / "controller.key"
        self.crl = self.root / "crl.pem"
        self._hosts_file = self.root / "hosts.json"
        self._ca = None
        self._ca_private = None

    # -- files ----------------------------------------------------------------------------------
    def ensure(self, hosts: list[str]) -> "PKI":
        """Make the CA (once), the broker's and controller's certificates for ``hosts`` (again when the hosts
        change or they near their end), and a CRL if there is none. Returns self."""
        hosts = list(dict.fromkeys(check_host(h) for h in hosts))
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        if not self.ca_crt.exists() or not self.ca_key.exists():
            self._make_ca()
        self._load_ca()
        try:
            old_hosts = json.loads(self._hosts_file.read_text())
        except (OSError, ValueError):
            old_hosts = None
        for crt, key, cn in ((self.broker_crt, self.broker_key, BROKER_CN),
                             (self.controller_crt, self.controller_key, CONTROLLER_CN)):
            if old_hosts != hosts or not self._valid_for(crt, REISSUE_BEFORE):
                self._write_server(crt, key, cn, hosts)
        write_atomic(self._hosts_file, json.dumps(hosts).encode(), 0o600)
        if not self.crl.exists():
            self.write_crl([])
        return self

    def _valid_for(self, crt: Path, margin: dt.timedelta) -> bool:
        from cryptography import x509

        try:
            cert = x509.load_pem_x509_certificate(crt.read_bytes())
        except (OSError, ValueError):
            return False
        return cert.issuer == self.ca.subject and cert.not_valid_after_utc - _now() > margin

    def _make_ca(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_CN),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"edgefleet {os.urandom(4).hex()}")])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE).not_valid_after(now + CA_LIFETIME)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        write_atomic(self.ca_key, _key_pem(key), 0o600)
        write_atomic(self.ca_crt, pem(cert).encode(), 0o644)

    def _load_ca(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            self._ca = x509.load_pem_x509_certificate(self.ca_crt.read_bytes())
            self._ca_private = serialization.load_pem_private_key(self.ca_key.read_bytes(), None)
        except (OSError, ValueError, TypeError) as e:
            raise PkiError(f"the fleet CA in {self.root} cannot be read ({e}); restore it from a backup: "
                           f"every enrolled device trusts only it") from None

    @property
    def ca(self):
        if self._ca is None:
            self._load_ca()
        return self._ca

    @property
    def ca_fingerprint(self) -> str:
        return fingerprint(self.ca)

    def ca_pem(self) -> str:
        return pem(self.ca)

    def controller_tls(self) -> Tls:
        """The controller's side of mutual TLS with the embedded broker."""
        return Tls(str(self.ca_crt), str(self.controller_crt), str(self.controller_key))

    def worker_tls(self, name: str, hosts: list[str]) -> Tls:
        """Controller worker ``name``'s side of mutual TLS with the broker (CN ``worker_cn(name)``), made now if
        missing or near its end."""
        crt, key = self.root / f"worker-{name}.crt", self.root / f"worker-{name}.key"
        if not self._valid_for(crt, REISSUE_BEFORE) or not key.exists():
            self._write_server(crt, key, worker_cn(name), list(dict.fromkeys(check_host(h) for h in hosts)))
        return Tls(str(self.ca_crt), str(crt), str(key))

    # -- issuing --------------------------------------------------------------------------------
    def _builder(self, cn: str, public_key, not_before: dt.datetime, not_after: dt.datetime):
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(self.ca.subject).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(not_before).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca.public_key()),
                               critical=False))

    def _write_server(self, crt: Path, key_path: Path, cn: str, hosts: list[str]) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID

        key = ec.generate_private_key(ec.SECP256R1())
        names = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        now = _now()
        cert = (self._builder(cn, key.public_key(), now - BACKDATE, now + SERVER_LIFETIME)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self._ca_private, hashes.SHA256()))
        write_atomic(key_path, _key_pem(key), 0o600)
        write_atomic(crt, pem(cert).encode(), 0o644)

    def sign_csr(self, csr_pem: str | bytes, cn: str, lifetime_s: float):
        """A client certificate for ``cn`` on the CSR's public key (the CSR's own subject is ignored)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.x509.oid import ExtendedKeyUsageOID

        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError:
            raise PkiError("csr: not a PEM certificate signing request") from None
        if not csr.is_signature_valid:
            raise PkiError("csr: its signature does not verify (it must be signed by the key it carries)")
        key = csr.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            if key.curve.name not in ("secp256r1", "secp384r1"):
                raise PkiError(f"csr: the curve {key.curve.name} is not accepted (use P-256 or P-384)")
        elif isinstance(key, rsa.RSAPublicKey):
            if key.key_size < 2048:
                raise PkiError(f"csr: an RSA key of {key.key_size} bits is too small (at least 2048)")
        else:
            raise PkiError("csr: the key must be ECDSA (P-256/P-384) or RSA (>= 2048 bits)")
        now = _now()
        return (self._builder(cn, key, now - dt.timedelta(hours=1), now + dt.timedelta(seconds=lifetime_s))
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self._ca_private, hashes.SHA256()))

    def issue_ephemeral(self, cn: str, lifetime_s: float = 300.0):
        """A short-lived certificate and its key for ``cn`` (PEM bytes), held in memory by the caller.

        The controller uses one to take over a revoked device's MQTT session (that disconnects it); its
        serial is revoked right after."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = self._builder(cn, key.public_key(), now - dt.timedelta(minutes=5),
                             now + dt.timedelta(seconds=lifetime_s)).sign(self._ca_private, hashes.SHA256())
        return cert, _key_pem(key)

    def write_crl(self, revoked: list[tuple[int, float]]) -> None:
        """(Re)write crl.pem listing ``revoked`` (serial, revocation time)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.ca.subject)
                   .last_update(now - dt.timedelta(minutes=5)).next_update(now + CRL_LIFETIME))
        for serial, when in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(dt.datetime.fromtimestamp(when, dt.timezone.utc)).build())
        if self._ca_private is None:
            self._load_ca()
        crl = builder.sign(self._ca_private, hashes.SHA256())
        write_atomic(self.crl, crl.public_bytes(serialization.Encoding.PEM), 0o644)

    def verify_issued(self, der: bytes):
        """The certificate in ``der`` if this CA issued it and it is in its validity period; PkiError otherwise."""
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            cert = x509.load_der_x509_certificate(der)
            if cert.issuer != self.ca.subject:
                raise PkiError("the certificate was not issued by this fleet's CA")
            self.ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                                        ec.ECDSA(cert.signature_hash_algorithm))
        except (ValueError, InvalidSignature):
            raise PkiError("the certificate was not issued by this fleet's CA") from None
        now = _now()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise PkiError("the certificate is expired or not yet valid")
        return cert


def common_name(cert) -> str | None:
    from cryptography.x509.oid import NameOID

    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if len(attrs) == 1 else None


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
