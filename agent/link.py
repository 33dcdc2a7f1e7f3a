"""The agent's one MQTT link: birth state and last will, desired/cmd in, the outbox out.

paho-mqtt 2.x, the idiomatic way, built by ``agent.transport`` (MQTT v5, mutual TLS with the device's
certificate on an mqtts:// broker): VERSION2 callbacks, a retained last will, connect + loop_start, a
persistent session (clean start off, a session expiry of days), subscribe inside on_connect (so a reconnect
resubscribes), QoS 1 out. A PUBACK with a failure reason code (the broker's ACL refused the topic: 0x87) is
counted in ``refused`` and the message leaves the outbox: sending it again would be refused again.

Telemetry and events never go to paho straight: they are queued on disk (agent/outbox.py), and a
publisher thread hands them to paho in seq order, at most ``window`` unacknowledged at a time. A
message leaves the outbox only when its PUBACK arrives (``on_publish``: paho's mid -> our seq), or, with a
controller that acknowledges end to end, when the controller's ack arrives (below). On a
disconnect the messages in flight stay with paho, which re-sends them (DUP set, same mid) as soon as it
reconnects, so their PUBACK still finds its seq; sending them again ourselves would send each twice.
If the process dies instead, they are still in the outbox and go out after the next start. Either way
the controller may see a message twice and drops the copy by (device, boot_id, seq).

The retained ``state`` (birth on connect, offline on stop, the last will) is not queued: only the
latest one matters and the broker keeps it.

End-to-end acknowledgement. A PUBACK only says the broker took a message; a broker that dies before it saved
its queue (mosquitto saves every ``autosave_interval``, 30 min by default) loses what it acknowledged while the
controller was away. A controller that acknowledges what it stored (``protocol.Ack`` on
``edgefleet/v1/<id>/ack``, which the link subscribes to: seq ranges per boot id) lets the device do better: a
PUBACKed message then stays in the outbox until the controller's ack deletes it, and one that stays
unacknowledged is sent again after ``ACK_TIMEOUT_S`` (30 s), the wait doubling for each message up to
``ACK_TIMEOUT_MAX_S`` (10 min). While no ack answers the last re-sends (the controller is away, or the broker
lost its subscription) only one message is sent again at a time, as a probe, with the same doubling wait: a
long absence does not flood the controller's queue at the broker with copies; once acks come again the rest
that is due follows, a window at a time. A re-send is the stored payload, same boot_id and seq: the controller's dedupe
makes it harmless. Re-sends go through the same window as new messages. An ack is applied only to messages whose
payload carries its boot_id (after a lost outbox seqs may start again under a new boot_id).

Which mode, with a controller that may predate acks: the link holds messages for the controller's ack only once
it has seen one, and remembers that in the outbox (``Outbox.acked_at``) so that it holds them across restarts
too (a restart while the controller is away is part of the failure it guards against). Until then PUBACK deletes
as before: an agent talking to a controller that never acknowledges keeps working as it always did, with no
re-sends and no growth. If no ack comes for ``outbox_max_age_s`` (what the outbox keeps at most anyway) the link
falls back to PUBACK mode until the next ack: a controller downgraded to one without acks costs at most that
long of holding and backed-off re-sends, within the outbox's bounds. Messages the controller never acknowledges
(it refused them as invalid; a quality message refused for its bundle is acknowledged) are re-sent, backing off,
until the outbox's bounds drop them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import msgspec

from agent import protocol, transport
from agent.outbox import Outbox

log = logging.getLogger("edgefleet.agent.link")

WINDOW = 64  # queued messages handed to paho and not yet acknowledged, at most
DIAGNOSE_EVERY_S = 30.0  # a failing connection is probed for its reason at most this often
SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our subscriptions and queued commands this long
MAX_REASONS = 100  # distinct reasons for dropped messages counted one by one; the rest under "other"
ACK_TIMEOUT_S = 30.0  # a message the broker took but the controller did not acknowledge is sent again after this
ACK_TIMEOUT_MAX_S = 600.0  # ... the wait doubling for each message up to this
ACK_NOTE_EVERY_S = 60.0  # how often the time of the controller's last ack is written to the outbox


class _BootId(msgspec.Struct):  # the one field an ack is matched on, read from a queued payload
    boot_id: str = ""


class Link:
    def __init__(
        self,
        device_id: str,
        broker: transport.BrokerUrl,
        *,
        tls: transport.Tls | None = None,
        keepalive: int,
        birth: Callable[[], protocol.State],
        on_desired: Callable[[protocol.Desired], None],
        on_cmd: Callable[[protocol.Cmd], None],
        outbox: Outbox,
        window: int = WINDOW,
        on_invalid_desired: Callable[[bytes, str], object] | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt

        self._mqtt = mqtt
        self.device_id = device_id
        self.broker = broker
        self.tls = tls
        self.outbox = outbox
        self.window = window
        self._birth = birth
        self._on_desired = on_desired
        self._on_cmd = on_cmd
        self._on_invalid_desired = on_invalid_desired
        self._connected = threading.Event()
        self._stopping = False
        self._failed: str | None = None  # why the broker cannot be reached (or refused us), while it cannot be
        self._diagnosing, self._diagnosed_at = False, float("-inf")
        self.dropped: dict[str, int] = {}  # invalid messages received, by reason (at most MAX_REASONS + "other")
        self.refused: dict[str, int] = {}  # our messages the broker refused (PUBACK reason), by reason
        # the publisher's state: touched only by its thread (and by stop() once it has ended)
        self._inflight: dict[int, int] = {}  # paho mid -> outbox seq
        self._sent_upto = 0  # the highest seq handed to paho
        self._generation = outbox.generation  # of the outbox file _sent_upto refers to
        self._acked: deque[tuple[int, bool]] = deque()  # (mid, refused) whose PUBACK came (on paho's thread)
        # end-to-end acks (see the module docstring)
        self.ack_timeout, self.ack_timeout_max = ACK_TIMEOUT_S, ACK_TIMEOUT_MAX_S
        self._acks: deque[protocol.Ack] = deque()  # the controller's acks (appended on paho's thread)
        recent = outbox.acked_at and time.time() - outbox.acked_at < outbox.max_age_s
        self.holding = bool(recent)  # PUBACKed messages wait for the controller's ack
        self._last_ack = time.monotonic()  # when an ack last came (or holding began)
        self._noted = float("-inf")  # when acked_at was last written
        self._sent: dict[int, list] = {}  # seq -> [boot_id, wait before a re-send] of what was handed to paho
        self._awaiting: dict[int, float] = {}  # seq -> when to send it again (monotonic): PUBACKed, not yet acked
        self._resent_at = float("-inf")  # when messages were last sent again
        self._probe_wait = self.ack_timeout  # while no ack answers re-sends: the wait before the next probe
        self.resent = 0  # messages sent again for want of the controller's ack
        self.acked_e2e = 0  # messages deleted on the controller's ack
        self._wake = threading.Event()
        self._halt = threading.Event()  # set by stop(): ends the publisher's back-off at once
        self._publisher = threading.Thread(target=self._publish_loop, name="agent-publisher", daemon=True)
        # with TLS the broker takes the client id from our certificate's CN (the device id) whatever we say
        self._ssl_context = tls.context() if broker.tls and tls else None
        self._c = transport.make_client(broker, device_id if broker.tls else f"edgefleet-agent-{device_id}", tls,
                                        context=self._ssl_context)
        self._keepalive = keepalive
        self._c.max_queued_messages_set(0)  # paho holds what is in flight across a reconnect (<= window + states)
        self._c.max_inflight_messages_set(window + 8)  # our window is the limit; room for state messages
        will = protocol.State(device_id=device_id, online=False, time=0.0)
        self._c.will_set(protocol.topic(device_id, protocol.STATE), protocol.encode(will), qos=1, retain=True)
        self._c.on_connect = self._connected_cb
        self._c.on_connect_fail = self._connect_fail_cb
        self._c.on_disconnect = self._disconnect_cb
        self._c.on_message = self._message_cb
        self._c.on_publish = self._published_cb

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def in_flight(self) -> int:
        """Queued messages handed to paho and not yet acknowledged by the broker."""
        return len(self._inflight)

    @property
    def awaiting(self) -> int:
        """Messages the broker acknowledged and the controller has not yet (0 unless ``holding``)."""
        return len(self._awaiting)

    @property
    def publisher_alive(self) -> bool:
        """Whether the thread that drains the outbox runs (for the agent's watchdog)."""
        return self._publisher.is_alive()

    def start(self) -> None:
        """Connect in the background and return at once: the agent serves from disk whether or not the broker
        answers (an uplink not up yet after a power cut, the controller's host down). paho retries with a
        backoff of 1 to 30 s; ``error`` says why the broker cannot be reached meanwhile, ``connected`` when it
        can. Telemetry and events wait in the outbox."""
        url = self.broker
        self._c.connect_async(url.host, url.port, keepalive=self._keepalive, clean_start=False,
                              properties=transport.connect_properties(SESSION_EXPIRY_S))
        self._c.loop_start()
        self._publisher.start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def error(self) -> str | None:
        """Why the broker could not be reached or refused us, while it cannot be; None once connected."""
        return None if self.connected else self._failed

    def _diagnose(self) -> None:
        """A failed connection: find out why in one line (paho only says "failed"), off paho's thread, at most
        once every DIAGNOSE_EVERY_S; log it when the reason changes."""
        now = time.monotonic()
        if self._diagnosing or now - self._diagnosed_at < DIAGNOSE_EVERY_S:
            return
        self._diagnosing, self._diagnosed_at = True, now

        def probe() -> None:
            try:
                transport.probe(self.broker, self.tls)
                reason = "the broker did not take the connection"
            except transport.TransportError as e:
                reason = str(e)
            finally:
                self._diagnosing = False
            if self.connected:
                return
            if reason != self._failed:
                log.warning("%s; serving from disk and trying again in the background", reason)
            self._failed = reason

        threading.Thread(target=probe, name="agent-link-probe", daemon=True).start()

    def use_identity(self, tls: transport.Tls) -> None:
        """A renewed certificate: the next (re)connection presents it; this one stays up."""
        self.tls = tls
        if self._ssl_context is not None:
            self._ssl_context.load_cert_chain(tls.cert, tls.key)

    def notify(self) -> None:
        """Something was queued in the outbox: send it now rather than on the next tick."""
        self._wake.set()

    def publish_state(self) -> None:
        self._publish_now(protocol.STATE, self._birth(), retain=True)

    def _publish_now(self, kind: str, msg: protocol.Message, retain: bool = False):
        return self._c.publish(protocol.topic(self.device_id, kind), protocol.encode(msg), qos=1, retain=retain)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sending, say goodbye (retained offline state; a clean disconnect sends no will), disconnect.

        What is still queued stays in the outbox on disk and goes out after the next start."""
        self._stopping = True
        self._halt.set()
        self._wake.set()
        if self._publisher.is_alive():
            self._publisher.join(timeout=10)
        if self.connected:
            info = self._publish_now(protocol.STATE, protocol.State(
                device_id=self.device_id, online=False, time=protocol.now(), boot_id=self._birth().boot_id),
                retain=True)
            try:
                info.wait_for_publish(timeout)  # the PUBACKs of what was in flight came before this one
            except (RuntimeError, ValueError):
                pass
        self._c.disconnect()
        self._c.loop_stop()
        if not self._publisher.is_alive():
            try:
                self._settle()  # fewer repeats after the restart
            except Exception:
                log.exception("acknowledging the last messages in the outbox failed")

    # --- the publisher (its own thread) ---------------------------------------------------------
    def _publish_loop(self) -> None:
        while not self._stopping:
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stopping:
                break
            try:
                self._settle()
                if self.connected:
                    self._send()
            except Exception:  # a full disk, a broken file: log, keep going
                log.exception("sending from the outbox failed")
                self._halt.wait(1.0)  # not time.sleep: it fails under libfaketime's real-time-only shift

    def _settle(self) -> None:
        """Remove from the outbox what is acknowledged: by the controller, or by the broker when not ``holding``."""
        if self.outbox.generation != self._generation:  # the file was replaced (corrupt): its seqs mean nothing
            self._generation, self._sent_upto = self.outbox.generation, 0  # send the new file from its start
            self._inflight.clear()  # and let late PUBACKs of the old one ack nothing
            self._sent.clear()
            self._awaiting.clear()
        now = time.monotonic()
        acks = []
        while self._acks:
            acks.append(self._acks.popleft())
        if acks:
            self._last_ack, self._probe_wait = now, self.ack_timeout
            if not self.holding:
                self.holding = True
                log.info("the controller acknowledges what it stores: messages stay queued until it has")
            if now - self._noted >= ACK_NOTE_EVERY_S:
                self._noted = now
                self.outbox.note_acks(time.time())
        elif self.holding and now - self._last_ack > self.outbox.max_age_s:
            self.holding = False
            log.warning("no acknowledgement from the controller for %g s: the broker's PUBACK deletes messages "
                        "again until the next one", self.outbox.max_age_s)
            gone = list(self._awaiting)
            self._awaiting.clear()
            for seq in gone:
                self._sent.pop(seq, None)
            self.outbox.ack(gone)
        seqs = []
        while self._acked:
            mid, refused = self._acked.popleft()
            seq = self._inflight.pop(mid, None)  # None: a state message
            if seq is None:
                continue
            sent = self._sent.get(seq)
            if sent is None:  # the controller's ack came first
                continue
            if self.holding and not refused:
                self._awaiting[seq] = now + sent[1]
            else:
                del self._sent[seq]
                seqs.append(seq)
        for ack in acks:
            seqs += self._acknowledged(ack)
        if seqs:
            self.outbox.ack(seqs)

    def _acknowledged(self, ack: protocol.Ack) -> list[int]:
        """The seqs handed to paho that ``ack`` covers (their payload carrying its boot_id), forgotten here."""
        out = []
        for first, last in ack.ranges:
            seqs = range(first, last + 1) if last - first < len(self._sent) else \
                [s for s in self._sent if first <= s <= last]
            for seq in seqs:
                sent = self._sent.get(seq)
                if sent is not None and sent[0] == ack.boot_id:
                    del self._sent[seq]
                    self._awaiting.pop(seq, None)
                    out.append(seq)
        self.acked_e2e += len(out)
        return out

    def _send(self) -> None:
        """Hand paho what is due again, then the next queued messages, in seq order, up to the window."""
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        now = time.monotonic()
        due: list[int] = []
        if self._awaiting:
            quiet = self._last_ack < self._resent_at  # no ack since the last re-sends: the controller seems away
            if not quiet or now >= self._resent_at + self._probe_wait:
                due = sorted(s for s, t in self._awaiting.items() if t <= now)[:1 if quiet else room]
                if due and quiet:  # one message probes; the rest waits for the controller to answer
                    self._probe_wait = min(self._probe_wait * 2, self.ack_timeout_max)
        if due:
            self._resent_at = now
            found = self.outbox.get(due)
            for seq in set(due) - {m.seq for m in found}:  # dropped by the outbox's bounds meanwhile
                self._awaiting.pop(seq, None)
                self._sent.pop(seq, None)
            for m in found:
                if not self._publish(m):
                    return
                del self._awaiting[m.seq]
                sent = self._sent[m.seq]
                sent[1] = min(sent[1] * 2, self.ack_timeout_max)
                self.resent += 1
                room -= 1
        if room <= 0 or self._sent_upto >= self.outbox.last_seq:  # full, or nothing new
            return
        for m in self.outbox.pending(room, after=self._sent_upto):
            if not self._publish(m):
                return
            self._sent_upto = m.seq
            if m.seq not in self._sent:
                self._sent[m.seq] = [_boot_id(m.payload), self.ack_timeout]

    def _publish(self, m) -> bool:
        ok = (self._mqtt.MQTT_ERR_SUCCESS, self._mqtt.MQTT_ERR_NO_CONN)  # NO_CONN: paho sends it on reconnect
        info = self._c.publish(protocol.topic(self.device_id, m.kind), m.payload, qos=1)
        if info.rc not in ok:
            log.warning("paho did not take message %d (%s); retrying", m.seq, info.rc)
            return False
        self._inflight[info.mid] = m.seq
        return True

    # --- paho callbacks (on paho's thread): never raise, never block -----------------------------
    def _connected_cb(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            reason = f"broker {self.broker} refused the connection: {reason_code}"
            if reason != self._failed:
                log.warning("%s; trying again in the background", reason)
            self._failed = reason
            return
        client.subscribe([(protocol.topic(self.device_id, protocol.DESIRED), 1),
                          (protocol.topic(self.device_id, protocol.CMD), 1),
                          (protocol.topic(self.device_id, protocol.ACK), 1)])
        self.publish_state()
        self._failed = None
        self._connected.set()
        self._wake.set()
        log.info("connected to %s", self.broker)

    def _connect_fail_cb(self, client, userdata) -> None:
        if self._failed is None:
            self._failed = f"cannot reach broker {self.broker}"
        self._diagnose()

    def _disconnect_cb(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected.is_set() and not self._stopping:
            log.warning("disconnected from broker (%s); reconnecting, %d queued messages in flight",
                        reason_code, len(self._inflight))
            self._failed = f"lost the broker {self.broker} ({reason_code})"
        elif not self._stopping:  # an attempt that ended before the CONNACK (TLS 1.3 refuses a certificate here)
            if self._failed is None:
                self._failed = f"broker {self.broker} closed the connection before accepting it"
            self._diagnose()
        self._connected.clear()

    def _published_cb(self, client, userdata, mid, reason_code, properties) -> None:
        # The PUBACK of a QoS 1 message. Only note it here: paho holds its message lock while calling us, and
        # the outbox write belongs to the publisher thread.
        failed = reason_code is not None and reason_code.is_failure
        if failed:  # e.g. 0x87 Not authorized: the ACL refused it
            reason = str(reason_code)
            if reason not in self.refused:
                log.error("the broker refused a message of ours: %s (counted; it is not sent again)", reason)
            self.refused[reason] = self.refused.get(reason, 0) + 1
        self._acked.append((mid, failed))
        self._wake.set()

    def _message_cb(self, client, userdata, message) -> None:
        kind = None
        try:
            _, kind = protocol.parse_topic(message.topic)
            if not message.payload:  # a cleared retained message
                return
            msg = protocol.decode(kind, message.payload)
            if kind == protocol.DESIRED:
                self._on_desired(msg)
            elif kind == protocol.CMD:
                self._on_cmd(msg)
            elif kind == protocol.ACK:
                if msg.device_id != self.device_id:
                    raise protocol.ProtocolError("ack for another device")
                self._acks.append(msg)  # applied by the publisher thread, which owns the outbox's writes
                self._wake.set()
        except protocol.ProtocolError as e:
            reason = str(e)
            try:
                if kind == protocol.DESIRED and self._on_invalid_desired is not None:
                    self._on_invalid_desired(message.payload, reason)  # a refusal the controller must see
            except Exception:
                log.exception("reporting an invalid desired message failed")
            if reason not in self.dropped and len(self.dropped) >= MAX_REASONS:
                reason = "other"
            if reason not in self.dropped:
                log.warning("dropped an invalid message on %s: %s", message.topic, reason)
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
        except Exception:  # a bug in a handler must not kill the network thread
            log.exception("handling %s failed", message.topic)


def _boot_id(payload: bytes) -> str:
    """The boot_id a queued payload carries ("" if it cannot be read: no ack then matches it)."""
    try:
        return msgspec.json.decode(payload, type=_BootId).boot_id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""
