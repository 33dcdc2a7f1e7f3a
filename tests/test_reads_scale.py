"""Reads that stay small at 10,000 devices: a real controller (embedded broker, HTTPS, its SQLite store) whose
registry holds 10,000 devices made through the store's own ``record_*`` methods (tests/bigfleet.py). A page of
``/api/health``, the overview page and ``/metrics`` are each a few tens of KB (on main: 5.7 MB, 4 MB, 8.5 MB),
and following ``next`` lists every device exactly once. Sizes are asserted, never times."""

from __future__ import annotations

import json
import re
import urllib.parse

import pytest
from bigfleet import OFFLINE_AFTER, populate
from prometheus_client.parser import text_string_to_metric_families
from util import admin_token, fleet_client, release_pub

from test_web import TOKENS, get

N = 10_000
pytestmark = pytest.mark.slow  # ~10 s to register the devices, a few s a full health read


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    from fleet.app import Fleet

    fleet = Fleet(tmp_path_factory.mktemp("big") / "fleet", release_keys=[release_pub()], http_port=0,
                  mqtt_listen="127.0.0.1:0", offline_after=OFFLINE_AFTER).start_background()
    TOKENS[fleet.http_url] = admin_token(fleet)
    try:
        ids = populate(fleet.store, N)
        yield fleet, ids
    finally:
        TOKENS.pop(fleet.http_url, None)
        fleet.stop()


def test_a_health_page_is_small_and_the_pages_list_every_device_once(big):
    fleet, ids = big
    status, headers, body = get(fleet, fleet.http_url + "/api/health")
    doc = json.loads(body)
    assert status == 200 and len(doc["devices"]) == 100 and doc["limit"] == 100
    assert len(body) < 150_000, len(body)  # 100 entries; all 10,000 were 5.7 MB
    nxt = re.fullmatch(r'<(/api/health\?[^>]+)>; rel="next"', headers["link"]).group(1)
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(nxt).query)["cursor"] == [doc["next"]]
    # the client follows the pages: every device once, in id order
    seen = [h["device_id"] for h in fleet_client(fleet).health()]
    assert seen == sorted(ids) and len(set(seen)) == N
    listed = [d["id"] for d in fleet_client(fleet).devices()]
    assert listed == sorted(ids)
    # filtered and sorted by a figure, through the Link header: once each, in that order
    url, got = fleet.http_url + "/api/health?status=offline&tag=site-b&sort=p95&limit=100", []
    while url:
        status, headers, body = get(fleet, url)
        assert status == 200, body
        got += json.loads(body)["devices"]
        url = fleet.http_url + headers["link"][1:headers["link"].index(">")] if "link" in headers else None
    want = [i for n, i in enumerate(ids) if n % 10 == 9 and n % 4 == 1]
    assert sorted(h["device_id"] for h in got) == want and len(got) == len(want)
    p95 = [h["latency_ms"]["p95"] for h in got]
    assert p95 == sorted(p95, reverse=True)
    assert len(fleet_client(fleet).health(limit=250, model="ocr")) == 250


def test_the_overview_page_is_small_and_pages_its_device_table(big):
    fleet, ids = big
    status, _, body = get(fleet, fleet.http_url + "/")
    page = body.decode()
    assert status == 200 and len(body) < 60_000, len(body)  # all 10,000 rows were 4 MB
    assert f'data-total="{N}"' in page and f'data-offline="{N // 10}"' in page.replace("\n ", " ")
    assert page.count('<tr data-device="') == 50 and '<tr data-device="dev-000049">' in page
    assert page.count('data-worst-device="') == 20 and page.count("<tr data-model=") == 15
    nxt = re.search(r'<a rel="next" href="([^"]+)"', page).group(1).replace("&amp;", "&")
    second = get(fleet, fleet.http_url + nxt)[2].decode()
    assert '<tr data-device="dev-000050">' in second and '<tr data-device="dev-000049">' not in second
    assert re.search(r'<a rel="prev" href="/">', second)
    status, _, body = get(fleet, fleet.http_url + "/?model=ocr&version=2.0.0&prefix=dev-001&limit=1000")
    rows = re.findall(r'<tr data-device="([^"]+)"', body.decode())
    assert rows == [i for n, i in enumerate(ids) if i.startswith("dev-001") and n % 5 == 3 and (n // 5) % 3 == 2]
    status, _, body = get(fleet, fleet.http_url + "/?limit=0")
    assert status == 400 and "limit=&#x27;0&#x27; is out of range" in body.decode()


def test_metrics_are_aggregated_and_small(big):
    fleet, ids = big
    status, _, body = get(fleet, fleet.http_url + "/metrics")
    assert status == 200 and len(body) < 30_000, len(body)  # per-device series were 8.5 MB
    fam = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert "edgefleet_device_online" not in fam  # per device only with --metrics-per-device
    by_state = {s.labels["state"]: s.value for s in fam["edgefleet_devices"].samples}
    assert by_state == {"online": N - N // 10, "offline": N // 10}
    per_model = fam["edgefleet_model_devices"].samples
    assert sum(s.value for s in per_model) == N and len({(s.labels["model"], s.labels["version"])
                                                         for s in per_model}) == 15
    assert sum(s.value for s in fam["edgefleet_tag_devices"].samples if s.labels["tag"] in ("cams", "mics")) == N
    p95 = {s.labels["stat"]: s.value for s in fam["edgefleet_model_latency_p95_ms"].samples
           if s.labels["model"] == "ocr" and s.labels["version"] == "1.0.0"}
    assert p95["max"] >= p95["mean"] > 0
