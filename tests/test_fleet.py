"""The fleet controller end to end: a real mosquitto, a real SQLite file, real HTTP, paho clients as devices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from util import admin_token, cli_args, fleet_client, issue_tls, wait_for, release_key, release_pub

from agent import protocol
from agent.bundle import Manifest, TensorSpec, write_bundle
from agent.errors import EdgefleetError
from edgefleet.cli import main as edgefleet_main
from fleet.app import Fleet
from fleet.client import FleetClient
from agent.transport import make_client, parse_url
from fleet.link import Link
from fleet.store import Store

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 30.0




def known(client, device_id: str) -> dict | None:
    """The device's health, or None while the controller has not registered it yet."""
    return next((d for d in client.health() if d["device_id"] == device_id), None)


class Device:
    """A paho client speaking the wire contract as a device would, with a retained last will."""

    def __init__(self, broker_url: str, device_id: str, tls, boot_id: str = "boot-1") -> None:
        self.id, self.boot_id = device_id, boot_id
        url = parse_url(broker_url)
        host, port = url.host, url.port
        self.client = make_client(url, f"device-{device_id}", tls)
        will = protocol.State(device_id=device_id, online=False, time=time.time(), boot_id=boot_id)
        self.client.will_set(protocol.topic(device_id, protocol.STATE), protocol.encode(will), qos=1, retain=True)
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        assert connected.wait(TIMEOUT)

    def send_raw(self, kind: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(f"{protocol.PREFIX}/{self.id}/{kind}", payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published()

    def send(self, msg: protocol.Message) -> None:
        kind = {protocol.State: protocol.STATE, protocol.Telemetry: protocol.TELEMETRY,
                protocol.Event: protocol.EVENTS, protocol.Quality: protocol.QUALITY}[type(msg)]
        self.send_raw(kind, protocol.encode(msg), retain=kind == protocol.STATE)

    def state(self, online: bool = True, **kw) -> None:
        kw = {"agent_version": "0.1.0", "arch": "x86_64", "cpu_flags": ["avx2"], "runtimes": ["onnxruntime"], **kw}
        self.send(protocol.State(device_id=self.id, online=online, time=time.time(), boot_id=self.boot_id, **kw))

    def telemetry(self, seq: int, inferences: int = 10, **kw) -> protocol.Telemetry:
        kw.setdefault("interval_s", 10.0)
        msg = protocol.Telemetry(device_id=self.id, boot_id=self.boot_id, seq=seq, time=time.time(),
                                 inferences=inferences, **kw)
        self.send(msg)
        return msg

    def event(self, seq: int, kind: str, **kw) -> None:
        self.send(protocol.Event(device_id=self.id, boot_id=self.boot_id, seq=seq, time=time.time(),
                                 kind=kind, **kw))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def drop(self) -> None:
        """Vanish without a DISCONNECT, as a crashed device does: the broker publishes the last will."""
        self.client.loop_stop()
        self.client.socket().close()


ACTIVE = protocol.ActiveModel(name="digits", version="1.2.0", sha256="ab" * 32, runtime="onnxruntime",
                              precision="int8")


@pytest.fixture
def fleet(tmp_path, monkeypatch, store_url):
    f = Fleet(tmp_path / "data", release_keys=[release_pub()], store_url=store_url,  # /metrics per device: the
              http_port=0, mqtt_listen="127.0.0.1:0", metrics_per_device=True).start_background()  # tests read each
    monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(f))  # for the CLI
    yield f
    f.stop()


@pytest.fixture
def client(fleet):
    return fleet_client(fleet)


@pytest.fixture
def devices(fleet, tmp_path):
    made = []

    def make(device_id: str, **kw) -> Device:
        tls = issue_tls(fleet.pki, device_id, tmp_path / "certs", fleet.store)  # enrolled, as a device would be
        made.append(Device(fleet.broker_url, device_id, tls, **kw))
        return made[-1]

    yield make
    for d in made:
        try:
            d.close()
        except Exception:
            pass


@pytest.fixture
def bundle(tmp_path) -> Path:
    model = tmp_path / "model.onnx"
    model.write_bytes(bytes(range(256)) * 40)  # any small file: the controller never loads the model
    sample = tmp_path / "sample.npz"
    sample.write_bytes(b"any bytes: never loaded either")
    manifest = Manifest(name="tiny", version="1.0.0", target="cpu", runtime="onnxruntime", precision="fp32",
                        model="model.onnx", files=[],
                        inputs=[TensorSpec(name="x", shape=[1, 4], dtype="float32")],
                        outputs=[TensorSpec(name="y", shape=[1, 2], dtype="float32")])
    out = tmp_path / "tiny.bundle.tar"
    write_bundle(out, manifest, {"model.onnx": model, "sample.npz": sample}, sign_key=release_key()[0])
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = edgefleet_main(["fleet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgefleet fleet: error: "), err
    for n in needles:
        assert n in lines[0], err


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, ca=None):
    """A request with the admin token (EDGEFLEET_TOKEN, which the fleet fixture sets), unless ``headers`` say
    otherwise; a body is JSON unless its Content-Type is given. ``ca``: the fleet (or its CA file) an https://
    URL's certificate must chain to."""
    import ssl

    ca = getattr(getattr(ca, "pki", None), "ca_crt", ca)
    token = os.environ.get("EDGEFLEET_TOKEN")
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}),
               **({"Content-Type": "application/json"} if body is not None else {}), **(headers or {})}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT, context=context) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# -- what devices report --------------------------------------------------------------------------------


def test_device_reports_and_health_shows_them(fleet, client, devices, capsys, monkeypatch):
    dev = devices("cam-1")
    dev.state(active=ACTIVE)
    lat = protocol.Latency(p50=2.0, p95=3.5, p99=4.0, max=9.0, mean=2.4)
    dev.telemetry(1, inferences=100, errors={"timeout": 2}, latency_ms=lat, cpu_percent=12.5,
                  rss_bytes=64 << 20, memory_percent=3.25)
    newer = protocol.Latency(p50=2.5, p95=4.0, p99=5.0, max=7.0, mean=2.6)
    dev.telemetry(2, inferences=50, errors={"timeout": 1, "nan": 1}, latency_ms=newer, cpu_percent=20.0,
                  rss_bytes=65 << 20, memory_percent=3.5)
    dev.telemetry(3, inferences=0, cpu_percent=1.0, rss_bytes=66 << 20, memory_percent=3.75)
    dev.event(1, "error", reason="camera unplugged")

    wait_for(lambda: client.status()["received"] == 5, what="all five messages")
    [h] = client.health()
    assert h["device_id"] == "cam-1" and h["online"] is True
    assert h["model"] == {"name": "digits", "version": "1.2.0", "precision": "int8",
                          "runtime": "onnxruntime", "sha256": "ab" * 32, "signed_by": None, "serial": None}
    assert h["errors"] == 4
    assert h["latency_ms"] == {"p50": 2.5, "p95": 4.0, "p99": 5.0}  # the latest window that had inferences
    assert (h["cpu_percent"], h["rss_bytes"], h["memory_percent"]) == (1.0, 66 << 20, 3.75)
    assert h["temperature_c"] is None
    assert h["last_seen"] <= time.time() and h["last_seen_ago_s"] >= 0

    detail = client.health("cam-1")
    assert detail["events"][0]["kind"] == "error" and detail["events"][0]["reason"] == "camera unplugged"
    [d] = client.devices()
    assert d["id"] == "cam-1" and d["arch"] == "x86_64" and d["runtimes"] == ["onnxruntime"]
    assert client.status()["devices"] == 1

    code, out, err = run_cli(capsys, "health", *cli_args(fleet))
    assert code == 0 and not err
    header, row = out.strip().splitlines()
    assert header.split()[:2] == ["device", "online"]
    assert row.split()[:8] == ["cam-1", "yes", "digits", "1.2.0", "int8", "150", "4", "2.50/4.00/5.00"]
    assert "unknown" in row and "ago" in row
    code, out, _ = run_cli(capsys, "health", "--json", *cli_args(fleet))
    assert code == 0 and json.loads(out)[0]["inferences"] == 150
    code, out, _ = run_cli(capsys, "health", "cam-1", *cli_args(fleet))
    assert code == 0 and "camera unplugged" in out
    monkeypatch.setenv("EDGEFLEET_SERVER", fleet.http_url)
    monkeypatch.setenv("EDGEFLEET_CA", str(fleet.pki.ca_crt))
    code, out, _ = run_cli(capsys, "devices", "--json")
    assert code == 0 and json.loads(out)[0]["id"] == "cam-1"


def test_telemetry_without_state_registers_the_device(client, devices):
    devices("cam-2").telemetry(1, inferences=7)
    h = wait_for(lambda: client.health(), what="device")[0]
    assert h["device_id"] == "cam-2" and h["online"] and h["inferences"] == 7 and h["model"] is None


def test_redelivered_telemetry_counts_once(fleet, client, devices):
    dev = devices("cam-3")
    msg = dev.telemetry(1, inferences=5)
    dev.send(msg)  # QoS 1 redelivery: same boot_id and seq
    dev.telemetry(2, inferences=1)
    wait_for(lambda: client.status()["received"] == 3, what="three messages")
    assert client.health("cam-3")["inferences"] == 6
    assert client.status()["duplicates"] == 1


def test_last_will_and_offline_state_mark_the_device_offline(client, devices):
    crashed = devices("cam-4")
    crashed.state()
    wait_for(lambda: (known(client, "cam-4") or {}).get("online"), what="online")
    crashed.drop()
    wait_for(lambda: not client.health("cam-4")["online"], what="the last will")

    polite = devices("cam-5")
    polite.state()
    wait_for(lambda: (known(client, "cam-5") or {}).get("online"), what="online")
    polite.state(online=False)
    wait_for(lambda: not client.health("cam-5")["online"], what="offline state")


def test_silent_device_goes_offline_after_three_intervals(client, devices):
    dev = devices("cam-6")
    dev.state()
    dev.telemetry(1, interval_s=0.2)
    wait_for(lambda: (known(client, "cam-6") or {}).get("inferences") == 10, what="telemetry")
    wait_for(lambda: not client.health("cam-6")["online"], what="heartbeat timeout")


def test_invalid_messages_are_counted_and_dropped(client, devices):
    dev = devices("cam-7")
    dev.send_raw(protocol.TELEMETRY, b"not json")
    dev.send_raw(protocol.TELEMETRY, b'{"v": 1, "device_id": "cam-7"}')
    other = protocol.Telemetry(device_id="someone-else", boot_id="b", seq=1, time=time.time(), interval_s=10,
                               inferences=1)
    dev.send_raw(protocol.TELEMETRY, protocol.encode(other))
    dev.send_raw(protocol.EVENTS, b'{"v": 2}')
    dev.telemetry(1, inferences=3)
    wait_for(lambda: client.status()["received"] == 1, what="the valid message")
    assert client.health("cam-7")["inferences"] == 3
    wait_for(lambda: sum(client.status()["invalid"].values()) == 4, what="four invalid messages")
    invalid = client.status()["invalid"]
    assert any("does not match" in reason for reason in invalid), invalid
    assert any("not JSON" in reason for reason in invalid), invalid


def test_messages_sent_while_the_link_is_down_arrive_after_it_reconnects(mosquitto, tmp_path):
    store = Store(tmp_path / "fleet.db").open()
    tls = mosquitto.pki.controller_tls()
    link = Link(mosquitto.url, store, client_id="controller-under-test", tls=tls).start()
    dev = Device(mosquitto.url, "cam-8", issue_tls(mosquitto.pki, "cam-8", tmp_path))
    try:
        dev.telemetry(1, inferences=1)
        wait_for(lambda: store.health(), what="first telemetry")
        link.stop()
        dev.telemetry(2, inferences=10)  # the broker PUBACKs and queues it in the controller's session
        dev.telemetry(3, inferences=100)
        link = Link(mosquitto.url, store, client_id="controller-under-test", tls=tls).start()
        wait_for(lambda: store.health("cam-8")[0]["inferences"] == 111, what="queued telemetry")

        link.stop()  # and across a broker restart (persistence on)
        dev.telemetry(4, inferences=1000)
        dev.close()
        mosquitto.stop()
        mosquitto.start()
        link = Link(mosquitto.url, store, client_id="controller-under-test", tls=tls).start()
        wait_for(lambda: store.health("cam-8")[0]["inferences"] == 1111, what="telemetry kept by the broker")
    finally:
        link.stop()
        store.close()


def test_fleet_on_an_external_broker(mosquitto, tmp_path):
    with Fleet(tmp_path / "data", release_keys=[release_pub()],
               broker_url=mosquitto.url, http_port=0, pki_dir=mosquitto.pki.root) as fleet:
        assert fleet.broker_url == mosquitto.url and fleet.broker is None
        dev = Device(mosquitto.url, "cam-9", issue_tls(mosquitto.pki, "cam-9", tmp_path, fleet.store))
        try:
            dev.state(active=ACTIVE)
            client = fleet_client(fleet)
            wait_for(lambda: client.health(), what="the device")
            assert client.status()["broker"] == mosquitto.url
            assert client.health("cam-9")["model"]["name"] == "digits"
        finally:
            dev.close()
    assert mosquitto.running  # the controller leaves a broker it did not start alone


def test_the_fleet_path_imports_no_runtime(tmp_path):
    code = (
        "import sys\n"
        "from fleet import app, api, broker, cli, client, link, store\n"
        "from fleet.app import Fleet\n"
        f"Fleet({str(tmp_path / 'data')!r}, http_port=0, mqtt_listen='127.0.0.1:0').start_background().stop()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'openvino')]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# -- bundles and deployments ------------------------------------------------------------------------------


def test_bundle_upload_and_ranged_download(fleet, client, bundle):
    up = client.upload_bundle(bundle)
    data = bundle.read_bytes()
    assert up["size"] == len(data) and up["manifest"]["name"] == "tiny"
    assert client.upload_bundle(bundle)["sha256"] == up["sha256"]  # idempotent
    url = f"{fleet.http_url}/bundles/{up['sha256']}"
    status, _, body = http("GET", url, ca=fleet)
    assert status == 200 and body == data
    status, headers, body = http("GET", url, headers={"Range": "bytes=100-1099"}, ca=fleet)
    assert status == 206 and body == data[100:1100]
    assert headers["content-range"] == f"bytes 100-1099/{len(data)}"
    status, _, body = http("GET", url, headers={"Range": f"bytes={len(data) - 10}-"}, ca=fleet)  # resume the tail
    assert status == 206 and body == data[-10:]
    status, _, body = http("GET", f"{fleet.http_url}/bundles/{'0' * 64}", ca=fleet)
    assert status == 404 and "error" in json.loads(body)
    assert (fleet.data_dir / "bundles" / f"{up['sha256']}.tar").read_bytes() == data


def test_deploy_publishes_a_retained_desired_model(fleet, client, bundle, devices, capsys, tmp_path):
    code, out, err = run_cli(capsys, "deploy", str(bundle), "--to", "cam-a", "cam-b", "--json",
                             *cli_args(fleet))
    assert code == 0, err
    dep = json.loads(out)
    assert [d["device_id"] for d in dep["devices"]] == ["cam-a", "cam-b"]
    assert {d["phase"] for d in dep["devices"]} == {"pending"}

    # a device that subscribes only now still gets it: desired is retained
    got: list[mqtt.MQTTMessage] = []
    url = parse_url(fleet.broker_url)
    late = make_client(url, "late-subscriber", issue_tls(fleet.pki, "cam-b", tmp_path / "late"))
    late.on_connect = lambda c, *a: c.subscribe(protocol.subscription(protocol.DESIRED, "cam-b"), qos=1)
    late.on_message = lambda c, u, m: got.append(m)
    late.connect(url.host, url.port)
    late.loop_start()
    try:
        wait_for(lambda: got, what="the retained desired")
    finally:
        late.disconnect()
        late.loop_stop()
    assert got[0].retain
    desired = protocol.decode(protocol.DESIRED, got[0].payload)
    sha = desired.sha256
    assert desired.deployment_id == dep["id"] and desired.name == "tiny" and desired.version == "1.0.0"
    assert desired.url == f"{fleet.http_url}/bundles/{sha}" and desired.size == bundle.stat().st_size
    status, _, body = http("GET", desired.url, ca=fleet)
    assert status == 200 and body == bundle.read_bytes()

    dev = devices("cam-b")
    dev.event(1, "downloading", deployment_id=dep["id"], sha256=sha)
    dev.event(2, "active", deployment_id=dep["id"], sha256=sha, version="1.0.0")
    wait_for(lambda: ((known(client, "cam-b") or {}).get("deployment") or {}).get("phase") == "active",
             what="phase active")
    phases = {d["device_id"]: d["phase"] for d in client.deployment(dep["id"])["devices"]}
    assert phases == {"cam-a": "pending", "cam-b": "active"}
    assert client.health("cam-b")["deployments"][0]["deployment_id"] == dep["id"]

    code, out, _ = run_cli(capsys, "deploy", str(bundle), "--to", "cam-a", *cli_args(fleet))
    assert code == 0 and "deployed tiny 1.0.0" in out


# -- bad inputs: one line, exit 2 ---------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors(fleet, client, bundle, tmp_path, capsys):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    status, _, body = http("POST", f"{fleet.http_url}/api/bundles", junk.read_bytes(),
                           {"Content-Type": "application/x-tar"}, ca=fleet)
    assert status == 400 and "not a bundle" in json.loads(body)["error"]
    with pytest.raises(EdgefleetError, match="not a bundle"):
        client.upload_bundle(junk)
    assert not [p for p in (fleet.data_dir / "bundles").iterdir()], "a rejected upload leaves nothing behind"

    code, _, err = run_cli(capsys, "deploy", str(junk), "--to", "cam-1", *cli_args(fleet))
    assert code == 2
    assert_one_error_line(err, "not a bundle")
    code, _, err = run_cli(capsys, "deploy", str(tmp_path / "missing.tar"), "--to", "cam-1",
                           *cli_args(fleet))
    assert code == 2
    assert_one_error_line(err, "missing.tar")

    status, _, body = http("GET", f"{fleet.http_url}/api/health/nobody", ca=fleet)
    assert status == 404 and "unknown device" in json.loads(body)["error"]
    code, _, err = run_cli(capsys, "health", "nobody", *cli_args(fleet))
    assert code == 2
    assert_one_error_line(err, "unknown device 'nobody'")

    with pytest.raises(EdgefleetError, match="unknown bundle"):
        client.deploy("0" * 64, ["cam-1"])
    sha = client.upload_bundle(bundle)["sha256"]
    with pytest.raises(EdgefleetError, match=r"devices\[0\] must be a device id"):
        client.deploy(sha, ["bad/id"])
    status, _, body = http("POST", f"{fleet.http_url}/api/deployments", b'{"bundle": 1}', ca=fleet)
    assert status == 400 and "invalid deployment request" in json.loads(body)["error"]
    status, _, body = http("GET", f"{fleet.http_url}/api/deployments/dep-nope", ca=fleet)
    assert status == 404


def test_unreachable_controller_is_one_line(free_port, capsys):
    code, _, err = run_cli(capsys, "devices", "--server", f"http://127.0.0.1:{free_port}", "--token", "eft_x")
    assert code == 2
    assert_one_error_line(err, "cannot reach the controller", "EDGEFLEET_SERVER")


def edgefleet(*argv: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "edgefleet.cli", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_serve_with_an_unreachable_broker_exits_2(free_port, tmp_path):
    proc = edgefleet("fleet", "serve", "--data", str(tmp_path / "data"), "--broker",
                     f"mqtts://127.0.0.1:{free_port}", "--http", "127.0.0.1:0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert_one_error_line(err, f"cannot reach broker mqtts://127.0.0.1:{free_port}")
    proc = edgefleet("fleet", "serve", "--data", str(tmp_path / "data"), "--broker",
                     f"mqtt://127.0.0.1:{free_port}", "--http", "127.0.0.1:0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert_one_error_line(err, "plaintext MQTT")


def test_serve_runs_until_sigterm(tmp_path):
    data = tmp_path / "data"
    proc = edgefleet("fleet", "serve", "--data", str(data), "--http", "127.0.0.1:0",
                     "--mqtt-listen", "127.0.0.1:0")
    try:
        line = proc.stdout.readline()
        assert line.startswith("edgefleet fleet: serving https://127.0.0.1:"), line + proc.stderr.read()
        info = json.loads((data / "controller.json").read_text())
        assert info["pid"] == proc.pid and info["broker"].startswith("mqtts://127.0.0.1:")
        first = proc.stdout.readline() + proc.stdout.readline() + proc.stdout.readline()
        token = (data / "admin.token").read_text().strip()
        assert "the first admin token" in first and first.splitlines()[1] == token and "fingerprint" in first
        assert FleetClient.configured(data=data, env={}).status()["ok"] is True
        assert (data.stat().st_mode & 0o777, (data / "pki").stat().st_mode & 0o777) == (0o700, 0o700)
        assert (data / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600
        broker_pid = int(subprocess.check_output(["pgrep", "-P", str(proc.pid), "mosquitto"], text=True))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not (data / "controller.json").exists()
        wait_for(lambda: not os.path.exists(f"/proc/{broker_pid}"), what="mosquitto to end")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
