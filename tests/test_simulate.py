"""`edgefleet fleet simulate` against a real controller (its embedded mosquitto, mutual TLS, HTTPS enrollment):
simulated devices enroll through the enrollment API, report without seq gaps, take a rollout or fail it the way
a bad update fails, reuse their identities on a rerun, and bad arguments are one line. No timing thresholds:
waits are bounded, never asserted."""

from __future__ import annotations

import json
import sqlite3

import pytest
from util import SimRun, admin_token, assert_refused_in_one_line, cli_args, fleet_client, release_pub, wait_for

from edgefleet.cli import main as edgefleet_main
from fleet.app import Fleet
from fleet.simulate import Provisioning, device_ids

TIMEOUT = 120.0


def start_fleet(tmp_path) -> Fleet:
    return Fleet(tmp_path / "fleet", release_keys=[release_pub()], http_port=0,
                 mqtt_listen="127.0.0.1:0").start_background()


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    f = start_fleet(tmp_path)
    monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(f))
    yield f
    f.stop()


def Running(fleet, state, count: int, **settings) -> SimRun:
    """A Simulator in a thread, enrolling with a provisioning token from ``fleet``."""
    def provisioning(missing: int) -> Provisioning:
        tok = fleet.enrollment.create_token(count=missing, prefix="sim-")
        return Provisioning(fleet.http_url, tok["token"], tok["ca_fingerprint"])

    return SimRun(state, count, provisioning, TIMEOUT, **settings)


def stored(fleet, what: str, prefix: str = "sim-") -> int:
    """Rows the controller stored for the simulated devices (its SQLite file, read only)."""
    db = sqlite3.connect(f"file:{fleet.data_dir / 'fleet.db'}?mode=ro", uri=True)
    try:
        return db.execute(f"SELECT count(*) FROM {what} WHERE device_id LIKE ?", (prefix + "%",)).fetchone()[0]
    finally:
        db.close()


def windows_by_device(fleet) -> dict[str, int]:
    db = sqlite3.connect(f"file:{fleet.data_dir / 'fleet.db'}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT device_id, count(*) FROM telemetry GROUP BY device_id").fetchall())
    finally:
        db.close()


def sim_health(client) -> dict[str, dict]:
    return {h["device_id"]: h for h in client.health() if h["device_id"].startswith("sim-")}


def test_fifty_devices_enroll_report_and_the_controller_counts_no_gaps(fleet, tmp_path):
    client = fleet_client(fleet)
    run = Running(fleet, tmp_path / "sim", 50, interval=0.5)
    wait_for(lambda: len(w := windows_by_device(fleet)) == 50 and min(w.values()) >= 3, TIMEOUT,
             what="3 windows from each of 50 devices stored")
    wait_for(lambda: len(sim_health(client)) == 50 and all(h["online"] for h in sim_health(client).values()),
             TIMEOUT, what="50 devices online in the registry")
    s = run.stop()
    assert (s["enrolled"], s["reused"], s["enroll_failed"], s["connect_failures"]) == (50, 0, 0, 0)
    assert s["connected_peak"] == 50 and s["unacknowledged"] == 0 and s["errors"] == {}
    # the controller acknowledged what it stored, end to end; the lag from send to ack is measured
    assert 0 < s["acked"] <= s["telemetry"] + s["events"]
    assert 0 < s["ack_lag_ms"]["p50"] <= s["ack_lag_ms"]["p99"] <= s["ack_lag_ms"]["max"]
    # every window the devices sent is stored, once, and the controller's seq accounting shows no gap
    wait_for(lambda: stored(fleet, "telemetry") == s["telemetry"], TIMEOUT, what="every window stored")
    health = wait_for(lambda: (h := sim_health(client)) and not any(d["online"] for d in h.values()) and h,
                      TIMEOUT, what="the devices' offline states")
    assert sorted(health) == device_ids("sim-", 50)
    assert {(h["seq_gaps"], h["duplicates"]) for h in health.values()} == {(0, 0)}
    assert sorted(windows_by_device(fleet)) == device_ids("sim-", 50)
    # each enrolled through the enrollment API with one provisioning token: one certificate a device
    certs = [c for c in client.certificates() if c["device_id"].startswith("sim-")]
    assert sorted(c["device_id"] for c in certs) == device_ids("sim-", 50)
    assert [(t["kind"], t["used"], t["prefix"]) for t in client.enrollments()] == [("provision", 50, "sim-")]


def finished(client, rollout_id, status):
    doc = client.rollout(rollout_id)
    if doc["status"] in ("running", "paused"):
        return None
    assert doc["status"] == status, json.dumps(doc, indent=2)
    return doc


def phases(doc) -> dict[str, str]:
    return {d["device_id"]: d["phase"] for w in doc["waves"] for d in w["devices"]}


def test_a_rollout_to_simulated_devices_completes_and_a_failing_one_halts(fleet, tmp_path, bundles):
    client = fleet_client(fleet)
    ids = device_ids("sim-", 20)
    run = Running(fleet, tmp_path / "sim", 20, interval=0.5, rate_errors=0.0, update_s=0.2, download=True)
    wait_for(lambda: len(sim_health(client)) == 20, TIMEOUT, what="20 devices in the registry")
    v1 = client.upload_bundle(bundles["v1"])["sha256"]
    ro = client.create_rollout(v1, ["all"], waves="1,50%,100%", soak="1s")
    doc = wait_for(lambda: finished(client, ro["id"], "completed"), TIMEOUT, what="v1 on every simulated device")
    assert [w["status"] for w in doc["waves"]] == ["passed"] * 3
    assert phases(doc) == {i: "active" for i in ids}
    first = run.stop()
    assert first["updates"] == {"active": 20, "failed": 0, "rolled_back": 0} and first["refused"] == 0
    assert first["downloaded_bytes"] == 20 * bundles["v1"].stat().st_size  # each fetched it (its certificate, TLS)

    # the same devices again (their identities reused), now failing every update: the first wave halts
    run = Running(fleet, tmp_path / "sim", 20, interval=0.5, rate_errors=1.0, update_s=0.2)
    wait_for(lambda: run.sim.counts.connected == 20, TIMEOUT, what="the devices back")
    v2 = client.upload_bundle(bundles["v2"])["sha256"]
    ro = client.create_rollout(v2, ["all"], waves="1,100%", soak="1s")
    doc = wait_for(lambda: finished(client, ro["id"], "halted"), TIMEOUT, what="the rollout to halt")
    assert doc["reason"].startswith("wave 1: sim-00001 reported failed") and "simulated failure" in doc["reason"]
    assert [w["status"] for w in doc["waves"]] == ["failed", "waiting"]
    canary = doc["waves"][0]["devices"][0]
    assert canary["device_id"] == "sim-00001" and canary["rollback"]["sha256"] == v1
    # sent back to v1, which it still runs (a failed update leaves the old model): it says so, as an agent does
    wait_for(lambda: client.rollout(ro["id"])["waves"][0]["devices"][0]["rollback"]["phase"] == "active", TIMEOUT,
             what="sim-00001 to confirm v1")
    assert all(p == "waiting" for d, p in phases(client.rollout(ro["id"])).items() if d != "sim-00001")
    second = run.stop()
    assert (second["reused"], second["enrolled"]) == (20, 0)
    assert second["updates"]["failed"] == 1 and second["updates"]["active"] == 0 and second["refused"] == 0
    assert all(h["seq_gaps"] == 0 for h in sim_health(client).values())


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = edgefleet_main(["fleet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_rerun_reuses_the_identities_and_an_unreachable_controller_is_one_line(tmp_path, monkeypatch, capsys):
    fleet = start_fleet(tmp_path)
    state = str(tmp_path / "sim")
    try:
        monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(fleet))
        argv = ["simulate", "--devices", "10", "--interval", "0.5", "--duration", "2", "--state", state, "--json",
                *cli_args(fleet)]
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, err
        assert (json.loads(out)["enrolled"], json.loads(out)["reused"]) == (10, 0)
        assert "10/10 enrolled" in err  # the progress, on stderr
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, err
        again = json.loads(out)
        assert (again["enrolled"], again["reused"], again["connect_failures"]) == (0, 10, 0)
        client = fleet_client(fleet)
        assert len(client.certificates()) == 10 and len(client.enrollments()) == 1  # nobody enrolled twice
        # the seq counters went on from where the first run left them (STATE/devices.json): every message of both
        # runs stored once, and no gap at the controller
        saved = json.loads((tmp_path / "sim" / "devices.json").read_text())
        assert sorted(saved) == device_ids("sim-", 10)
        sent = sum(d["seq"] for d in saved.values())
        wait_for(lambda: stored(fleet, "telemetry") + stored(fleet, "events") == sent, TIMEOUT,
                 what="both runs stored")
        assert all(h["seq_gaps"] == 0 for h in sim_health(client).values())
    finally:
        fleet.stop()
    code = edgefleet_main(["fleet", *argv])  # the controller (and its broker) is gone
    assert_refused_in_one_line(code, capsys.readouterr(), "cannot reach broker", prog="edgefleet fleet")


@pytest.mark.parametrize("args, needle", [
    ([], "give --devices N"),
    (["--devices", "0"], "--devices '0': expected 1 to 100000"),
    (["--devices", "ten"], "--devices 'ten': expected a whole number"),
    (["--devices", "5", "--rate-errors", "1.5"], "--rate-errors '1.5'"),
    (["--devices", "5", "--interval", "-1"], "--interval"),
    (["--devices", "5", "--interval", "soon"], "--interval"),
    (["--devices", "5", "--connect-rate", "0"], "--connect-rate"),
    (["--devices", "5", "--duration", "x"], "--duration"),
    (["--devices", "5", "--prefix", "Sim!"], "--prefix 'Sim!'"),
    (["--devices", "5", "--provision-token", "efe_x"], "--provision-token and --ca-fingerprint go together"),
    (["--devices", "5", "--provision-token", "efe_x", "--ca-fingerprint", "abc"], "invalid CA fingerprint"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, needle, tmp_path, capsys):
    code = edgefleet_main(["fleet", "simulate", *args, "--state", str(tmp_path / "sim")])
    assert_refused_in_one_line(code, capsys.readouterr(), needle, prog="edgefleet fleet")
    assert not (tmp_path / "sim").exists()


def test_an_unreachable_controller_is_one_line_and_exit_2(tmp_path, capsys, free_port):
    code = edgefleet_main(["fleet", "simulate", "--devices", "3", "--state", str(tmp_path / "sim"),
                           "--server", f"https://127.0.0.1:{free_port}", "--token", "efa_nothing"])
    assert_refused_in_one_line(code, capsys.readouterr(), "127.0.0.1", prog="edgefleet fleet")


def test_a_desired_not_signed_by_the_controller_is_refused_as_an_agent_refuses_it(fleet, tmp_path):
    """The simulated device checks a desired as the agent does (agent.updater.check_signed): one signed by another
    key, or for another device, is answered with a `failed` event that says why, and nothing is installed."""
    import time

    import msgspec
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent import protocol, signing

    client = fleet_client(fleet)
    run = Running(fleet, tmp_path / "sim", 2, interval=0.5, rate_errors=0.0, update_s=0.1)
    wait_for(lambda: run.sim.counts.connected == 2, TIMEOUT, what="2 devices connected")
    base = protocol.Desired(deployment_id="dep-forged", name="m", version="9", url="https://example.com/b.tar",
                            sha256="ab" * 32, size=10, device_id="sim-00001", expires=time.time() + 600,
                            counter=10_000, time=time.time())
    forged = signing.sign_message(Ed25519PrivateKey.generate(), base)
    elsewhere = signing.sign_message(fleet.signer.key, msgspec.structs.replace(base, device_id="sim-00002",
                                                                               deployment_id="dep-other"))
    for msg in (forged, elsewhere):  # through the controller's own connection: the only one that may write them
        fleet.link._publish("sim-00001", protocol.DESIRED, msg, retain=False, what="a forged desired")
    reasons = wait_for(lambda: len(r := [e["reason"] for e in client.health("sim-00001")["events"]
                                         if e["kind"] == "failed"]) == 2 and r, TIMEOUT, what="two refusals")
    assert any(r.startswith("refused: desired is signed by key") for r in reasons), reasons
    assert any(r.startswith("refused: desired is for device sim-00002") for r in reasons), reasons
    s = run.stop()
    assert s["refused"] == 2 and s["updates"] == {"active": 0, "failed": 0, "rolled_back": 0}



def test_devices_enroll_with_a_provisioning_token_given_without_an_admin_token(fleet, tmp_path, monkeypatch, capsys):
    """What a user without admin rights runs: `fleet provision` made the token; the simulator needs no API token."""
    monkeypatch.delenv("EDGEFLEET_TOKEN")
    tok = fleet.enrollment.create_token(count=3, prefix="sim-")
    code, out, err = run_cli(capsys, "simulate", "--devices", "3", "--interval", "0.5", "--duration", "1",
                             "--state", str(tmp_path / "sim"), "--provision-token", tok["token"],
                             "--ca-fingerprint", tok["ca_fingerprint"], "--server", fleet.http_url,
                             "--ca", str(fleet.pki.ca_crt), "--json")
    assert code == 0, err
    assert json.loads(out)["enrolled"] == 3
    assert [(t["used"], t["uses_left"]) for t in fleet_client(fleet).enrollments()] == [(3, 0)]
    # a token whose prefix does not allow the ids: every enrollment refused, in one line
    tok = fleet.enrollment.create_token(count=3, prefix="cam-")
    code = edgefleet_main(["fleet", "simulate", "--devices", "2", "--prefix", "other-", "--duration", "1",
                           "--state", str(tmp_path / "sim2"), "--provision-token", tok["token"],
                           "--ca-fingerprint", tok["ca_fingerprint"], "--server", fleet.http_url,
                           "--ca", str(fleet.pki.ca_crt)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.strip().splitlines()[-1].startswith("edgefleet fleet: error: no simulated device could "
                                                            "enroll: enroll: the controller refused: device_id")
