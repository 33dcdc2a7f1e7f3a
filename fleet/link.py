"""The controller's MQTT link: takes in what devices report, publishes what they should run.

A persistent MQTT v5 session (stable client id, clean start off, a session expiry of days) makes the
broker keep what devices send while the controller restarts. The client is built by ``agent.transport``
(mutual TLS with the controller's identity on an mqtts:// broker). Anything that does not follow the contract
is counted, logged once per reason, and dropped.

Batched ingest. paho's network thread only validates a message (topic, enrolment, strict decode: cheap) and puts
it on a bounded queue (``queue_max``); when the queue is full the callback blocks, paho stops reading, and the
broker holds the rest (back-pressure, not loss). One writer thread takes up to ``batch_max`` messages (or what
arrived within ``LINGER_S`` of the first) and stores them with ``store.record_many`` in one transaction. Only
after that commits are the messages acknowledged to the broker (manual ack), so a crash in between means a
redelivery, which the store ignores by (device, boot_id, seq).

A store error: the batch is not acknowledged; the writer logs it once, keeps the batch and tries again with a
back-off (0.2 s doubling to 5 s) while the queue, then paho, then the broker hold what comes meanwhile. If the
link stops first, the broker redelivers the batch in the next session. After a failed batch its messages are
tried one by one: a message that fails (twice) while others go in is the message's fault, not the store's: it
is counted as "not stored: <error>", acknowledged and dropped, as before batching, so that one bad message
cannot stall ingest.

End-to-end acknowledgement. A PUBACK only tells a device that the broker took its message, and a broker that
dies before saving its queue loses what it had acknowledged. So after each batch commits, the link tells each
device what of it is now stored (``protocol.Ack`` on ``edgefleet/v1/<id>/ack``: the boot id and seq ranges; one
message per device and boot per batch, QoS 0). Stored means newly stored or stored before (a duplicate), and a
quality message refused for good (``quality.Refused``: sending it again changes nothing) is acknowledged too;
a message that does not decode is not (its seq cannot be trusted). Ranges, never "everything up to N": with
several controller workers sharing a device's traffic each acknowledges only what it stored itself. A lost ack
costs one re-send, which dedupe drops and the link acknowledges again (agent/link.py has the device's side).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import protocol, transport
from agent.errors import EdgefleetError
from fleet.store import Store

if TYPE_CHECKING:
    from fleet.signer import Signer

log = logging.getLogger("edgefleet.fleet.link")

CLIENT_ID = "edgefleet-fleet"
SESSION_EXPIRY_S = 7 * 24 * 3600
# the device kinds this controller stores
STORED = (protocol.STATE, protocol.TELEMETRY, protocol.EVENTS, protocol.QUALITY)
MAX_REASONS = 100  # distinct reasons counted one by one; the rest under "other"
QUEUE_MAX = 2000  # validated messages waiting for the writer; when full, paho's callback blocks
BATCH_MAX = 500  # messages stored in one transaction, at most
LINGER_S = 0.005  # after the first message of a batch, how long the writer waits for more
RETRY_S = 0.2  # the writer's first wait after a store error; doubling to RETRY_MAX_S
RETRY_MAX_S = 5.0
FAIL_FIRST = 3  # messages of a failed batch that fail alone, none going in, before the store is taken to be down
SEQUENCED = (protocol.TELEMETRY, protocol.EVENTS, protocol.QUALITY)  # the kinds a device keeps until acknowledged
_STOP = object()  # the writer's end-of-queue mark


class Item(NamedTuple):
    """One validated message on its way to the store."""

    msg: protocol.Message
    kind: str
    received: float
    retained: bool
    mid: int
    qos: int
    topic: str
    session: int  # the connection it came on: a packet id means nothing on another one


class Link:
    """One paho client in a background thread, feeding ``store``."""

    def __init__(self, broker_url: str, store: Store, client_id: str = CLIENT_ID, keepalive: int = 30,
                 connect_timeout: float = 5.0, publish_timeout: float = 10.0,
                 session_expiry_s: int = SESSION_EXPIRY_S, tls: transport.Tls | None = None,
                 enrolled: Callable[[str], bool] | None = None, signer: "Signer | None" = None,
                 queue_max: int = QUEUE_MAX, batch_max: int = BATCH_MAX, acks: bool = True,
                 share: str | None = None, states: bool = True) -> None:
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
        self.queue_max, self.batch_max = queue_max, batch_max
        self.share = share  # a worker's: telemetry, events and quality on $share/<share>/... (see subscriptions)
        self.states = states  # whether this link records the devices' states (a worker: only while it leads)
        self._waiting: dict[int, threading.Event] = {}  # (un)subscriptions follow_states waits for, by mid
        # SUBACK/UNSUBACK mids nobody waited for yet: the latest 64, oldest first (a dict keeps insertion order)
        self._answered_mids: dict[int, None] = {}
        self._wait_lock = threading.Lock()
        self.acks = acks  # publish end-to-end acks (False: as a controller from before them; tests)
        self.batches = 0  # committed batches
        self.acks_sent = 0  # ack messages published
        self.store_errors = 0  # batches the store raised on (tried again)
        self._queue: queue.Queue = queue.Queue(queue_max)
        self._writer: threading.Thread | None = None
        self._halt = threading.Event()  # ends the writer's back-off at once on stop
        self._logged: set[str] = set()
        self._session = 0  # +1 on every connection

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
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        self._stopping = False
        self._halt.clear()
        self._connected.clear()
        self._answered.clear()
        self._connect_error = None
        self._queue = queue.Queue(self.queue_max)
        self._writer = threading.Thread(target=self._write_loop, args=(client, self._queue), name="fleet-writer",
                                        daemon=True)
        self._writer.start()
        client.connect_async(self.host, self.port, keepalive=self.keepalive, clean_start=False,
                             properties=transport.connect_properties(self.session_expiry_s))
        self._client = client
        client.loop_start()
        if not self._answered.wait(self.connect_timeout) or self._connect_error:
            reason = self._connect_error or f"no answer within {self.connect_timeout:g} s"
            self.stop()
            raise EdgefleetError(f"{where}: {reason}")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Store and acknowledge what is queued, then disconnect, keeping the session: the broker queues what devices
        send until the next start, and redelivers what was not acknowledged."""
        client, self._client = self._client, None
        if client is None:
            return
        self._stopping = True  # from now on paho's callback takes nothing (not acknowledged: redelivered later)
        writer, q = self._writer, self._queue
        if writer is not None and writer.is_alive():
            try:
                q.put(_STOP, timeout=timeout)  # after what is queued: the writer drains it first
            except queue.Full:
                pass
            self._halt.set()  # a batch the store fails on now is not tried again: the broker redelivers it
            writer.join(timeout)
        _empty(q)  # a callback blocked on the full queue returns
        client.disconnect()
        client.loop_stop()
        _empty(q)
        self._connected.clear()

    def follow_states(self, on: bool, timeout: float = 10.0) -> bool:
        """Start (the leader) or stop recording the devices' states; a new subscription brings every device's
        retained state. Kept across reconnections (``_on_connect`` subscribes by ``states``). Waits up to
        ``timeout`` for the broker's SUBACK/UNSUBACK, so that a state sent after this returns follows the new rule;
        whether it came (False: not connected now, or no answer: the next connection subscribes as ``states``)."""
        self.states = on
        client = self._client
        if client is None or not self._connected.is_set():
            return False
        topic = protocol.subscription(protocol.STATE)
        if on:
            opts = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
            rc, mid = client.subscribe([(topic, opts)])
        else:
            rc, mid = client.unsubscribe(topic)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        done = threading.Event()
        with self._wait_lock:  # the answer may have come already (paho's thread)
            if mid in self._answered_mids:
                del self._answered_mids[mid]
                return True
            self._waiting[mid] = done
        answered = done.wait(timeout)
        with self._wait_lock:
            self._waiting.pop(mid, None)
        return answered

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
        self._session += 1
        # Retained state is sent only for a new subscription (retain handling 1), not on every reconnect.
        opts = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        client.subscribe(subscriptions(self.share, opts, self.states))
        log.info("connected to %s (session present: %s)", self.broker_url, flags.session_present)
        self._connect_error = None

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                        properties: Any) -> None:
        self._answer(mid)

    def _answer(self, mid: int) -> None:
        with self._wait_lock:
            done = self._waiting.pop(mid, None)
            if done is None:  # answered before follow_states registered it (or a connection's own subscription)
                self._answered_mids[mid] = None
                while len(self._answered_mids) > 64:
                    del self._answered_mids[next(iter(self._answered_mids))]
        if done is not None:
            done.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        self._answer(mid)
        # connected once subscribed: a message a device sends after start() returns is routed to this session
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
        if self._stopping:
            return  # not acknowledged: the broker redelivers it in the next session
        try:
            item = self.validate(message.topic, message.payload, bool(message.retain), message.mid, message.qos)
        except Exception as e:  # never out of the callback: that would end paho's thread
            self._count(f"not stored: {type(e).__name__}: {e}", message.topic)
            item = None
        if item is None:
            if message.qos > 0:
                client.ack(message.mid, message.qos)
            return
        self._queue.put(item)  # blocks while the queue is full: paho stops reading, the broker holds the rest

    def validate(self, topic: str, payload: bytes, retained: bool = False, mid: int = 0, qos: int = 0) -> Item | None:
        """The message as an Item for the writer; None for one that is counted as invalid (or empty) and dropped."""
        received = time.time()
        if not payload:  # a retained message being cleared
            return None
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
            return None
        return Item(msg, kind, received, retained, mid, qos, topic, self._session)

    # -- the writer (its own thread) ------------------------------------------------------------
    def _write_loop(self, client: mqtt.Client, q: queue.Queue) -> None:
        held: list[Item] = []  # a batch the store failed on: kept, not acknowledged, tried again
        delay = RETRY_S
        done = False
        while not (done and not held):
            if done and self._halt.is_set():
                return  # stopping while the store fails: the broker redelivers what is held
            batch, done = _take(q, held, self.batch_max, done)
            if not batch:
                continue
            held = self._write(client, batch)
            if held:
                self._halt.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            else:
                delay = RETRY_S

    def _write(self, client: mqtt.Client, batch: list[Item]) -> list[Item]:
        """Store one batch, then acknowledge it (MQTT, then end to end); returns what to hold and try again."""
        try:
            results = self.store.record_many([(i.msg, i.received, i.retained) for i in batch])
        except Exception as e:
            self._once(f"storing a batch of {len(batch)} failed ({type(e).__name__}: {e}); not acknowledged, "
                       "held and tried again", e)
            with self._lock:
                self.store_errors += 1
            if len(batch) == 1:
                return batch
            return self._one_by_one(client, batch)
        self._settled(client, batch, results)
        return []

    def _one_by_one(self, client: mqtt.Client, batch: list[Item]) -> list[Item]:
        """After a failed batch: each message alone. When none goes in the store is at fault: hold them all (after
        FAIL_FIRST failures in a row, without trying the rest; those that failed go last, so that next time the
        others are tried first). When some do, those that fail are bad messages: counted, acknowledged, dropped."""
        good: list[tuple[Item, bool | str]] = []
        bad: list[tuple[Item, Exception]] = []
        for n, item in enumerate(batch):
            if not good and len(bad) >= FAIL_FIRST:
                return batch[n:] + [i for i, _ in bad]
            try:
                good.append((item, self.store.record_many([(item.msg, item.received, item.retained)])[0]))
            except Exception as e:
                bad.append((item, e))
        if not good:
            return batch
        again = []  # the store works: a message that failed while it did not (a transient error) gets one more try
        for item, _ in bad:
            try:
                good.append((item, self.store.record_many([(item.msg, item.received, item.retained)])[0]))
            except Exception as e:
                again.append((item, e))
        bad = again
        for item, e in bad:
            self._count(f"not stored: {type(e).__name__}: {e}", item.topic)
        self._settled(client, [i for i, _ in good] + [i for i, _ in bad],
                      [r for _, r in good] + [None] * len(bad))
        return []

    def _settled(self, client: mqtt.Client, batch: list[Item], results: list) -> None:
        """After the commit: count, acknowledge each message to the broker, and each device what it has stored
        (``None`` in ``results``: a message dropped, acknowledged to the broker only)."""
        self._tally(batch, results)
        with self._lock:
            self.batches += 1
        for item in batch:
            # After a reconnect the broker redelivers what was not acknowledged (same packet ids, a new copy in the
            # queue) and may then reuse an id for another message: only the copy of this connection is acked.
            if item.qos > 0 and item.session == self._session:
                client.ack(item.mid, item.qos)
        if self.acks:
            self._acknowledge(client, batch, results)

    def _tally(self, batch: list[Item], results: list) -> None:
        for item, result in zip(batch, results):
            if isinstance(result, str):  # a quality message that does not fit its bundle
                self._count(result, item.topic)
            elif result is not None:
                with self._lock:
                    self.received += 1
                    self.duplicates += result is False

    def _acknowledge(self, client: mqtt.Client, batch: list[Item], results: list) -> None:
        """One ack message per device (and boot id) of the batch: the seq ranges it has stored."""
        stored: dict[tuple[str, str], list[int]] = defaultdict(list)
        for item, result in zip(batch, results):
            if result is not None and item.kind in SEQUENCED:
                stored[(item.msg.device_id, item.msg.boot_id)].append(item.msg.seq)
        now = time.time()
        for (device_id, boot_id), seqs in stored.items():
            ranges = protocol.seq_ranges(seqs)
            for i in range(0, len(ranges), protocol.MAX_ACK_RANGES):
                ack = protocol.Ack(device_id=device_id, boot_id=boot_id, time=now,
                                   ranges=ranges[i:i + protocol.MAX_ACK_RANGES])
                info = client.publish(protocol.topic(device_id, protocol.ACK), protocol.encode(ack), qos=0)
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    with self._lock:
                        self.acks_sent += 1

    def _once(self, text: str, e: Exception) -> None:
        key = type(e).__name__
        if key not in self._logged:
            self._logged.add(key)
            log.error("%s (logged once per kind of error)", text)

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


def subscriptions(share: str | None, opts: SubscribeOptions, states: bool = True
                  ) -> list[tuple[str, SubscribeOptions]]:
    """What the link subscribes to. Alone: every kind of every device. As one of several workers (``share``, a
    group name): telemetry, events and quality through MQTT v5 shared subscriptions (``$share/<group>/...``), so
    the broker gives each message to one worker of the group; but ``state`` on a plain subscription, because a
    broker never sends retained messages on a shared subscription (MQTT 5, 4.8.2), and only in the leader
    (``states``: ``Link.follow_states``): one worker records the states in the order the broker sent them (several
    would each record every state, and a slow one could record an older state after a newer one: an online/offline
    flap), and a new leader's new subscription gets every device's retained state, so it starts from the latest."""
    state = [(protocol.subscription(protocol.STATE), opts)] if states else []
    if share is None:
        return state + [(protocol.subscription(kind), opts) for kind in STORED if kind != protocol.STATE]
    shared = SubscribeOptions(qos=1)  # no retain handling: shared subscriptions get no retained messages anyway
    return state + [
        (f"$share/{share}/{protocol.subscription(kind)}", shared) for kind in STORED if kind != protocol.STATE]


def _take(q: queue.Queue, held: list[Item], most: int, done: bool) -> tuple[list[Item], bool]:
    """The next batch: what is held, then what the queue has (waiting for the first message, then LINGER_S for
    more), at most ``most``; and whether the end-of-queue mark was taken."""
    batch = list(held)
    if done:
        return batch, True
    deadline = None
    while len(batch) < most:
        if deadline is None and not batch:
            timeout = 0.5
        else:
            deadline = deadline or time.monotonic() + LINGER_S
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
        try:
            item = q.get(timeout=timeout)
        except queue.Empty:
            if not batch:
                return batch, False
            break
        if item is _STOP:
            return batch, True
        batch.append(item)
    return batch, False


def _empty(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def _reason(e: Exception) -> str:
    """A reason to count under: the error without the parts that differ from message to message."""
    text = str(e)
    if text.startswith(("not an edgefleet v1 topic", "invalid device id")):
        return text.split(":")[0]
    return re.sub(r"\s*\(byte \d+\)", "", text)[:300]
