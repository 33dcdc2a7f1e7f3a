"""Batched ingest and end-to-end acknowledgement: a real mosquitto, a real controller store and link, real agents.

Nothing here asserts how long anything took; every wait is bounded generously.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest
from test_fleet import Device
from util import agent_config as enrolled_config, issue_tls, release_pub, wait_for

from agent import link as agent_link
from agent import protocol
from agent.daemon import Agent
from fleet.app import Fleet
from fleet.broker import Mosquitto
from fleet.link import Link
from fleet.pki import PKI
from fleet.store import Store

DEVICE = "edge-1"


class GatedStore(Store):
    """The real store, with ``record_many`` that can be held shut (``gate``) or made to fail (``fail``: that many
    calls raise; ``poison``: seqs that always make it raise): the faults the writer must survive."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.gate.set()
        self.fail = 0
        self.poison: set[int] = set()
        self.calls = 0

    def record_many(self, items):
        self.calls += 1
        self.gate.wait(60)
        if self.fail:
            self.fail -= 1
            raise sqlite3.OperationalError("disk I/O error (injected)")
        if any(getattr(m, "seq", None) in self.poison for m, _, _ in items):
            raise ValueError("a message this store cannot take (injected)")
        return super().record_many(items)


def stored(store: Store, device_id: str) -> Counter:
    rows = store.query("SELECT seq FROM telemetry WHERE device_id = ?1 UNION ALL "
                       "SELECT seq FROM events WHERE device_id = ?1", (device_id,))
    return Counter(r[0] for r in rows)


class AckListener(Device):
    """A device that also reads its ack topic (as the agent does), collecting the controller's acks."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.acks: list[protocol.Ack] = []
        self.client.on_message = lambda c, u, m: self.acks.append(protocol.decode(protocol.ACK, m.payload))
        info = self.client.subscribe(protocol.topic(self.id, protocol.ACK), qos=1)
        assert info[0] == 0

    def acked(self) -> set[int]:
        return {s for a in self.acks for first, last in a.ranges for s in range(first, last + 1)}


@pytest.fixture
def store(tmp_path):
    s = GatedStore(tmp_path / "fleet.db").open()
    yield s
    s.close()


def start_link(mosquitto, store, **kw) -> Link:
    return Link(mosquitto.url, store, client_id="controller-under-test", tls=mosquitto.pki.controller_tls(),
                **kw).start()


def test_a_batch_with_duplicates_and_a_refused_message_is_stored_counted_and_acknowledged(mosquitto, tmp_path,
                                                                                          store):
    dev = AckListener(mosquitto.url, "cam-1", issue_tls(mosquitto.pki, "cam-1", tmp_path))
    link = start_link(mosquitto, store)
    store.gate.clear()  # the first batch waits: the rest piles up in the queue and goes in as one batch
    try:
        dev.telemetry(1)
        wait_for(lambda: store.calls == 1, what="the first batch taken")
        for seq in range(2, 41):
            dev.telemetry(seq)
        for seq in range(5, 11):  # a device re-sending what the controller already has
            dev.telemetry(seq)
        dev.send(protocol.Quality(device_id="cam-1", boot_id="boot-1", seq=41, time=1.0, interval_s=10.0,
                                  sha256="cd" * 32, version="1", profile="ef" * 32))  # no such bundle: refused
        wait_for(lambda: link._queue.qsize() >= 46, what="the rest queued behind the first batch")
        store.gate.set()
        wait_for(lambda: link.received == 46 and sum(link.invalid.values()) == 1, what="all of it handled")
        assert link.duplicates == 6
        assert len(link.invalid) == 1 and "bundle" in next(iter(link.invalid)), link.invalid
        assert stored(store, "cam-1") == Counter(range(1, 41))
        wait_for(lambda: dev.acked() == set(range(1, 42)), what="acks for everything stored (and the refusal)")
        # coalesced: one ack message per batch (the first batch held one message, the second all the rest)
        assert len(dev.acks) == link.batches == 2
        assert sorted(map(tuple, dev.acks[1].ranges)) == [(2, 41)]
    finally:
        link.stop()
        dev.close()


def test_acks_are_ranges_per_device_of_what_this_controller_stored(mosquitto, tmp_path, store):
    a = AckListener(mosquitto.url, "cam-a", issue_tls(mosquitto.pki, "cam-a", tmp_path))
    b = AckListener(mosquitto.url, "cam-b", issue_tls(mosquitto.pki, "cam-b", tmp_path))
    sent_a = [s for s in range(1, 31) if s not in (11, 12, 20)]  # what another worker took, or lost on the way
    sent_b = [3, 4, 5, 9]
    link = start_link(mosquitto, store)
    store.gate.clear()
    try:
        a.telemetry(sent_a[0])
        wait_for(lambda: store.calls == 1, what="the first batch taken")
        for seq in sent_a[1:]:
            a.telemetry(seq)
        for seq in sent_b:
            b.event(seq, "active")
        wait_for(lambda: link._queue.qsize() == len(sent_a) - 1 + len(sent_b), what="the rest queued")
        store.gate.set()
        wait_for(lambda: a.acked() == set(sent_a) and b.acked() == set(sent_b), what="the acks")
        assert [x.ranges for x in a.acks] == [[[1, 1]], [[2, 10], [13, 19], [21, 30]]]  # never "up to 30"
        assert [x.ranges for x in b.acks] == [[[3, 5], [9, 9]]]  # one message for the device in that batch
        assert {x.boot_id for x in a.acks + b.acks} == {"boot-1"}
    finally:
        link.stop()
        a.close()
        b.close()


def test_a_full_queue_holds_paho_back_and_loses_nothing(mosquitto, tmp_path, store):
    dev = Device(mosquitto.url, "cam-2", issue_tls(mosquitto.pki, "cam-2", tmp_path))
    link = start_link(mosquitto, store, queue_max=5, batch_max=3)
    store.gate.clear()
    try:
        for seq in range(1, 61):  # the broker PUBACKs them all and holds what the controller does not read
            dev.telemetry(seq)
        wait_for(lambda: link._queue.full(), what="the queue to fill")
        assert stored(store, "cam-2") == Counter() and link.received == 0
        store.gate.set()
        wait_for(lambda: link.received == 60, what="everything stored once the store takes writes")
        assert stored(store, "cam-2") == Counter(range(1, 61)) and not link.invalid and link.duplicates == 0
    finally:
        link.stop()
        dev.close()


def test_a_store_error_leaves_the_batch_unacknowledged_and_the_broker_redelivers_it(mosquitto, tmp_path, store):
    dev = Device(mosquitto.url, "cam-3", issue_tls(mosquitto.pki, "cam-3", tmp_path))
    link = start_link(mosquitto, store)
    try:
        dev.telemetry(1)
        wait_for(lambda: link.received == 1, what="the first window")
        store.fail = 10 ** 6  # the store fails from now on (a disk error, a database restarting)
        for seq in range(2, 21):
            dev.telemetry(seq)
        wait_for(lambda: link.store_errors >= 2, what="the writer to fail and try again")
        assert link._writer.is_alive() and stored(store, "cam-3") == Counter([1])
        link.stop()  # gives up the held batch: not acknowledged, so the broker keeps it in the session
        store.fail = 0
        link = start_link(mosquitto, store)
        wait_for(lambda: stored(store, "cam-3") == Counter(range(1, 21)), what="the redelivered batch stored")
        assert not link.invalid
    finally:
        link.stop()
        dev.close()


def test_a_transient_store_error_is_retried_and_a_message_the_store_cannot_take_does_not_stall_ingest(
        mosquitto, tmp_path, store):
    dev = Device(mosquitto.url, "cam-4", issue_tls(mosquitto.pki, "cam-4", tmp_path))
    link = start_link(mosquitto, store)
    try:
        store.fail = 2  # two failures, then it works again: the held batch goes in, once
        for seq in range(1, 11):
            dev.telemetry(seq)
        wait_for(lambda: stored(store, "cam-4") == Counter(range(1, 11)), what="the batch after the retry")
        assert link.store_errors >= 1 and link._writer.is_alive()
        store.poison = {13}
        for seq in range(11, 21):
            dev.telemetry(seq)
        wait_for(lambda: stored(store, "cam-4") == Counter(set(range(1, 21)) - {13}), what="the rest")
        assert any(r.startswith("not stored: ValueError") for r in link.invalid), link.invalid
    finally:
        link.stop()
        dev.close()


# -- the device's side, against a broker that dies -------------------------------------------------------------
class DefaultAutosaveMosquitto(Mosquitto):
    """The embedded broker's config with mosquitto's own autosave (every 1800 s), as an external broker runs:
    what it queued since its last save is gone when it is killed."""

    def config(self) -> str:
        return "\n".join(line for line in super().config().splitlines() if not line.startswith("autosave_interval"))


@pytest.fixture
def broker(tmp_path, free_port):
    pki = PKI(tmp_path / "pki").ensure(["localhost", "127.0.0.1"])
    b = DefaultAutosaveMosquitto(tmp_path / "mosquitto", port=free_port, pki=pki).start()
    yield b
    b.stop()


def start_fleet(tmp_path, broker) -> Fleet:
    return Fleet(tmp_path / "fleet", release_keys=[release_pub()], broker_url=broker.url, http_port=0,
                 pki_dir=broker.pki.root).start_background()


def seqs(fleet_dir: Path) -> Counter:
    with closing(sqlite3.connect(fleet_dir / "fleet.db", timeout=30)) as db:
        return Counter(r[0] for r in db.execute("SELECT seq FROM telemetry WHERE device_id = ?1 UNION ALL "
                                                "SELECT seq FROM events WHERE device_id = ?1", (DEVICE,)))


def kill(broker: Mosquitto) -> None:
    broker.proc.kill()  # SIGKILL: no save of what it queued
    broker.proc.wait()
    broker.proc = None


@pytest.mark.parametrize("acks", [True, False], ids=["end-to-end-acks", "control-puback-only"])
def test_a_broker_killed_while_the_controller_is_away(tmp_path, broker, monkeypatch, acks):
    """The issue's fault: the controller is away, the device keeps sending and the broker PUBACKs (and queues in
    the controller's session) what it sends; the broker is SIGKILLed before it saved that, and restarted; the
    controller comes back. With end-to-end acks the device still holds what the controller never acknowledged
    and sends it again: no window is missing. The control run is the same with a controller that does not
    acknowledge (as before this change, and as the agent's fallback mode): the PUBACK deleted those messages and
    they are gone, which is what the first run defends against. The control run is also the compatibility
    check: against such a controller the agent works as it always did (no holding, no re-sends, a drained
    outbox)."""
    monkeypatch.setattr(agent_link, "ACK_TIMEOUT_S", 0.5)
    monkeypatch.setattr(agent_link, "ACK_TIMEOUT_MAX_S", 2.0)
    if not acks:  # a controller from before end-to-end acks
        monkeypatch.setattr(Link, "_acknowledge", lambda *a: None)
    fleet = start_fleet(tmp_path, broker)
    agent = Agent(enrolled_config(fleet, tmp_path / "device", DEVICE, api="127.0.0.1:0", telemetry_interval_s=0.2,
                                  keepalive_s=5))
    agent.start()
    try:
        wait_for(lambda: len(seqs(fleet.data_dir)) >= 3, what="telemetry stored")
        if acks:
            wait_for(lambda: agent.link.holding, what="the agent to see the controller's acks")
        fleet.stop()  # the controller is away; its session at the broker queues what the device sends
        start = agent.outbox.last_seq
        wait_for(lambda: agent.outbox.last_seq >= start + 15 and agent.link.in_flight == 0,
                 what="windows sent and PUBACKed while the controller is away")
        upto = agent.outbox.last_seq
        kill(broker)
        broker.start()  # same port; it lost the controller's queue
        fleet = start_fleet(tmp_path, broker)
        wait_for(lambda: max(seqs(fleet.data_dir), default=0) > upto + 5, what="new windows after the restart")
        if acks:
            wait_for(lambda: all(seqs(fleet.data_dir)[s] for s in range(1, upto + 1)),
                     what="every window, re-sent for want of the controller's ack")
            assert agent.link.resent > 0
            wait_for(lambda: agent.outbox.pending_count <= agent.link.window, what="the outbox to drain")
        else:
            have = seqs(fleet.data_dir)
            missing = [s for s in range(1, upto + 1) if not have[s]]
            assert missing, "the broker lost nothing: the fault was not reproduced"
            assert not agent.link.holding and agent.link.resent == 0 and agent.outbox.acked_at == 0
            assert agent.outbox.pending_count <= agent.link.window  # PUBACK deletes, as before
        assert max(seqs(fleet.data_dir).values()) == 1  # nothing stored twice
    finally:
        agent.stop()
        fleet.stop()


def test_the_agent_holds_for_acks_of_its_boot_only_re_sends_and_remembers_across_a_restart(tmp_path, broker,
                                                                                          monkeypatch):
    """Against a controller that does not acknowledge, one ack (naming another boot id: it deletes nothing) turns
    holding on: PUBACKed messages stay queued and are sent again; the ack of the right boot deletes exactly its
    ranges; a new agent on the same state dir holds from the start (the outbox remembers the acks)."""
    monkeypatch.setattr(agent_link, "ACK_TIMEOUT_S", 0.3)
    monkeypatch.setattr(agent_link, "ACK_TIMEOUT_MAX_S", 1.0)
    monkeypatch.setattr(Link, "_acknowledge", lambda *a: None)
    fleet = start_fleet(tmp_path, broker)
    cfg = enrolled_config(fleet, tmp_path / "device", DEVICE, api="127.0.0.1:0", telemetry_interval_s=0.2,
                          keepalive_s=5)
    agent = Agent(cfg)
    agent.start()

    def ack(boot_id: str, ranges) -> None:
        msg = protocol.Ack(device_id=DEVICE, boot_id=boot_id, ranges=ranges, time=1.0)
        fleet.link._client.publish(protocol.topic(DEVICE, protocol.ACK), protocol.encode(msg), qos=1)

    try:
        wait_for(lambda: len(seqs(fleet.data_dir)) >= 3, what="telemetry stored")
        assert not agent.link.holding and agent.outbox.pending_count <= agent.link.window
        ack("0123456789abcdef0", [[1, 10 ** 6]])  # not this agent's boot: acknowledges nothing
        wait_for(lambda: agent.link.holding, what="holding after the first ack")
        held = agent.outbox.pending_count
        wait_for(lambda: agent.link.resent >= 5 and agent.outbox.pending_count >= held + 10,
                 what="messages kept after their PUBACK and sent again")
        # no ack answers the re-sends (the controller "is away"): one message at a time probes, not all of them
        assert agent.link.resent < agent.link.awaiting
        first = wait_for(lambda: agent.link.awaiting and min(agent.link._awaiting.copy()), what="a held seq")
        ack(agent.boot_id, [[first, first + 4]])
        wait_for(lambda: agent.link.acked_e2e == 5, what="the acknowledged range deleted")
        assert not agent.outbox.get(range(first, first + 5)) and agent.outbox.get([first + 5])
        assert fleet.link.duplicates > 0 and max(seqs(fleet.data_dir).values()) == 1  # re-sends: copies dropped
    finally:
        agent.stop()
    assert agent.outbox.acked_at > 0
    again = Agent(cfg)  # the same device restarted while the controller does not acknowledge
    again.start()
    try:
        assert again.link.holding  # remembered in the outbox: it holds from the start
    finally:
        again.stop()
        fleet.stop()


def test_an_agent_falls_back_to_puback_when_the_controller_stops_acknowledging(tmp_path, broker, monkeypatch):
    """A controller downgraded to one without acks: after outbox_max_age_s without an ack (what the outbox would
    keep at most anyway) the agent lets the broker's PUBACK delete again, so its outbox drains."""
    monkeypatch.setattr(agent_link, "ACK_TIMEOUT_S", 0.3)
    monkeypatch.setattr(Link, "_acknowledge", lambda *a: None)
    fleet = start_fleet(tmp_path, broker)
    agent = Agent(enrolled_config(fleet, tmp_path / "device", DEVICE, api="127.0.0.1:0", telemetry_interval_s=0.2,
                                  keepalive_s=5, outbox_max_age_s=3.0))
    agent.start()
    try:
        wait_for(lambda: len(seqs(fleet.data_dir)) >= 3, what="telemetry stored")
        msg = protocol.Ack(device_id=DEVICE, boot_id=agent.boot_id, ranges=[[1, 1]], time=1.0)
        fleet.link._client.publish(protocol.topic(DEVICE, protocol.ACK), protocol.encode(msg), qos=1)
        wait_for(lambda: agent.link.holding, what="holding after the ack")
        wait_for(lambda: agent.link.awaiting >= 3, what="messages held for an ack that never comes")
        wait_for(lambda: not agent.link.holding, what="the fallback after outbox_max_age_s without an ack")
        wait_for(lambda: agent.outbox.pending_count <= agent.link.window and not agent.link.awaiting,
                 what="PUBACK deleting again")
        top = agent.outbox.last_seq
        wait_for(lambda: all(seqs(fleet.data_dir)[s] for s in range(2, top + 1)), what="everything stored")
    finally:
        agent.stop()
        fleet.stop()
