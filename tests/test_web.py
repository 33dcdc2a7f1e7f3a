"""The dashboard, /metrics and the OpenAPI document, on a real controller with a real agent serving a real
model (a bundle made by the real converter, so its report is real), over real HTTP."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
from test_fleet_quality import real  # noqa: F401  (a fixture: a real bundle with its reference profile)
from util import admin_token, fleet_client, wait_for, release_pub

from agent.errors import EdgefleetError

OUTPUT = "save_infer_model/scale_0.tmp_1"
PAGES = {"/", "/devices/{device_id}", "/rollouts/{rollout_id}", "/login", "/logout"}  # HTML, not the JSON API
TOKENS: dict[str, str] = {}  # a started controller's URL -> its admin token (fleet_with_agents)


def _auth(url: str) -> dict[str, str]:
    """The admin token's header for a URL of a controller fleet_with_agents started."""
    return next(({"Authorization": f"Bearer {t}"} for base, t in TOKENS.items() if url.startswith(base + "/")), {})


def get(fleet, url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    from util import ssl_context

    req = urllib.request.Request(url, headers={**_auth(url), **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30, context=ssl_context(fleet)) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@contextlib.contextmanager
def fleet_with_agents(tmp: Path, deploy: dict[str, Path], crops, interval: float = 0.3, windows: int = 4,
                      bad_every: dict[str, int] | None = None) -> Iterator[tuple]:
    """A controller and one real agent per device of ``deploy`` (device -> bundle), each bundle deployed and
    active, real inferences sent through each agent's local API (a varying load; for a device in
    ``bad_every``, one request in that many a bad input, which the agent counts as an error) until
    ``windows`` telemetry windows with inferences arrived.
    Yields (fleet, {device: agent}, {"upload": {device: response}, "deploy": {...}})."""
    from agent.api import AgentClient
    from agent.daemon import Agent
    from fleet.app import Fleet
    from fleet.broker import free_port
    from util import agent_config

    fleet = Fleet(tmp / "fleet", release_keys=[release_pub()],  # /metrics per device: the tests read each one's
                  http_port=0, mqtt_listen="127.0.0.1:0", metrics_per_device=True).start_background()
    TOKENS[fleet.http_url] = admin_token(fleet)
    agents = {}
    try:
        for device in deploy:
            cfg = agent_config(fleet, tmp / device, device, api=f"127.0.0.1:{free_port()}",
                               telemetry_interval_s=interval)
            agents[device] = Agent(cfg)
            agents[device].start()
        client = fleet_client(fleet)
        responses: dict[str, dict] = {"upload": {}, "deploy": {}}
        for device, path in deploy.items():
            wait_for(lambda: any(h["device_id"] == device for h in client.health()), what=f"{device} registered")
            up = responses["upload"][device] = client.upload_bundle(path)
            responses["deploy"][device] = client.deploy(up["sha256"], [device])
        for device, a in agents.items():
            sha = responses["upload"][device]["sha256"]
            wait_for(lambda: a.engine.current and a.engine.current.sha == sha, what=f"{device} active")
        x, _ = crops
        apis = {d: AgentClient(a.api.address) for d, a in agents.items()}

        def windows_with_inferences(device: str) -> int:
            return fleet.store._query("SELECT count(*) FROM telemetry WHERE device_id = ? AND inferences > 0",
                                      (device,))[0][0]

        deadline = time.monotonic() + 120 + 3 * interval * windows
        rng = np.random.default_rng(5)
        i = 0
        while min(windows_with_inferences(d) for d in agents) < windows:
            assert time.monotonic() < deadline, "timed out waiting for telemetry windows with inferences"
            for n, (device, api) in enumerate(apis.items()):
                every = (bad_every or {}).get(device)
                for _ in range(int(rng.integers(2, 10)) * (n + 1)):
                    i += 1
                    if every and i % every == 0:
                        with pytest.raises(EdgefleetError, match="shape"):
                            api.infer({"x": np.zeros((1, 3, 48, 100), np.float32)})
                        continue
                    out = api.infer({"x": x[i % len(x): i % len(x) + 1]})
                    assert out[OUTPUT].shape == (1, 2)
            time.sleep(interval / 3)
        yield fleet, agents, responses
    finally:
        for a in agents.values():
            a.stop()
        TOKENS.pop(fleet.http_url, None)
        fleet.stop()


@pytest.fixture(scope="session")
def converted(tmp_path_factory, crops) -> Path:
    """The real converter's cpu bundles of the PP-OCR classifier; returns the int8 one."""
    from converter.convert import convert
    from edgefleet.models import model_path

    d = tmp_path_factory.mktemp("converted")
    x, _ = crops
    np.savez(d / "calib.npz", x=x)
    report = convert(model_path("ocr-cls"), target="cpu", calib=d / "calib.npz", out=d / "out", name="ocr-cls",
                     version="2.1", input_shapes={"x": [1, 3, 48, 192]})
    [int8] = [v for v in report["variants"] if v["variant"] == "int8"]
    from agent.bundle import sign_bundle
    from util import release_key

    sign_bundle(int8["path"], release_key()[0])  # the converter's output, signed as a build host would
    return Path(int8["path"])


@pytest.fixture(scope="module")
def site(tmp_path_factory, converted, crops):
    with fleet_with_agents(tmp_path_factory.mktemp("site"), {"dev-web": converted}, crops) as s:
        yield s


def test_overview_lists_devices_with_their_health(site):
    fleet, _, _ = site
    status, headers, body = get(fleet, fleet.http_url + "/")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert 'data-online="1" data-offline="0"' in page.replace("\n ", " ") and 'data-total="1"' in page
    row = page[page.index('<tr data-device="dev-web">'):]
    row = row[: row.index("</tr>")]
    assert 'href="/devices/dev-web"' in row and "online" in row
    assert "ocr-cls" in row and "2.1" in row and "int8" in row and " ms" in row and "ago" in row
    from util import fleet_client

    [h] = fleet_client(fleet).health()
    assert ("unknown" in row) == (h["temperature_c"] is None)  # no sensor: "unknown", never 0 °C
    assert "Rollouts" in page
    for asset in ("/static/edgefleet.css", "/static/edgefleet.js"):
        assert asset in page and get(fleet, fleet.http_url + asset)[0] == 200


def test_device_page_has_charts_report_events_and_deployments(site):
    fleet, _, responses = site
    status, _, body = get(fleet, fleet.http_url + "/devices/dev-web")
    page = body.decode()
    assert status == 200
    for chart in ("latency", "errors", "throughput", "cpu", "memory", "temperature"):
        assert f'data-chart="{chart}"' in page
    assert 'data-src="/api/devices/dev-web/series?since=3600"' in page
    assert "/static/uplot/uPlot.iife.min.js" in page and get(fleet, fleet.http_url + "/static/uplot/uPlot.iife.min.js")[0] == 200
    # the converter's report from the bundle's manifest
    assert "Converter report" in page and "cpu / int8" in page and "top-1" in page and "held-out samples" in page
    assert "Gate" in page and "Measured on" in page
    # events and deployment history
    dep = responses["deploy"]["dev-web"]["id"]
    assert "Recent events" in page and ">active<" in page and dep in page
    assert get(fleet, fleet.http_url + "/devices/dev-web?since=900")[2].decode().count('?since=900" class=on') == 1


def test_series_has_the_telemetry_windows(site):
    from fleet.series import Series

    fleet, _, _ = site
    status, headers, body = get(fleet, fleet.http_url + "/api/devices/dev-web/series?since=600")
    assert status == 200 and headers["content-type"] == "application/json"
    s = msgspec.json.decode(body, type=Series)
    assert s.source == "raw" and set(s.resolution) == {"raw"} and s.step is None and s.points == len(s.time) >= 4
    assert s.time == sorted(s.time) and s.since < s.time[0] <= s.until
    assert sum(v is not None for v in s.p50) >= 4 and all(v > 0 for v in s.p99 if v is not None)
    assert all(r > 0 for r in s.rss_bytes) and sum(s.inferences) > 0
    assert all(v in (None, 0.0) for v in s.error_rate)
    # buckets: one point for the lot, the same totals
    b = msgspec.json.decode(get(fleet, fleet.http_url + "/api/devices/dev-web/series?since=600&step=600")[2], type=Series)
    assert b.step == 600 and 1 <= b.points <= 2 and sum(b.inferences) == sum(s.inferences)
    assert any(v is not None and v > 0 for v in b.p99)
    for query, needle in (("since=-1", "since"), ("since=abc", "since"), ("step=0.1", "step"),
                          ("since=60&step=61", "step"), ("from=0", "unknown query parameter 'from'")):
        status, _, body = get(fleet, fleet.http_url + "/api/devices/dev-web/series?" + query)
        assert status == 400 and needle in json.loads(body)["error"]
    status, _, body = get(fleet, fleet.http_url + "/api/devices/nope/series")
    assert status == 404 and "unknown device 'nope'" in json.loads(body)["error"]


def test_the_raw_table_alone_gives_the_same_points(site):
    """``raw_points`` (a store without rollups) and ``Store.series`` (rollups too) agree on raw windows."""
    from fleet.series import raw_points, recent_rates

    fleet, _, _ = site
    now = time.time()
    raw = raw_points(fleet.store, "dev-web", now - 600, now)
    assert len(raw) >= 4
    rates = recent_rates(fleet.store, now)["dev-web"]  # the last minute's, for a health report without them
    assert rates["inferences_per_min"] > 0 and rates["error_rate"] == 0
    if not hasattr(fleet.store, "series"):
        pytest.skip("this store has no rollups (Store.series)")
    tiers = fleet.store.series("dev-web", now - 600, now)
    for a, b in zip(raw, tiers, strict=True):
        for k in a:
            assert a[k] == b[k] or (isinstance(a[k], float) and abs(a[k] - b[k]) < 1e-6), (k, a[k], b[k])
    bucket = raw_points(fleet.store, "dev-web", now - 600, now, step=600)
    assert sum(p["inferences"] for p in bucket) == sum(p["inferences"] for p in raw)


def test_unknown_device_and_rollout_are_404_pages(site):
    fleet, _, _ = site
    status, headers, body = get(fleet, fleet.http_url + "/devices/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
    assert status == 404 and headers["content-type"].startswith("text/html")
    assert "No such device" in body.decode() and "<img src=x" not in body.decode()
    status, _, body = get(fleet, fleet.http_url + "/rollouts/ro-nope")
    assert status == 404 and "No such rollout" in body.decode()


def test_metrics_parse_as_prometheus_text(site):
    from prometheus_client.parser import text_string_to_metric_families

    fleet, _, _ = site
    status, headers, body = get(fleet, fleet.http_url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {s.labels["state"]: s.value for s in families["edgefleet_devices"].samples} == {"online": 1, "offline": 0}
    assert families["edgefleet_device_inferences"].type == "counter"
    assert families["edgefleet_device_errors"].type == "counter"
    labels = {"device": "dev-web", "model": "ocr-cls", "version": "2.1"}

    def value(name: str, **extra) -> float:
        family = families[name.removesuffix("_total")]
        [v] = [s.value for s in family.samples if s.labels == {**labels, **extra}]
        return v

    from util import fleet_client

    h = fleet_client(fleet).health("dev-web")
    assert value("edgefleet_device_online") == 1
    assert value("edgefleet_device_inferences_total") >= 1 and value("edgefleet_device_errors_total") == 0
    for q in ("0.5", "0.95", "0.99"):
        assert value("edgefleet_device_latency_ms", quantile=q) > 0
    assert value("edgefleet_device_latency_ms", quantile="0.5") <= value("edgefleet_device_latency_ms", quantile="0.99")
    assert value("edgefleet_device_rss_bytes") > 0 and value("edgefleet_device_cpu_percent") >= 0
    assert value("edgefleet_device_memory_percent") > 0 and value("edgefleet_device_seq_gaps") == 0
    assert abs(value("edgefleet_device_last_seen_timestamp_seconds") - time.time()) < 600
    temps = families["edgefleet_device_temperature_celsius"].samples
    assert (temps == []) == (h["temperature_c"] is None)  # omitted when unknown
    text = body.decode()
    for name in families:
        assert text.count(f"# HELP {name} ") + text.count(f"# HELP {name}_total ") == 1


def test_metrics_escape_labels():
    from prometheus_client.parser import text_string_to_metric_families

    from fleet.metrics import render

    odd = 'a "quoted" \\ back\nslash'
    health = [{"device_id": "d-1", "online": False, "model": {"name": odd, "version": "1"}, "inferences": 3,
               "errors": 1, "latency_ms": {"p50": 1.5, "p95": 2.0, "p99": 2.5}, "cpu_percent": None,
               "rss_bytes": None, "memory_percent": None, "temperature_c": 41.5, "last_seen": 1.7e9,
               "seq_gaps": 2}]
    families = {f.name: f for f in text_string_to_metric_families(render(health, per_device=True))}
    [s] = families["edgefleet_device_temperature_celsius"].samples
    assert s.labels == {"device": "d-1", "model": odd, "version": "1"} and s.value == 41.5
    assert families["edgefleet_device_cpu_percent"].samples == []
    assert {s.labels["state"]: s.value for s in families["edgefleet_devices"].samples} == {"online": 0, "offline": 1}
    # the aggregates by model carry the same label, escaped the same way; without per_device, no device label
    [s] = families["edgefleet_model_temperature_celsius_max"].samples
    assert s.labels == {"model": odd, "version": "1"} and s.value == 41.5
    families = {f.name: f for f in text_string_to_metric_families(render(health))}
    assert not [f for f in families if f.startswith("edgefleet_device_")]
    assert {(s.labels["model"], s.labels["state"]): s.value for s in families["edgefleet_model_devices"].samples} \
        == {(odd, "online"): 0, (odd, "offline"): 1}


def _schema_type(schema: dict):
    """The msgspec type a response schema of the document names ({"$ref"} or an array of one)."""
    from fleet import schemas
    from fleet.series import Series

    structs = {c.__name__: c for c in (*vars(schemas).values(), Series)
               if isinstance(c, type) and issubclass(c, msgspec.Struct)}
    if schema.get("type") == "array":
        return list[_schema_type(schema["items"])]
    return structs[schema["$ref"].rsplit("/", 1)[1]]


def call(fleet, method: str, url: str, body: dict | None = None) -> tuple[int, dict | list]:
    from util import ssl_context

    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json", **_auth(url)})
    try:
        with urllib.request.urlopen(req, timeout=30, context=ssl_context(fleet)) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def rollout(site):
    """A real rollout of the device's bundle to it (it already runs it: the rollout completes), or None when
    this controller has no rollout engine."""
    fleet, _, responses = site
    if get(fleet, fleet.http_url + "/api/rollouts")[0] == 404:
        return None
    status, r = call(fleet, "POST", fleet.http_url + "/api/rollouts",
                     {"bundle": responses["upload"]["dev-web"]["sha256"], "targets": ["dev-web"]})
    assert status == 201, r
    return r


def test_rollout_page_shows_waves_and_phases(site, rollout):
    fleet, _, _ = site
    status, _, body = get(fleet, fleet.http_url + "/")
    if rollout is None:
        assert "no rollout engine" in body.decode()
        pytest.skip("this controller has no rollout engine (/api/rollouts)")
    assert f'<tr data-rollout="{rollout["id"]}">' in body.decode()
    status, _, body = get(fleet, fleet.http_url + "/rollouts/" + rollout["id"])
    page = body.decode()
    assert status == 200 and f"Rollout {rollout['id']}" in page
    assert 'data-wave="1"' in page and '<tr data-device="dev-web">' in page and 'href="/devices/dev-web"' in page
    r = call(fleet, "GET", fleet.http_url + "/api/rollouts/" + rollout["id"])[1]
    assert '<span class="pill' in page and r["waves"][0]["devices"][0]["phase"] in page


def test_openapi_documents_every_json_endpoint_and_the_real_answers_match(site, rollout):
    fleet, _, responses = site
    status, _, body = get(fleet, fleet.http_url + "/api/openapi.json")
    doc = json.loads(body)
    assert status == 200 and doc["openapi"].startswith("3.1") and doc["info"]["version"]
    # every real route is documented, and every documented one exists
    from starlette.routing import Route

    real = {(r.path, m.lower()) for r in fleet.app.routes if isinstance(r, Route) and r.path not in PAGES
            for m in r.methods - {"HEAD"}}
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert real == documented, (real - documented, documented - real)
    for path, ops in doc["paths"].items():
        for op in ops.values():
            for ref in _refs(op):  # every $ref resolves
                assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"], ref
    # each documented GET answers, and a JSON answer decodes into the schema it is documented with
    # (the structs forbid unknown fields: a field the API returns and the document does not name fails)
    dep = responses["deploy"]["dev-web"]
    sha = responses["upload"]["dev-web"]["sha256"]
    params = {"device_id": "dev-web", "deployment_id": dep["id"], "sha256": sha,
              "rollout_id": rollout and rollout["id"]}
    for path, ops in doc["paths"].items():
        if "get" not in ops:
            continue
        url = fleet.http_url + path.format(**{k: v for k, v in params.items() if "{" + k + "}" in path})
        status, headers, body = get(fleet, url)
        assert status == 200, (path, status, body[:200])
        content = ops["get"]["responses"]["200"]["content"]
        media = next(iter(content))
        assert headers["content-type"].split(";")[0] == media.split(";")[0], path
        schema = content[media]["schema"]
        if "$ref" in schema or schema.get("type") == "array":
            msgspec.json.decode(body, type=_schema_type(schema))
    # the other methods, with real requests (the upload and the deployment: what the fixture's answered)
    def answers(path: str, method: str, status: int, body) -> None:
        response = doc["paths"][path][method]["responses"][str(status)]
        msgspec.convert(body, _schema_type(response["content"]["application/json"]["schema"]))

    answers("/api/bundles", "post", 200, responses["upload"]["dev-web"])
    answers("/api/deployments", "post", 200, dep)
    answers("/api/deployments", "post", 400, call(fleet, "POST", fleet.http_url + "/api/deployments", {"bundle": sha})[1])
    tags = fleet.http_url + "/api/devices/dev-web/tags"
    if "/api/devices/{device_id}/tags" in doc["paths"]:
        answers("/api/devices/{device_id}/tags", "put", 200, call(fleet, "PUT", tags, {"tags": ["dock"]})[1])
        answers("/api/devices/{device_id}/tags", "post", 200, call(fleet, "POST", tags, {"remove": ["dock"]})[1])
    if "/api/enrollments" in doc["paths"]:  # and the identity routes, with real requests
        token = call(fleet, "POST", fleet.http_url + "/api/enrollments", {"device_id": "dev-new", "ttl_s": 600})
        answers("/api/enrollments", "post", 201, token[1])
        answers("/api/enrollments/{token_id}/revoke", "post", 200,
                call(fleet, "POST", f"{fleet.http_url}/api/enrollments/{token[1]['id']}/revoke")[1])
        answers("/enroll", "post", 401, call(fleet, "POST", fleet.http_url + "/enroll",
                                             {"token": token[1]["token"], "csr": "x"})[1])
        answers("/api/devices/{device_id}/revoke", "post", 404,
                call(fleet, "POST", fleet.http_url + "/api/devices/dev-none/revoke")[1])
    if rollout is not None:
        answers("/api/rollouts", "post", 201, rollout)
        url = f"{fleet.http_url}/api/rollouts/{rollout['id']}/pause"
        status, body = call(fleet, "POST", url)  # it may have completed already: then a 409
        answers("/api/rollouts/{rollout_id}/{action}", "post", status, body)
    # a documented error answers with the documented error body
    status, _, body = get(fleet, fleet.http_url + "/api/health/nope")
    assert status == 404 and "404" in doc["paths"]["/api/health/{device_id}"]["get"]["responses"]
    msgspec.json.decode(body, type=_schema_type({"$ref": "#/components/schemas/Error"}))


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return [node["$ref"]] if "$ref" in node else [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


# -- model quality (issue 12): the fleet page's worst devices, a device page's section and its chart columns ----------
HOSTILE = '<script>alert("out")</script>&'  # an output name a bundle's profile.json may carry


@pytest.fixture(scope="module")
def quality_site(tmp_path_factory, real):
    """A controller with a real bundle uploaded (the PP-OCR direction classifier with a reference profile built
    from the fp32 outputs on half of the real text crops: ``test_fleet_quality.real``) and quality windows filed in
    its store as its link files them (``Store.record_quality``): the bins are the model's real outputs on the
    other half folded by ``agent.quality.Folder``, the confusion its real predictions against the crops' labels.
    cam-ok serves upright and turned text like the reference, cam-turned only turned text (drift), cam-odd runs a
    bundle whose profile names its output ``HOSTILE``, cam-old reported 30 min ago, cam-quiet never; nine more
    devices make the worst list longer than the page shows."""
    from agent import protocol
    from agent import quality as aq
    from fleet.app import Fleet

    fleet = Fleet(tmp_path_factory.mktemp("quality-site") / "fleet", release_keys=[release_pub()],
                  http_port=0, mqtt_listen="127.0.0.1:0").start_background()
    TOKENS[fleet.http_url] = admin_token(fleet)
    try:
        sha = fleet_client(fleet).upload_bundle(real["path"])["sha256"]
        profile_id, profile = fleet.store.reference(sha)
        assert sha == real["sha"] and profile == real["profile"]
        out, labels, output = real["outputs"], real["labels"], real["output"]
        turned = np.flatnonzero(labels == 1)
        index = {c: i for i, c in enumerate(profile.outputs[0].classes)}
        now = time.time()

        def fold(rows) -> list[dict]:
            f = aq.Folder(profile)
            f.add({output: out[rows]})
            taken = f.take()
            return [taken[o.name] for o in profile.outputs]

        def confusion(rows) -> list[list[int]]:
            cells: dict[tuple[int, int], int] = {}
            for t, p in zip(labels[rows], out[rows].argmax(1)):
                k = (index.get(int(t), len(index)), index.get(int(p), len(index)))
                cells[k] = cells.get(k, 0) + 1
            return [[t, p, n] for (t, p), n in sorted(cells.items())]

        def send(device, seq, at, rows, *, sha256=sha, prof=profile_id, bins=None, **kw):
            assert fleet.store.record_quality(protocol.Quality(
                device_id=device, boot_id="boot-1", seq=seq, time=at, interval_s=60.0, sha256=sha256, version="2.1",
                profile=prof, served=len(rows), bins=fold(rows) if bins is None else bins, **kw), received=at)

        everything = np.arange(len(labels))
        for i in range(3):
            at = now - 600 + 200 * i
            send("cam-ok", i + 1, at, everything, canary=protocol.Canary(runs=16, agree=16, time=at),
                 feedback=protocol.Feedback(labels=len(labels), confusion=confusion(everything),
                                            refused={"unknown-id": 2, "late": 1}))
            send("cam-turned", i + 1, at, turned,
                 canary=protocol.Canary(runs=16, agree=15, max_abs_err=0.5, time=at))
        for n in range(9):
            send(f"cam-more-{n}", 1, now - 300, everything[n::2])
        send("cam-old", 1, now - 1800, everything)
        fleet.store.record_telemetry(protocol.Telemetry(device_id="cam-quiet", boot_id="boot-1", seq=1,
                                                        time=now - 60, interval_s=60.0, inferences=0),
                                       received=now - 60)
        # a bundle (stored as an upload stores it) whose profile names its classifier output HOSTILE
        from test_fleet_quality import bins as hand_bins, hand_profile

        odd = hand_profile()
        odd.outputs[0].name = HOSTILE
        odd_sha = "0d" * 32
        fleet.store.add_bundle(odd_sha, 1000, {"name": "odd", "version": "1", "target": "cpu",
                                               "runtime": "onnxruntime", "precision": "int8"},
                               profile=msgspec.json.encode(odd))
        send("cam-odd", 1, now - 120, range(50), sha256=odd_sha, prof=odd.id, bins=hand_bins((40, 10, 0)))
        yield fleet, {"sha": sha, "profile": profile, "labels": labels, "out": out, "turned": turned,
                      "fold": fold, "index": index}
    finally:
        TOKENS.pop(fleet.http_url, None)
        fleet.stop()


def _section(page: str, start: str, end: str) -> str:
    i = page.index(start)
    return page[i: page.index(end, i)]


def _psi(v) -> str:
    return f"{v:.3f}"


def _pct(v) -> str:
    return f"{v * 100:.1f} %"


def test_fleet_page_lists_the_worst_devices_by_model_quality(quality_site):
    from fleet import quality

    fleet, _ = quality_site
    page = get(fleet, fleet.http_url + "/")[2].decode()
    panel = _section(page, '<section class="panel" id="quality-worst"', "</section>")
    rows = quality.summary(fleet.store)  # what the panel renders: the last hour, worst first
    assert len(rows) == 13 and 'data-quality-total="13" data-quality-shown="10"' in panel
    shown = [r["device_id"] for r in rows[:10]]
    assert [line.split('"')[0] for line in panel.split('data-quality-device="')[1:]] == shown
    assert '<a href="/?quality=all">All 13 devices</a>' in panel
    turned = next(r for r in rows if r["device_id"] == "cam-turned")
    assert turned["band_ref"] == "significant" and rows[0]["band"] == "significant"
    row = _section(panel, '<tr data-quality-device="cam-turned"', "</tr>")
    # a drifting device stands out: the row is marked and its band is a "bad" pill
    assert 'data-band="significant" class=drifting' in row
    assert (f'<span class="psi">{_psi(turned["psi_ref"])}</span> <span class="pill bad" '
            f'data-band="significant">significant</span>') in row
    assert f'<span class="psi">{_psi(turned["psi_fleet"])}</span>' in row
    # the rest: only a significant band marks a row (cam-ok's outputs are like the reference's)
    ok_row = next(r for r in rows if r["device_id"] == "cam-ok")
    assert ok_row["band_ref"] != "significant" and ok_row["psi_ref"] < turned["psi_ref"] / 10
    for r in rows[:10]:
        marked = f'data-quality-device="{r["device_id"]}" data-band="{r["band"]}" class=drifting' in panel
        assert marked == (r["band"] == "significant"), r
    assert any(r["band"] != "significant" for r in rows[:10])
    assert 'href="/devices/cam-turned"' in row and "2.1 <code" in row and f'title="{quality_site[1]["sha"]}"' in row
    assert f"{_pct(45 / 48)} <span class=\"muted\">48 runs</span>" in row  # 3 windows of 15 of 16
    # all of them, one click away (cam-quiet sent no quality: not listed)
    every = _section(get(fleet, fleet.http_url + "/?quality=all")[2].decode(), 'id="quality-worst"', "</section>")
    assert every.count("data-quality-device=") == 13 and '<a href="/">Only the worst ten</a>' in every
    assert [line.split('"')[0] for line in every.split('data-quality-device="')[1:]] == [r["device_id"] for r in rows]
    assert "cam-quiet" not in every
    ok = _section(every, '<tr data-quality-device="cam-ok"', "</tr>")
    labels, out = quality_site[1]["labels"], quality_site[1]["out"]
    accuracy = float((out.argmax(1) == labels).mean())
    assert f'{_pct(accuracy)} <span class="muted">{3 * len(labels)} labels</span>' in ok
    assert f'{_pct(1.0)} <span class="muted">48 runs</span>' in ok and "class=drifting" not in ok


def test_device_page_shows_drift_canary_feedback_and_the_confusion_matrix(quality_site):
    from agent import quality as aq
    from fleet import quality

    fleet, data = quality_site
    page = get(fleet, fleet.http_url + "/devices/cam-turned")[2].decode()
    section = _section(page, '<section class="panel" id="quality">', "</section>")
    q = quality.device(fleet.store, "cam-turned")
    # drift vs the bundle's reference, against a value computed here from the folded outputs (3 windows)
    folded = [{f: [3 * n for n in c] for f, c in o.items()} for o in data["fold"](data["turned"])]
    expected = max(aq.psi(o.counts[f], folded[i][f]) for i, o in enumerate(data["profile"].outputs)
                   for f in o.counts)
    ref, vs_fleet = q["drift"]["reference"], q["drift"]["fleet"]
    assert ref["psi"] == pytest.approx(expected, abs=1e-6) and ref["band"] == "significant"
    row = _section(section, '<tr data-drift="reference"', "</tr>")
    assert (f'<td class="psi">{_psi(ref["psi"])}</td><td class="js">{_psi(ref["js"])}</td>'
            f'<td><span class="pill bad" data-band="significant">significant</span></td>') in row
    assert f'{3 * len(data["turned"])} served vs {ref["expected_served"]} reference samples' in row
    row = _section(section, '<tr data-drift="fleet"', "</tr>")
    assert f'<td class="psi">{_psi(vs_fleet["psi"])}</td>' in row and "other devices" in row
    # canary: 45 of 48 with its Wilson interval, the largest error, the last run
    lo, hi = aq.wilson(45, 48)
    assert f'{_pct(45 / 48)}</span> <span class="muted interval" title="95 % Wilson interval">' \
           f'[{lo * 100:.1f}–{hi * 100:.1f} %]</span>' in section
    assert "45 of 48 agree with fp32" in section and "<dd>0.5</dd>" in section
    assert "No feedback labels in this range." in section  # cam-turned's application sends no labels
    for chart in ("psi", "canary", "accuracy"):
        assert f'data-chart="{chart}"' in section

    page = get(fleet, fleet.http_url + "/devices/cam-ok")[2].decode()
    section = _section(page, '<section class="panel" id="quality">', "</section>")
    labels, pred = data["labels"], data["out"].argmax(1)
    correct = int((pred == labels).sum())
    lo, hi = aq.wilson(3 * correct, 3 * len(labels))
    assert (f'{_pct(correct / len(labels))}</span> <span class="muted interval" title="95 % Wilson interval">'
            f'[{lo * 100:.1f}–{hi * 100:.1f} %]</span> <span class="muted">on {3 * len(labels)} labels</span>'
            ) in section
    # the confusion matrix: the profile's classes then "other" on both axes, true class in rows
    classes = [*data["profile"].outputs[0].classes, "other"]
    matrix = _section(section, '<table class="confusion"', "</table>")
    assert "<thead><tr><th class=\"corner\">true \\ predicted</th>" + "".join(
        f'<th scope="col">{c}</th>' for c in classes) in matrix
    for t in classes:
        for p in classes:
            n = 3 * int(((labels == t) & (pred == p)).sum()) if "other" not in (t, p) else 0
            assert f'data-true="{t}" data-pred="{p}">{n}</td>' in matrix, (t, p)
    assert sum(f'data-true="{t}" data-pred="{t}">' in matrix for t in classes) == len(classes)
    fb = quality.device(fleet.store, "cam-ok")["feedback"]
    for c in fb["per_class"]:
        row = _section(section, f'<tr data-class="{c["class"]}">', "</tr>")
        assert f'<td>{c["support"]}</td><td>{c["predicted"]}</td>' in row
        assert (c["precision"] is None and "<td>–" in row) or _pct(c["precision"]) in row
    macro = fb["macro"]
    assert f'{_pct(macro["precision"])} <span class="muted">/</span> {_pct(macro["recall"])}' in section
    # refused feedback by reason (3 windows: 2 and 1 each)
    refused = _section(section, '<table class="grid quality-refused">', "</table>")
    assert "<code>unknown-id</code></td><td>6</td>" in refused and "<code>late</code></td><td>3</td>" in refused
    assert "<h3>Canary</h3>" in section and "48 of 48 agree with fp32" in section


def test_device_page_escapes_what_a_profile_names(quality_site):
    fleet, _ = quality_site
    page = get(fleet, fleet.http_url + "/devices/cam-odd")[2].decode()
    section = _section(page, '<section class="panel" id="quality">', "</section>")
    assert HOSTILE not in page and "<script>alert" not in page
    escaped = "&lt;script&gt;alert(&quot;out&quot;)&lt;/script&gt;&amp;"
    # the worst output of the drift (40 / 10 against 50 / 50) and the per-feature table name it, escaped
    assert f"<td><code>{escaped}</code> · class</td>" in _section(section, '<tr data-drift="reference"', "</tr>")
    assert section.count(f"<code>{escaped}</code>") >= 3


def test_device_pages_without_quality_say_so_in_one_line(quality_site):
    fleet, _ = quality_site
    page = get(fleet, fleet.http_url + "/devices/cam-quiet")[2].decode()
    section = _section(page, '<section class="panel" id="quality">', "</section>")
    assert '<p class="muted" id="quality-none">No quality reports yet.</p>' in section
    assert "data-chart" not in section and "<table" not in section
    assert 'id="device-tail"' in page  # the rest of the page is there
    # cam-old reported 30 minutes ago: in the last hour, not in the last 15 minutes
    assert 'id="quality-none"' not in get(fleet, fleet.http_url + "/devices/cam-old")[2].decode()
    page = get(fleet, fleet.http_url + "/devices/cam-old?since=900")[2].decode()
    assert '<p class="muted" id="quality-none">No quality reports in the last 15 min.</p>' in page


def test_series_carries_the_quality_columns(quality_site):
    from fleet import quality
    from fleet.series import Series

    fleet, data = quality_site
    s = msgspec.json.decode(get(fleet, fleet.http_url + "/api/devices/cam-turned/series?since=3600")[2], type=Series)
    q, expected = s.quality, quality.series(fleet.store, "cam-turned")
    assert q.sha256 == data["sha"] and q.points == 3 and q.step is None and q.min_served == 50
    assert q.time == [p["time"] for p in expected["points"]] and q.time == sorted(q.time)
    assert q.psi == [p["psi"] for p in expected["points"]] and all(v > 0.25 for v in q.psi)
    assert q.band == ["significant"] * 3 and q.canary_agreement == [15 / 16] * 3
    assert q.accuracy == [None] * 3 and q.labels == [0] * 3 and q.served == [len(data["turned"])] * 3
    ok = msgspec.json.decode(get(fleet, fleet.http_url + "/api/devices/cam-ok/series")[2], type=Series).quality
    assert ok.accuracy == [pytest.approx(float((data["out"].argmax(1) == data["labels"]).mean()))] * 3
    b = msgspec.json.decode(get(fleet, fleet.http_url + "/api/devices/cam-turned/series?since=3600&step=3600")[2],
                            type=Series).quality
    assert b.step == 3600 and sum(b.windows) == 3 and sum(b.served) == 3 * len(data["turned"])
    quiet = msgspec.json.decode(get(fleet, fleet.http_url + "/api/devices/cam-quiet/series")[2], type=Series)
    assert quiet.quality.sha256 is None and quiet.quality.points == 0 and quiet.quality.time == []
