"""Messages the outbox holds in memory while the state dir takes no writes (agent/outbox.py): oldest first,
bounded by bytes and by age, the oldest dropped first (the caller counts them)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import NamedTuple


class Held(NamedTuple):
    seq: int
    kind: str
    payload: bytes
    created: float  # wall clock
    mono: float  # CLOCK_BOOTTIME


class HeldQueue:
    def __init__(self, max_bytes: int, max_age_s: float) -> None:
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._items: deque[Held] = deque()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Held]:
        return iter(self._items)

    def append(self, item: Held, now_mono: float) -> int:
        """Add the newest; returns how many of the oldest were dropped to stay within the bounds."""
        self._items.append(item)
        self.bytes += len(item.payload)
        return self.bound(now_mono)

    def bound(self, now_mono: float) -> int:
        dropped = 0
        while self._items and (self.bytes > self.max_bytes or now_mono - self._items[0].mono > self.max_age_s):
            self.bytes -= len(self._items.popleft().payload)
            dropped += 1
        return dropped

    def after(self, seq: int, limit: int) -> list[Held]:
        out = []
        for m in self._items:
            if len(out) >= limit:
                break
            if m.seq > seq:
                out.append(m)
        return out

    def remove(self, seqs: set[int]) -> set[int]:
        """Remove the messages of ``seqs`` (acknowledged); returns the seqs it held."""
        found = seqs & {m.seq for m in self._items}
        if found:
            self._items = deque(m for m in self._items if m.seq not in found)
            self.bytes = sum(len(m.payload) for m in self._items)
        return found

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
