"""Retention: raw telemetry folded into 1-minute and 1-hour rollups, and series() across all three.

Real SQLite, telemetry stored through the Store's ingest path with old timestamps; the only stand-in is
the clock (``now`` given to compact, a ``clock`` given to the job).
"""

from __future__ import annotations

import pytest
from util import fleet_client, wait_for, release_pub

from agent import protocol
from agent.errors import EdgefleetError
from fleet.app import Fleet
from fleet.retention import DAY, HOUR, Housekeeper, Policy, compact, histogram_percentile, parse_duration
from fleet.store import Store

NOW = 1_800_000_000.0 + 1234.5  # not on an hour: the cutoffs are rounded down to whole hours
POLICY = Policy(raw_s=7 * DAY, rollup_s=30 * DAY)
NB = len(protocol.LATENCY_BUCKETS_MS) + 1


def hist(**buckets: int) -> list[int]:
    """A histogram from {bucket index: count}, written as b2=90 (bucket 2 is (2, 5] ms, 6 is (50, 100])."""
    h = [0] * NB
    for k, n in buckets.items():
        h[int(k[1:])] = n
    return h


class Sender:
    """Telemetry into the store as the link stores it (record_telemetry), with the time given."""

    def __init__(self, store: Store, device_id: str = "cam-1") -> None:
        self.store, self.device_id, self.seq = store, device_id, 0

    def __call__(self, t: float, inferences: int = 0, errors: dict | None = None, latency=None, histogram=(),
                 cpu: float = 10.0, rss: int = 100 << 20, mem: float = 5.0, temp: float | None = None,
                 interval_s: float = 10.0) -> None:
        self.seq += 1
        msg = protocol.Telemetry(device_id=self.device_id, boot_id="b1", seq=self.seq, time=t,
                                 interval_s=interval_s, inferences=inferences, errors=errors or {},
                                 latency_ms=latency, histogram=list(histogram), cpu_percent=cpu, rss_bytes=rss,
                                 memory_percent=mem, temperature_c=temp)
        assert self.store.record_telemetry(msg, received=t)


def lat(p50, p95, p99, mx, mean) -> protocol.Latency:
    return protocol.Latency(p50=p50, p95=p95, p99=p99, max=mx, mean=mean)


@pytest.fixture
def store(store_url):
    s = Store(store_url).open()
    yield s
    s.close()


def rows(store: Store, sql: str, *args) -> list[dict]:
    return [dict(r) for r in store.query(sql, args)]


def minute(t: float) -> float:
    return t // 60 * 60


def test_parse_duration_and_policy_bounds():
    assert parse_duration("7d") == 7 * DAY and parse_duration("90d") == 90 * DAY
    assert parse_duration("12h") == 12 * HOUR and parse_duration("30") == 30 and parse_duration("1.5m") == 90
    for bad in ("", "7x", "-1d", "0", "d"):
        with pytest.raises(EdgefleetError, match="invalid"):
            parse_duration(bad)
    with pytest.raises(EdgefleetError, match="at least 1h"):
        Policy(raw_s=60)
    with pytest.raises(EdgefleetError, match="must not be shorter"):
        Policy(raw_s=7 * DAY, rollup_s=DAY)


def test_histogram_percentiles_interpolate_inside_the_bucket():
    h = hist(b2=90, b6=10)  # 90 in (2, 5] ms, 10 in (50, 100] ms
    assert histogram_percentile(h, 0.5) == pytest.approx(2 + 3 * 50 / 90, abs=1e-3)
    assert histogram_percentile(h, 0.95) == pytest.approx(75.0)
    assert histogram_percentile(h, 0.95, max_ms=80.0) == pytest.approx(65.0)  # the largest seen caps the top
    assert histogram_percentile(hist(b12=4), 0.5, max_ms=6000.0) == pytest.approx(5500.0)  # the open bucket
    assert histogram_percentile([0] * NB, 0.5) is None


def test_compact_folds_old_raw_rows_into_rollups(store):
    send = Sender(store)
    old = NOW - 9 * DAY  # beyond raw retention: folded into 1m and 1h
    m0 = minute(old)
    # two windows in one minute: 90 inferences in (2, 5] ms, 10 in (50, 100] ms
    send(m0 + 5, 90, {"timeout": 2}, lat(3.0, 4.5, 4.9, 5.0, 3.0), hist(b2=90), cpu=10, rss=100, temp=40.0)
    send(m0 + 15, 10, {"timeout": 1, "nan": 4}, lat(70.0, 78.0, 80.0, 80.0, 70.0), hist(b6=10), cpu=30, rss=300)
    send(m0 + 25, 0, cpu=20, rss=200)  # an idle window: resources only
    send(m0 + 65, 5, {}, lat(1.0, 1.5, 1.8, 2.0, 1.2), hist(b1=5))  # the next minute, same hour (mostly)
    recent = NOW - 2 * DAY  # within raw retention: stays raw
    send(recent, 7, {"nan": 1}, lat(2.0, 3.0, 4.0, 4.0, 2.5), hist(b2=7))
    before = store.health("cam-1", now=NOW)[0]
    assert before["inferences"] == 112 and before["errors"] == 8

    done = compact(store, now=NOW, policy=POLICY)
    assert done["folded"] == 4

    raw = rows(store, "SELECT time FROM telemetry")
    assert [r["time"] for r in raw] == [recent], "raw rows beyond retention are gone, newer ones kept"
    [m1, m2] = rows(store, "SELECT * FROM telemetry_1m ORDER BY bucket")
    assert m1["bucket"] == m0 and m2["bucket"] == m0 + 60
    p = store.series("cam-1", m0, m0 + 59)[0]
    assert p["resolution"] == "1m" and p["windows"] == 3 and p["duration_s"] == 60
    assert (p["inferences"], p["errors"]) == (100, 7)
    assert p["errors_by_kind"] == {"timeout": 3, "nan": 4}
    assert p["inferences_per_min"] == pytest.approx(100 * 60 / 30)
    assert p["error_rate"] == pytest.approx(7 / 107, abs=1e-6)
    # the merged histogram's percentiles; the worst window's kept beside them
    assert p["p50_ms"] == pytest.approx(2 + 3 * 50 / 90, abs=1e-3)
    assert p["p95_ms"] == pytest.approx(65.0) and p["p99_ms"] == pytest.approx(77.0)
    assert (p["p95_max_ms"], p["p99_max_ms"], p["latency_max_ms"]) == (78.0, 80.0, 80.0)
    assert p["latency_mean_ms"] == pytest.approx((3.0 * 90 + 70.0 * 10) / 100)
    assert (p["cpu_percent"], p["cpu_percent_max"]) == (20.0, 30.0)
    assert (p["rss_bytes"], p["rss_bytes_max"]) == (200, 300)
    assert (p["temperature_c"], p["temperature_c_max"]) == (40.0, 40.0)  # one window had a sensor

    # one window with inferences keeps that window's exact percentiles
    q = store.series("cam-1", m0 + 60, m0 + 119)[0]
    assert (q["p50_ms"], q["p95_ms"], q["p99_ms"]) == (1.0, 1.5, 1.8)

    [h] = [r for r in rows(store, "SELECT * FROM telemetry_1h") if r["bucket"] <= m0 < r["bucket"] + HOUR]
    assert h["windows"] == 3 + (m0 + 65 < h["bucket"] + HOUR)
    assert sum(r["inferences"] for r in rows(store, "SELECT inferences FROM telemetry_1h")) == 105

    after = store.health("cam-1", now=NOW)[0]
    assert (after["inferences"], after["errors"]) == (112, 8), "totals do not depend on raw rows"

    # idempotent: nothing left to fold, rollups unchanged
    snapshot = rows(store, "SELECT * FROM telemetry_1m ORDER BY bucket"), rows(store, "SELECT * FROM telemetry_1h")
    assert compact(store, now=NOW, policy=POLICY)["folded"] == 0
    assert (rows(store, "SELECT * FROM telemetry_1m ORDER BY bucket"), rows(store, "SELECT * FROM telemetry_1h")) \
        == snapshot


def test_a_late_window_is_merged_into_its_existing_bucket(store):
    send = Sender(store)
    m0 = minute(NOW - 9 * DAY)
    send(m0 + 5, 90, {}, lat(3.0, 4.5, 4.9, 5.0, 3.0), hist(b2=90))
    compact(store, now=NOW, policy=POLICY)
    send(m0 + 15, 10, {"nan": 1}, lat(70.0, 78.0, 80.0, 80.0, 70.0), hist(b6=10))  # replayed from an outbox, late
    assert compact(store, now=NOW, policy=POLICY)["folded"] == 1
    [p] = store.series("cam-1", m0, m0 + 59)
    assert (p["windows"], p["inferences"], p["errors"]) == (2, 100, 1)
    assert p["p95_ms"] == pytest.approx(65.0) and p["p95_max_ms"] == 78.0
    assert not rows(store, "SELECT * FROM telemetry")


def test_windows_without_histograms_fall_back_to_weighted_p50_and_max(store):
    send = Sender(store)
    m0 = minute(NOW - 9 * DAY)
    send(m0 + 5, 30, {}, lat(2.0, 4.0, 6.0, 7.0, 2.5))  # an agent that sends no histogram
    send(m0 + 15, 10, {}, lat(6.0, 9.0, 12.0, 13.0, 6.5), hist(b4=10))
    compact(store, now=NOW, policy=POLICY)
    [p] = store.series("cam-1", m0, m0 + 59)
    assert p["p50_ms"] == pytest.approx((2.0 * 30 + 6.0 * 10) / 40)
    assert (p["p95_ms"], p["p99_ms"]) == (9.0, 12.0)


def test_rollup_retention_and_series_across_resolutions(store):
    send = Sender(store)
    very_old = NOW - 40 * DAY  # beyond the 1-minute retention: only its hour remains
    old = NOW - 9 * DAY
    recent = NOW - DAY
    for base in (very_old, old, recent):
        for i in range(3):
            send(base + i * 10, 10 + i, {"nan": 1} if i == 0 else {}, lat(2.0, 3.0, 4.0, 4.5, 2.2), hist(b2=10 + i))
    compact(store, now=NOW, policy=POLICY)

    assert [r["bucket"] for r in rows(store, "SELECT bucket FROM telemetry_1m")] == \
        sorted({minute(old + i * 10) for i in range(3)})
    assert len(rows(store, "SELECT * FROM telemetry_1h")) == len({(t + i * 10) // HOUR for t in (very_old, old)
                                                                  for i in range(3)})
    points = store.series("cam-1", NOW - 45 * DAY, NOW)
    by_res = {}
    for p in points:
        by_res.setdefault(p["resolution"], []).append(p)
    assert set(by_res) == {"1h", "1m", "raw"}
    assert all(p["time"] < NOW - 30 * DAY for p in by_res["1h"])
    assert all(NOW - 30 * DAY - HOUR <= p["time"] < NOW - 7 * DAY for p in by_res["1m"])
    assert all(p["time"] >= NOW - 7 * DAY - HOUR for p in by_res["raw"]) and len(by_res["raw"]) == 3
    assert [p["time"] for p in points] == sorted(p["time"] for p in points)
    assert sum(p["inferences"] for p in points) == 3 * 33 == store.health("cam-1", now=NOW)[0]["inferences"]
    assert sum(p["errors"] for p in points) == 3

    # a step merges points into step-long buckets; sums stay the same
    daily = store.series("cam-1", NOW - 45 * DAY, NOW, step=DAY)
    assert len(daily) == 3 and sum(p["inferences"] for p in daily) == 99
    assert {p["resolution"] for p in daily} == {"1h", "1m", "raw"}
    assert all(p["duration_s"] == DAY for p in daily)
    assert daily[-1]["p50_ms"] is not None
    with pytest.raises(EdgefleetError, match="step"):
        store.series("cam-1", NOW - DAY, NOW, step=0)


def test_the_job_compacts_with_the_clock_it_is_given(store):
    send = Sender(store)
    send(NOW - 9 * DAY, 5, {}, lat(1.0, 1.0, 1.0, 1.0, 1.0), hist(b1=5))
    send(NOW - 60, 5, {}, lat(1.0, 1.0, 1.0, 1.0, 1.0), hist(b1=5))
    job = Housekeeper(store, POLICY, sweep_every_s=0.05, clock=lambda: NOW).start()
    try:
        wait_for(lambda: len(rows(store, "SELECT * FROM telemetry")) == 1, what="the job's first compaction")
    finally:
        job.stop()
    assert rows(store, "SELECT inferences FROM telemetry_1m") == [{"inferences": 5}]
    # the sweep ran with the same clock: the device, silent since NOW - 60, went offline after 3 intervals
    [t] = store.device_detail("cam-1")["transitions"][:1]
    assert t["online"] is False and t["reason"] == "heartbeat timeout" and t["time"] == NOW - 60 + 30


def test_health_totals_survive_compaction_through_the_api(tmp_path):
    with Fleet(tmp_path / "data", release_keys=[release_pub()],
               http_port=0, mqtt_listen="127.0.0.1:0", retention=POLICY,
               compact_every_s=3600) as fleet:  # the job's own (real clock) run is at start, before any row
        client = fleet_client(fleet)
        send = Sender(fleet.store, "cam-r")
        for day in (20, 10, 9, 1):
            send(NOW - day * DAY, 100, {"timeout": day}, lat(2.0, 3.0, 4.0, 5.0, 2.5), hist(b2=100))
        before = client.health("cam-r")
        fleet.compact(now=NOW)
        after = client.health("cam-r")
        assert len(rows(fleet.store, "SELECT * FROM telemetry")) == 1
        assert (after["inferences"], after["errors"]) == (before["inferences"], before["errors"]) == (400, 40)
        assert after["errors_by_kind"] == before["errors_by_kind"] == {"timeout": {"count": 40,
                                                                                    "last_time": NOW - DAY}}


def test_old_telemetry_is_folded_and_on_postgresql_its_partitions_are_dropped_whole(store):
    import time

    from fleet.store import schema

    now = time.time()
    send = Sender(store)
    send(1_700_000_000.0, 5)  # long ago: SQLite's table, PostgreSQL's default partition
    send(now - 60, 7)  # today's partition
    send(now + DAY, 11)  # tomorrow's (made ahead)
    pg = store.backend.name == "postgresql"
    if pg:
        names = [p[0] for p in schema.partitions(store.backend)]
        assert schema.partition_name(now) in names and schema.partition_name(now + DAY) in names
    done = compact(store, now=now + 10 * DAY, policy=POLICY, batch=2)  # batches of 2: resumed across them
    assert done["folded"] == 3 and rows(store, "SELECT count(*) AS n FROM telemetry") == [{"n": 0}]
    assert sum(r["inferences"] for r in rows(store, "SELECT inferences FROM telemetry_1h")) == 23
    assert store.health("cam-1", now=now + 10 * DAY)[0]["inferences"] == 23
    if pg:
        dropped = done["partitions_dropped"]
        assert schema.partition_name(now) in dropped and schema.partition_name(now + DAY) in dropped
        assert rows(store, "SELECT count(*) AS n FROM telemetry_keys") == [{"n": 0}]
        assert not rows(store, "SELECT tier FROM retention WHERE tier LIKE 'fold:%'")  # no progress left behind
    else:
        assert done["partitions_dropped"] == []
    assert compact(store, now=now + 10 * DAY, policy=POLICY)["folded"] == 0  # idempotent
