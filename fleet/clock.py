"""Device clocks on the controller's time line: each device's clock offset, estimated from its messages alone.

Every telemetry window and event carries the time the device's clock said when it was built (``sent``); the
controller notes when it arrived (``received``). ``received - sent = offset + delay``: ``offset`` is what must
be added to the device's clock to read the controller's (positive: the device is behind), ``delay`` >= 0 is the
network and every queue on the way (the agent's outbox while the broker was away, the broker's queue while
the controller was). So every message is an upper bound on the offset, and the smallest ``received - sent``
is the estimate: the least delayed message's. A replay after an outage arrives with a large value (queueing,
not the clock) and never raises the estimate. Estimates are kept per (device, boot id): a reboot may come
with another clock (a board without a real-time clock boots at its last saved time).

Steps. A clock may be stepped mid-run (NTP syncing: from 400 days behind to right; or back). A device's seq
follows the order its messages were built, and a running agent sends a telemetry window at least every
``interval_s``; so messages ``n`` seqs apart were built at most ``n x (2 x interval_s + SLACK_S)`` apart. When
the sent times of seq neighbours are further apart than that, or go back by more than ``BACK_S``, the clock
was stepped between them: from that seq on, a new *regime* is estimated afresh. Each regime keeps its own
offset, so a message stamped before a step that arrives after it (queued meanwhile) is still read with the
offset of the clock that stamped it. A step smaller than those bounds looks like delay: the estimate follows
a forward one at once and a backward one only through drift (below).

Drift. A crystal drifts up to about 100 ppm: a regime's estimate rises by ``DRIFT`` x the seconds since the
sample that set it, unless a new sample is lower. A clock running slow is followed; a replay cannot raise the
estimate by more than that between two fresh messages.

Filing. A message is filed at ``sent + offset`` of its regime (never after it arrived). While a regime starts
with queued messages (an agent that started without its broker sends its backlog first) its estimate is too
high and those rows land too late; when a fresher message lowers it by more than ``REFILE_S`` below what its
rows were filed with, ``Regime.needs_refile`` says so and the store moves the regime's rows (``fleet.store``).

Pure: messages in, estimates out (``observe``, ``estimate``); the store persists a ``Clock`` per boot as JSON and
re-files with SQL (``Store.refile``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import msgspec

DRIFT = 1e-4  # the most a device's clock is assumed to drift against the controller's (100 ppm)
SLACK_S = 30.0  # a late telemetry window: the agent's watchdog allows 2 intervals + 30 s
BACK_S = 2.0  # sent times of seq neighbours may go back this much (two threads stamp, one queue orders)
REFILE_S = 1.0  # rows filed this much later than the regime's estimate now says are moved
MAX_REGIMES = 16  # the regimes kept per boot (a late message older than them is read with the oldest)
DEFAULT_INTERVAL_S = 10.0


class Regime(msgspec.Struct):
    """A stretch of one boot's messages (seq >= ``seq``, up to the next regime) stamped by one clock setting."""

    seq: int  # its first seq
    offset: float  # received - sent of the least delayed sample, as of ``at``
    at: float  # the controller time that sample arrived
    filed: float  # the largest offset its stored rows were filed with

    def value(self, now: float) -> float:
        """The estimate at controller time ``now``: raised by the drift allowed since ``at``."""
        return self.offset + DRIFT * max(0.0, now - self.at)

    @property
    def needs_refile(self) -> bool:
        return self.filed - self.offset > REFILE_S


class Clock(msgspec.Struct):
    """One (device, boot)'s clock: its regimes (by first seq) and the last in-order message."""

    regimes: list[Regime] = []
    last_seq: int = 0
    last_sent: float = 0.0
    jumps: int = 0  # steps detected

    @property
    def offset(self) -> float:
        """The current regime's estimate (received - sent: positive when the device is behind)."""
        return self.regimes[-1].offset

    def regime(self, seq: int) -> Regime:
        """The regime a seq belongs to (the oldest kept for a seq before them all)."""
        found = self.regimes[0]
        for r in self.regimes:
            if r.seq <= seq:
                found = r
        return found

    def span(self, r: Regime) -> tuple[int, int]:
        """[first seq, next regime's first seq) of a regime."""
        i = self.regimes.index(r)
        return r.seq, self.regimes[i + 1].seq if i + 1 < len(self.regimes) else 2**62

    def dump(self) -> bytes:
        """As the store keeps it (JSON)."""
        return _ENCODER.encode(self)

    @classmethod
    def load(cls, doc: bytes | str) -> "Clock":
        return _DECODER.decode(doc)


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(Clock)


def stepped(step: float, seqs: int, interval_s: float) -> bool:
    """Whether sent times ``step`` seconds apart, ``seqs`` seqs apart, mean the clock was stepped between them."""
    interval = interval_s if interval_s and interval_s > 0 and math.isfinite(interval_s) else DEFAULT_INTERVAL_S
    return step < -BACK_S or step > seqs * (2 * interval + SLACK_S)


def observe(clock: Clock | None, seq: int, sent: float, received: float,
            interval_s: float = DEFAULT_INTERVAL_S) -> tuple[Clock, float]:
    """Take one message of a boot into its clock (None: the boot's first): (the clock, updated in place; the
    controller time to file the message at)."""
    d = received - sent
    if clock is None or not clock.regimes:
        clock = Clock(regimes=[Regime(seq=seq, offset=d, at=received, filed=d)], last_seq=seq, last_sent=sent)
        return clock, received
    if seq > clock.last_seq:  # in order: the usual case
        if stepped(sent - clock.last_sent, seq - clock.last_seq, interval_s):
            clock.regimes = (clock.regimes + [Regime(seq=seq, offset=d, at=received, filed=d)])[-MAX_REGIMES:]
            clock.jumps += 1
        clock.last_seq, clock.last_sent = seq, sent
        r = clock.regimes[-1]
    else:  # late (a redelivery overtaken by newer ones): read with the regime of its seq, teaching it nothing
        r = clock.regime(seq)  # (had a step come between it and its seq neighbours, no one would know)
        value = r.value(received)
        r.filed = max(r.filed, value)
        return clock, min(received, sent + value)
    value = r.value(received)
    if d <= value:
        r.offset, r.at, value = d, received, d
    r.filed = max(r.filed, value)
    return clock, min(received, sent + value)


def estimate(messages: Iterable[tuple[int, float, float]], interval_s: float = DEFAULT_INTERVAL_S
             ) -> tuple[Clock, list[float]]:
    """(seq, sent, received) of one boot, in arrival order -> (its clock, each message's filing time)."""
    clock: Clock | None = None
    filed = []
    for seq, sent, received in messages:
        clock, t = observe(clock, seq, sent, received, interval_s)
        filed.append(t)
    if clock is None:
        raise ValueError("no messages")
    return clock, filed


def amount(seconds: float) -> str:
    """A length of time in the largest unit it fills: ``400.0 d``, ``5.0 min``, ``3.2 s``."""
    a = abs(seconds)
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if a >= size:
            return f"{a / size:.1f} {unit}"
    return f"{a:.1f} s"


def describe(offset_s: float | None) -> str:
    """An offset in words: ``400.0 d behind``, ``3.2 s ahead``, ``within 1 s``, ``unknown``."""
    if offset_s is None:
        return "unknown"
    if abs(offset_s) < 1.0:
        return "within 1 s"
    return f"{amount(offset_s)} {'behind' if offset_s > 0 else 'ahead'}"
