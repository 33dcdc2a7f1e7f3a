"""What this device has accepted, kept across restarts so that nothing older can be replayed at it:

- the counter of the last ``desired`` and of the last ``cmd`` it accepted from the controller (each signed
  with a per-device counter that only grows: agent/signing.py), and the latest time the controller signed
  one at: a lower bound on the real time that holds when the device's own clock does not;
- per model name, the highest bundle ``serial`` it has run, and the bundles (sha256) it has run: a lower
  serial is refused unless the controller's signed desired marks it as a rollback to one of those.

One small JSON file, ``state_dir/ledger.json``, replaced atomically (written, fsynced, renamed).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec

from agent.files import write_atomic

log = logging.getLogger("edgefleet.agent.ledger")

FILE = "ledger.json"
MAX_RAN = 256  # bundles remembered as run (the oldest forgotten first)


class _Doc(msgspec.Struct):
    desired_counter: int = 0
    cmd_counter: int = 0
    issued: float = 0.0  # the latest issued time of an accepted desired or cmd (the controller's clock)
    serials: dict[str, int] = {}  # model name -> highest serial run
    ran: list[str] = []  # sha256 of bundles run, oldest first


class Ledger:
    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.path = Path(state_dir) / FILE
        self._doc = _Doc()

    def open(self) -> "Ledger":
        try:
            self._doc = msgspec.json.decode(self.path.read_bytes(), type=_Doc)
        except FileNotFoundError:
            pass
        except (OSError, msgspec.DecodeError) as e:  # a torn or edited file: start from what the disk shows
            log.error("%s is unreadable (%s): starting a new one; counters restart from the next message",
                      self.path, e)
        return self

    @property
    def desired_counter(self) -> int:
        return self._doc.desired_counter

    @property
    def cmd_counter(self) -> int:
        return self._doc.cmd_counter

    @property
    def issued(self) -> float:
        return self._doc.issued

    def highest_serial(self, name: str) -> int:
        return self._doc.serials.get(name, 0)

    def ran(self, sha: str) -> bool:
        return sha in self._doc.ran

    def accept(self, kind: str, counter: int, issued: float = 0.0) -> None:
        """Record the counter and issued time of an accepted desired (``kind`` "desired") or cmd ("cmd")."""
        field = f"{kind}_counter"
        changed = False
        if counter > getattr(self._doc, field):
            setattr(self._doc, field, counter)
            changed = True
        if issued > self._doc.issued:
            self._doc.issued = issued
            changed = True
        if changed:
            self._save()

    def record_run(self, name: str, serial: int, sha: str) -> None:
        """A bundle became the running model."""
        changed = False
        if serial > self._doc.serials.get(name, 0):
            self._doc.serials[name] = serial
            changed = True
        if sha not in self._doc.ran:
            self._doc.ran = (self._doc.ran + [sha])[-MAX_RAN:]
            changed = True
        if changed:
            self._save()

    def downgrade(self, name: str, serial: int, sha: str, rollback: bool) -> str:
        """Why running bundle ``sha`` (``name``, ``serial``) would be a refused downgrade ('' if it is not)."""
        top = self.highest_serial(name)
        if serial >= top:
            return ""
        if rollback and self.ran(sha):
            return ""
        if rollback:
            return (f"bundle serial {serial} of {name} is lower than {top}, which this device has run, and this "
                    f"bundle is not one it ran before: a rollback may only return to one")
        return (f"bundle serial {serial} of {name} is lower than {top}, which this device has run: a downgrade "
                f"is accepted only as a rollback signed by the controller")

    def _save(self) -> None:
        try:
            write_atomic(self.path, msgspec.json.encode(self._doc), 0o644)
        except OSError as e:  # a full or read-only state dir: it holds in memory until the next write works
            log.warning("cannot write %s (%s): kept in memory", self.path, e.strerror or e)
