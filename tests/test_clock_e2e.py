"""Devices with wrong clocks, for real: `edgefleet agent run` processes whose wall clock is shifted by Debian's
libfaketime (the real-time clock only: ``FAKETIME_DONT_FAKE_MONOTONIC=1``), enrolled against a real controller
and a real mosquitto over mutual TLS, serving a real model.

The only stand-in is the device's wall clock, which is what is under test. Nothing asserts how long anything
took; where a window's filing time is compared with when it was built, the bound is the estimator's accuracy on
one machine (the least delay over dozens of fresh windows, and ``fleet.clock.REFILE_S``), far below what the
failures look like (a window filed 400 days back, or a backlog piled up at the instant it arrived).

libfaketime 0.9.10 (Debian bookworm) fails Python >= 3.11's ``time.sleep`` with EINVAL when the monotonic clock
is not faked (wolfcw/libfaketime#426, ``clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)``); the agent does not
sleep that way while it runs connected, but paho does between reconnection attempts, so these tests keep the
agent's connection up: the outage in the second test is the controller's, with the broker queueing for it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import sysconfig
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from util import agent_config, fleet_client, wait_for, release_pub

from agent.api import AgentClient
from agent.config import dumps
from fleet.app import Fleet
from fleet.broker import Mosquitto, free_port
from fleet.clock import DRIFT, REFILE_S
from fleet.pki import PKI

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DAY = 86400.0
INTERVAL = 0.5
TIMEOUT = 120.0
ACCURACY_S = 3 * REFILE_S  # see the module doc


@pytest.fixture(scope="module")
def libfaketime() -> Path:
    lib = Path("/usr/lib") / (sysconfig.get_config_var("MULTIARCH") or "") / "faketime" / "libfaketime.so.1"
    if not lib.is_file():
        pytest.skip(f"libfaketime is not installed ({lib}): scripts/setup.sh installs Debian's")
    return lib


def start_agent(tmp_path: Path, fleet: Fleet, device: str, libfaketime: Path, **fake: str):
    """An enrolled agent process under libfaketime (``fake``: its FAKETIME* variables); (process, config, log)."""
    cfg = agent_config(fleet, tmp_path / device, device, api=f"127.0.0.1:{free_port('127.0.0.1')}",
                       telemetry_interval_s=INTERVAL, keepalive_s=5)
    path = tmp_path / f"{device}.toml"
    path.write_text(dumps(cfg))
    log = tmp_path / f"{device}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LD_PRELOAD": str(libfaketime), "FAKETIME_DONT_FAKE_MONOTONIC": "1",
           **fake}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edgefleet.cli", "agent", "run", "--config", str(path)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, cfg, log


def stop(proc: subprocess.Popen, log: Path) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def windows(fleet_or_path, device: str) -> list[dict]:
    """The device's telemetry rows as stored: seq, filed time, its own time, when it arrived."""
    path = fleet_or_path if isinstance(fleet_or_path, Path) else fleet_or_path.data_dir / "fleet.db"
    with closing(sqlite3.connect(path, timeout=30)) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT seq, time, device_time, received, inferences FROM telemetry "
                                            "WHERE device_id = ? ORDER BY seq", (device,))]


def alive(proc: subprocess.Popen, log: Path) -> None:
    assert proc.poll() is None, log.read_text()[-3000:]


def test_an_agent_400_days_behind_is_on_the_controllers_time_line(tmp_path, libfaketime, bundles, crops):
    fleet = Fleet(tmp_path / "fleet", release_keys=[release_pub()],
                  http_port=0, mqtt_listen="127.0.0.1:0").start_background()
    proc = None
    try:
        client = fleet_client(fleet)
        started = time.time()
        proc, cfg, log = start_agent(tmp_path, fleet, "cam-old", libfaketime, FAKETIME="-400d")
        wait_for(lambda: len(windows(fleet, "cam-old")) >= 3 or proc.poll() is not None, TIMEOUT,
                 what="the agent's first windows")
        alive(proc, log)
        first = windows(fleet, "cam-old")[0]
        assert first["received"] - first["device_time"] >= 400 * DAY  # the device's clock is 400 days behind

        # a rollout to it that must see 20 inferences on the new model: "telemetry since the switch"
        v1 = client.upload_bundle(bundles["v1"])["sha256"]
        ro = client.create_rollout(v1, ["cam-old"], min_inferences=20, soak="1s")
        api = AgentClient(cfg.api)
        x, _ = crops

        def completed():
            doc = client.rollout(ro["id"])
            if doc["status"] == "running":
                try:
                    api.infer({"x": x[:1]})
                except Exception:  # the model is not active yet
                    time.sleep(INTERVAL)
                return None
            return doc

        doc = wait_for(completed, TIMEOUT, what="the rollout to pass its gate", every=0.02)
        alive(proc, log)
        assert doc["status"] == "completed", json.dumps(doc, indent=2)
        [d] = doc["waves"][0]["devices"]
        assert d["phase"] == "active" and d["inferences"] + d["errors"] >= 20  # min_inferences counts errors too

        rows = windows(fleet, "cam-old")  # (more keep coming)
        h = client.health("cam-old")
        assert h["recent"]["windows"] >= 1 and h["inferences_per_min"] is not None  # recent rates: not empty
        least = min(r["received"] - r["device_time"] for r in rows)  # the estimate: at most this, but for drift
        assert 400 * DAY <= h["clock"]["offset_s"] <= least + DRIFT * (time.time() - started) + 1e-3
        assert h["clock"]["exceeds_max"]
        last = json.loads(fleet.store.query("SELECT payload FROM telemetry WHERE device_id = 'cam-old' "
                                            "ORDER BY seq DESC LIMIT 1")[0][0])
        assert h["clock"]["synced"] == last["clock_synced"]  # what the agent says (adjtimex is not faked)
        for r in rows:  # every window filed between the agent's start and its arrival, at its own time + offset
            assert started <= r["time"] <= r["received"]
            assert r["time"] == pytest.approx(r["device_time"] + 400 * DAY, abs=ACCURACY_S)

        # the chart of the last 10 minutes has every window
        series = client._call("GET", "/api/devices/cam-old/series?since=600")
        assert {r["time"] for r in rows} <= set(series["time"])
        assert all(started <= t <= series["until"] for t in series["time"])
        # and retention, which deletes raw rows by age, keeps them: they are fresh
        assert fleet.compact()["folded"] == 0 and len(windows(fleet, "cam-old")) >= len(rows)

        code = subprocess.run([sys.executable, "-m", "edgefleet.cli", "fleet", "health", "cam-old", "--server",
                               fleet.http_url, "--ca", str(fleet.pki.ca_crt), "--token", client.token],
                              cwd=REPO, capture_output=True, text=True)
        assert code.returncode == 0, code.stderr
        assert "clock: 400.0 d behind the controller's, beyond the 5.0 min bound" in code.stdout, code.stdout
    finally:
        if proc is not None:
            stop(proc, tmp_path / "cam-old.log")
        fleet.stop()


@pytest.fixture
def broker(tmp_path):
    """A mosquitto of the test's own, so the controller can stop while the broker queues for it."""
    pki = PKI(tmp_path / "pki").ensure(["localhost", "127.0.0.1"])
    b = Mosquitto(tmp_path / "mosquitto", port=free_port("127.0.0.1"), pki=pki).start()
    yield b
    b.stop()


def outbox_seq(state_dir: Path) -> int:
    with closing(sqlite3.connect(state_dir / "outbox.db", timeout=30)) as db:
        return db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]


def test_a_clock_set_right_while_the_controller_is_away_keeps_a_continuous_series(tmp_path, libfaketime, broker):
    """400 days behind; the controller stops (the broker queues what the device sends); NTP sets the device's
    clock right meanwhile; the controller comes back to a backlog stamped by both settings, then fresh windows.
    Each window must be filed when it was built: neither 400 days back nor piled up at the controller's return."""
    rc = tmp_path / "faketime.rc"
    rc.write_text("-400d\n")

    def controller() -> Fleet:
        return Fleet(tmp_path / "fleet", release_keys=[release_pub()],
                     broker_url=broker.url, http_port=0, pki_dir=broker.pki.root).start_background()

    fleet = controller()
    db = fleet.data_dir / "fleet.db"
    proc = None
    try:
        started = time.time()
        proc, cfg, log = start_agent(tmp_path, fleet, "cam-ntp", libfaketime, FAKETIME_TIMESTAMP_FILE=str(rc),
                                     FAKETIME_NO_CACHE="1")
        state = Path(cfg.state_dir)
        wait_for(lambda: len(windows(db, "cam-ntp")) >= 10 or proc.poll() is not None, TIMEOUT,
                 what="windows from the agent 400 days behind")
        alive(proc, log)
        fleet.stop()
        at_stop = outbox_seq(state)
        wait_for(lambda: outbox_seq(state) >= at_stop + 20, TIMEOUT, what="windows sent while the controller is away")
        rc.write_text("+0\n")  # NTP: the device's clock is right from now on
        stepped = time.time()
        at_step = outbox_seq(state)
        wait_for(lambda: outbox_seq(state) >= at_step + 20, TIMEOUT, what="windows after the step")
        alive(proc, log)

        fleet = controller()
        client = fleet_client(fleet)
        back = outbox_seq(state)
        wait_for(lambda: {r["seq"] for r in windows(db, "cam-ntp")} >= set(range(1, back + 1)) - {
            e[0] for e in fleet.store.query("SELECT seq FROM events WHERE device_id = 'cam-ntp'")},
            TIMEOUT, what="the backlog to arrive")
        wait_for(lambda: len([r for r in windows(db, "cam-ntp") if r["seq"] > back]) >= 10, TIMEOUT,
                 what="fresh windows after the backlog")
        wait_for(lambda: not fleet.store.query("SELECT 1 FROM clocks WHERE dirty = 1"), TIMEOUT,
                 what="the sweep to re-file what the fresh windows corrected")
        alive(proc, log)

        rows = windows(db, "cam-ntp")
        for r in rows:
            behind = r["device_time"] < stepped - 200 * DAY
            built = r["device_time"] + (400 * DAY if behind else 0.0)  # libfaketime's shift is exact
            assert started <= r["time"] <= r["received"], r  # none vanished into the past
            assert abs(r["time"] - built) <= ACCURACY_S, (r, built)  # nor piled up where the backlog arrived
        assert any(r["device_time"] < stepped - 200 * DAY and r["received"] > stepped for r in rows)  # both sides
        assert any(r["device_time"] > stepped - 200 * DAY and r["seq"] <= back for r in rows)  # in the backlog
        times = [r["time"] for r in rows]
        assert times == sorted(times)  # in the order they were built

        h = client.health("cam-ntp")
        assert h["clock"]["jumps"] >= 1 and abs(h["clock"]["offset_s"]) <= ACCURACY_S
        assert not h["clock"]["exceeds_max"] and h["recent"]["windows"] >= 1
        series = client._call("GET", "/api/devices/cam-ntp/series?since=3600")
        assert {r["time"] for r in rows} <= set(series["time"]) and series["time"] == sorted(series["time"])
    finally:
        if proc is not None:
            stop(proc, tmp_path / "cam-ntp.log")
        fleet.stop()
