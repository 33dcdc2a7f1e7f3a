"""The controller's MQTT link: takes in what devices report, publishes what they should run.

A persistent MQTT v5 session (stable client id, clean start off, a session expiry of days) makes the
broker keep what devices send while the controller restarts. The client is built by ``agent.transport``
(mutual TLS with the controller's identity on an mqtts:// broker). A message is acknowledged only after it was
stored (manual ack), so a crash in between means a redelivery, which the store ignores. Anything that
does not follow the contract is counted, logged once per reason, and dropped.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import protocol, transport
from agent.errors import EdgefleetError
from fleet import quality
from fleet.store import Store

if TYPE_CHECKING:
    from fleet.signer import Signer

log = logging.getLogger("edgefleet.fleet.link")

CLIENT_ID = "edgefleet-fleet"
SESSION_EXPIRY_S = 7 * 24 * 3600
# the device kinds this controller stores
STORED = (protocol.STATE, protocol.TELEMETRY, protocol.EVENTS, protocol.QUALITY)
MAX_REASONS = 100  # distinct reasons counted one by one; the rest under "other"


class Link:
    """One paho client in a background thread, feeding ``store``."""

    def __init__(self, broker_url: str, store: Store, client_id: str = CLIENT_ID, keepalive: int = 30,
                 connect_timeout: float = 5.0, publish_timeout: float = 10.0,
                 session_expiry_s: int = SESSION_EXPIRY_S, tls: transport.Tls | None = None,
                 enrolled: Callable[[str], bool] | None = None, signer: "Signer | None" = None) -> None:
        self.broker_url = broker_url
        self.url = transport.parse_url(broker_url)
        self.host, self.port = self.url.host, self.url.port
        self.tls = tls
        self.enrolled = enrolled  # None: every device id the broker lets through is taken (insecure mode)
        self.store = store
        self.signer = signer  # None: messages go out unsigned (a link without a controller: some tests)
        self.desired_lock = threading.RLock()  # sign, publish and record one device's desired at a time
        self.client_id = client_id
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self.session_expiry_s = session_expiry_s
        self.received = 0
        self.duplicates = 0
        self._invalid: dict[str, int] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._answered = threading.Event()  # the first connection attempt has an outcome (start() waits for it)
        self._connect_error: str | None = None
        self._client: mqtt.Client | None = None
        self._stopping = False

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "Link":
        where = f"cannot reach broker {self.broker_url}"
        # a quick probe turns "connection refused" or a refused certificate into a clear error, not retries
        transport.probe(self.url, self.tls, timeout=min(3.0, self.connect_timeout))
        client = transport.make_client(self.url, self.client_id, self.tls, manual_ack=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_connect_fail = self._on_connect_fail
        self._stopping = False
        self._connected.clear()
        self._answered.clear()
        self._connect_error = None
        client.connect_async(self.host, self.port, keepalive=self.keepalive, clean_start=False,
                             properties=transport.connect_properties(self.session_expiry_s))
        self._client = client
        client.loop_start()
        if not self._answered.wait(self.connect_timeout) or self._connect_error:
            reason = self._connect_error or f"no answer within {self.connect_timeout:g} s"
            self.stop()
            raise EdgefleetError(f"{where}: {reason}")
        return self

    def stop(self) -> None:
        """Disconnect, keeping the session: the broker queues what devices send until the next start."""
        client, self._client = self._client, None
        if client is None:
            return
        self._stopping = True
        client.disconnect()
        client.loop_stop()
        self._connected.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and not self._connect_error

    # -- paho callbacks (the network thread) ----------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            self._connect_error = f"broker refused the connection: {reason_code}"
            log.error("%s refused the connection: %s", self.broker_url, reason_code)
            self._answered.set()
            return
        # Retained state is sent only for a new subscription (retain handling 1), not on every reconnect.
        opts = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        client.subscribe([(protocol.subscription(kind), opts) for kind in STORED])
        log.info("connected to %s (session present: %s)", self.broker_url, flags.session_present)
        self._connect_error = None
        self._connected.set()
        self._answered.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho swallows the exception; a TLS failure shows only here, before any CONNACK
        if not self._answered.is_set():
            self._connect_error = "the TLS handshake or TCP connection failed (wrong CA or certificate?)" \
                if self.url.tls else "the connection failed"
            self._answered.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self._connected.clear()
        if not self._stopping:
            log.warning("lost the broker %s (%s); reconnecting", self.broker_url, reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self.handle(message.topic, message.payload, bool(message.retain))
        except Exception as e:  # never out of the callback: that would end paho's thread
            self._count(f"not stored: {type(e).__name__}: {e}", message.topic)
        finally:
            if message.qos > 0:
                client.ack(message.mid, message.qos)

    def handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """Validate one message and store it; an invalid one is counted and dropped."""
        received = time.time()
        if not payload:  # a retained message being cleared
            return
        try:
            device_id, kind = protocol.parse_topic(topic)
            if kind not in STORED:
                raise protocol.ProtocolError(f"{kind} is not a message devices send")
            if self.enrolled is not None and not self.enrolled(device_id):
                raise protocol.ProtocolError("device not enrolled (or revoked)")
            msg = protocol.decode(kind, payload)
            if msg.device_id != device_id:
                raise protocol.ProtocolError(f"{kind} payload's device_id does not match its topic")
        except protocol.ProtocolError as e:
            self._count(_reason(e), topic)
            return
        if kind == protocol.QUALITY:  # checked against its bundle's profile before it counts as received
            try:
                stored = self.store.record_quality(msg, received, retained)
            except quality.Refused as e:
                self._count(str(e), topic)
                return
        with self._lock:
            self.received += 1
        if kind == protocol.STATE:
            self.store.record_state(msg, received, retained)
            stored = True
        elif kind == protocol.TELEMETRY:
            stored = self.store.record_telemetry(msg, received, retained)
        elif kind == protocol.EVENTS:
            stored = self.store.record_event(msg, received, retained)
        if not stored:
            with self._lock:
                self.duplicates += 1

    def _count(self, reason: str, topic: str) -> None:
        with self._lock:
            if reason not in self._invalid and len(self._invalid) >= MAX_REASONS:
                reason = "other"
            first = reason not in self._invalid
            self._invalid[reason] = self._invalid.get(reason, 0) + 1
        if first:
            log.warning("dropping a message on %s: %s (logged once per reason)", topic, reason)

    @property
    def invalid(self) -> dict[str, int]:
        """Dropped messages by reason."""
        with self._lock:
            return dict(self._invalid)

    # -- fleet -> device ------------------------------------------------------------------------
    def publish_desired(self, device_id: str, desired: protocol.Desired) -> None:
        """Publish a device's desired model, retained, and wait until the broker has acknowledged it. With a
        signer (``fleet.signer``), the one place a desired is signed: for this device, issued now, expiring,
        with the next counter and the fleet's trust statements; the store then keeps it (unsigned) so that the
        sweep can sign it again before it expires."""
        with self.desired_lock:
            if self.signer is None:
                self._publish(device_id, protocol.DESIRED, desired, retain=True, what="the desired model")
                return
            from fleet.signer import unsigned

            plain = unsigned(desired)
            trust = self.signer.trust()
            signed = self.signer.desired(device_id, plain, trust)
            self._publish(device_id, protocol.DESIRED, signed, retain=True, what="the desired model")
            self.store.set_signed_desired(device_id, protocol.encode(plain).decode(), signed.time, signed.expires,
                                          self.signer.digest(trust))

    def publish_cmd(self, device_id: str, cmd: protocol.Cmd) -> None:
        """Send a device a one-shot command (not retained) and wait until the broker has acknowledged it; signed
        (for this device, expiring in minutes, the next counter) when the link has a signer."""
        if self.signer is not None:
            cmd = self.signer.cmd(device_id, cmd)
        self._publish(device_id, protocol.CMD, cmd, retain=False, what=f"the {cmd.kind} command")

    def _publish(self, device_id: str, kind: str, msg: protocol.Message, *, retain: bool, what: str) -> None:
        client = self._client
        if client is None:
            raise EdgefleetError("the MQTT link is not running")
        info = client.publish(protocol.topic(device_id, kind), protocol.encode(msg), qos=1, retain=retain)
        try:
            info.wait_for_publish(self.publish_timeout)
        except (ValueError, RuntimeError) as e:
            raise EdgefleetError(f"cannot publish to {device_id}: {e}") from None
        if not info.is_published():
            raise EdgefleetError(f"the broker {self.broker_url} did not acknowledge {what} for "
                                 f"{device_id} within {self.publish_timeout:g} s")


def _reason(e: Exception) -> str:
    """A reason to count under: the error without the parts that differ from message to message."""
    text = str(e)
    if text.startswith(("not an edgefleet v1 topic", "invalid device id")):
        return text.split(":")[0]
    return re.sub(r"\s*\(byte \d+\)", "", text)[:300]
