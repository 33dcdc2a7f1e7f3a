"""The controller's estimate of each device's clock (fleet/clock.py), and the store filing what devices report on
the controller's time line with it.

The estimator is a pure function: (seq, sent, received) in, offsets and filing times out. The streams below are
made from a true time line: a message is built at true time ``b``, stamped with ``b + error(b)`` by the device's
clock and received at ``b + delay``; a good estimate files it at ``b``. The store tests use a real SQLite file.
"""

from __future__ import annotations

import random
import json
import sqlite3

import pytest

from agent import protocol
from fleet import clock
from fleet.clock import REFILE_S, Clock, estimate, observe
from fleet.rollouts import Rollouts
from fleet.store import SCHEMA_VERSION, Store

DAY = 86400.0
T0 = 1_800_000_000.0
INTERVAL = 10.0


def stream(n: int, error, delay, start: float = T0, first_seq: int = 1, interval: float = INTERVAL):
    """(seq, sent, received) of ``n`` windows built every ``interval`` from ``start``, and their true build times;
    ``error(i, b)`` is the device clock's error (device - true) at build, ``delay(i, b)`` the time to arrival."""
    out, builds = [], []
    for i in range(n):
        b = start + i * interval
        out.append((first_seq + i, b + error(i, b), b + delay(i, b)))
        builds.append(b)
    return out, builds


def by_arrival(msgs, builds):
    order = sorted(range(len(msgs)), key=lambda i: (msgs[i][2], msgs[i][0]))
    return [msgs[i] for i in order], [builds[i] for i in order]


def jitter(seed: int, low: float = 0.005, high: float = 0.5):
    rng = random.Random(seed)
    return lambda i, b: rng.uniform(low, high)


def refiled(c: Clock, messages: list[tuple[int, float, float]], filed: list[float]) -> list[float]:
    """What ``Store.refile`` does to the rows of a regime whose estimate fell: each filed more than REFILE_S later
    than its regime's estimate now says is moved to ``sent + offset``."""
    out = list(filed)
    for r in c.regimes:
        if r.needs_refile:
            lo, hi = c.span(r)
            for i, (seq, sent, _) in enumerate(messages):
                if lo <= seq < hi and out[i] > sent + r.offset + REFILE_S:
                    out[i] = sent + r.offset
            r.filed = r.offset
    return out


def assert_filed_at_builds(filed, builds, tolerance: float) -> None:
    worst = max(abs(f - b) for f, b in zip(filed, builds))
    assert worst <= tolerance, f"a message was filed {worst:.3f} s away from when it was built"


def assert_continuous(filed, builds) -> None:
    """Neither vanished nor piled up: in build order, the filed times step as the build times do (to within
    REFILE_S)."""
    pairs = sorted(zip(builds, filed))
    for (b1, f1), (b2, f2) in zip(pairs, pairs[1:]):
        assert abs((f2 - f1) - (b2 - b1)) <= 2 * REFILE_S, (b1, f1, b2, f2)


# -- the estimator --------------------------------------------------------------------------------------------


def test_a_clock_400_days_behind_is_estimated_within_the_least_delay():
    msgs, builds = stream(60, lambda i, b: -400 * DAY, jitter(1))
    c, filed = estimate(msgs, INTERVAL)
    least = min(r - s for _, s, r in msgs) - 400 * DAY
    assert 400 * DAY <= c.offset <= 400 * DAY + least + clock.DRIFT * 600
    assert all(b <= f <= r for f, b, (_, _, r) in zip(filed, builds, msgs))  # never before it was built, nor after
    assert_filed_at_builds(filed[10:], builds[10:], 0.5)  # arrived
    assert c.jumps == 0 and len(c.regimes) == 1


def test_an_outbox_replay_is_not_taken_for_the_clock():
    """An hour without the broker: 360 windows queued, then sent in a burst. Their received - sent is the queue's
    wait, not the clock: the estimate stays, and each is filed when it was built, not when the burst came."""
    outage, back = T0 + 300, T0 + 300 + 3600

    def delay(i, b):  # the burst takes 4 ms: the first fresh window comes after it (FIFO)
        return (back - b) + i * 0.00001 if outage <= b < back else 0.01

    msgs, builds = stream(420, lambda i, b: -400 * DAY, delay)
    msgs, builds = by_arrival(msgs, builds)
    c, filed = estimate(msgs, INTERVAL)
    assert c.offset == pytest.approx(400 * DAY + 0.01, abs=1e-6)
    assert_filed_at_builds(filed, builds, 0.01 + clock.DRIFT * 3700)  # (the estimate may rise by the drift)
    assert not c.regimes[0].needs_refile and c.jumps == 0
    replayed = [f for f, b in zip(filed, builds) if outage <= b < back]
    assert max(replayed) - min(replayed) > 3000  # spread over the hour, not piled at the reconnect


def test_a_boot_that_starts_with_its_backlog_is_refiled_once_fresh_messages_come():
    """An agent that started without its broker sends its backlog first: the boot's first estimate is too high
    (its messages land late, at their arrival) until fresher ones come; then its rows are moved to their times."""
    back = T0 + 1000
    msgs, builds = stream(200, lambda i, b: 0.0, lambda i, b: (back - b) + i * 0.00001 if b < back else 0.02)
    c, filed = estimate(msgs, INTERVAL)
    assert max(f - b for f, b in zip(filed, builds)) > 500  # before: the backlog filed late
    assert c.regimes[0].needs_refile
    moved = refiled(c, msgs, filed)
    assert not c.regimes[0].needs_refile
    assert_filed_at_builds(moved, builds, REFILE_S + 0.02 + 1e-6)
    assert_continuous(moved, builds)


def test_a_clock_stepped_forward_mid_run_keeps_a_continuous_series():
    """NTP syncs a board that booted 400 days behind: from seq 51 on its clock is right."""
    msgs, builds = stream(100, lambda i, b: -400 * DAY if i < 50 else 0.0, jitter(2))
    c, filed = estimate(msgs, INTERVAL)
    moved = refiled(c, msgs, filed)  # what the store does for a regime whose estimate fell: nothing to do here
    assert c.jumps == 1 and [r.seq for r in c.regimes] == [1, 51]
    assert c.regimes[0].offset >= 400 * DAY and 0 <= c.offset <= 0.5
    assert_filed_at_builds(moved[5:], builds[5:], 0.5)
    assert_continuous(moved[5:], builds[5:])


def test_a_clock_stepped_back_mid_run_keeps_a_continuous_series():
    """A clock that was an hour ahead is set right: its sent times go back an hour between two windows."""
    msgs, builds = stream(100, lambda i, b: 3600.0 if i < 50 else 0.0, jitter(3))
    c, filed = estimate(msgs, INTERVAL)
    moved = refiled(c, msgs, filed)
    assert c.jumps == 1 and c.regimes[0].offset <= -3600 + 0.5
    assert_filed_at_builds(moved[5:], builds[5:], 0.5 + REFILE_S)
    assert_continuous(moved[5:], builds[5:])


def test_a_step_during_an_outage_files_both_sides_by_the_clock_that_stamped_them():
    """400 days behind; the broker goes away; meanwhile NTP sets the clock right; the backlog (stamped by both
    settings) comes in one burst, then fresh windows. Each side is filed by its own clock's offset."""
    outage, step, back = T0 + 300, T0 + 600, T0 + 1200

    def delay(i, b):  # the burst takes 1.5 ms: the first fresh window comes after it
        return (back - b) + i * 0.00001 if outage <= b < back else 0.01

    msgs, builds = stream(150, lambda i, b: -400 * DAY if b < step else 0.0, delay)
    msgs, builds = by_arrival(msgs, builds)
    c, filed = estimate(msgs, INTERVAL)
    moved = refiled(c, msgs, filed)
    assert c.jumps == 1
    assert_filed_at_builds(moved, builds, REFILE_S + 0.01 + clock.DRIFT * 1200)
    assert_continuous(moved, builds)


def test_a_clock_running_slow_is_followed():
    """A crystal 50 ppm slow, never synchronised, over two days: the estimate follows it (DRIFT allows 100 ppm)."""
    msgs, builds = stream(2 * 8640, lambda i, b: -50e-6 * (b - T0), jitter(4, 0.005, 0.05))
    _, filed = estimate(msgs, INTERVAL)
    assert_filed_at_builds(filed, builds, 1.0)  # 50 ppm over two days is 8.6 s


def test_a_late_message_is_filed_by_the_regime_of_its_seq():
    msgs, builds = stream(40, lambda i, b: -400 * DAY if i < 20 else 0.0, lambda i, b: 0.01)
    late = msgs.pop(9)  # seq 10, stamped 400 days behind, overtaken by everything after it
    b10 = builds.pop(9)
    c, filed = estimate(msgs, INTERVAL)
    seq, sent, _ = late
    c, at = observe(c, seq, sent, msgs[-1][2] + 5, INTERVAL)
    assert at == pytest.approx(b10 + 0.01) and c.regime(10) is c.regimes[0]


def test_a_late_message_from_across_a_step_teaches_nothing():
    """Seqs 1-20 stamped 400 days behind, 21-40 right; 20 and 21 are overtaken (redelivered after 22-40), so the
    step is seen between 19 and 22 and seq 21, stamped by the right clock, falls in the first regime by its seq.
    It must neither drag that regime's estimate down (which would move seqs 1-19 400 days back) nor be filed in
    the future."""
    msgs, builds = stream(40, lambda i, b: -400 * DAY if i < 20 else 0.0, lambda i, b: 0.01)
    order = [*range(19), *range(21, 40), 19, 20]
    arrived = [msgs[i][:2] + (msgs[i][2] + (300 if i in (19, 20) else 0),) for i in order]
    c, filed = estimate(arrived, INTERVAL)
    moved = refiled(c, arrived, filed)
    assert [r.seq for r in c.regimes] == [1, 22] and c.regimes[0].offset == pytest.approx(400 * DAY + 0.01)
    assert_filed_at_builds(moved[:19], [builds[i] for i in order[:19]], 0.011)
    assert moved[-1] <= arrived[-1][2]  # seq 21: no later than it arrived


def test_stepped_bounds():
    assert not clock.stepped(10.0, 1, 10.0) and not clock.stepped(45.0, 1, 10.0) and not clock.stepped(-1.0, 1, 10.0)
    assert clock.stepped(51.0, 1, 10.0) and clock.stepped(-3.0, 1, 10.0) and not clock.stepped(100.0, 3, 10.0)
    assert clock.stepped(400 * DAY, 1000, 10.0)


def test_offsets_in_words():
    assert clock.describe(400 * DAY) == "400.0 d behind" and clock.describe(-90.0) == "1.5 min ahead"
    assert clock.describe(0.2) == "within 1 s" and clock.describe(None) == "unknown"


# -- the store files on the controller's time line ------------------------------------------------------------


@pytest.fixture
def store(store_url):
    s = Store(store_url, max_clock_offset_s=300).open()
    yield s
    s.close()


def telemetry(seq: int, sent: float, boot: str = "b1", **kw) -> protocol.Telemetry:
    kw.setdefault("interval_s", INTERVAL)
    kw.setdefault("inferences", 6)
    return protocol.Telemetry(device_id="cam-1", boot_id=boot, seq=seq, time=sent, **kw)


def rows(store: Store, sql: str, *args) -> list[tuple]:
    return [tuple(r) for r in store.query(sql, args)]


def test_windows_of_a_clock_400_days_behind_count_in_health_charts_gates_and_retention(store):
    import time

    now = time.time()
    sha = "ab" * 32
    active = protocol.ActiveModel(name="m", version="1", sha256=sha, runtime="onnxruntime", precision="fp32")
    for i in range(12):  # the last two minutes
        received = now - 120 + i * INTERVAL
        assert store.record_telemetry(telemetry(i + 1, received - 400 * DAY - 0.01, active=active,
                                                latency_ms=protocol.Latency(p50=1, p95=2, p99=3, max=4, mean=1)),
                                      received=received)
    h = store.health("cam-1")[0]
    assert h["recent"]["windows"] == 12 and h["inferences_per_min"] == 36.0
    assert h["clock"]["offset_s"] == pytest.approx(400 * DAY + 0.01, abs=1e-3) and h["clock"]["exceeds_max"]
    assert len(store.series("cam-1", now - 600, now)) == 12  # the chart of the last 10 minutes
    gate = Rollouts(store, link=None, public_url=lambda: "")._health("cam-1", sha, now - 300, None)
    assert gate.inferences == 72 and gate.p95_ms == 2.0  # "telemetry since the switch" sees them
    from fleet.retention import Policy, compact

    assert compact(store, now, Policy())["folded"] == 0  # fresh: retention keeps them
    assert rows(store, "SELECT count(*) FROM telemetry") == [(12,)]
    # the device's own time is kept, in its column and in the payload
    [(device_time, payload, filed)] = rows(store, "SELECT device_time, payload, time FROM telemetry WHERE seq = 1")
    assert device_time == json.loads(payload)["time"] == pytest.approx(now - 120 - 400 * DAY - 0.01) and filed == pytest.approx(now - 120)


def test_the_store_refiles_a_backlog_once_fresh_windows_come(store):
    """The boot's first windows are its backlog (sent when the broker came back): filed late at first, moved by
    the sweep once fresher windows lowered the estimate."""
    back = T0 + 1000
    msgs, builds = stream(110, lambda i, b: -400 * DAY, lambda i, b: (back - b) + i * 0.00001 if b < back else 0.02)
    for seq, sent, received in msgs:
        assert store.record_telemetry(telemetry(seq, sent), received=received)
    filed = [r[0] for r in rows(store, "SELECT time FROM telemetry ORDER BY seq")]
    assert max(f - b for f, b in zip(filed, builds)) > 500
    assert rows(store, "SELECT dirty FROM clocks") == [(1,)]
    store.sweep(now=back + 200)  # what the housekeeper does every second
    filed = [r[0] for r in rows(store, "SELECT time FROM telemetry ORDER BY seq")]
    assert_filed_at_builds(filed, builds, REFILE_S + 0.02 + 1e-6)
    assert rows(store, "SELECT dirty FROM clocks") == [(0,)]


def test_each_boot_has_its_own_clock(store):
    """Boot b1 ran 400 days behind; the device restarted (boot b2) with its clock right; then what b1 had still
    queued arrives. Each is filed by its own boot's estimate."""
    for i in range(5):
        store.record_telemetry(telemetry(i + 1, T0 + i * INTERVAL - 400 * DAY), received=T0 + i * INTERVAL + 0.01)
    for i in range(5):
        store.record_telemetry(telemetry(20 + i, T0 + 100 + i * INTERVAL, boot="b2"),
                               received=T0 + 100 + i * INTERVAL + 0.01)
    store.record_telemetry(telemetry(6, T0 + 50 - 400 * DAY), received=T0 + 150)  # b1's last, late
    filed = dict(rows(store, "SELECT seq, time FROM telemetry"))
    assert filed[6] == pytest.approx(T0 + 50 + 0.01) and filed[24] == pytest.approx(T0 + 140 + 0.01)
    offsets = dict(rows(store, "SELECT boot_id, offset_s FROM clocks"))
    assert offsets["b1"] == pytest.approx(400 * DAY + 0.01) and offsets["b2"] == pytest.approx(0.01)


def test_events_are_filed_like_windows_and_keep_the_device_time(store):
    store.record_telemetry(telemetry(1, T0 - 400 * DAY), received=T0 + 0.01)
    store.record_event(protocol.Event(device_id="cam-1", boot_id="b1", seq=2, time=T0 + 5 - 400 * DAY,
                                      kind="error", reason="camera unplugged"), received=T0 + 5.01)
    assert rows(store, "SELECT time, device_time FROM events") == [(pytest.approx(T0 + 5.01),
                                                                    pytest.approx(T0 + 5 - 400 * DAY))]
    [e] = store.device_detail("cam-1")["events"]
    assert e["time"] == pytest.approx(T0 + 5.01)


def test_storage_clock_sync_and_disk_come_from_the_newest_report(store):
    store.record_state(protocol.State(device_id="cam-1", online=True, time=T0, boot_id="b1", storage="ok",
                                      clock_synced=False), received=T0)
    store.record_telemetry(telemetry(2, T0 + 10, storage="full", disk_free_bytes=4096, clock_synced=True),
                           received=T0 + 10)
    # a window built before that one, arriving after it (a redelivery), says nothing newer
    store.record_telemetry(telemetry(1, T0 + 5, storage="ok", disk_free_bytes=1 << 30), received=T0 + 20)
    h = store.health("cam-1")[0]
    assert (h["storage"], h["storage_since"], h["disk_free_bytes"]) == ("full", T0 + 10, 4096)
    assert h["clock"]["synced"] is True
    [d] = store.devices()
    assert (d["storage"], d["clock_synced"], d["disk_free_bytes"]) == ("full", True, 4096)


def test_a_version_4_database_is_migrated(tmp_path):
    from fleet.store import schema as store_module

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(store_module.BASE + ";INSERT INTO schema_version VALUES (2);")
    for v in (2, 3):
        db.executescript(store_module.MIGRATIONS[v])
    db.execute("INSERT INTO devices (id, first_seen, last_seen) VALUES ('cam-1', ?, ?)", (T0, T0))
    db.execute("INSERT INTO telemetry (device_id, boot_id, seq, time, received, interval_s, inferences, errors, "
               "payload) VALUES ('cam-1', 'b', 1, ?, ?, 10, 5, 0, '{}')", (T0, T0))
    db.commit()
    db.close()
    s = Store(path).open()
    try:
        assert rows(s, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]  # and on to the newest
        assert rows(s, "SELECT time, device_time FROM telemetry") == [(T0, None)]  # as it was: the device's time
        h = s.health("cam-1", now=T0 + 1)[0]
        assert h["recent"]["inferences"] == 5 and h["clock"]["offset_s"] is None and h["storage"] is None
    finally:
        s.close()


def test_a_retained_state_replayed_at_start_is_placed_by_the_devices_clock(store):
    """The controller restarts and the broker replays a device's retained birth: it shows the device no later than
    it was sent, on the controller's time line (not 400 days ago: the device would count as long silent)."""
    store.record_telemetry(telemetry(1, T0 - 400 * DAY), received=T0 + 0.01)
    store.record_state(protocol.State(device_id="cam-1", online=True, time=T0 + 5 - 400 * DAY, boot_id="b1"),
                       received=T0 + 20, retained=True)
    h = store.health("cam-1", now=T0 + 21)[0]
    assert h["last_seen"] == pytest.approx(T0 + 5.01, abs=0.1) and h["online"]


def test_retention_keeps_the_latest_clocks_of_each_device(store):
    from fleet.retention import CLOCKS_KEPT, Policy, compact

    for n in range(CLOCKS_KEPT + 3):  # boots long ago, one after another
        store.record_telemetry(telemetry(n + 1, T0 + n, boot=f"b{n:02d}"), received=T0 + n)
    store.record_telemetry(protocol.Telemetry(device_id="cam-2", boot_id="x", seq=1, time=T0, interval_s=10,
                                              inferences=1), received=T0)
    compact(store, T0 + 30 * DAY, Policy())
    kept = rows(store, "SELECT device_id, boot_id FROM clocks ORDER BY device_id, boot_id")
    assert kept == [("cam-1", f"b{n:02d}") for n in range(3, CLOCKS_KEPT + 3)] + [("cam-2", "x")]
