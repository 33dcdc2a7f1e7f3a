"""What the controller shows of what really runs each device's model and of its accelerators' load (health, the
device report, the CLI, /metrics, the device page), and that unknown stays unknown: a real controller and
mosquitto, devices are paho clients speaking the wire contract (test_fleet.Device) with the figures each case needs."""

from __future__ import annotations

import json
import sqlite3
import time

import msgspec
import pytest
from test_fleet import (ACTIVE, cli_args, client, devices, fleet, http, run_cli)  # noqa: F401
from util import wait_for

from agent import protocol
from fleet import schemas
from fleet.store import Store

GIB = 1 << 30
FALLBACK = "CUDAExecutionProvider is not available here (onnxruntime has CPUExecutionProvider)"


def report(dev, seq: int, serving: protocol.Serving | None, runtime_devices: dict, accelerators: list) -> None:
    now = time.time()
    active = msgspec.structs.replace(ACTIVE, serving=serving)
    dev.send(protocol.State(device_id=dev.id, online=True, time=now, boot_id=dev.boot_id, agent_version="0.1.0",
                            arch="x86_64", active=active, devices=runtime_devices))
    dev.send(protocol.Telemetry(device_id=dev.id, boot_id=dev.boot_id, seq=seq, time=now, interval_s=10.0,
                                inferences=30, active=active, accelerators=accelerators,
                                latency_ms=protocol.Latency(p50=1.0, p95=2.0, p99=3.0, max=4.0, mean=1.2)))


@pytest.fixture
def two(fleet, client, devices):
    """cam-gpu: an NVIDIA GPU with every figure and an Intel iGPU whose load sysfs does not give, its model on the
    CPU after the CUDA provider was passed over; cam-npu: an NPU whose utilisation is not known yet (its first
    window), the model on it through OpenVINO."""
    report(devices("cam-gpu"), 1, protocol.Serving(device="CPU", provider="CPUExecutionProvider", fallback=FALLBACK),
           {"onnxruntime": ["CPUExecutionProvider"], "openvino": ["CPU", "GPU", "AUTO"]},
           [protocol.AcceleratorUsage(name="nvidia0", kind="gpu", driver="nvml", utilization_percent=37.5,
                                      memory_used_bytes=2 * GIB, memory_total_bytes=8 * GIB),
            protocol.AcceleratorUsage(name="card0", kind="gpu", driver="i915")])
    report(devices("cam-npu"), 1, protocol.Serving(device="NPU", provider="openvino"), {"openvino": ["CPU", "NPU"]},
           [protocol.AcceleratorUsage(name="accel0", kind="npu", driver="intel_vpu", memory_used_bytes=3 << 20)])
    wait_for(lambda: client.status()["received"] == 4, what="four messages")
    return {h["device_id"]: h for h in client.health()}


def test_serving_devices_and_accelerators_in_the_api(client, two):
    gpu, npu = two["cam-gpu"], two["cam-npu"]
    assert gpu["serving"] == {"device": "CPU", "provider": "CPUExecutionProvider", "fallback": FALLBACK}
    assert npu["serving"] == {"device": "NPU", "provider": "openvino", "fallback": ""}
    assert gpu["accelerators"] == [
        {"name": "nvidia0", "kind": "gpu", "driver": "nvml", "utilization_percent": 37.5,
         "memory_used_bytes": 2 * GIB, "memory_total_bytes": 8 * GIB},
        {"name": "card0", "kind": "gpu", "driver": "i915", "utilization_percent": None, "memory_used_bytes": None,
         "memory_total_bytes": None}]  # unknown stays null, never 0
    assert npu["accelerators"][0]["utilization_percent"] is None
    rep = client.health("cam-gpu")  # the device report
    assert rep["identity"]["devices"] == {"onnxruntime": ["CPUExecutionProvider"], "openvino": ["CPU", "GPU", "AUTO"]}
    assert rep["serving"] == gpu["serving"] and rep["accelerators"] == gpu["accelerators"]
    msgspec.convert(client.health(), list[schemas.Health])  # the document describes these fields
    msgspec.convert(rep["identity"], schemas.Identity)
    msgspec.convert(client.devices(), list[schemas.Device])
    devs = {d["id"]: d for d in client.devices()}
    assert devs["cam-gpu"]["runtime_devices"] == {"onnxruntime": ["CPUExecutionProvider"],
                                                  "openvino": ["CPU", "GPU", "AUTO"]}
    assert devs["cam-npu"]["active_serving"] == {"device": "NPU", "provider": "openvino", "fallback": ""}


def test_serving_and_accelerators_in_the_cli(fleet, two, capsys):
    code, out, err = run_cli(capsys, "health", "--json", *cli_args(fleet))
    assert code == 0, err
    doc = {h["device_id"]: h for h in json.loads(out)}
    assert doc["cam-gpu"]["serving"]["provider"] == "CPUExecutionProvider"
    assert doc["cam-npu"]["accelerators"][0]["name"] == "accel0"

    code, out, err = run_cli(capsys, "health", *cli_args(fleet))
    assert code == 0, err
    header, *rows = out.splitlines()
    assert "runs on" in header and "accel util" in header
    row = {r.split()[0]: r for r in rows}
    assert "nvidia0 37.5%,card0 unknown" in row["cam-gpu"] and "accel0 unknown" in row["cam-npu"]

    code, out, err = run_cli(capsys, "health", "cam-gpu", *cli_args(fleet))
    assert code == 0, err
    assert f"serving: CPU via CPUExecutionProvider (fallback: {FALLBACK})" in out
    assert "runtime devices: onnxruntime CPUExecutionProvider; openvino CPU, GPU, AUTO" in out
    assert "nvidia0 gpu nvml util 37.5 %, memory 2.0G of 8.0G" in out
    assert "card0 gpu i915 util unknown, memory unknown" in out
    code, out, err = run_cli(capsys, "health", "cam-npu", *cli_args(fleet))
    assert code == 0, err
    assert "serving: NPU via openvino\n" in out and "fallback" not in out
    assert "accel0 npu intel_vpu util unknown, memory 3.0M of unknown" in out


def test_serving_and_accelerators_in_metrics(fleet, two):
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body = http("GET", fleet.http_url + "/metrics", ca=fleet)
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}

    def samples(name: str) -> dict:
        return {(s.labels["device"], s.labels.get("accelerator")): s for s in families[name].samples}

    util = samples("edgefleet_device_accelerator_utilization_percent")
    assert {k: s.value for k, s in util.items()} == {("cam-gpu", "nvidia0"): 37.5}  # card0, accel0: unknown, absent
    assert util[("cam-gpu", "nvidia0")].labels["kind"] == "gpu"
    assert {k: s.value for k, s in samples("edgefleet_device_accelerator_memory_used_bytes").items()} == {
        ("cam-gpu", "nvidia0"): 2 * GIB, ("cam-npu", "accel0"): 3 << 20}
    assert {k: s.value for k, s in samples("edgefleet_device_accelerator_memory_total_bytes").items()} == {
        ("cam-gpu", "nvidia0"): 8 * GIB}
    info = {s.labels["device"]: s for s in families["edgefleet_device_serving_info"].samples}
    assert {d: (s.labels["runtime_device"], s.labels["provider"], s.value) for d, s in info.items()} == {
        "cam-gpu": ("CPU", "CPUExecutionProvider", 1), "cam-npu": ("NPU", "openvino", 1)}


def test_serving_and_accelerators_on_the_device_page(fleet, two):
    page = http("GET", fleet.http_url + "/devices/cam-gpu", ca=fleet)[2].decode()
    assert '<span data-serving="CPU">CPU via CPUExecutionProvider</span>' in page and "fallback: CUDAExecution" in page
    assert "onnxruntime: CPUExecutionProvider; openvino: CPU, GPU, AUTO" in page
    nv = page[page.index('data-accelerator="nvidia0"'):]
    assert "load 37.5 %, memory 2.0 GiB of 8.0 GiB" in nv[:nv.index("</div>")]
    card = page[page.index('data-accelerator="card0"'):]
    assert "load unknown" in card[:card.index("</div>")] and "memory" not in card[:card.index("</div>")]
    page = http("GET", fleet.http_url + "/devices/cam-npu", ca=fleet)[2].decode()
    npu = page[page.index('data-accelerator="accel0"'):]
    assert "load unknown, memory 3.0 MiB of unknown" in npu[:npu.index("</div>")]


def test_a_device_that_says_nothing_of_them_shows_not_reported(fleet, client, devices, capsys):
    """An agent from before issue 14: no serving, no devices, no accelerators in what it sends."""
    dev = devices("cam-old")
    dev.send(protocol.State(device_id=dev.id, online=True, time=time.time(), boot_id=dev.boot_id,
                            agent_version="0.1.0", arch="x86_64", active=ACTIVE))
    raw = json.loads(protocol.encode(protocol.Telemetry(device_id=dev.id, boot_id=dev.boot_id, seq=1,
                                                        time=time.time(), interval_s=10.0, inferences=1)))
    del raw["accelerators"]
    dev.send_raw(protocol.TELEMETRY, json.dumps(raw).encode())
    wait_for(lambda: client.status()["received"] == 2, what="two messages")
    [h] = client.health()
    assert h["serving"] is None
    code, out, _ = run_cli(capsys, "health", "cam-old", *cli_args(fleet))
    assert code == 0 and "serving: not reported" in out and "runtime devices: not reported" in out
    status, _, body = http("GET", fleet.http_url + "/metrics", ca=fleet)
    samples = [ln for ln in body.decode().splitlines() if not ln.startswith("#")]
    assert [ln for ln in samples if ln.startswith(("edgefleet_device_serving_info", "edgefleet_device_accelerator_"))] \
        == []
    # the protocol's default is null: not reported (an agent that finds none sends [])
    assert h["accelerators"] is None and "accelerators: not reported" in out


def test_a_version_7_database_is_migrated(tmp_path):
    from fleet.store import schema as store_module

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(store_module.BASE + ";INSERT INTO schema_version VALUES (2);")
    for v in range(2, 7):
        db.executescript(store_module.MIGRATIONS[v])
    db.execute("INSERT INTO devices (id, first_seen, last_seen, active_name) VALUES ('cam-1', 1e9, 1e9, 'digits')")
    db.commit()
    db.close()
    s = Store(path).open()
    try:
        assert s.query("SELECT version FROM schema_version")[0][0] == store_module.SCHEMA_VERSION == 10
        [d] = s.devices()
        assert (d["active_serving"], d["runtime_devices"]) == (None, {})
        [h] = s.health("cam-1", now=1e9 + 1)
        assert (h["serving"], h["accelerators"]) == (None, None)  # nothing said: unknown
    finally:
        s.close()
