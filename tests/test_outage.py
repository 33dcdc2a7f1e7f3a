"""Broker outages against the durable outbox: real mosquitto (stopped and restarted on the same port, with
persistence), a real controller, real agents (in process, and as a process killed with SIGKILL).

Every wait is bounded generously; nothing here asserts how long anything took.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest
from util import agent_config as enrolled_config, fleet_client, wait_for, release_pub

from agent.config import AgentConfig
from agent.daemon import Agent
from fleet.app import Fleet
from fleet.broker import Mosquitto
from fleet.pki import PKI

REPO = Path(__file__).resolve().parents[1]
DEVICE = "edge-1"
INTERVAL = 0.2  # telemetry every 0.2 s: steady traffic


@pytest.fixture
def broker(tmp_path, free_port):
    """A mosquitto of the test's own on a fixed port, so it can be stopped and started again at the same URL."""
    pki = PKI(tmp_path / "pki").ensure(["localhost", "127.0.0.1"])  # the fleet's CA, which the broker trusts
    b = Mosquitto(tmp_path / "mosquitto", port=free_port, pki=pki).start()
    yield b
    b.stop()


@pytest.fixture
def fleet(tmp_path, broker):
    f = Fleet(tmp_path / "fleet", release_keys=[release_pub()],
              broker_url=broker.url, http_port=0, pki_dir=broker.pki.root).start_background()
    yield f
    f.stop()


def agent_config(tmp_path, fleet, **kw) -> AgentConfig:
    return enrolled_config(fleet, tmp_path / "device", DEVICE, api="127.0.0.1:0", telemetry_interval_s=INTERVAL,
                           keepalive_s=5, **kw)


def received(fleet) -> list[tuple[int, str]]:
    """(seq, boot_id) of every telemetry and event row the controller stored for the device."""
    with closing(sqlite3.connect(fleet.data_dir / "fleet.db", timeout=30)) as db:
        return db.execute("SELECT seq, boot_id FROM telemetry WHERE device_id = ?1 "
                          "UNION ALL SELECT seq, boot_id FROM events WHERE device_id = ?1", (DEVICE,)).fetchall()


def seq_counts(fleet) -> Counter:
    return Counter(seq for seq, _ in received(fleet))


def has_all(fleet, upto: int) -> bool:
    have = seq_counts(fleet)
    return all(have[s] for s in range(1, upto + 1))


def outbox_on_disk(state_dir: Path) -> tuple[int, list[int]]:
    """(last seq handed out, seqs still queued), read from the agent's outbox file as it is on disk."""
    with closing(sqlite3.connect(state_dir / "outbox.db", timeout=30)) as db:
        last = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]
        return last, [r[0] for r in db.execute("SELECT seq FROM messages ORDER BY seq")]


def assert_exactly_once(counts: Counter, produced: int, still_queued: list[int] = ()) -> None:
    """Every seq the agent produced is stored once, but for what is still in its outbox (at most once)."""
    assert max(counts, default=0) <= produced, "the controller has a seq the agent never produced"
    twice = {s: n for s, n in counts.items() if n > 1}
    assert not twice, f"stored more than once: {twice}"
    missing = [s for s in range(1, produced + 1) if not counts[s] and s not in still_queued]
    assert not missing, f"never arrived and no longer queued: {missing}"


def test_a_broker_outage_loses_nothing_and_duplicates_nothing(tmp_path, broker, fleet):
    agent = Agent(agent_config(tmp_path, fleet))
    agent.start()
    client = fleet_client(fleet)
    try:
        wait_for(lambda: len(received(fleet)) >= 5, what="telemetry before the outage")
        broker.stop()
        wait_for(lambda: not agent.link.connected, what="the agent to notice the outage")
        start = agent.outbox.last_seq
        wait_for(lambda: agent.outbox.last_seq >= start + 20, what="messages queued during the outage")
        assert agent.outbox.pending_count >= 20  # all of them waiting on disk
        broker.start()  # same port, its persistence kept the controller's session
        during = agent.outbox.last_seq
        wait_for(lambda: has_all(fleet, during), what="everything queued during the outage to arrive")
        wait_for(lambda: agent.outbox.pending_count == 0, what="the outbox to drain")
        health = wait_for(lambda: (h := client.health(DEVICE))["outbox_pending"] == 0 and h["seq_gaps"] == 0
                          and h, what="the controller to see no gap and an empty outbox")
        assert health["outbox_dropped"] == 0 and health["duplicates"] >= 0
        counts = seq_counts(fleet)
        assert all(counts[s] == 1 for s in range(1, during + 1))
    finally:
        agent.stop()
    produced, queued = outbox_on_disk(Path(agent.config.state_dir))
    assert produced > during and {b for _, b in received(fleet)} == {agent.boot_id}
    assert_exactly_once(seq_counts(fleet), produced, queued)


def _start_agent_process(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "edgefleet.cli", "agent", "run", "--config", str(config)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_what_was_queued_before_a_sigkill_arrives_after_the_restart(tmp_path, broker, fleet):
    from agent.config import dumps

    cfg = agent_config(tmp_path, fleet)
    state = Path(cfg.state_dir)
    config = tmp_path / "agent.toml"
    config.write_text(dumps(cfg))
    log = tmp_path / "agent.log"
    proc = _start_agent_process(config, log)
    try:
        wait_for(lambda: len(received(fleet)) >= 3 or proc.poll() is not None, what="the agent's first telemetry")
        assert proc.poll() is None, log.read_text()
        first_boot = {b for _, b in received(fleet)}
        broker.stop()
        wait_for(lambda: len(outbox_on_disk(state)[1]) >= 15, what="messages queued while the broker is down")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        before, queued = outbox_on_disk(state)
        assert queued and queued[-1] == before

        broker.start()
        proc = _start_agent_process(config, log)
        wait_for(lambda: has_all(fleet, before) or proc.poll() is not None, what="the queued messages to arrive")
        assert proc.poll() is None, log.read_text()
        later = wait_for(lambda: [(s, b) for s, b in received(fleet) if b not in first_boot],
                         what="telemetry from the restarted agent")
        assert min(s for s, _ in later) > before  # seq went on; nothing from the new run reuses an old seq
        counts = seq_counts(fleet)
        assert all(counts[s] == 1 for s in range(1, before + 1))  # queued before the kill: each exactly once
        for seq, boot in received(fleet):
            if seq <= before:
                assert boot in first_boot  # replayed as built, under the boot_id of the run that queued it
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
        produced, queued = outbox_on_disk(state)
        assert_exactly_once(seq_counts(fleet), produced, queued)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_full_outbox_drops_the_oldest_and_the_controller_hears_the_count(tmp_path, broker, fleet):
    max_bytes = 2000  # a few telemetry messages
    agent = Agent(agent_config(tmp_path, fleet, outbox_max_bytes=max_bytes))
    agent.start()
    client = fleet_client(fleet)
    try:
        wait_for(lambda: len(received(fleet)) >= 3, what="telemetry before the outage")
        broker.stop()
        wait_for(lambda: not agent.link.connected, what="the agent to notice the outage")
        delivered_before = max(seq_counts(fleet))

        def dropping():
            assert agent.outbox.pending_bytes <= max_bytes  # the bound holds all along
            return agent.outbox.dropped >= 10

        wait_for(dropping, what="the full outbox to drop messages")
        broker.start()
        wait_for(lambda: agent.link.connected and agent.outbox.pending_count == 0, what="the outbox to drain")
        dropped = agent.outbox.dropped  # nothing is dropped any more: the queue is empty
        health = wait_for(lambda: (h := client.health(DEVICE))["outbox_dropped"] == dropped and h,
                          what="the dropped count in telemetry")
        counts = seq_counts(fleet)
        top = max(counts)
        missing = [s for s in range(1, top + 1) if not counts[s]]
        # The oldest of the outage went, as one block right after what was delivered before it; everything newer
        # arrived. (A message that was in flight when the broker went may still arrive although it was dropped
        # from the outbox: paho re-sends it after the reconnect. So missing <= dropped.)
        assert 0 < len(missing) <= dropped
        assert missing == list(range(missing[0], missing[0] + len(missing)))
        assert missing[0] > delivered_before
        assert health["seq_gaps"] == len(missing)
    finally:
        agent.stop()


def test_a_corrupt_outbox_is_moved_aside_and_reported_to_the_controller(tmp_path, broker, fleet):
    cfg = agent_config(tmp_path, fleet)
    state = Path(cfg.state_dir)  # made by the enrollment
    (state / "outbox.db").write_bytes(b"a power cut in the middle of a write" * 200)
    agent = Agent(cfg)
    agent.start()
    try:
        client = fleet_client(fleet)
        errors = wait_for(lambda: [e for e in client.health(DEVICE)["events"] if e["kind"] == "error"]
                          if client.health() else None, what="the error event")
        aside = [p.name for p in state.iterdir() if p.name.startswith("outbox.db.corrupt-")]
        assert len(aside) == 1 and aside[0] in errors[0]["reason"]
        assert (state / aside[0]).read_bytes().startswith(b"a power cut")  # kept, never deleted
    finally:
        agent.stop()
