"""What the controller shows of devices' storage, free disk and clocks (health, the CLI, /metrics, the dashboard),
and the warning at deploy time for a device that reported too little room: a real controller and mosquitto,
devices are paho clients speaking the wire contract (test_fleet.Device) with the figures each case needs."""

from __future__ import annotations

import json
import time

import msgspec
import pytest
from test_fleet import (ACTIVE, bundle, cli_args, client, devices, fleet, http, known,  # noqa: F401
                        run_cli)
from util import wait_for

from agent import protocol
from fleet import schemas

DAY = 86400.0
GIB = 1 << 30


def report(dev, seq: int, late_s: float = 0.0, **kw) -> None:
    """A state and a telemetry window, stamped by a clock ``late_s`` behind."""
    now = time.time()
    state = {k: kw[k] for k in ("storage", "clock_synced") if k in kw}
    dev.send(protocol.State(device_id=dev.id, online=True, time=now - late_s, boot_id=dev.boot_id,
                            agent_version="0.1.0", arch="x86_64", active=ACTIVE, **state))
    dev.send(protocol.Telemetry(device_id=dev.id, boot_id=dev.boot_id, seq=seq, time=now - late_s, interval_s=10.0,
                                inferences=30, active=ACTIVE, **kw,
                                latency_ms=protocol.Latency(p50=1.0, p95=2.0, p99=3.0, max=4.0, mean=1.2)))


@pytest.fixture
def three(fleet, client, devices):
    """cam-ok (all well), cam-full (its state dir full), cam-late (its clock 400 days behind, not synchronised)."""
    report(devices("cam-ok"), 1, storage="ok", clock_synced=True, disk_free_bytes=5 * GIB)
    report(devices("cam-full"), 1, storage="full", disk_free_bytes=1024)
    report(devices("cam-late"), 1, late_s=400 * DAY, clock_synced=False, disk_free_bytes=2 * GIB)
    wait_for(lambda: client.status()["received"] == 6, what="six messages")
    return {h["device_id"]: h for h in client.health()}


def test_storage_disk_and_clock_in_the_health_api_and_the_cli(fleet, client, three, capsys):
    ok, full, late = three["cam-ok"], three["cam-full"], three["cam-late"]
    assert (ok["storage"], ok["disk_free_bytes"], ok["clock"]["synced"]) == ("ok", 5 * GIB, True)
    assert abs(ok["clock"]["offset_s"]) < ok["clock"]["max_offset_s"] == 300 and not ok["clock"]["exceeds_max"]
    assert (full["storage"], full["disk_free_bytes"]) == ("full", 1024) and full["storage_since"] > 0
    assert late["clock"]["offset_s"] >= 400 * DAY and late["clock"]["exceeds_max"] and late["clock"]["synced"] is False
    assert late["recent"]["windows"] == 1 and late["inferences_per_min"] == 180.0  # its window is recent
    msgspec.convert(client.health(), list[schemas.Health])  # the document describes these fields
    msgspec.convert(client.devices(), list[schemas.Device])
    assert [h["device_id"] for h in client.health(sort="disk")] == ["cam-full", "cam-late", "cam-ok"]
    assert [h["device_id"] for h in client.health(sort="clock")][0] == "cam-late"

    code, out, err = run_cli(capsys, "health", *cli_args(fleet))
    assert code == 0, err
    header, *rows = out.splitlines()
    assert "disk free" in header and "clock" in header
    row = {r.split()[0]: r for r in rows}
    assert "FULL 1.0K" in row["cam-full"] and "5.0G" in row["cam-ok"]
    assert "400.0 d behind !" in row["cam-late"] and "!" not in row["cam-ok"]
    code, out, _ = run_cli(capsys, "health", "cam-late", *cli_args(fleet))
    assert code == 0 and ("clock: 400.0 d behind the controller's, beyond the 5.0 min bound (estimated from its "
                          "messages); the OS says not synchronised") in out, out
    code, out, _ = run_cli(capsys, "health", "cam-full", *cli_args(fleet))
    assert code == 0 and "storage: full since " in out and "1.0K free" in out, out


def test_storage_disk_and_clock_in_metrics(fleet, three):
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body = http("GET", fleet.http_url + "/metrics", ca=fleet)
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}

    def value(name: str, device: str, **extra) -> float:
        [v] = [s.value for s in families[name].samples if s.labels.get("device") == device
               and all(s.labels.get(k) == v for k, v in extra.items())]
        return v

    assert value("edgefleet_device_storage", "cam-full", state="full") == 1
    assert value("edgefleet_device_storage", "cam-full", state="ok") == 0
    assert value("edgefleet_device_storage", "cam-ok", state="ok") == 1
    assert len([s for s in families["edgefleet_device_storage"].samples]) == 9  # three states a device, no more
    assert value("edgefleet_device_disk_free_bytes", "cam-full") == 1024
    assert value("edgefleet_device_clock_offset_seconds", "cam-late") >= 400 * DAY
    assert value("edgefleet_device_clock_offset_exceeded", "cam-late") == 1
    assert value("edgefleet_device_clock_offset_exceeded", "cam-ok") == 0
    assert value("edgefleet_device_clock_synced", "cam-late") == 0 and value("edgefleet_device_clock_synced", "cam-ok") == 1
    assert "cam-full" not in {s.labels["device"] for s in families["edgefleet_device_clock_synced"].samples}  # unknown
    assert families["edgefleet_storage_degraded"].samples[0].value == 1
    assert families["edgefleet_clock_offset_exceeded"].samples[0].value == 1


def test_storage_and_clock_banners_on_the_dashboard(fleet, three):
    status, _, body = http("GET", fleet.http_url + "/", ca=fleet)
    page = body.decode()
    assert status == 200
    storage = page[page.index('id="storage"'):]
    storage = storage[:storage.index("</section>")]
    assert 'data-storage="1"' in storage and "cam-full" in storage and "full" in storage and "1.0 KiB free" in storage
    clocks = page[page.index('id="clocks"'):]
    clocks = clocks[:clocks.index("</section>")]
    assert 'data-clocks="1"' in clocks and "cam-late" in clocks and "400.0 d behind" in clocks
    assert "not synchronised" in clocks and "5.0 min" in clocks
    row = page[page.index('<tr data-device="cam-full">'):]
    assert '<span class="pill bad">full</span> 1.0 KiB' in row[:row.index("</tr>")]

    page = http("GET", fleet.http_url + "/devices/cam-late", ca=fleet)[2].decode()
    assert 'id="clocks"' in page and "clock off" in page and "400.0 d behind" in page and "not synchronised" in page
    assert 'id="storage"' not in page
    page = http("GET", fleet.http_url + "/devices/cam-full", ca=fleet)[2].decode()
    assert 'id="storage"' in page and 'id="clocks"' not in page
    page = http("GET", fleet.http_url + "/devices/cam-ok", ca=fleet)[2].decode()
    assert 'id="storage"' not in page and 'id="clocks"' not in page and "within 1 s" in page


def test_a_deploy_to_a_device_with_too_little_disk_warns_and_goes_ahead(fleet, client, devices, bundle, capsys):
    size = bundle.stat().st_size
    report(devices("cam-small"), 1, disk_free_bytes=size)  # room for the download, not for its unpacked copy
    report(devices("cam-big"), 1, disk_free_bytes=2 * size)
    report(devices("cam-ro"), 1, storage="read_only", disk_free_bytes=GIB)
    wait_for(lambda: client.status()["received"] == 6, what="six messages")

    sha = client.upload_bundle(bundle)["sha256"]
    dep = client.deploy(sha, ["cam-small", "cam-big", "cam-ro"])
    msgspec.convert(dep, schemas.DeploymentCreated)
    assert {d["device_id"]: d["phase"] for d in dep["devices"]} == dict.fromkeys(["cam-big", "cam-ro", "cam-small"],
                                                                                 "pending")
    small, ro = dep["warnings"]
    assert small.startswith(f"cam-small last reported {size / 1024:.1f} KiB free (") and \
        f"the bundle needs {2 * size / 1024:.1f} KiB (2 x {size / 1024:.1f} KiB" in small, small
    assert ro == "cam-ro reports its storage read-only: it cannot take the bundle until that is fixed"

    code, out, err = run_cli(capsys, "deploy", str(bundle), "--to", "cam-small", "cam-big", *cli_args(fleet))
    assert code == 0 and out.startswith("deployed tiny 1.0.0"), err
    [line] = err.splitlines()  # one line a warning, on stderr; the deploy went ahead
    assert line.startswith("edgefleet fleet: warning: cam-small last reported ") and small.split(": ")[-1] in line

    doc = client.create_rollout(sha, ["cam-ro", "cam-big"])
    msgspec.convert(doc, schemas.RolloutCreated)
    assert doc["warnings"] == [ro]
    code, out, err = run_cli(capsys, "deploy", str(bundle), "--to", "cam-small", "--soak", "1s", *cli_args(fleet))
    assert code == 0 and out.startswith("rollout ro-"), err
    [line] = err.splitlines()
    assert line.startswith("edgefleet fleet: warning: cam-small last reported ")

    # nothing to say about a device with room, nor one that never sent telemetry
    devices("cam-new").state()
    wait_for(lambda: known(client, "cam-new"), what="cam-new")
    assert client.deploy(sha, ["cam-big", "cam-new"])["warnings"] == []
