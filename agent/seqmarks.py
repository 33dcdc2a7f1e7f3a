"""The two small files beside the outbox that keep a seq from ever being handed out twice (agent/outbox.py).

- ``outbox.db.seq``, the ceiling: a number no seq ever exceeded, raised atomically (a new file, fsynced, renamed
  over the old one) before a seq above it is used. When the database is lost, a new one starts above it.
- ``outbox.db.held``, the held mark: the last seq handed out while messages were held in memory because the state
  dir took no writes. 32 bytes made while the disk was fine and then rewritten in place (``pwrite`` +
  ``fdatasync``), which a full filesystem still takes since it needs no new block. After a kill, the next start
  goes on above it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("edgefleet.agent.outbox")

CEILING_SUFFIX = ".seq"
HELD_SUFFIX = ".held"
HELD_WIDTH = 32  # bytes of the held mark: a seq, padded, rewritten in place


class SeqMarks:
    def __init__(self, db_path: Path) -> None:
        self.ceiling_path = db_path.with_name(db_path.name + CEILING_SUFFIX)
        self.held_path = db_path.with_name(db_path.name + HELD_SUFFIX)
        self.ceiling = 0  # mirrors the ceiling file
        self.held = 0  # mirrors the held mark

    @property
    def floor(self) -> int:
        """No seq above this may have been handed out: where a new database starts."""
        return max(self.ceiling, self.held)

    def load(self) -> None:
        self.ceiling = _read_int(self.ceiling_path, "seq ceiling")
        self.held = _read_int(self.held_path, "held mark")

    def raise_ceiling(self, value: int) -> None:
        """Durably record that seqs up to ``value`` may be used, before using any of them."""
        tmp = self.ceiling_path.with_name(self.ceiling_path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, f"{value}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.ceiling_path)
        except OSError:
            _unlink(tmp)
            raise
        fsync_dir(self.ceiling_path.parent)
        self.ceiling = value

    def make_held(self) -> None:
        """Make the held mark while the disk takes writes, so that a full one can still take it in place."""
        if self.held_path.exists():
            return
        tmp = self.held_path.with_name(self.held_path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(_held_bytes(self.held))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.held_path)
            fsync_dir(self.held_path.parent)
        except OSError as e:
            log.warning("outbox: cannot make %s (%s)", self.held_path.name, e)
            _unlink(tmp)

    def write_held(self, seq: int) -> bool:
        """Record in place that ``seq`` was handed out while held in memory; False when the disk refused."""
        try:
            fd = os.open(self.held_path, os.O_WRONLY)
            try:
                os.pwrite(fd, _held_bytes(seq), 0)
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError:
            return False
        self.held = seq
        return True


def _held_bytes(seq: int) -> bytes:
    return f"{seq}".ljust(HELD_WIDTH - 1).encode() + b"\n"


def _read_int(path: Path, what: str) -> int:
    try:
        return int(path.read_bytes().split()[0])
    except FileNotFoundError:
        return 0
    except IndexError:  # empty
        return 0
    except (OSError, ValueError) as e:
        log.warning("ignoring an unreadable %s %s: %s", what, path, e)
        return 0


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
