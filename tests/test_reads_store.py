"""The store's own pages and figures (fleet/store/pages.py, issue 15 item 7), on both backends: a page read in
SQL (filters, keyset, LIMIT) is the page the Python reference (``fleet.paging.page`` over every health entry)
gives, cursors and all; the fleet's figures counted by the database (``aggregate.from_store``) are the ones
summed from every health entry (``aggregate.summarize``), before and after retention has folded every raw row
into rollups."""

from __future__ import annotations

import dataclasses
import time

import pytest
from bigfleet import OFFLINE_AFTER, populate

from agent import protocol
from fleet import aggregate, api_reads, paging, retention
from fleet.store import Store

N = 90


def _register(store: Store, device_id: str, now: float) -> None:
    store.record_state(protocol.State(device_id=device_id, online=True, time=now, boot_id="b1", agent_version="0.9.0",
                                      arch="x86_64", runtimes=["onnxruntime"]), received=now)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet(request, tmp_path_factory):
    url = (f"sqlite:///{tmp_path_factory.mktemp('reads')}/fleet.db" if request.param == "sqlite"
           else request.getfixturevalue("pg_cluster").new_database())
    store = Store(url, offline_after=OFFLINE_AFTER).open()
    now = time.time()
    populate(store, N, now)
    for device_id in ("a_b-1", "axb-1", "ab-2"):  # the '_' of a prefix must not match any character
        _register(store, device_id, now)
    with store.tx() as db:  # flagged devices: a full disk, an identity conflict, a clock far off
        db.execute("UPDATE devices SET storage = 'full' WHERE id IN ('dev-000003', 'dev-000011')")
        db.execute("UPDATE devices SET conflict_last = ?, conflict_first = ?, conflicts = 2 WHERE id = 'dev-000005'",
                   (now - 5, now - 50))
        db.execute("UPDATE clocks SET offset_s = 9000 WHERE device_id = 'dev-000007'")
    try:
        yield store, now
    finally:
        store.close()


def reference(store: Store, q: paging.Query, now: float) -> list[paging.Page]:
    """Every page of a listing by the Python path: the filters and order over every health entry."""
    health = store.health(now=now)
    out, cursor = [], None
    while True:
        found = paging.page(health, cursor, q.limit, q.filters, q.sort, q.descending)
        out.append(found)
        if found.next is None:
            return out
        cursor = paging.Cursor.decode(found.next)


def pages_of(store: Store, q: paging.Query, now: float) -> list[paging.Page]:
    out, cursor = [], None
    while True:
        found = api_reads.health_page(store, dataclasses.replace(q, cursor=cursor), now)
        out.append(found)
        if found.next is None:
            return out
        cursor = paging.Cursor.decode(found.next)


@pytest.mark.parametrize("params", [
    {}, {"order": "desc"}, {"sort": "model"}, {"sort": "version", "order": "desc"}, {"sort": "inferences"},
    {"sort": "errors", "order": "asc"}, {"sort": "disk"}, {"status": "offline"}, {"tag": "site-b", "sort": "errors"},
    {"model": "ocr", "version": "1.1.0"}, {"model": ""}, {"prefix": "a_"}, {"prefix": "dev-00004"},
    {"sort": "p95"}, {"sort": "error-rate"}, {"sort": "rate", "order": "asc"}, {"sort": "cpu", "tag": "site-a"},
    {"sort": "temperature", "status": "offline"}, {"sort": "rss"}, {"sort": "clock"}, {"sort": "p99"},
    {"sort": "memory", "model": "ocr"},  # figures the database derives per device
    {"tag": "cams", "sort": "status"}, {"sort": "status", "order": "desc"},
    {"sort": "last-seen"}, {"sort": "drift"},  # sorted in Python
])
def test_a_page_read_in_sql_is_the_reference_page_cursors_and_all(fleet, params):
    store, now = fleet
    q = paging.parse({"limit": "7", **params}, sortable=True)
    want, got = reference(store, q, now), pages_of(store, q, now)
    assert [[h["device_id"] for h in p.items] for p in got] == [[h["device_id"] for h in p.items] for p in want]
    assert [(p.next, p.prev) for p in got] == [(p.next, p.prev) for p in want]
    assert got[0].items or params.get("model") == ""
    assert got[0].items == want[0].items  # the entries too, built in batches
    if params.get("prefix") == "a_":
        assert [h["device_id"] for h in got[0].items] == ["a_b-1"]


def test_a_page_of_the_registry_and_a_forged_cursor(fleet):
    store, now = fleet
    q = paging.parse({"limit": "4", "status": "offline"})
    found = api_reads.devices_page(store, q)
    every = [d for d in store.devices() if not d["online"]]
    assert [d["id"] for d in found.items] == [d["id"] for d in every[:4]] and found.next
    later = api_reads.devices_page(store, dataclasses.replace(q, cursor=paging.Cursor.decode(found.next)))
    assert [d["id"] for d in later.items] == [d["id"] for d in every[4:8]]
    assert later.items[0] == every[4]
    forged = paging.Cursor("inferences", True, False, "text", "dev-000001")
    with pytest.raises(paging.PageError, match="invalid cursor"):
        api_reads.health_page(store, paging.Query(paging.Filters(), 5, forged, "inferences"), now)


def _same(agg: aggregate.Fleet, ref: aggregate.Fleet) -> None:
    def group(g: aggregate.Group) -> dict:
        d = dataclasses.asdict(g)
        return {k: (pytest.approx(v) if isinstance(v, float) else
                    {kk: pytest.approx(vv) if isinstance(vv, float) else vv for kk, vv in v.items()}
                    if isinstance(v, dict) else v) for k, v in d.items()}

    assert dataclasses.asdict(ref.all) == group(agg.all)
    assert sorted(agg.models) == sorted(ref.models) and sorted(agg.tags) == sorted(ref.tags)
    for k in ref.models:
        assert dataclasses.asdict(ref.models[k]) == group(agg.models[k])
    for k in ref.tags:
        assert dataclasses.asdict(ref.tags[k]) == group(agg.tags[k])
    assert (agg.conflicts, agg.storage_degraded, agg.clocks_off) == (ref.conflicts, ref.storage_degraded,
                                                                     ref.clocks_off)
    for name in ("conflicted", "no_writes", "clock_off", "worst_error_rate", "worst_p95"):
        assert getattr(agg, name) == getattr(ref, name), name


def test_the_figures_counted_by_the_database_are_the_summed_ones(fleet):
    store, now = fleet
    ref = aggregate.summarize(store.health(now=now))
    assert ref.conflicts == 1 and ref.storage_degraded == 2 and ref.clocks_off == 1 and ref.worst_error_rate
    _same(aggregate.from_store(store, now), ref)


def test_the_figures_after_retention_come_from_the_rollups(fleet):
    store, now = fleet
    later = now + 30 * 86400  # every raw row folded into rollups and deleted
    retention.compact(store, now=later)
    assert store.last_telemetry("dev-000001") is None
    ref = aggregate.summarize(store.health(now=later))
    assert ref.all.p95.n and ref.all.cpu.n  # from the rollups
    _same(aggregate.from_store(store, later), ref)


def test_schema_10_adds_the_read_indexes_to_a_schema_9_database(store_url):
    store = Store(store_url).open()
    with store.tx() as db:  # what a controller of schema 9 left
        db.execute("DROP INDEX deployment_devices_device")
        db.execute("DROP INDEX devices_active")
        db.execute("UPDATE schema_version SET version = 9")
    store.close()
    store = Store(store_url).open()
    try:
        assert store.query("SELECT version FROM schema_version")[0][0] == 10
        sql = ("SELECT indexname FROM pg_indexes WHERE indexname IN (?, ?)" if store.backend.name == "postgresql"
               else "SELECT name FROM sqlite_master WHERE type = 'index' AND name IN (?, ?)")
        assert sorted(r[0] for r in store.query(sql, ("deployment_devices_device", "devices_active"))) == [
            "deployment_devices_device", "devices_active"]
    finally:
        store.close()
