"""Rollouts end to end: a real controller and mosquitto, real agents in-process, real bundles and models.

No timing thresholds: soaks are short (1-2 s) and waits are bounded generously; a wave that must not pass
before traffic uses ``min_inferences``, so the test, not the clock, decides when it can."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import msgspec
import pytest
from util import admin_token, agent_config, bearer, cli_args, fleet_client, ssl_context, wait_for, release_pub

from agent import protocol
from agent.api import AgentClient
from agent.daemon import Agent
from agent.errors import EdgefleetError
from edgefleet.cli import main as edgefleet_main
from fleet.schemas import Rollout as RolloutView
from fleet.schemas import RolloutSummary
from fleet.app import Fleet

TIMEOUT = 120.0
DEVICES = ["dev-1", "dev-2", "dev-3", "dev-4"]


@pytest.fixture
def fleet(tmp_path, monkeypatch, store_url):
    f = Fleet(tmp_path / "fleet", release_keys=[release_pub()], store_url=store_url,
              http_port=0, mqtt_listen="127.0.0.1:0").start_background()
    monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(f))  # for the CLI
    yield f
    f.stop()


def start_agents(tmp_path, fleet, ids=DEVICES) -> list[Agent]:
    agents = []
    for device_id in ids:
        a = Agent(agent_config(fleet, tmp_path / device_id, device_id, api="127.0.0.1:0", telemetry_interval_s=0.3))
        a.start()
        agents.append(a)
    client = fleet_client(fleet)
    wait_for(lambda: {d["id"] for d in client.devices()} >= set(ids), what="the agents to register")
    return agents


@pytest.fixture
def agents(tmp_path, fleet):
    made = start_agents(tmp_path, fleet)
    yield made
    for a in made:
        a.stop()


def finished(client, rollout_id, status=None):
    doc = client.rollout(rollout_id)
    if doc["status"] in ("running", "paused"):
        return None
    if status is not None:
        assert doc["status"] == status, json.dumps(doc, indent=2)
    return doc


def on_v1(client, agents, bundles) -> str:
    """Every agent on v1, through a plain one-wave rollout to all (no soak by default)."""
    v1 = client.upload_bundle(bundles["v1"])["sha256"]
    ro = client.create_rollout(v1, ["all"])
    assert ro["wave_count"] == 1 and ro["options"]["soak_s"] == 0
    wait_for(lambda: finished(client, ro["id"], "completed"), TIMEOUT, what="v1 on every agent")
    assert all(a.engine.current.sha == v1 for a in agents)
    return v1


def devices_of(doc) -> dict[str, dict]:
    return {d["device_id"]: d | {"wave": w["wave"]} for w in doc["waves"] for d in w["devices"]}


def events(client, device, rollout_id):
    return [e for e in client.health(device)["events"] if (e["deployment_id"] or "").startswith(rollout_id)]


def run_cli(capsys, *argv):
    code = edgefleet_main(["fleet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- (a) a good model rolls out in waves ------------------------------------------------------------------------


def test_a_good_model_rolls_out_in_waves_to_every_device(fleet, agents, bundles, capsys):
    client = fleet_client(fleet)
    on_v1(client, agents, bundles)
    code, out, err = run_cli(capsys, "deploy", str(bundles["v2"]), "--to", "all", "--waves", "1,50%,100%",
                             "--soak", "2s", "--max-error-rate", "1%", "--max-p95-regression", "500%",
                             *cli_args(fleet))
    assert code == 0, err
    assert "in 3 wave(s) of 1, 1, 2" in out and "wave 1 published to dev-1" in out
    rollout_id = out.split()[1].rstrip(":")
    v2 = client.upload_bundle(bundles["v2"])["sha256"]

    doc = wait_for(lambda: finished(client, rollout_id, "completed"), TIMEOUT, what="the rollout to complete")
    assert all(a.engine.current.sha == v2 for a in agents)
    assert [w["devices"] and [d["device_id"] for d in w["devices"]] for w in doc["waves"]] == \
        [["dev-1"], ["dev-2"], ["dev-3", "dev-4"]]
    assert [w["status"] for w in doc["waves"]] == ["passed"] * 3
    for earlier, later in zip(doc["waves"], doc["waves"][1:]):
        # a wave started only once every device of the one before was active and had soaked
        assert all(later["started"] >= d["active_since"] + 2 for d in earlier["devices"])
        for d in later["devices"]:  # and its devices heard nothing of this rollout before that
            assert all(e["time"] >= later["started"] - 1 for e in events(client, d["device_id"], rollout_id))
    for d in devices_of(doc).values():
        assert d["phase"] == "active" and d["soaked"] and d["previous"] != v2 and d["rollback"] is None
    # the answers are what the OpenAPI document says, field for field
    msgspec.convert(doc, RolloutView)
    msgspec.convert(client.rollouts(), list[RolloutSummary])

    code, out, _ = run_cli(capsys, "rollouts", *cli_args(fleet))
    assert code == 0 and rollout_id in out and "completed" in out and "4/4 active" in out
    code, out, _ = run_cli(capsys, "rollout", rollout_id, *cli_args(fleet))
    assert code == 0 and "completed" in out and "max error rate 1.00%" in out
    assert sum(line.split()[1:2] == ["passed"] for line in out.splitlines()) == 3
    code, out, _ = run_cli(capsys, "rollout", rollout_id, "--json", *cli_args(fleet))
    assert code == 0 and json.loads(out)["id"] == rollout_id


# -- (b) a bad model halts at the first wave and goes back ----------------------------------------------------


def assert_untouched(client, agents, doc, v1):
    """Only wave 1 heard of the rollout; every other device still runs v1."""
    first = {d["device_id"] for d in doc["waves"][0]["devices"]}
    for a in agents:
        device = a.config.device_id
        if device in first:
            continue
        assert devices_of(doc)[device]["phase"] == "waiting"
        assert a.engine.current.sha == v1
        assert events(client, device, doc["id"]) == []
    assert all(w["started"] is None for w in doc["waves"][1:])


def test_a_model_that_fails_its_smoke_test_halts_the_first_wave(fleet, agents, bundles, capsys):
    client = fleet_client(fleet)
    v1 = on_v1(client, agents, bundles)
    slow = client.upload_bundle(bundles["slow"])["sha256"]
    ro = client.create_rollout(slow, ["all"], waves="1,100%", soak="2s")
    doc = wait_for(lambda: finished(client, ro["id"], "halted"), TIMEOUT, what="the rollout to halt")
    assert doc["reason"].startswith("wave 1: dev-1 reported failed") and "latency budget" in doc["reason"]
    assert [w["status"] for w in doc["waves"]] == ["failed", "waiting"]
    dev1 = devices_of(doc)["dev-1"]
    assert dev1["phase"] == "failed" and dev1["rollback"]["sha256"] == v1
    # its desired model is v1 again (it never left v1: the agent kept it); the agent says so for the rollback
    doc = wait_for(lambda: (d := client.rollout(ro["id"])) and devices_of(d)["dev-1"]["rollback"]["phase"] == "active"
                   and d, TIMEOUT, what="dev-1 to confirm v1")
    assert agents[0].engine.current.sha == v1
    assert_untouched(client, agents, doc, v1)
    msgspec.convert(doc, RolloutView)

    code, out, _ = run_cli(capsys, "rollout", ro["id"], *cli_args(fleet))
    assert code == 0 and "halted" in out and f"sent back to 1 ({v1[:12]}): active" in out


def test_a_model_slower_than_the_threshold_on_real_traffic_is_halted_and_rolled_back(fleet, agents, bundles, crops):
    client = fleet_client(fleet)
    v1 = on_v1(client, agents, bundles)
    v2 = client.upload_bundle(bundles["v2"])["sha256"]
    # dev-1 cannot pass its soak before it has served 5 inferences: the traffic below decides, not the clock
    ro = client.create_rollout(v2, ["all"], waves="1,100%", soak="1s", max_p95_ms=0.0001, min_inferences=5)
    assert [d["device_id"] for d in ro["waves"][0]["devices"]] == ["dev-1"]
    canary = agents[0]
    wait_for(lambda: canary.engine.current.sha == v2, TIMEOUT, what="v2 on the canary")
    api = AgentClient(canary.api.address)
    x, _ = crops
    for i in range(10):
        api.infer({"x": x[i : i + 1]})
    doc = wait_for(lambda: finished(client, ro["id"], "halted"), TIMEOUT, what="the rollout to halt")
    assert doc["reason"].startswith("wave 1: dev-1 p95 latency") and "> 0.0001 ms" in doc["reason"]
    dev1 = devices_of(doc)["dev-1"]
    assert dev1["inferences"] >= 5 and dev1["p95_ms"] > 0.0001 and dev1["rollback"]["sha256"] == v1
    wait_for(lambda: canary.engine.current.sha == v1, TIMEOUT, what="the canary back on v1")
    assert api.infer({"x": x[:1]})  # and serving
    assert_untouched(client, agents, doc, v1)


# -- (c) a controller restart mid-rollout ------------------------------------------------------------------------


def test_a_rollout_continues_after_the_controller_restarts(tmp_path, mosquitto, free_port, bundles, crops, store_url):
    data = tmp_path / "fleet"

    def controller() -> Fleet:
        return Fleet(data, release_keys=[release_pub()], broker_url=mosquitto.url, http_port=free_port,
                     store_url=store_url,
                     pki_dir=mosquitto.pki.root).start_background()

    fleet = controller()
    agents = start_agents(tmp_path, fleet, ["dev-1", "dev-2", "dev-3"])
    try:
        client = fleet_client(fleet)
        v1 = on_v1(client, agents, bundles)
        v2 = client.upload_bundle(bundles["v2"])["sha256"]
        for device in ("dev-1", "dev-2"):
            client.tag(device, ["lobby"])
        ro = client.create_rollout(v2, ["tag:lobby"], waves="1,100%", soak="1s", min_inferences=3,
                                   max_error_rate="10%")
        assert [[d["device_id"] for d in w["devices"]] for w in ro["waves"]] == [["dev-1"], ["dev-2"]]
        # wave 1 is active on dev-1 but cannot pass: it has served nothing yet
        wait_for(lambda: devices_of(client.rollout(ro["id"]))["dev-1"]["phase"] == "active", TIMEOUT,
                 what="dev-1 active on v2")
        before = client.rollout(ro["id"])
        fleet.stop()
        restarted = time.time()
        fleet = controller()

        after = client.rollout(ro["id"])
        assert after["status"] == "running" and after["waves"][0]["started"] == before["waves"][0]["started"]
        assert after["waves"][1]["started"] is None

        def serve_and_check():
            for a in agents:
                if a.engine.current and a.engine.current.sha == v2:
                    AgentClient(a.api.address).infer({"x": crops[0][:1]})
            return finished(client, ro["id"], "completed")

        doc = wait_for(serve_and_check, TIMEOUT, every=0.2, what="the rollout to complete after the restart")
        assert [a.engine.current.sha for a in agents] == [v2, v2, v1]  # dev-3 has no lobby tag
        assert events(client, "dev-3", ro["id"]) == []
        assert doc["waves"][1]["started"] > restarted  # published by the new controller
        assert client.deployment(f"{ro['id']}-w2")["created"] > restarted
        assert all(d["previous"] == v1 for d in devices_of(doc).values())
    finally:
        for a in agents:
            a.stop()
        fleet.stop()


# -- bad input ---------------------------------------------------------------------------------------------------


def post(fleet, url, body: bytes):
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **bearer(fleet)})
    try:
        with urllib.request.urlopen(req, timeout=30, context=ssl_context(fleet)) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def register(fleet, device_id):
    """A device known to the controller (as its first birth message would make it)."""
    fleet.store.record_state(protocol.State(device_id=device_id, online=True, time=time.time()), time.time())


def test_bad_rollout_requests_are_4xx_and_one_cli_line(fleet, bundles, tmp_path, capsys):
    client = fleet_client(fleet)
    register(fleet, "cam-1")
    register(fleet, "cam-2")
    sha = client.upload_bundle(bundles["v1"])["sha256"]
    url = f"{fleet.http_url}/api/rollouts"

    def req(**kw):
        return json.dumps({"bundle": sha, "targets": ["cam-1"]} | kw).encode()

    for body, status, needle in [
        (req(targets=["nobody"]), 404, "unknown device 'nobody'"),
        (req(targets=["tag:lobby"]), 404, "unknown tag 'lobby'"),
        (req(targets=["bad/id"]), 400, "targets[0] must be a target"),
        (req(targets=[]), 400, "targets: Expected `array` of length >= 1"),
        (req(bundle="0" * 64), 404, "unknown bundle"),
        (req(waves="1,50%"), 400, "must end at 100%"),
        (req(waves="50%,10%,100%"), 400, "must increase"),
        (req(targets=["cam-1", "cam-2"], waves="5,100%"), 400, "asks for 5 devices"),
        (req(max_error_rate="150%"), 400, "max_error_rate must be a rate in [0%, 100%)"),
        (req(max_error_rate=1.5), 400, "max_error_rate: Expected `float` < 1.0"),
        (req(max_p95_ms=-1), 400, "max_p95_ms: Expected `float` > 0.0"),
        (req(max_p95_regression="0%"), 400, "max_p95_regression must be a regression"),
        (req(soak="forever"), 400, "soak must be a duration"),
        (req(waves=["0"]), 400, "waves[0] must be a wave"),
        (req(soak="1h", wave_timeout="30m"), 400, "must be longer than the soak"),
        (req(max_drift_psi=0), 400, "max_drift_psi: Expected `float` > 0.0"),
        (req(min_canary_agreement=1.5), 400, "min_canary_agreement: Expected `float` <= 1.0"),
        (req(max_accuracy_drop="100%"), 400, "max_accuracy_drop must be a rate in [0%, 100%)"),
        (req(min_labels=0), 400, "min_labels: Expected `int` >= 1"),
        (req(colour="red"), 400, "invalid rollout request"),
        (b"not json", 400, "invalid rollout request"),
    ]:
        code, doc = post(fleet, url, body)
        assert code == status and needle in doc["error"], (body, code, doc)

    code, doc = post(fleet, f"{url}/ro-nope/pause", b"")
    assert code == 404 and "unknown rollout" in doc["error"]
    live = client.create_rollout(sha, ["cam-1"])  # cam-1 never answers: the rollout stays running
    code, doc = post(fleet, url, req(targets=["all"]))
    assert code == 409 and "cam-1 is in rollout" in doc["error"]
    code, doc = post(fleet, f"{url}/{live['id']}/explode", b"")
    assert code == 400 and "unknown action" in doc["error"]
    code, doc = post(fleet, f"{url}/{live['id']}/resume", b"")
    assert code == 409 and "only a paused rollout" in doc["error"]
    assert client.rollout_action(live["id"], "abort")["status"] == "aborted"
    assert client.create_rollout(sha, ["cam-1"])["status"] == "running"  # free again

    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    for argv, needle in [
        (["deploy", str(junk), "--to", "all", "--waves", "1,100%"], "not a bundle"),
        (["deploy", str(bundles["v1"]), "--to", "all", "--waves", "1,50%"], "must end at 100%"),
        (["deploy", str(bundles["v1"]), "--to", "cam-1", "--max-error-rate", "2"], "max error rate"),
        (["deploy", str(bundles["v1"]), "--to", "tag:nope"], "unknown tag 'nope'"),
        (["deploy", str(bundles["v1"]), "--to", "all", "--max-p95-ms", "fast"], "--max-p95-ms"),
        (["deploy", str(bundles["v1"]), "--to", "all", "--max-drift-psi", "lots"], "--max-drift-psi 'lots'"),
        (["deploy", str(bundles["v1"]), "--to", "all", "--min-canary-agreement", "200%"],
         "--min-canary-agreement '200%'"),
        (["deploy", str(bundles["v1"]), "--to", "all", "--max-accuracy-drop", "x"], "max accuracy drop 'x'"),
        (["deploy", str(bundles["v1"]), "--to", "all", "--min-labels", "0"], "--min-labels '0'"),
        (["rollout", "ro-nope"], "unknown rollout 'ro-nope'"),
        (["rollout", live["id"], "resume"], "aborted"),
    ]:
        code, out, err = run_cli(capsys, *argv, *cli_args(fleet))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("edgefleet fleet: error: "), (argv, err)
        assert needle in lines[0], (argv, err)


def test_client_errors_are_edgefleet_errors(fleet):
    with pytest.raises(EdgefleetError, match="unknown rollout"):
        fleet_client(fleet).rollout("ro-missing")
