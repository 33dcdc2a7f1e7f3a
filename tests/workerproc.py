"""A controller worker (``edgefleet fleet serve --worker NAME``) in a process of its own: started, stopped cleanly
(its broker session kept, when asked for with ``--session-expiry``), SIGKILLed, started again. Used by the workers
tests and by ``bench/fleet.py --section workers``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fleet.broker import free_port
from util import wait_for

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    def __init__(self, name: str, data: Path, store_url: str, broker_url: str, release_key: Path, log: Path,
                 extra: list[str] | tuple[str, ...] = ()) -> None:
        self.name, self.data, self.log, self.port = name, data, log, free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "edgefleet.cli", "fleet", "serve", "--data", str(data), "--worker", name,
                     "--store", store_url, "--broker", broker_url, "--http", f"127.0.0.1:{self.port}",
                     "--release-key", str(release_key), *extra]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        """Start it (again, after stop or kill: the same port, data dir and log)."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)})
        return self

    def client(self):
        from fleet.client import FleetClient

        return FleetClient(self.url, timeout=30, token=(self.data / "admin.token").read_text().strip(),
                           ca=str(self.data / "pki" / "ca.crt"))

    def status(self) -> dict | None:
        """Its ``/api/status``, or None while it is not up (or killed)."""
        try:
            return self.client().status()
        except Exception:  # not up yet (or killed)
            return None

    def ready(self, timeout: float) -> dict:
        """Wait until its API says it is connected to the broker (and so subscribed); its status then. Raises
        AssertionError, as ``wait_for`` does, when it exits or the time is up."""
        def up() -> dict | None:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited {None if self.proc is None else self.proc.returncode}")
            s = self.status()
            return s if s and s.get("mqtt_connected") else None

        return wait_for(up, timeout, what=f"worker {self.name} connected to the broker", every=0.2)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: whatever it had taken from the broker and not acknowledged goes back to the broker."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (a clean disconnect), SIGKILL after ``timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
