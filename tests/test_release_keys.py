"""The controller's side of signing (issue 10): the upload policy (each attack refused with its reason), the
release keys it lists (`edgefleet fleet keys`), trust statements, and the signature on every desired and cmd it
publishes (read back from the real broker as the device would get them)."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from pathlib import Path

import msgspec
import pytest
from test_fleet import (ACTIVE, Device, assert_one_error_line, client, devices, fleet, http, known,  # noqa: F401
                        run_cli)
from util import cli_args, enroll, issue_tls, release_key, release_pub, wait_for

from agent import protocol, signing
from agent.bundle import Manifest, TensorSpec, write_bundle
from agent.identity import CONTROLLER_KEY, Identity, renew
from agent.transport import make_client, parse_url
from fleet.app import Fleet

TIMEOUT = 30


def tiny(tmp: Path, name: str = "tiny", version: str = "1.0.0", key=None, serial: int | None = None,
         payload: bytes = b"") -> Path:
    """A small bundle (the controller never loads the model), signed with ``key`` when given."""
    d = tmp / f"{name}-{version}-{time.monotonic_ns()}"
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(bytes(range(256)) * 8 + payload)
    (d / "sample.npz").write_bytes(b"sample bytes")
    m = Manifest(name=name, version=version, target="cpu", runtime="onnxruntime", precision="fp32",
                 model="model.onnx", files=[], inputs=[TensorSpec(name="x", shape=[1, 4], dtype="float32")],
                 outputs=[TensorSpec(name="y", shape=[1, 2], dtype="float32")])
    out = d / "bundle.tar"
    write_bundle(out, m, {"model.onnx": d / "model.onnx", "sample.npz": d / "sample.npz"}, sign_key=key,
                 serial=serial)
    return out


def members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(i, tar.extractfile(i).read()) for i in tar.getmembers()]


def retar(src: Path, out: Path, replace: dict[str, bytes]) -> Path:
    """``src`` with some members' bytes replaced (same order, same names): what an attacker does to a bundle."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members(src):
            data = replace.get(info.name, data)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def upload(fleet, path: Path) -> tuple[int, dict]:
    status, _, body = http("POST", f"{fleet.http_url}/api/bundles", path.read_bytes(),
                           {"Content-Type": "application/x-tar"}, ca=fleet)
    return status, json.loads(body)


def refused(fleet, path: Path, *needles: str) -> str:
    status, doc = upload(fleet, path)
    assert status == 400, doc
    for n in needles:
        assert n in doc["error"], doc["error"]
    return doc["error"]


@pytest.fixture
def other_key(tmp_path):
    """A release key the fleet does not list: (private key, public key path)."""
    key, pub = signing.generate(tmp_path / "other", "other")
    return signing.load_private(key), pub


# -- the upload policy ----------------------------------------------------------------------------------


def test_uploads_must_be_signed_by_a_listed_key(fleet, client, tmp_path, other_key):
    key, _ = release_key()
    tests_id = signing.load_public(release_pub()).keyid
    good = tiny(tmp_path, key=key, serial=7)
    up = client.upload_bundle(good)
    assert (up["signed_by"], up["signer"], up["manifest"]["serial"]) == (tests_id, "tests", 7)
    [row] = [b for b in client.bundles() if b["sha256"] == up["sha256"]]
    assert (row["signed_by"], row["signer"], row["serial"]) == (tests_id, "tests", 7)

    # unsigned
    refused(fleet, tiny(tmp_path), "bundle is not signed", "edgefleet sign BUNDLE --key KEY")
    # signed by a key the fleet does not list
    other, other_pub = other_key
    other_id = signing.load_public(other_pub).keyid
    refused(fleet, tiny(tmp_path, key=other), other_id, "does not list", "edgefleet fleet keys add")
    # the manifest edited after signing (the signature kept)
    parts = dict((i.name, data) for i, data in members(good))
    edited = parts["manifest.json"].replace(b'"1.0.0"', b'"9.9.9"')
    assert edited != parts["manifest.json"]
    refused(fleet, retar(good, tmp_path / "edited.tar", {"manifest.json": edited}),
            "does not verify", "changed after signing")
    # a valid signature, of another bundle's manifest
    second = tiny(tmp_path, version="2.0.0", key=key, serial=8)
    sig2 = dict((i.name, data) for i, data in members(second))["manifest.sig"]
    refused(fleet, retar(good, tmp_path / "mixed.tar", {"manifest.sig": sig2}),
            "does not verify", "another manifest")
    # a file swapped inside a signed bundle (same size, other bytes)
    swapped = bytes(b ^ 0xFF for b in parts["model.onnx"])
    error = refused(fleet, retar(good, tmp_path / "swapped.tar", {"model.onnx": swapped}))
    assert "model.onnx" in error and "does not match its manifest" in error, error
    # nothing refused was stored
    assert [b["sha256"] for b in client.bundles()] == [up["sha256"]]


def test_a_removed_keys_bundles_are_refused(fleet, client, tmp_path, other_key, capsys):
    other, other_pub = other_key
    other_id = signing.load_public(other_pub).keyid
    code, out, _ = run_cli(capsys, "keys", "add", str(other_pub), "--name", "ci", "--json", *cli_args(fleet))
    assert code == 0 and json.loads(out)["keyid"] == other_id
    first = client.upload_bundle(tiny(tmp_path, key=other, serial=1))
    assert first["signer"] == "ci"
    code, out, _ = run_cli(capsys, "keys", "remove", other_id, *cli_args(fleet))
    assert code == 0 and "removed" in out
    refused(fleet, tiny(tmp_path, version="1.1", key=other, serial=2), other_id, "ci", "removed")
    # a key once removed cannot be listed again (devices were told to stop trusting it)
    code, _, err = run_cli(capsys, "keys", "add", str(other_pub), *cli_args(fleet))
    assert code != 0
    assert_one_error_line(err, "was removed")


def test_allow_unsigned_takes_unsigned_bundles_and_still_checks_signatures(tmp_path, other_key):
    from util import fleet_client

    with Fleet(tmp_path / "data", release_keys=[release_pub()], http_port=0, mqtt_listen="127.0.0.1:0",
               allow_unsigned=True) as f:
        client = fleet_client(f)
        up = client.upload_bundle(tiny(tmp_path))
        assert up["signed_by"] is None and up["signer"] is None
        other, other_pub = other_key
        up = client.upload_bundle(tiny(tmp_path, version="2", key=other))
        assert up["signed_by"] == signing.load_public(other_pub).keyid and up["signer"] is None  # recorded
        good = tiny(tmp_path, version="3", key=release_key()[0])
        assert client.upload_bundle(good)["signer"] == "tests"
        parts = dict((i.name, data) for i, data in members(good))
        edited = retar(good, tmp_path / "edited.tar",
                       {"manifest.json": parts["manifest.json"].replace(b'"3"', b'"4"')})
        status, _, body = http("POST", f"{f.http_url}/api/bundles", edited.read_bytes(),
                               {"Content-Type": "application/x-tar", "Authorization": f"Bearer {client.token}"},
                               ca=f)
        assert status == 400 and "does not verify" in json.loads(body)["error"]


def test_serve_says_allow_unsigned_loudly(tmp_path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "edgefleet.cli", "fleet", "serve", "--data", str(tmp_path / "d"),
                             "--http", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0", "--allow-unsigned"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        line = proc.stderr.readline()
        assert "WARNING: --allow-unsigned" in line, line
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


# -- release keys and trust statements ----------------------------------------------------------------


def test_keys_add_list_remove_in_the_cli(fleet, tmp_path, other_key, capsys):
    tests_id = signing.load_public(release_pub()).keyid
    code, out, _ = run_cli(capsys, "keys", "list", "--json", *cli_args(fleet))
    assert code == 0
    assert [(k["keyid"], k["name"], k["status"]) for k in json.loads(out)] == [(tests_id, "tests", "active")]
    _, other_pub = other_key
    other_id = signing.load_public(other_pub).keyid
    code, out, _ = run_cli(capsys, "keys", "add", str(other_pub), *cli_args(fleet))
    assert code == 0 and other_id in out
    code, out, _ = run_cli(capsys, "keys", "list", *cli_args(fleet))
    assert code == 0 and other_id in out and "other" in out and "active" in out
    code, _, err = run_cli(capsys, "keys", "add", str(other_pub), *cli_args(fleet))
    assert code != 0
    assert_one_error_line(err, "already listed")
    code, out, _ = run_cli(capsys, "keys", "remove", other_id, "--json", *cli_args(fleet))
    doc = json.loads(out)
    assert code == 0 and doc["status"] == "removed" and doc["removal"]["op"] == "remove"
    # the removal is the controller's, and verifies with its key
    controller = signing.load_public(fleet.data_dir / "keys" / "controller.pub")
    st = msgspec.convert(doc["removal"], protocol.TrustStatement)
    assert st.by == controller.keyid and controller.verify(st.sig, signing.statement_bytes(st))
    for argv, needle in ((["remove", "0123456789abcdef"], "no release key"),
                         (["remove", other_id], "removed already"),
                         (["add", str(tmp_path / "nope.pub")], "cannot read")):
        code, _, err = run_cli(capsys, "keys", *argv, *cli_args(fleet))
        assert code != 0
        assert_one_error_line(err, needle)
    (tmp_path / "junk.pub").write_text("not a key")
    code, _, err = run_cli(capsys, "keys", "add", str(tmp_path / "junk.pub"), *cli_args(fleet))
    assert code != 0
    assert_one_error_line(err, "not a PEM public key")


def test_an_add_statement_must_verify_with_a_listed_key(fleet, client, tmp_path, other_key, capsys):
    key, _ = release_key()
    new_key, new_pub = signing.generate(tmp_path / "new", "release-2")
    new = signing.load_public(new_pub)
    other, _ = other_key

    def add(statement, *extra) -> tuple[int, str, str]:
        path = tmp_path / f"st-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(msgspec.to_builtins(statement)))
        return run_cli(capsys, "keys", "add", str(new_pub), "--statement", str(path), *extra, *cli_args(fleet))

    # signed by a key the fleet does not list
    code, _, err = add(signing.add_statement(other, new, time.time()))
    assert code != 0
    assert_one_error_line(err, "does not list")
    # forged: changed after it was signed
    good = signing.add_statement(key, new, time.time())
    code, _, err = add(msgspec.structs.replace(good, name="evil"))
    assert code != 0
    assert_one_error_line(err, "does not verify")
    # for another key
    third = signing.load_public(signing.generate(tmp_path / "third", "third")[1])
    code, _, err = add(signing.add_statement(key, third, time.time()))
    assert code != 0
    assert_one_error_line(err, "not for this key")
    # the real one
    code, out, _ = add(good, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["name"] == "release-2" and doc["statement"]["by"] == signing.load_public(
        release_pub()).keyid
    assert client.upload_bundle(tiny(tmp_path, key=signing.load_private(new_key)))["signer"] == "release-2"


# -- signed desired and cmd --------------------------------------------------------------------------------


class Inbox:
    """What a device receives on its desired and cmd topics (a real MQTT client, the device's identity)."""

    def __init__(self, fleet, device_id: str, tmp: Path) -> None:
        tls = issue_tls(fleet.pki, device_id, tmp / "certs", fleet.store)
        url = parse_url(fleet.broker_url)
        self.messages: list[protocol.Desired | protocol.Cmd] = []
        self.lock = threading.Lock()
        self.client = make_client(url, device_id, tls)
        subscribed = threading.Event()

        def on_connect(client, *a):
            client.subscribe([(protocol.topic(device_id, protocol.DESIRED), 1),
                              (protocol.topic(device_id, protocol.CMD), 1)])

        def on_message(client, userdata, m):
            kind = protocol.parse_topic(m.topic)[1]
            if m.payload:
                with self.lock:
                    self.messages.append(protocol.decode(kind, m.payload))

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = on_message
        self.client.connect(url.host, url.port, keepalive=30)
        self.client.loop_start()
        assert subscribed.wait(TIMEOUT)

    def wait(self, n: int, kind=protocol.Desired) -> list:
        def got():
            with self.lock:
                found = [m for m in self.messages if isinstance(m, kind)]
            return found if len(found) >= n else None
        return wait_for(got, TIMEOUT, f"{n} {kind.__name__} message(s)")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def verifies(fleet, msg) -> bool:
    controller = signing.load_public(fleet.data_dir / "keys" / "controller.pub")
    return msg.keyid == controller.keyid and controller.verify(msg.sig, signing.message_bytes(msg))


def test_every_desired_and_cmd_is_signed_for_its_device(fleet, client, tmp_path, other_key, capsys):
    keys = fleet.data_dir / "keys"
    assert (keys.stat().st_mode & 0o777, (keys / "controller.key").stat().st_mode & 0o777) == (0o700, 0o600)
    inbox = Inbox(fleet, "dev-s", tmp_path)
    try:
        sha = client.upload_bundle(tiny(tmp_path, key=release_key()[0]))["sha256"]
        before = time.time()
        client.deploy(sha, ["dev-s"])
        [d1] = inbox.wait(1)
        assert verifies(fleet, d1) and d1.device_id == "dev-s" and d1.sha256 == sha and not d1.rollback
        assert before <= d1.time <= time.time() and d1.expires == pytest.approx(d1.time + fleet.desired_ttl_s)
        assert d1.trust == []  # no statements yet
        # tampering shows: another device's id, a later expiry
        assert not verifies(fleet, msgspec.structs.replace(d1, device_id="dev-t"))
        assert not verifies(fleet, msgspec.structs.replace(d1, expires=d1.expires + 1))
        # a deploy sent back on purpose is signed as a rollback; counters grow across desired and cmd
        run_cli(capsys, "deploy", str(tiny(tmp_path, key=release_key()[0])), "--to", "dev-s", "--rollback",
                *cli_args(fleet))
        d2 = inbox.wait(2)[1]
        assert verifies(fleet, d2) and d2.rollback and d2.counter > d1.counter
        fleet.link.publish_cmd("dev-s", protocol.Cmd(id="c1", kind="ping"))
        [c] = inbox.wait(1, protocol.Cmd)
        assert verifies(fleet, c) and c.device_id == "dev-s" and c.counter > d2.counter
        assert c.expires == pytest.approx(c.time + 300)
        # the sweep signs a retained desired again before it expires (here: as if half the TTL had gone by)
        assert fleet.resign() == 0  # not due yet
        assert fleet.resign(now=time.time() + fleet.desired_ttl_s / 2 + 1) == 1
        d3 = inbox.wait(3)[2]
        assert verifies(fleet, d3) and d3.counter > c.counter and d3.expires > d2.expires
        assert (d3.sha256, d3.deployment_id, d3.rollback) == (d2.sha256, d2.deployment_id, True)
        # a trust change goes to every device with a desired: the removal, signed by the controller
        _, other_pub = other_key
        other_id = signing.load_public(other_pub).keyid
        run_cli(capsys, "keys", "add", str(other_pub), *cli_args(fleet))
        run_cli(capsys, "keys", "remove", other_id, *cli_args(fleet))
        d4 = inbox.wait(4)[3]
        assert verifies(fleet, d4) and [(s.op, s.keyid) for s in d4.trust] == [("remove", other_id)]
        assert d4.counter > d3.counter
        # what the rollout driver sends back (auto-rollback and `rollout ID rollback` alike) is signed as a rollback
        from types import SimpleNamespace

        from fleet.rollout import Publish, Rollback

        fleet.rollouts._flush(SimpleNamespace(id="ro-test"), [Rollback("ro-20260101-000000-abcdef-rb1", sha,
                                                                       ["dev-s"])])
        d5 = inbox.wait(5)[4]
        assert verifies(fleet, d5) and d5.rollback and d5.sha256 == sha
        fleet.rollouts._flush(SimpleNamespace(id="ro-test"), [Publish("ro-20260101-000000-abcdef-w1", sha, ["dev-s"])])
        d6 = inbox.wait(6)[5]
        assert verifies(fleet, d6) and not d6.rollback
    finally:
        inbox.close()


def test_the_counter_never_goes_back_after_a_restart(tmp_path):
    data = tmp_path / "data"
    with Fleet(data, release_keys=[release_pub()], http_port=0, mqtt_listen="127.0.0.1:0") as f:
        pem = f.signer.pem
        first = f.store.next_counter("dev-r", time.time() + 3600)  # a clock that was ahead once
    with Fleet(data, release_keys=[release_pub()], http_port=0, mqtt_listen="127.0.0.1:0") as f:
        assert f.signer.pem == pem  # the same key
        assert f.store.next_counter("dev-r", time.time()) == first + 1
        assert [k["name"] for k in f.store.release_keys()] == ["tests"]  # listed once


def test_enrollment_gives_the_device_the_controllers_key(fleet, tmp_path):
    ident = enroll(fleet, tmp_path / "dev", "dev-e")
    path = ident.controller_key_path
    assert path == tmp_path / "dev" / "identity" / CONTROLLER_KEY
    assert signing.load_public(path).keyid == fleet.signer.keyid
    renewed = renew(ident)
    assert renewed.cert_file != ident.cert_file and renewed.controller_key_path.read_text() == fleet.signer.pem
    assert Identity.load(tmp_path / "dev").controller_key_path == path


# -- who signed the running bundle --------------------------------------------------------------------------


def test_health_and_the_device_page_show_the_signer(fleet, client, devices, tmp_path, capsys):
    from util import ssl_context  # noqa: F401

    tests_id = signing.load_public(release_pub()).keyid
    up = client.upload_bundle(tiny(tmp_path, key=release_key()[0], serial=41))
    dev = devices("dev-h")
    running = msgspec.structs.replace(ACTIVE, sha256=up["sha256"])
    dev.state(active=running)  # an older agent: it does not say who signed it; the upload's record does
    wait_for(lambda: ((known(client, "dev-h") or {}).get("model") or {}).get("sha256") == up["sha256"], TIMEOUT,
             "state")  # not registered yet at the first look, unless the store is quick
    assert client.health("dev-h")["signer"] == {"keyid": tests_id, "name": "tests", "serial": 41,
                                                 "source": "bundle", "removed": False}
    dev.state(active=msgspec.structs.replace(running, signed_by=tests_id, serial=42))
    wait_for(lambda: client.health("dev-h")["signer"]["source"] == "device", TIMEOUT, "signed state")
    code, out, _ = run_cli(capsys, "health", "dev-h", *cli_args(fleet))
    assert code == 0 and f"signed by tests ({tests_id}), serial 42" in out
    status, _, body = http("GET", f"{fleet.http_url}/devices/dev-h", ca=fleet)
    assert status == 200 and f'data-signer="{tests_id}"' in body.decode() and ">42<" in body.decode()
    code, out, _ = run_cli(capsys, "bundles", *cli_args(fleet))
    assert code == 0 and up["sha256"][:12] in out and f"tests ({tests_id})" in out and "41" in out
