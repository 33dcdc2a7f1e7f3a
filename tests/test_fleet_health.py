"""Devices and groups, online/offline history, health reports and bad input: a real mosquitto, a real SQLite
file, real HTTP; devices are paho clients speaking the wire contract (test_fleet.Device)."""

from __future__ import annotations

import json

import pytest
from test_fleet import (ACTIVE, assert_one_error_line, bundle, cli_args, client, devices, fleet, http,  # noqa: F401
                        known, run_cli)
from util import wait_for

from agent import protocol
from agent.errors import EdgefleetError
from fleet import targets
from fleet.store import Store


def lat(p50: float, p95: float, p99: float) -> protocol.Latency:
    return protocol.Latency(p50=p50, p95=p95, p99=p99, max=p99, mean=p50)


def registered(client, *ids: str) -> None:
    wait_for(lambda: all(known(client, i) for i in ids), what=f"{', '.join(ids)} registered")


def transitions(client, device_id: str) -> list[tuple[bool, str]]:
    """(online, reason), oldest first."""
    return [(t["online"], t["reason"]) for t in reversed(client.health(device_id)["transitions"])]


# -- tags and targets --------------------------------------------------------------------------------------


def test_tags_and_targets(fleet, client, devices, capsys):
    for name in ("cam-1", "cam-2", "gate-1"):
        devices(name).state()
    registered(client, "cam-1", "cam-2", "gate-1")

    code, out, err = run_cli(capsys, "tag", "cam-1", "lobby", "cams", *cli_args(fleet))
    assert code == 0 and out.strip() == "cam-1: cams, lobby", err
    assert client.tag("cam-2", ["cams", "yard"])["tags"] == ["cams", "yard"]
    assert client.set_tags("gate-1", ["yard"]) == {"device_id": "gate-1", "tags": ["yard"]}
    code, out, _ = run_cli(capsys, "tag", "cam-2", "--remove", "yard", "--json", *cli_args(fleet))
    assert code == 0 and json.loads(out) == {"device_id": "cam-2", "tags": ["cams"]}
    status, _, body = http("PUT", f"{fleet.http_url}/api/devices/cam-1/tags", b'{"tags": ["lobby", "cams", "x"]}', ca=fleet)
    assert status == 200 and json.loads(body)["tags"] == ["cams", "lobby", "x"]
    status, _, body = http("POST", f"{fleet.http_url}/api/devices/cam-1/tags", b'{"remove": ["x"]}', ca=fleet)
    assert status == 200 and json.loads(body)["tags"] == ["cams", "lobby"]

    code, out, _ = run_cli(capsys, "devices", *cli_args(fleet))
    lines = out.strip().splitlines()
    assert lines[0].split()[6] == "tags"
    assert {line.split()[0]: line.split()[6] for line in lines[1:]} == \
        {"cam-1": "cams,lobby", "cam-2": "cams", "gate-1": "yard"}
    assert [d["tags"] for d in client.devices()] == [["cams", "lobby"], ["cams"], ["yard"]]

    store = fleet.store
    assert targets.resolve(store, ["gate-1"]) == ["gate-1"]
    assert targets.resolve(store, ["tag:cams"]) == ["cam-1", "cam-2"]
    assert targets.resolve(store, ["gate-1", "tag:cams", "cam-1"]) == ["gate-1", "cam-1", "cam-2"]
    assert targets.resolve(store, ["all"]) == ["cam-1", "cam-2", "gate-1"]
    assert targets.resolve(store, ["tag:yard", "all"]) == ["gate-1", "cam-1", "cam-2"]
    with pytest.raises(targets.UnknownTarget, match="unknown device 'cam-9'") as e:
        targets.resolve(store, ["cam-1", "cam-9"])
    assert e.value.status == 404
    with pytest.raises(targets.UnknownTarget, match="unknown tag 'attic'"):
        targets.resolve(store, ["tag:attic"])
    for bad in ("tag:", "tag:a/b", "cam/1", "label:x", ""):
        with pytest.raises(targets.TargetError, match="invalid") as e:
            targets.resolve(store, [bad])
        assert e.value.status == 400
    with pytest.raises(targets.TargetError, match="no target"):
        targets.resolve(store, [])
    with pytest.raises(targets.TargetError, match="a list"):
        targets.resolve(store, "all")

    # the same resolver behind GET /api/devices?target=... and `fleet devices TARGET...`
    assert [d["id"] for d in client.devices(["tag:cams"])] == ["cam-1", "cam-2"]
    code, out, _ = run_cli(capsys, "devices", "tag:yard", "cam-1", "--json", *cli_args(fleet))
    assert code == 0 and [d["id"] for d in json.loads(out)] == ["cam-1", "gate-1"]


def test_resolving_all_on_an_empty_fleet_is_an_error(store_url):
    store = Store(store_url).open()
    try:
        with pytest.raises(targets.UnknownTarget, match="none has registered"):
            targets.resolve(store, ["all"])
    finally:
        store.close()


# -- online / offline history ------------------------------------------------------------------------------


def test_transitions_birth_will_timeout_recovery_and_offline_state(fleet, client, devices):
    dev = devices("cam-1")
    dev.state()
    wait_for(lambda: (known(client, "cam-1") or {}).get("online"), what="online")
    dev.drop()  # the broker publishes its last will
    wait_for(lambda: not client.health("cam-1")["online"], what="the last will")

    dev = devices("cam-1")  # back: a new connection, a new birth
    dev.state()
    wait_for(lambda: client.health("cam-1")["online"], what="the new birth")
    dev.telemetry(1, interval_s=0.2)  # then silence: offline after 3 x 0.2 s, found by the sweep, not by asking
    wait_for(lambda: len(fleet.store.device_detail("cam-1")["transitions"]) == 4, what="the heartbeat timeout")
    dev.telemetry(2, interval_s=3600)  # reports again: online (recovered)
    wait_for(lambda: client.health("cam-1")["online"], what="recovery")
    dev.state(online=False)  # a clean stop says offline itself
    wait_for(lambda: not client.health("cam-1")["online"], what="the offline state")

    assert transitions(client, "cam-1") == [
        (True, "birth"), (False, "last will"), (True, "birth"), (False, "heartbeat timeout"), (True, "telemetry"),
        (False, "offline state")]
    report = client.health("cam-1")
    timeout = next(t for t in report["transitions"] if t["reason"] == "heartbeat timeout")
    sent_1 = next(t for t in report["transitions"] if t["reason"] == "telemetry")
    assert timeout["time"] < sent_1["time"]
    assert report["status"] == "offline" and report["status_since"] == report["transitions"][0]["time"]
    assert report["identity"]["arch"] == "x86_64", "an offline state does not erase what the device said"


def test_offline_after_is_a_controller_setting(store_url):
    store = Store(store_url, offline_after=5).open()
    try:
        t0 = 1_700_000_000.0
        store.record_telemetry(protocol.Telemetry(device_id="cam-1", boot_id="b", seq=1, time=t0, interval_s=10,
                                                  inferences=1), received=t0)
        assert store.sweep(now=t0 + 49) == 0 and store.health("cam-1", now=t0 + 49)[0]["online"]
        assert store.sweep(now=t0 + 51) == 1 and not store.health("cam-1", now=t0 + 51)[0]["online"]
        assert store.sweep(now=t0 + 99) == 0  # recorded once
        assert [(t["online"], t["reason"], t["time"]) for t in store.device_detail("cam-1")["transitions"]] == [
            (False, "heartbeat timeout", t0 + 50), (True, "telemetry", t0)]
    finally:
        store.close()
    with pytest.raises(EdgefleetError, match="offline_after"):
        Store(store_url, offline_after=0)


def test_serve_rejects_bad_settings_in_one_line(tmp_path, capsys):
    for flag, value, needle in (("--offline-after", "0", "--offline-after"), ("--offline-after", "x", "intervals"),
                                ("--raw-retention", "7 days", "--raw-retention"),
                                ("--raw-retention", "10m", "at least 1h"),
                                ("--rollup-retention", "1d", "must not be shorter"),
                                ("--max-clock-offset", "soon", "--max-clock-offset"),
                                ("--max-clock-offset", "0", "--max-clock-offset")):
        code, _, err = run_cli(capsys, "serve", "--data", str(tmp_path / "data"), flag, value)
        assert code == 2
        assert_one_error_line(err, needle)


# -- health: the fleet table and one device's report ---------------------------------------------------------


@pytest.fixture
def three(fleet, client, devices):
    """Three devices with different figures: cam-1 fast, cam-2 slow with errors, gate-1 offline and hot."""
    a, b, c = devices("cam-1"), devices("cam-2"), devices("gate-1")
    a.state(active=ACTIVE)
    a.telemetry(1, inferences=600, latency_ms=lat(1.0, 2.0, 3.0), cpu_percent=10.0, rss_bytes=50 << 20,
                memory_percent=1.0, interval_s=60)
    b.state(active=ACTIVE)
    b.telemetry(1, inferences=60, errors={"timeout": 3, "nan": 1}, latency_ms=lat(5.0, 40.0, 90.0),
                cpu_percent=80.0, rss_bytes=70 << 20, memory_percent=3.0, interval_s=60)
    c.state()
    c.telemetry(1, inferences=120, errors={"nan": 1}, latency_ms=lat(2.0, 9.0, 12.0), cpu_percent=30.0,
                rss_bytes=60 << 20, memory_percent=2.0, temperature_c=71.5, interval_s=60)
    wait_for(lambda: client.status()["received"] == 6, what="six messages")
    c.state(online=False)
    wait_for(lambda: not client.health("gate-1")["online"], what="gate-1 offline")
    client.tag("cam-1", ["cams"])
    client.tag("cam-2", ["cams"])
    client.tag("gate-1", ["yard"])
    return a, b, c


def ids(doc) -> list[str]:
    return [h["device_id"] for h in doc]


def test_health_table_sorts_and_filters_in_the_api_and_the_cli(fleet, client, three, capsys):
    h = {d["device_id"]: d for d in client.health()}
    assert h["cam-1"]["inferences_per_min"] == 600.0 and h["cam-1"]["error_rate"] == 0
    assert h["cam-2"]["inferences_per_min"] == 60.0 and h["cam-2"]["error_rate"] == pytest.approx(4 / 64)
    assert h["gate-1"]["status"] == "offline" and h["gate-1"]["tags"] == ["yard"]
    assert h["cam-1"]["recent"]["window_s"] > 0 and h["cam-2"]["recent"]["errors_by_kind"] == {"timeout": 3, "nan": 1}

    assert ids(client.health(sort="p95")) == ["cam-2", "gate-1", "cam-1"]
    assert ids(client.health(sort="p95", order="asc")) == ["cam-1", "gate-1", "cam-2"]
    assert ids(client.health(sort="errors")) == ["cam-2", "gate-1", "cam-1"]
    assert ids(client.health(sort="cpu")) == ["cam-2", "gate-1", "cam-1"]
    assert ids(client.health(sort="rate")) == ["cam-1", "gate-1", "cam-2"]
    assert ids(client.health(sort="temperature")) == ["gate-1", "cam-1", "cam-2"]  # unknown last
    assert ids(client.health(sort="status")) == ["gate-1", "cam-1", "cam-2"]  # offline first
    by_seen = client.health(sort="last-seen")  # the longest silent first
    assert [d["last_seen"] for d in by_seen] == sorted(d["last_seen"] for d in by_seen)
    assert ids(client.health(tag="cams")) == ["cam-1", "cam-2"]
    assert ids(client.health(status="offline")) == ["gate-1"]
    assert ids(client.health(tag="cams", status="online", sort="p99")) == ["cam-2", "cam-1"]
    status, _, body = http("GET", f"{fleet.http_url}/api/health?tag=cams&sort=p95&order=asc", ca=fleet)
    assert status == 200 and ids(json.loads(body)["devices"]) == ["cam-1", "cam-2"]

    code, out, err = run_cli(capsys, "health", "--sort", "p95", *cli_args(fleet))
    assert code == 0, err
    header, *rows = out.strip().splitlines()
    assert [r.split()[0] for r in rows] == ["cam-2", "gate-1", "cam-1"]
    cols = header.split()
    assert cols[:2] == ["device", "online"] and "inf/min" in cols and "err" in cols and "temp" in cols
    row = {r.split()[0]: r.split() for r in rows}
    assert row["cam-2"][7:10] == ["5.00/40.00/90.00", "60.0", "6.25"]  # p50/p95/p99, inf/min, err %
    assert "71.5" in row["gate-1"] and "unknown" in row["cam-1"]
    assert row["cam-1"][-1] == "cams" and row["gate-1"][1] == "no"
    code, out, _ = run_cli(capsys, "health", "--tag", "yard", *cli_args(fleet))
    assert code == 0 and [r.split()[0] for r in out.strip().splitlines()[1:]] == ["gate-1"]
    code, out, _ = run_cli(capsys, "health", "--status", "online", "--sort", "cpu", "--order", "asc", "--json",
                           *cli_args(fleet))
    assert code == 0 and ids(json.loads(out)) == ["cam-1", "cam-2"]
    # pages (fleet/paging.py): the CLI follows them (--json has every entry), --limit takes the first N
    code, out, _ = run_cli(capsys, "health", "--sort", "p95", "--limit", "2", "--json", *cli_args(fleet))
    assert code == 0 and ids(json.loads(out)) == ["cam-2", "gate-1"]
    code, out, _ = run_cli(capsys, "devices", "--prefix", "cam-", "--json", *cli_args(fleet))
    assert code == 0 and [d["id"] for d in json.loads(out)] == ["cam-1", "cam-2"]
    status, headers, body = http("GET", f"{fleet.http_url}/api/health?sort=p95&limit=1", ca=fleet)
    doc = json.loads(body)
    assert status == 200 and ids(doc["devices"]) == ["cam-2"] and doc["limit"] == 1 and doc["next"]
    link = dict(headers)["link"]
    assert link.startswith("</api/health?sort=p95&limit=1&cursor=") and link.endswith('>; rel="next"')
    got = ids(doc["devices"])
    while doc["next"]:  # the cursor carries the sort: each device once, in that order
        status, _, body = http("GET", f"{fleet.http_url}/api/health?sort=p95&limit=1&cursor={doc['next']}", ca=fleet)
        doc = json.loads(body)
        got += ids(doc["devices"])
    assert got == ["cam-2", "gate-1", "cam-1"]


def test_device_report(fleet, client, devices, bundle, capsys):
    dev = devices("cam-1")
    dev.state(active=ACTIVE)
    registered(client, "cam-1")
    client.tag("cam-1", ["lobby"])
    sha = client.upload_bundle(bundle)["sha256"]
    dep = client.deploy(sha, ["cam-1"])["id"]
    dev.event(1, "downloading", deployment_id=dep, sha256=sha)
    dev.event(2, "failed", deployment_id=dep, sha256=sha, reason="sha256 mismatch")
    dev.event(3, "error", reason="camera unplugged")
    dev.telemetry(4, inferences=30, errors={"timeout": 2}, latency_ms=lat(2.0, 3.0, 4.0), cpu_percent=12.5,
                  rss_bytes=64 << 20, memory_percent=3.25, interval_s=30)
    dev.telemetry(5, inferences=30, errors={"timeout": 1, "nan": 5}, latency_ms=lat(2.5, 3.5, 4.5), interval_s=30)
    wait_for(lambda: client.status()["received"] == 6, what="six messages")

    r = client.health("cam-1")
    assert r["identity"] == {"arch": "x86_64", "agent_version": "0.1.0", "runtimes": ["onnxruntime"],
                             "cpu_flags": ["avx2"], "boot_id": "boot-1", "first_seen": r["identity"]["first_seen"],
                             "devices": {}}  # its state names no runtime's devices
    assert r["tags"] == ["lobby"] and r["model"]["name"] == "digits" and r["status"] == "online"
    assert (r["inferences"], r["errors"]) == (60, 8)
    assert r["inferences_per_min"] == 60.0 and r["error_rate"] == pytest.approx(8 / 68)
    assert r["latency_ms"] == {"p50": 2.5, "p95": 3.5, "p99": 4.5}
    assert {k: v["count"] for k, v in r["errors_by_kind"].items()} == {"timeout": 3, "nan": 5}
    assert [(e["kind"], e["reason"]) for e in r["recent_errors"]] == [("error", "camera unplugged"),
                                                                       ("failed", "sha256 mismatch")]
    assert [e["kind"] for e in r["events"]] == ["error", "failed", "downloading"]
    [d] = r["deployments"]
    assert (d["deployment_id"], d["phase"], d["reason"], d["name"], d["version"]) == \
        (dep, "failed", "sha256 mismatch", "tiny", "1.0.0")
    assert [(t["online"], t["reason"]) for t in r["transitions"]] == [(True, "birth")]
    for field in ("online", "model", "inferences", "errors", "latency_ms", "cpu_percent", "rss_bytes",
                  "memory_percent", "temperature_c", "last_seen", "last_seen_ago_s", "deployment", "seq_gaps",
                  "duplicates", "outbox_dropped", "outbox_pending", "events", "deployments"):
        assert field in r, field

    code, out, err = run_cli(capsys, "health", "cam-1", *cli_args(fleet))
    assert code == 0, err
    for needle in ("cam-1: online", "tags lobby", "arch x86_64, agent 0.1.0, runtimes onnxruntime", "avx2",
                   "digits 1.2.0 (int8, onnxruntime", "60.0/min", "2.50/3.50/4.50", "temperature unknown",
                   "nan 5", "timeout 3", "failed", "sha256 mismatch", "camera unplugged", dep, "tiny 1.0.0",
                   "online   birth"):
        assert needle in out, (needle, out)
    code, out, _ = run_cli(capsys, "health", "cam-1", "--json", *cli_args(fleet))
    doc = json.loads(out)
    again = client.health("cam-1")
    for d in (doc, again):
        d.pop("last_seen_ago_s")
        d["quality_report"].pop("since"), d["quality_report"].pop("until")  # the last 10 minutes as of each call
    assert code == 0 and doc == again, "--json prints the API's JSON"


# -- bad input: 4xx with a message from the API, one line and exit 2 from the CLI ------------------------------


def test_bad_input_to_the_api_and_the_cli(fleet, client, devices, tmp_path, capsys):
    devices("cam-1").state()
    registered(client, "cam-1")
    client.tag("cam-1", ["lobby"])
    url = fleet.http_url

    def api(method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, str]:
        status, _, raw = http(method, url + path, body, headers, ca=fleet)
        return status, json.loads(raw)["error"]

    def cli(*argv: str, needle: str) -> None:
        code, _, err = run_cli(capsys, *argv, *cli_args(fleet))
        assert code == 2, (argv, err)
        assert_one_error_line(err, needle)

    # unknown device
    assert api("GET", "/api/health/nobody") == (404, "unknown device 'nobody'")
    assert api("POST", "/api/devices/nobody/tags", b'{"add": ["x"]}') == (404, "unknown device 'nobody'")
    cli("health", "nobody", needle="unknown device 'nobody'")
    cli("tag", "nobody", "x", needle="unknown device 'nobody'")
    status, msg = api("GET", "/api/devices?target=nobody")
    assert status == 404 and "unknown device 'nobody'" in msg
    cli("devices", "cam-1", "nobody", needle="unknown device 'nobody'")

    # malformed targets and tags; an unknown tag
    for target in ("tag:", "tag:a/b", "bad/id", "label:x"):
        status, msg = api("GET", f"/api/devices?target={target}")
        assert status == 400 and "invalid" in msg, (target, msg)
    cli("devices", "tag:", needle="invalid tag ''")
    cli("devices", "a:b", needle="invalid target 'a:b'")
    status, msg = api("GET", "/api/devices?target=tag:attic")
    assert status == 404 and "unknown tag 'attic'" in msg
    status, msg = api("PUT", "/api/devices/cam-1/tags", b'{"tags": ["ok", "not ok"]}')
    assert status == 400 and "tags[1] must be a tag" in msg
    cli("tag", "cam-1", "a/b", needle="add[0] must be a tag")
    cli("tag", "cam-1", needle="name tags to add")
    for body in (b"not json", b'{"tags": "lobby"}', b'{"tag": ["x"]}'):
        status, msg = api("PUT", "/api/devices/cam-1/tags", body)
        assert status == 400 and "invalid tags request" in msg, (body, msg)
    assert api("POST", "/api/devices/cam-1/tags", b"{}") == (400, "nothing to change: give tags to add and/or remove")
    assert client.health("cam-1")["tags"] == ["lobby"], "a rejected request changes nothing"

    # filters, sort keys and limits out of range
    status, msg = api("GET", "/api/health?status=maybe")
    assert status == 400 and "invalid status 'maybe'" in msg
    status, msg = api("GET", "/api/health?sort=colour")
    assert status == 400 and "cannot sort by 'colour'" in msg
    cli("health", "--sort", "colour", needle="cannot sort by 'colour'")
    status, msg = api("GET", "/api/health?order=sideways")
    assert status == 400 and "invalid order" in msg
    status, msg = api("GET", "/api/health?tag=attic")
    assert status == 404 and "unknown tag 'attic'" in msg
    cli("health", "--tag", "attic", needle="unknown tag 'attic'")
    status, msg = api("GET", "/api/health?tag=a/b")
    assert status == 400 and "invalid tag" in msg
    status, msg = api("GET", "/api/health?stauts=online")
    assert status == 400 and "unknown query parameter 'stauts'" in msg
    for query, needle in (("limit=0", "limit='0' is out of range: a whole number from 1 to 1000"),
                          ("cursor=bm90IGEgY3Vyc29y", "invalid cursor: pass back the `next` of the previous page"),
                          ("prefix=Cam", "invalid prefix 'Cam'"), ("limit=5&limit=6", "limit is given more than once")):
        for endpoint in ("/api/health", "/api/devices"):
            assert api("GET", f"{endpoint}?{query}") == (400, api("GET", f"/api/health?{query}")[1])
            assert needle in api("GET", f"{endpoint}?{query}")[1], (endpoint, query)
    with pytest.raises(SystemExit) as exited:  # argparse's usage error: exit 2, the option named
        run_cli(capsys, "health", "--limit", "0", *cli_args(fleet))
    assert exited.value.code == 2 and "--limit: '0' is not a whole number of at least 1" in capsys.readouterr().err
    for limit in ("0", "1001", "-1", "ten"):
        status, msg = api("GET", f"/api/health/cam-1?events={limit}")
        assert status == 400 and "out of range" in msg, (limit, msg)
    cli("health", "cam-1", "--sort", "p95", needle="without a DEVICE_ID")

    # a bundle that is not a bundle
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    status, msg = api("POST", "/api/bundles", junk.read_bytes(), {"Content-Type": "application/x-tar"})
    assert status == 400 and "not a bundle" in msg
    cli("deploy", str(junk), "--to", "cam-1", needle="not a bundle")
