"""One simulated device (fleet/simulate.py): an enrolled identity on its own MQTT connection, speaking the
contract of ``agent/protocol.py`` as the agent does, without running a model.

- ``state``: the retained birth on every connect (boot id, agent version, arch, the active model), the retained
  last will ``online: false``, and an offline state on a clean stop;
- ``telemetry``: one window every ``interval`` seconds, at a random phase per device (so a thousand devices do
  not publish in the same millisecond), with made-up but plausible figures (inferences, latency, CPU, memory);
- ``events``: a ``desired`` is checked as the agent checks it (``agent.updater.check_signed``: the controller's
  signature, this device, not expired, its counter not lower) and answered with the agent's sequence
  downloading, verifying, activating, active; or ``failed`` at a step, with probability ``rate_errors``;
  a refused desired gets one ``failed`` event, as the agent's; a ``rollback`` command goes back to the model
  it ran before (``rolled_back``);
- one seq counter per device for telemetry and events, kept in the simulator's state dir across runs, as the
  agent's outbox keeps it, so the controller's gap accounting holds; what the broker has not acknowledged
  is sent again after a reconnect (simmqtt);
- end-to-end acks, as agent/link.py: each telemetry window and event is kept (in memory) until the controller's
  ``ack`` names its seq for this boot, and sent again after ``ack_timeout`` (the wait doubling per message up to
  ACK_TIMEOUT_MAX_S) while it is not: a PUBACK only says the broker took it, and a broker, or a controller worker
  it was handed to, may lose it after that. At most MAX_BACKLOG are kept (then the oldest goes, counted in
  ``unacked_dropped``: against a controller that never acknowledges, memory stays bounded).
"""

from __future__ import annotations

import asyncio
import hashlib
import platform
import random
import ssl
import time
import urllib.request
from dataclasses import dataclass, field

import msgspec

from agent import __version__, protocol, signing
from agent.identity import Identity
from agent.updater import check_signed
from fleet.simmqtt import Connection, MqttError

SESSION_EXPIRY_S = 3600  # the broker keeps a simulated device's session (and what it queued) this long
MAX_BACKLOG = 1000  # windows queued while disconnected, at most (then windows are skipped: no seq is spent)
STEPS = ("downloading", "verifying", "activating")
LAG_SAMPLES = 100_000
ACK_TIMEOUT_S = 30.0  # as agent/link.py: a message the controller has not acknowledged is sent again after this
ACK_TIMEOUT_MAX_S = 600.0  # ... the wait doubling for each message up to this


@dataclass
class Settings:
    """What every simulated device does (the CLI's options)."""

    interval: float = 10.0
    rate_errors: float = 0.01
    update_s: float = 1.0  # how long downloading + verifying + activating take together (without --download)
    download: bool = False
    inferences_per_s: float = 5.0
    ack_timeout: float = ACK_TIMEOUT_S  # re-send what the controller has not acknowledged after this


@dataclass
class Counts:
    """The simulator's totals, shared by its devices (one event loop: no lock)."""

    connected: int = 0
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    telemetry: int = 0
    events: int = 0
    skipped: int = 0
    desired: int = 0
    refused: int = 0
    updates_active: int = 0
    updates_failed: int = 0
    rolled_back: int = 0
    resent: int = 0  # messages sent again for want of the controller's ack
    unacked_dropped: int = 0  # kept messages given up on (more than MAX_BACKLOG waiting for an ack)
    downloaded_bytes: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    # seconds from a message's first publish to the controller's ack of it (stored and acknowledged): a uniform
    # sample of at most LAG_SAMPLES, for the summary's percentiles
    ack_lags: list[float] = field(default_factory=list)
    acked: int = 0

    def lag(self, seconds: float) -> None:
        self.acked += 1
        if len(self.ack_lags) < LAG_SAMPLES:
            self.ack_lags.append(seconds)
        else:  # reservoir sampling: every message equally likely to be in the sample
            i = random.randrange(self.acked)
            if i < LAG_SAMPLES:
                self.ack_lags[i] = seconds

    def error(self, reason: str) -> None:
        if reason in self.errors or len(self.errors) < 20:
            self.errors[reason] = self.errors.get(reason, 0) + 1
        else:
            self.errors["other"] = self.errors.get("other", 0) + 1


class Limiter:
    """At most ``rate`` acquisitions a second, spread evenly (connections and reconnections)."""

    def __init__(self, rate: float) -> None:
        self.gap = 1.0 / rate
        self._next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        at = max(now, self._next)
        self._next = at + self.gap
        if at > now:
            await asyncio.sleep(at - now)


class SimDevice:
    def __init__(self, ident: Identity, saved: dict | None, settings: Settings, counts: Counts, rng: random.Random,
                 downloads: asyncio.Semaphore) -> None:
        """``saved``: what ``saved()`` returned in an earlier run (the seq counter, the model it ran), or None."""
        self.ident = ident
        self.downloads = downloads
        self.id = ident.device_id
        self.seq = int((saved or {}).get("seq", 0))
        self.boot_id = rng.getrandbits(64).to_bytes(8, "big").hex()
        self.s, self.counts, self.rng = settings, counts, rng
        self.conn = Connection(self._on_message)
        self.active: protocol.ActiveModel | None = None
        if (saved or {}).get("active"):
            try:
                self.active = msgspec.convert(saved["active"], protocol.ActiveModel)
            except msgspec.ValidationError:
                pass  # as an agent whose model store lost its current model: it runs none
        self.previous: protocol.ActiveModel | None = None
        key_path = ident.controller_key_path
        self.key = signing.load_public(key_path) if key_path is not None else None
        self.counters = {"desired": 0, "cmd": 0}
        self.issued = 0.0
        self._want: protocol.Desired | None = None
        self._done: set[tuple[str, str]] = set()
        self._updating: asyncio.Task | None = None
        self._refused: set[bytes] = set()
        self._stopping = False
        self._quiet = False
        self.latency_ms = rng.uniform(4.0, 30.0)  # this device's typical inference latency
        self._context: ssl.SSLContext | None = None  # made once, for every (re)connection
        # seq -> (topic, payload, when to send it again (monotonic), the wait after that, when first sent): not yet
        # acknowledged
        self.unacked: dict[int, tuple[str, bytes, float, float, float]] = {}

    def saved(self) -> dict:
        """What the next run starts from (the agent keeps these on disk: its outbox's seq, its current model)."""
        return {"seq": self.seq, "active": msgspec.to_builtins(self.active) if self.active else None}

    # -- the connection -----------------------------------------------------------------------------------
    async def run(self, limiter: Limiter, stop: asyncio.Event) -> None:
        """Connect (through ``limiter``), stay connected, reconnect with a back-off of 1 to 30 s, until ``stop``."""
        ticker = asyncio.get_running_loop().create_task(self._tick(stop))
        resender = asyncio.get_running_loop().create_task(self._resend(stop))
        delay = 1.0
        url = self._broker()
        will = (protocol.topic(self.id, protocol.STATE),
                protocol.encode(protocol.State(device_id=self.id, online=False, time=0.0)))
        keepalive = min(65535, max(60, int(self.s.interval * 2) + 10))
        try:
            while not stop.is_set():
                await limiter.wait()
                if stop.is_set():
                    break
                try:
                    if url.tls and self._context is None:  # ~10 ms of OpenSSL (its PEM decoders), GIL released:
                        self._context = await asyncio.to_thread(self.ident.tls.context)  # not on the loop
                    context = self._context
                    await self.conn.connect(url.host, url.port, context, self.id, keepalive, SESSION_EXPIRY_S, will)
                    await self.conn.subscribe([protocol.topic(self.id, protocol.DESIRED),
                                               protocol.topic(self.id, protocol.CMD),
                                               protocol.topic(self.id, protocol.ACK)])
                except (MqttError, ssl.SSLError, OSError) as e:
                    self.counts.connect_failures += 1
                    self.counts.error(f"connect: {e}")
                    await _sleep(stop, delay * self.rng.uniform(0.5, 1.0))
                    delay = min(delay * 2, 30.0)
                    continue
                delay = 1.0
                self.counts.connects += 1
                self.counts.connected += 1
                self.publish_state()
                await _first(stop.wait(), self.conn.closed.wait())
                self.counts.connected -= 1
                if not stop.is_set():
                    self.counts.disconnects += 1
                    self.counts.error(f"disconnected: {self.conn.error}")
        finally:
            ticker.cancel()
            resender.cancel()
            if self._updating is not None:
                self._updating.cancel()

    def _broker(self):
        from agent.transport import parse_url

        return parse_url(self.ident.broker)

    async def stop(self, timeout: float) -> None:
        """Wait (up to ``timeout``) for the broker to acknowledge what is pending, say offline, disconnect."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        while self.conn.connected and self.conn.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.conn.connected:
            self.conn.publish(protocol.topic(self.id, protocol.STATE), protocol.encode(protocol.State(
                device_id=self.id, online=False, time=protocol.now(), boot_id=self.boot_id)), retain=True)
            while self.conn.connected and self.conn.pending and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        await self.conn.disconnect()

    # -- what it sends ---------------------------------------------------------------------------------------
    def publish_state(self) -> None:
        birth = protocol.State(device_id=self.id, online=True, time=protocol.now(), boot_id=self.boot_id,
                               agent_version=f"{__version__}+sim", arch=platform.machine()[:32],
                               runtimes=["onnxruntime"], active=self.active, clock_synced=True)
        self.conn.publish(protocol.topic(self.id, protocol.STATE), protocol.encode(birth), retain=True)

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def telemetry(self) -> protocol.Telemetry:
        s, rng = self.s, self.rng
        count = int(s.inferences_per_s * s.interval * rng.uniform(0.8, 1.2)) if self.active else 0
        latency, hist = None, []
        if count:
            p50 = self.latency_ms * rng.uniform(0.9, 1.1)
            latency = protocol.Latency(p50=p50, p95=p50 * 1.5, p99=p50 * 2, max=p50 * 3, mean=p50 * 1.1)
            hist = [0] * (len(protocol.LATENCY_BUCKETS_MS) + 1)
            hist[_bucket(p50)] += count - count // 10
            hist[_bucket(p50 * 2)] += count // 10
        return protocol.Telemetry(
            device_id=self.id, boot_id=self.boot_id, seq=self._next_seq(), time=protocol.now(),
            interval_s=s.interval, inferences=count, latency_ms=latency, histogram=hist, active=self.active,
            cpu_percent=round(rng.uniform(5, 40), 1), rss_bytes=150 << 20, memory_percent=12.0,
            disk_free_bytes=8 << 30, temperature_c=round(rng.uniform(40, 60), 1), load1=0.5,
            outbox_pending=len(self.conn.pending), clock_synced=True)

    def quiet(self) -> None:
        """Send no more telemetry; keep answering desireds and re-sending what is not acknowledged (a test then
        sees the device's last window stored)."""
        self._quiet = True

    def publish_telemetry(self) -> None:
        if self._quiet:
            return
        if len(self.conn.pending) >= MAX_BACKLOG:
            self.counts.skipped += 1
            return
        msg = self.telemetry()
        self._send_sequenced(protocol.topic(self.id, protocol.TELEMETRY), msg.seq, protocol.encode(msg))
        self.counts.telemetry += 1

    def emit(self, kind: str, about, reason: str = "") -> None:
        """An event of the agent's: ``about`` names the deployment, sha256 and version (a Desired, or
        ``protocol.named``'s answer)."""
        ev = protocol.Event(device_id=self.id, boot_id=self.boot_id, seq=self._next_seq(), time=protocol.now(),
                            kind=kind, deployment_id=about.deployment_id, sha256=about.sha256,
                            version=about.version, reason=protocol.clip(reason))
        self._send_sequenced(protocol.topic(self.id, protocol.EVENTS), ev.seq, protocol.encode(ev))
        self.counts.events += 1

    def _send_sequenced(self, topic: str, seq: int, payload: bytes) -> None:
        """Publish, and keep the message until the controller's ack names its seq."""
        if len(self.unacked) >= MAX_BACKLOG:
            del self.unacked[min(self.unacked)]
            self.counts.unacked_dropped += 1
        wait, now = self.s.ack_timeout, time.monotonic()
        self.unacked[seq] = (topic, payload, now + wait, wait, now)
        self.conn.publish(topic, payload)

    def _on_ack(self, ack: protocol.Ack) -> None:
        if ack.boot_id != self.boot_id:
            return  # another run's: its messages are not kept here
        now = time.monotonic()
        for first, last in ack.ranges:
            if last - first < len(self.unacked):
                seqs = [q for q in range(first, last + 1) if q in self.unacked]
            else:
                seqs = [q for q in self.unacked if first <= q <= last]
            for seq in seqs:
                self.counts.lag(now - self.unacked.pop(seq)[4])

    async def _resend(self, stop: asyncio.Event) -> None:
        """Every second, while connected: send again (a new PUBLISH) what the controller has not acknowledged in
        time (a copy it stored already is dropped by its dedupe and acknowledged again)."""
        while not stop.is_set():
            await _sleep(stop, 1.0)
            if not self.conn.connected:
                continue
            now = time.monotonic()
            for seq, (topic, payload, due, wait, sent) in list(self.unacked.items()):
                if due <= now:
                    wait = min(wait * 2, ACK_TIMEOUT_MAX_S)
                    self.unacked[seq] = (topic, payload, now + wait, wait, sent)
                    self.conn.publish(topic, payload)
                    self.counts.resent += 1

    async def _tick(self, stop: asyncio.Event) -> None:
        """Telemetry every interval, from a random phase, each window a little early or late."""
        loop = asyncio.get_running_loop()
        at = loop.time() + self.rng.uniform(0, self.s.interval)
        while not stop.is_set():
            await asyncio.sleep(max(0.0, at + self.rng.uniform(-0.02, 0.02) * self.s.interval - loop.time()))
            if stop.is_set() or self._stopping:
                return
            self.publish_telemetry()
            at += self.s.interval

    # -- what it receives --------------------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            _, kind = protocol.parse_topic(topic)
            if not payload:  # a cleared retained message
                return
            msg = protocol.decode(kind, payload)
        except protocol.ProtocolError as e:
            if topic.endswith("/" + protocol.DESIRED):
                self._refuse(payload, str(e))
            self.counts.error(f"invalid message: {str(e)[:100]}")
            return
        if kind == protocol.DESIRED:
            self._on_desired(msg, payload)
        elif kind == protocol.CMD:
            self._on_cmd(msg)
        elif kind == protocol.ACK:
            self._on_ack(msg)

    def _check(self, msg, kind: str) -> str:
        why = check_signed(msg, self.key, self.id, self.counters[kind], time.time(), True, self.issued)
        if not why:
            self.counters[kind] = msg.counter
            self.issued = max(self.issued, msg.time)
        return why

    def _refuse(self, payload: bytes, why: str) -> None:
        digest = hashlib.sha256(payload).digest()
        if digest not in self._refused:  # a retained desired comes back on every reconnect: say it once
            self._refused.add(digest)
            self.counts.refused += 1
            self.emit("failed", protocol.named(payload), f"refused: {why}")

    def _on_desired(self, desired: protocol.Desired, payload: bytes) -> None:
        self.counts.desired += 1
        why = self._check(desired, "desired")
        if why:
            if not (why.startswith("desired expired") and self.active and self.active.sha256 == desired.sha256):
                self._refuse(payload, why)
            return
        self._want = desired
        if self._updating is None or self._updating.done():
            self._updating = asyncio.get_running_loop().create_task(self._update())

    def _on_cmd(self, cmd: protocol.Cmd) -> None:
        why = self._check(cmd, "cmd")
        if why:
            self.counts.error(f"refused a {cmd.kind} command: {why[:100]}")
        elif cmd.kind == "report":
            self.publish_telemetry()
        elif cmd.kind == "ping":
            self.publish_state()
        elif cmd.kind == "rollback" and self.previous is not None and self.active is not None:
            bad, self.active, self.previous = self.active, self.previous, None
            self.counts.rolled_back += 1
            self.emit("rolled_back", bad, f"rollback command {cmd.id}; back on {self.active.version} "
                                          f"({self.active.sha256[:12]})")
            self.publish_state()

    async def _update(self) -> None:
        """The agent's reconcile loop: the latest desired, until done (a newer one waits for the current step)."""
        while self._want is not None:
            desired, self._want = self._want, None
            if (desired.deployment_id, desired.sha256) in self._done:
                continue
            self._done.add((desired.deployment_id, desired.sha256))
            if self.active is not None and self.active.sha256 == desired.sha256:
                if self.active.deployment_id != desired.deployment_id:
                    self.active = protocol.ActiveModel(**{**_fields(self.active),
                                                          "deployment_id": desired.deployment_id})
                    self.emit("active", desired, "already running this bundle")
                continue
            await self._apply(desired)

    async def _apply(self, desired: protocol.Desired) -> None:
        fail_at = self.rng.choice(STEPS) if self.rng.random() < self.s.rate_errors else None
        for step in STEPS:
            self.emit(step, desired)
            if step == "downloading" and self.s.download:
                try:
                    got = await _download(desired, self.ident, self.downloads)  # not `+= await`: that adds to
                    self.counts.downloaded_bytes += got                          # the total read before the wait
                except Exception as e:  # the controller's answer or the network: the agent reports it as failed
                    self.counts.updates_failed += 1
                    self.emit("failed", desired, f"download: {e}")
                    return
            else:
                await asyncio.sleep(self.s.update_s / len(STEPS) * self.rng.uniform(0.5, 1.5))
            if step == fail_at:
                self.counts.updates_failed += 1
                self.emit("failed", desired, f"simulated failure while {step} (--rate-errors {self.s.rate_errors:g})")
                return
        self.previous = self.active
        self.active = protocol.ActiveModel(name=desired.name, version=desired.version, sha256=desired.sha256,
                                           runtime="onnxruntime", precision="fp32",
                                           deployment_id=desired.deployment_id)
        self.counts.updates_active += 1
        self.emit("active", desired, "simulated")
        self.publish_state()


def _fields(active: protocol.ActiveModel) -> dict:
    return {f: getattr(active, f) for f in active.__struct_fields__}


def _bucket(ms: float) -> int:
    for i, bound in enumerate(protocol.LATENCY_BUCKETS_MS):
        if ms <= bound:
            return i
    return len(protocol.LATENCY_BUCKETS_MS)


async def _download(desired: protocol.Desired, ident: Identity, slots: asyncio.Semaphore) -> int:
    """Fetch the bundle over HTTPS with the device's certificate (as the agent does), hashing it and keeping
    nothing; raises if its size or sha256 differ. At most ``slots`` at a time per process (threads)."""
    async with slots:
        return await asyncio.to_thread(_fetch, desired.url, desired.sha256, desired.size, ident)


def _fetch(url: str, sha: str, size: int, ident: Identity) -> int:
    if not url.startswith("https://"):
        raise ValueError(f"refusing to download {url[:200]!r}: not an https URL")
    h, n = hashlib.sha256(), 0
    with urllib.request.urlopen(url, timeout=60, context=ident.tls.context()) as resp:
        while block := resp.read(1 << 16):
            h.update(block)
            n += len(block)
            if n > size:
                break
    if n != size or h.hexdigest() != sha:
        raise ValueError(f"the bundle from {url} has {n} bytes and sha256 {h.hexdigest()[:12]}, "
                         f"not {size} and {sha[:12]}")
    return n


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def _first(*aws) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
