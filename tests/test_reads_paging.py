"""fleet.paging (the listings' keyset pages, filters, cursor) and fleet.aggregate (the fleet in figures), on the
entries a real store returns for a registered fleet (tests/bigfleet.py)."""

from __future__ import annotations

import base64
import json
import time

import pytest
from bigfleet import OFFLINE_AFTER, populate

from fleet import aggregate, paging
from fleet.store import Store
from fleet.targets import TargetError

N = 300


@pytest.fixture(scope="module")
def fleet_rows(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("paging") / "fleet.db", offline_after=OFFLINE_AFTER).open()
    now = time.time()
    populate(store, N, now)
    try:
        yield store, store.health(now=now), store.devices(), store.device_ids()
    finally:
        store.close()


def walk(rows, q: paging.Query) -> list:
    """Every page of a listing, following next; asserts that prev leads back to the page before."""
    out, cursor, pages = [], None, []
    while True:
        found = paging.page(rows, cursor, q.limit, q.filters, q.sort, q.descending)
        assert len(found.items) <= q.limit
        if pages:
            back = paging.page(rows, paging.Cursor.decode(found.prev) if found.prev else None, q.limit, q.filters,
                               q.sort, q.descending)
            assert [paging.row_id(r) for r in back.items] == pages[-1]
        pages.append([paging.row_id(r) for r in found.items])
        out += found.items
        if found.next is None:
            return out
        cursor = paging.Cursor.decode(found.next)


@pytest.mark.parametrize("sort,order", [("device", None), ("device", "desc"), ("p95", None), ("error-rate", None),
                                        ("temperature", "asc"), ("status", None), ("model", "desc")])
def test_paging_through_every_page_lists_each_device_once_in_order(fleet_rows, sort, order):
    _, health, _, _ = fleet_rows
    q = paging.parse({"limit": "7", "sort": sort, **({"order": order} if order else {})}, sortable=True)
    got = walk(health, q)
    ids = [h["device_id"] for h in got]
    assert sorted(ids) == sorted(h["device_id"] for h in health) and len(set(ids)) == N
    from fleet.health import sort_entries
    assert ids == [h["device_id"] for h in sort_entries(health, sort, None if order is None else order == "desc")]


def test_filters_keep_exactly_the_matching_devices_on_every_kind_of_row(fleet_rows):
    _, health, registry, ids = fleet_rows
    f = paging.Filters(status="online", tag="site-b", model="ocr", version="1.1.0")
    want = {h["device_id"] for h in health if h["online"] and "site-b" in h["tags"]
            and h["model"]["name"] == "ocr" and h["model"]["version"] == "1.1.0"}
    assert want  # the fleet has some, and some of each filter's misses
    assert {h["device_id"] for h in walk(health, paging.Query(f, 3, None))} == want
    assert {d["id"] for d in walk(registry, paging.Query(f, 3, None))} == want
    pre = paging.Query(paging.Filters(prefix="dev-0001"), 1000, None)
    assert [paging.row_id(r) for r in walk(ids, pre)] == [i for i in ids if i.startswith("dev-0001")]
    assert len(walk(ids, pre)) == 100
    # a device that registers between two pages shifts nothing: keyset, not offset
    first = paging.page(ids, None, 10, paging.Filters())
    later = paging.page(["dev-000000a", *ids], paging.Cursor.decode(first.next), 10, paging.Filters())
    assert paging.row_id(later.items[0]) == ids[10]


@pytest.mark.parametrize("params,needle", [
    ({"limit": "0"}, "limit='0' is out of range: a whole number from 1 to 1000"),
    ({"limit": "1001"}, "out of range"), ({"limit": "ten"}, "out of range"),
    ({"status": "maybe"}, "invalid status 'maybe': choose online or offline"),
    ({"prefix": "Cam"}, "invalid prefix 'Cam'"), ({"model": "x" * 200}, "model is too long"),
    ({"cursor": "!!"}, "invalid cursor"), ({"cursor": "bm90IGpzb24"}, "invalid cursor"),
    ({"cursor": base64.urlsafe_b64encode(json.dumps([1, "p95", True, False, 3.0, "a"]).encode()).decode()},
     "invalid cursor: it continues a listing sorted by p95 desc, not by device asc"),
    ({"sort": "colour"}, "cannot sort by 'colour'"), ({"order": "up"}, "invalid order 'up'"),
    ({"colour": "red"}, "unknown query parameter 'colour'"),
])
def test_bad_parameters_are_one_clear_message(params, needle):
    with pytest.raises(paging.PageError) as err:
        paging.parse(params, sortable=True)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_cursor_of_the_wrong_type_or_a_malformed_tag_is_refused(fleet_rows):
    _, health, _, _ = fleet_rows
    forged = paging.Cursor("p95", True, False, "text", "dev-000001")
    with pytest.raises(paging.PageError, match="invalid cursor"):
        paging.page(health, forged, 10, paging.Filters(), "p95")
    with pytest.raises(TargetError, match="invalid tag"):
        paging.parse({"tag": "a/b"})


def test_aggregates_count_every_device_once_and_name_the_worst(fleet_rows):
    _, health, _, _ = fleet_rows
    agg = aggregate.summarize(health)
    assert agg.all.devices == N and agg.all.offline == sum(1 for h in health if not h["online"]) == N // 10
    assert sum(g.devices for g in agg.models.values()) == N and len(agg.models) == 15
    assert agg.tags["cams"].devices + agg.tags["mics"].devices == N
    assert agg.all.inferences == sum(h["inferences"] for h in health)
    rates = sorted(((h["error_rate"], h["device_id"]) for h in health if h["error_rate"]),
                   key=lambda t: (-t[0], t[1]))
    assert [h["device_id"] for h in agg.worst_error_rate] == [d for _, d in rates[:aggregate.WORST]]
    p95 = sorted(((h["latency_ms"]["p95"], h["device_id"]) for h in health), key=lambda t: (-t[0], t[1]))
    assert [h["device_id"] for h in agg.worst_p95] == [d for _, d in p95[:aggregate.WORST]]
    g = agg.models[("ocr", "1.0.0")]
    members = [h for h in health if h["model"]["name"] == "ocr" and h["model"]["version"] == "1.0.0"]
    assert g.p95.max == max(h["latency_ms"]["p95"] for h in members)
    assert g.p95.mean == pytest.approx(sum(h["latency_ms"]["p95"] for h in members) / len(members))
