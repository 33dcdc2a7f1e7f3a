"""`edgefleet fleet simulate`: thousands of simulated devices in one process, against a real controller.

Each device (fleet/simdevice.py) enrolls through the controller's enrollment API as an agent does
(``agent.identity.enroll``: its own key, a CSR, a provisioning token whose ids start with the prefix, the CA
pinned by its fingerprint), keeps its identity in the state dir, and holds its own mutual-TLS MQTT connection
(fleet/simmqtt.py, on one asyncio loop: paho's thread or blocking handshake per client does not scale to
thousands). A rerun finds the identities and the seq counters in the state dir and enrolls nobody again:

    STATE/<device id>/identity/    what ``agent.identity`` keeps for a real device
    STATE/devices.json             device id -> the last seq it used and the model it runs (written every 30 s
                                   and at the end), as the agent's outbox and model store keep them

Connections open at a bounded rate; the summary counts what was sent and what happened, with the process's
CPU time and peak memory, which is how many devices one process holds is measured.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

from agent import identity, transport
from agent.errors import EdgefleetError
from agent.files import write_atomic
from fleet.simdevice import Counts, Limiter, Settings, SimDevice

DEVICES_FILE = "devices.json"
ENROLL_WORKERS = 4  # enrollments in flight at once (each a key, a CSR and two HTTPS requests); in processes when
#                    there are many, so that their Python work does not take the GIL from the event loop while
#                    thousands of devices connect and report
FEW = 64  # up to this many enrollments: threads (starting processes costs seconds)
DOWNLOAD_THREADS = 16  # bundle downloads in flight at once, with --download
SAVE_EVERY_S = 30.0
SSL_READ_BUFFER = 16 * 1024  # bytes asyncio reads a TLS connection into at a time (see Simulator.run)
STOP_TIMEOUT_S = 10.0  # at the end, how long the devices wait for the broker's last acknowledgements


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edgefleet" / "simulate"


def device_ids(prefix: str, count: int) -> list[str]:
    """The simulated ids: the prefix and a number from 1, five digits at least (stable as the count grows)."""
    return [f"{prefix}{i:05d}" for i in range(1, count + 1)]


@dataclass(frozen=True)
class Provisioning:
    """How new identities are enrolled: the controller's https URL, a provisioning token, the CA's fingerprint."""

    controller: str
    token: str
    ca_fingerprint: str


class Simulator:
    """``provisioning(missing)`` is asked for a token only when ``missing`` > 0 devices have no identity yet."""

    def __init__(self, state_dir: Path, count: int, prefix: str, settings: Settings, connect_rate: float,
                 provisioning: Callable[[int], Provisioning], progress: Callable[[str], None] | None = None,
                 seed: int | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.ids = device_ids(prefix, count)
        self.settings = settings
        self.connect_rate = connect_rate
        self.provisioning = provisioning
        self.progress = progress
        self.rng = random.Random(seed)
        self.counts = Counts()
        self.devices: list[SimDevice] = []
        self.reused = self.enrolled = self.enroll_failed = 0
        self.connected_peak = 0
        self._saved: dict[str, dict] = {}  # device id -> {"seq": n, "active": ActiveModel as JSON or None}
        self._all_connected: tuple[float, float] | None = None  # (wall, cpu) when every device was first connected
        self._started = time.monotonic()
        self._stop_requested = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    # -- set-up (before the loop runs devices) ---------------------------------------------------------------
    def _load(self) -> tuple[list[identity.Identity], list[str]]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / DEVICES_FILE
        try:
            self._saved = {str(k): {"seq": int(v["seq"]), "active": v.get("active")}
                           for k, v in json.loads(path.read_text()).items()}
        except FileNotFoundError:
            self._saved = {}
        except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
            raise EdgefleetError(f"{path} is unreadable ({e}): remove it (the controller then counts seq gaps once) "
                                 f"or the whole state dir (the devices then need enrolling under another prefix, "
                                 f"or revoking first)") from None
        found, missing = [], []
        for device_id in self.ids:
            try:
                ident = identity.Identity.load(self.state_dir / device_id)
            except identity.IdentityError:
                ident = None
            if ident is not None and ident.device_id == device_id:
                found.append(ident)
            else:
                missing.append(device_id)
        return found, missing

    def _save(self) -> None:
        saved = dict(self._saved)
        saved.update({d.id: d.saved() for d in self.devices})
        write_atomic(self.state_dir / DEVICES_FILE, json.dumps(saved).encode(), 0o600)

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self, duration: float | None) -> dict:
        """Run until ``duration`` seconds have passed (None: until SIGINT/SIGTERM); the summary.

        asyncio's TLS protocol gives every connection a 256 KiB read buffer (Python 3.11 ``sslproto``, zeroed, so
        resident): 250 MiB a thousand devices. A device reads a few hundred bytes at a time, so 16 KiB (one TLS
        record) does, for this process's connections while it runs."""
        from asyncio import sslproto

        was = sslproto.SSLProtocol.max_size
        sslproto.SSLProtocol.max_size = SSL_READ_BUFFER
        try:
            return asyncio.run(self._main(duration))
        finally:
            sslproto.SSLProtocol.max_size = was

    def stop(self) -> None:
        """End a run from another thread (a test, a program that embeds the simulator): as Ctrl-C does."""
        self._stop_requested.set()
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def _main(self, duration: float | None) -> dict:
        loop = asyncio.get_running_loop()
        started, cpu0 = time.monotonic(), _cpu()
        self._started = started
        found, missing = await asyncio.to_thread(self._load)
        prov = None
        if missing:
            prov = await asyncio.to_thread(self.provisioning, len(missing))
            await asyncio.to_thread(identity.fetch_pinned_ca, prov.controller, prov.ca_fingerprint, 30.0)
        else:
            url = transport.parse_url(found[0].broker, what="the enrolled broker")
            try:
                await asyncio.to_thread(transport.probe, url, found[0].tls, 10.0)
            except transport.TransportError as e:
                raise EdgefleetError(f"{e} (the devices in {self.state_dir} were enrolled with the controller at "
                                     f"{found[0].controller}; give another --state for another controller)") from None
        stop = asyncio.Event()
        self._loop, self._stop = loop, stop
        if self._stop_requested.is_set():
            stop.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        limiter, downloads = Limiter(self.connect_rate), asyncio.Semaphore(DOWNLOAD_THREADS)
        enroll_pool = (ThreadPoolExecutor(ENROLL_WORKERS) if len(missing) <= FEW  # no processes to start for a few
                       else ProcessPoolExecutor(ENROLL_WORKERS, mp_context=multiprocessing.get_context("spawn")))
        self.reused = len(found)
        tasks = [loop.create_task(self._device(ident, None, prov, enroll_pool, limiter, downloads, stop))
                 for ident in found]
        tasks += [loop.create_task(self._device(None, device_id, prov, enroll_pool, limiter, downloads, stop))
                  for device_id in missing]
        reporter = loop.create_task(self._report(started, cpu0, stop))
        try:
            await asyncio.wait_for(stop.wait(), duration) if duration else await stop.wait()
        except asyncio.TimeoutError:
            pass
        stop.set()
        connected_at_end = self.counts.connected
        await asyncio.gather(*tasks, return_exceptions=True)  # enrollments under way end first
        if self.progress is not None:
            self.progress(f"{time.monotonic() - started:5.0f} s  {self._line()}; stopping")
        await asyncio.gather(*(d.stop(STOP_TIMEOUT_S) for d in self.devices), return_exceptions=True)
        reporter.cancel()
        enroll_pool.shutdown(wait=False, cancel_futures=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        await asyncio.to_thread(self._save)
        if self.reused + self.enrolled == 0:
            first = next(iter(self.counts.errors), "no reason recorded")
            raise EdgefleetError(f"no simulated device could enroll: {first}")
        return self.summary(time.monotonic() - started, _cpu() - cpu0, connected_at_end)

    async def _device(self, ident, device_id, prov, pool, limiter, downloads, stop) -> None:
        if ident is None:
            try:
                ident = await asyncio.get_running_loop().run_in_executor(
                    pool, _enroll, self.state_dir / device_id, prov, device_id)
            except (EdgefleetError, OSError, BrokenProcessPool) as e:
                self.enroll_failed += 1
                self.counts.error(f"enroll: {e}")
                return
            self.enrolled += 1
        if stop.is_set():
            return
        device = SimDevice(ident, self._saved.get(ident.device_id), self.settings, self.counts,
                           random.Random(self.rng.getrandbits(64)), downloads)
        self.devices.append(device)
        await device.run(limiter, stop)

    async def _report(self, started: float, cpu0: float, stop: asyncio.Event) -> None:
        last, saved = "", time.monotonic()
        while True:
            await asyncio.sleep(2.0)
            c = self.counts
            self.connected_peak = max(self.connected_peak, c.connected)
            if self._all_connected is None and c.connected == len(self.ids):
                self._all_connected = (time.monotonic(), _cpu())
            if self.reused + self.enrolled + self.enroll_failed == len(self.ids) and not self.devices:
                stop.set()  # nobody enrolled: nothing to simulate
            line = self._line()
            if self.progress is not None and line != last:
                self.progress(f"{time.monotonic() - started:5.0f} s  {line}")
                last = line
            if time.monotonic() - saved > SAVE_EVERY_S:
                saved = time.monotonic()
                await asyncio.to_thread(self._save)

    def _line(self) -> str:
        c = self.counts
        return (f"{self.reused + self.enrolled}/{len(self.ids)} enrolled ({self.enrolled} new, "
                f"{self.enroll_failed} failed), {c.connected} connected, {c.telemetry} windows, "
                f"{c.events} events, updates {c.updates_active} active {c.updates_failed} failed")

    def summary(self, wall: float, cpu: float, connected_at_end: int) -> dict:
        c = asdict(self.counts)
        errors = c.pop("errors")
        lags = sorted(c.pop("ack_lags"))
        ack_lag_ms = {q: round(lags[min(len(lags) - 1, int(len(lags) * q / 100))] * 1e3, 1) if lags else None
                      for q in (50, 99)}
        ack_lag_ms["max"] = round(lags[-1] * 1e3, 1) if lags else None
        updates = {"active": c.pop("updates_active"), "failed": c.pop("updates_failed"),
                   "rolled_back": c.pop("rolled_back")}
        c.pop("connected")
        steady, all_after = None, None
        if self._all_connected is not None:
            all_after = round(self._all_connected[0] - self._started, 1)
            w0, cpu_0 = self._all_connected
            w1 = time.monotonic()
            if w1 - w0 > 1:
                steady = round((_cpu() - cpu_0) / (w1 - w0) * 100, 1)
        return {"devices": len(self.ids), "reused": self.reused, "enrolled": self.enrolled,
                "enroll_failed": self.enroll_failed, "connected_at_end": connected_at_end,
                "connected_peak": max(self.connected_peak, connected_at_end), **c, "updates": updates,
                "unacknowledged": sum(len(d.conn.pending) for d in self.devices),
                # from a message's first publish to the controller's ack: stored, end to end
                "ack_lag_ms": {f"p{q}" if q != "max" else q: v for q, v in ack_lag_ms.items()},
                "duration_s": round(wall, 1), "cpu_s": round(cpu, 1), "cpu_percent": round(cpu / wall * 100, 1),
                "all_connected_after_s": all_after, "cpu_percent_all_connected": steady,
                "max_rss_mib": round(_max_rss_mib(), 1),
                "state_dir": str(self.state_dir), "errors": errors}


def _enroll(state_dir: Path, prov: Provisioning, device_id: str) -> identity.Identity:
    return identity.enroll(state_dir, prov.controller, prov.token, prov.ca_fingerprint, device_id=device_id)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _max_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (1 << 20) if sys.platform == "darwin" else kib / 1024


def summary_text(s: dict) -> str:
    u = s["updates"]
    lines = [f"{s['devices']} simulated devices: {s['reused']} reused, {s['enrolled']} enrolled, "
             f"{s['enroll_failed']} failed to enroll; {s['connected_at_end']} connected at the end "
             f"(peak {s['connected_peak']}), {s['connect_failures']} failed connects, {s['disconnects']} disconnects",
             f"sent {s['telemetry']} telemetry windows and {s['events']} events ({s['skipped']} windows skipped, "
             f"{s['unacknowledged']} unacknowledged at the end); {s['desired']} desired received, "
             f"{s['refused']} refused",
             f"acknowledged by the controller: {s['acked']}, lag from send to ack p50 {s['ack_lag_ms']['p50']} ms, "
             f"p99 {s['ack_lag_ms']['p99']} ms, max {s['ack_lag_ms']['max']} ms",
             f"updates: {u['active']} active, {u['failed']} failed, {u['rolled_back']} rolled back"
             + (f"; downloaded {s['downloaded_bytes']} bytes" if s["downloaded_bytes"] else ""),
             (f"all connected after {s['all_connected_after_s']} s; " if s["all_connected_after_s"] is not None
              else "") + f"{s['duration_s']} s, CPU {s['cpu_s']} s ({s['cpu_percent']} % of one core"
             + (f", {s['cpu_percent_all_connected']} % once all were connected" if s["cpu_percent_all_connected"]
                is not None else "") + f"), peak memory {s['max_rss_mib']} MiB",
             f"identities in {s['state_dir']}"]
    lines += [f"  {n} x {reason}" for reason, n in s["errors"].items()]
    return "\n".join(lines)
