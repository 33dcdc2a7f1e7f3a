"""One way to reach the broker, for the agent and the controller alike: its URL, TLS, and the paho client.

    mqtts://HOST[:PORT]   MQTT over TLS (port 8883 by default): what a fleet runs
    mqtt://HOST[:PORT]    plaintext (port 1883): only where the caller allows it (``insecure`` mode)

``Tls`` names the CA file the broker's certificate must chain to and, for mutual TLS, this side's own
certificate and key. ``make_client`` builds a paho 2.x client the idiomatic way (VERSION2 callbacks, MQTT v5,
TLS 1.2 or later with the broker's host name checked); the caller adds its will, callbacks and session and
connects with ``connect_properties``. TLS is configured here and nowhere else.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from agent.errors import EdgefleetError

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class TransportError(EdgefleetError, ValueError):
    """A broker URL or TLS setting that cannot work; the message names it."""


@dataclass(frozen=True)
class BrokerUrl:
    scheme: str  # mqtt | mqtts
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_url(url: str, *, allow_plaintext: bool = True, what: str = "broker") -> BrokerUrl:
    """``mqtts://HOST[:PORT]`` (or ``mqtt://`` when ``allow_plaintext``) -> BrokerUrl; TransportError otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise TransportError(f"{what} {url!r} has an invalid port") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username or parts.password:
        raise TransportError(f"{what} {url!r} is not an mqtts://HOST:PORT URL")
    if parts.scheme == "mqtt" and not allow_plaintext:
        raise TransportError(f"{what} {url!r} is plaintext MQTT: use mqtts:// (TLS)")
    return BrokerUrl(parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme])


@dataclass(frozen=True)
class Tls:
    """The files of one side of a TLS connection: the CA to trust, and our own certificate and key (mutual TLS)."""

    ca: str
    cert: str | None = None
    key: str | None = None

    def check(self) -> "Tls":
        for what, path in (("CA file", self.ca), ("certificate", self.cert), ("key", self.key)):
            if path is not None and not Path(path).is_file():
                raise TransportError(f"TLS {what} {path} does not exist")
        if (self.cert is None) != (self.key is None):
            raise TransportError("TLS needs both a certificate and its key, or neither")
        return self

    def context(self, server_hostname_check: bool = True) -> ssl.SSLContext:
        """A client-side SSLContext: the peer must present a certificate from ``ca`` naming the host we dialled."""
        self.check()
        try:
            ctx = ssl.create_default_context(cafile=self.ca)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.check_hostname = server_hostname_check
            if self.cert:
                ctx.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as e:
            raise TransportError(f"cannot load TLS files ({self.ca}, {self.cert}, {self.key}): {e}") from None
        return ctx


def make_client(url: BrokerUrl, client_id: str, tls: Tls | None, *, manual_ack: bool = False,
                context: ssl.SSLContext | None = None):
    """A paho client for ``url`` speaking MQTT v5, with TLS when the URL is mqtts:// (``tls`` is then required).

    ``context``: an SSLContext made from ``tls`` that the caller keeps, to load a renewed certificate into it
    (``load_cert_chain``) for the next connection."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                         manual_ack=manual_ack)
    if url.tls:
        if tls is None:
            raise TransportError(f"{url} needs TLS settings: a CA file, and a certificate and key")
        client.tls_set_context(context or tls.context())
    client.reconnect_delay_set(1, 30)
    return client


def connect_properties(session_expiry_s: int):
    """CONNECT properties for a persistent session: the broker keeps it ``session_expiry_s`` after a disconnect."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    return props


def describe(error: BaseException) -> str:
    """A connection error as one readable clause (TLS failures say which side refused what)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"the broker's certificate was refused: {error.verify_message or error.reason}"
    if isinstance(error, ssl.SSLError):
        reason = error.reason or str(error)
        if "ALERT" in reason.upper():
            return f"the broker refused our certificate ({reason.lower().replace('_', ' ')})"
        return f"TLS failed: {reason}"
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)


def probe(url: BrokerUrl, tls: Tls | None, timeout: float = 3.0) -> None:
    """Open a TCP (and TLS) connection to the broker and close it; TransportError says what failed.

    paho reports a failed TLS handshake only as "connection failed": this says which certificate was
    refused, so that a wrong CA, a revoked or expired device certificate or a plaintext port is one clear
    line. TLS 1.3 servers refuse a client certificate after the handshake, so a refusal is read for briefly."""
    import socket

    try:
        sock = socket.create_connection((url.host, url.port), timeout=timeout)
    except OSError as e:
        raise TransportError(f"cannot reach broker {url}: {describe(e)}") from None
    try:
        if not url.tls:
            return
        if tls is None:
            raise TransportError(f"{url} needs TLS settings: a CA file, and a certificate and key")
        try:
            with tls.context().wrap_socket(sock, server_hostname=url.host) as s:
                s.settimeout(0.3)
                try:
                    if s.recv(1) == b"":
                        raise TransportError(f"broker {url} closed the connection after the TLS handshake "
                                             f"(is our certificate revoked?)")
                except (TimeoutError, socket.timeout):
                    pass  # it waits for our MQTT CONNECT: the certificates were accepted
        except (ssl.SSLError, OSError) as e:
            raise TransportError(f"cannot connect to broker {url}: {describe(e)}") from None
    finally:
        sock.close()
