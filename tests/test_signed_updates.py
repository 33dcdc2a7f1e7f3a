"""Devices run only what the owner signed (issue 10), attack by attack, through a real controller, a real TLS
mosquitto and a real agent: each attack must end in a ``failed`` event naming why, the device still on and
serving the bundle it had, nothing of the refused bundle unpacked, and the controller showing the device as
failed in that deployment.

The attacker is a compromised controller or broker: it can write the controller's bundle store and database
(here: files and rows put in directly, past the upload policy) and publish anything on the broker with the
controller's rights (here: the controller's own MQTT connection). It does not hold the release key.
"""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
from util import agent_config, fleet_client, release_key, release_pub, wait_for

from agent import bundle, protocol, signing
from agent.api import AgentClient
from agent.daemon import Agent
from fleet.app import Fleet

TIMEOUT = 120.0


# --- bundles an attacker can make --------------------------------------------------------------------
def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def resign(src: Path, out: Path, key, **manifest_changes) -> Path:
    """A copy of ``src`` with its manifest changed and signed with ``key``."""
    files = members(src)
    m = msgspec.structs.replace(bundle.decode_manifest(files[bundle.MANIFEST]), **manifest_changes)
    files[bundle.MANIFEST] = bundle.encode_manifest(m)
    files[bundle.SIG] = signing.sign_manifest(key, files[bundle.MANIFEST])
    return write_tar(out, files)


@pytest.fixture(scope="module")
def attacks(tmp_path_factory, bundles):
    """Bundle files for each attack on the bundle, made from the signed v2 (serial 2)."""
    d = tmp_path_factory.mktemp("attacks")
    key, _ = release_key()
    v1, v2 = members(bundles["v1"]), members(bundles["v2"])
    out = {}
    unsigned = dict(v2)
    del unsigned[bundle.SIG]
    out["unsigned"] = (write_tar(d / "unsigned.tar", unsigned), "bundle is not signed")
    stranger = signing.load_private(signing.generate(d / "stranger", "stranger")[0])
    out["unknown key"] = (resign(bundles["v2"], d / "stranger.tar", stranger, version="evil"),
                          "which this device does not trust")
    edited = dict(v2)
    m = bundle.decode_manifest(v2[bundle.MANIFEST])
    edited[bundle.MANIFEST] = bundle.encode_manifest(msgspec.structs.replace(m, version="edited",
                                                                             latency_budget_ms=1e9))
    out["manifest edited after signing"] = (write_tar(d / "edited.tar", edited), "does not verify")
    borrowed = dict(v2)
    borrowed[bundle.SIG] = v1[bundle.SIG]  # a valid signature, of v1's manifest
    out["another bundle's signature"] = (write_tar(d / "borrowed.tar", borrowed), "does not verify")
    swapped = dict(resign(bundles["v2"], d / "base.tar", key, version="swapped") and members(d / "base.tar"))
    sample = swapped["sample.npz"]
    swapped["sample.npz"] = sample[:-1] + bytes([sample[-1] ^ 0xFF])  # same size, another content
    out["file swapped inside a signed bundle"] = (write_tar(d / "swapped.tar", swapped),
                                                  "does not match its manifest entry")
    return out


# --- the set-up: a controller, one device on v2 ------------------------------------------------------
@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("fleet"), http_port=0, mqtt_listen="127.0.0.1:0",
              release_keys=[release_pub()]).start_background()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def device(tmp_path_factory, fleet, bundles):
    cfg = agent_config(fleet, tmp_path_factory.mktemp("cam-1"), "cam-1", api="127.0.0.1:0",
                       telemetry_interval_s=0.5, rollback_window_s=0)
    agent = Agent(cfg)
    agent.start()
    client = fleet_client(fleet)
    v2 = client.upload_bundle(bundles["v2"])["sha256"]
    dep = client.deploy(v2, ["cam-1"])
    wait_for(lambda: client.deployment(dep["id"])["devices"][0]["phase"] == "active", TIMEOUT, what="v2 active")
    yield agent
    agent.stop()


def smuggle(fleet, path: Path) -> str:
    """Put a bundle in the controller's store as a compromised controller would: past the upload policy."""
    sha = bundle.sha256_file(path)
    (fleet.data_dir / "bundles").mkdir(exist_ok=True)
    (fleet.data_dir / "bundles" / f"{sha}.tar").write_bytes(path.read_bytes())
    m = bundle.read_signed(path).manifest  # headers only: the attacks are on signatures and contents
    fleet.store.add_bundle(sha, path.stat().st_size, msgspec.to_builtins(m))
    return sha


def refused(fleet, agent, dep_id: str, reason: str, running: str) -> None:
    """The device reported `failed` naming ``reason`` for ``dep_id``; it still runs and serves ``running``;
    nothing of the refused bundle is unpacked; the controller shows it failed, not active."""
    client = fleet_client(fleet)

    def phase():
        row = client.deployment(dep_id)["devices"][0]
        return row if row["phase"] in ("failed", "active") else None

    row = wait_for(phase, TIMEOUT, what=f"the device's answer to {dep_id}")
    assert row["phase"] == "failed", row
    assert reason in row["reason"], row["reason"]
    assert agent.engine.current.sha == running
    models = {p.name for p in agent.store.models.iterdir()}
    assert models <= {running, agent.engine.previous.sha if agent.engine.previous else running}, models
    assert not list(agent.store.downloads.iterdir())
    x = np.zeros((1, 3, 48, 192), np.float32)
    app = AgentClient(agent.api.address)
    try:
        assert app.infer({"x": x})  # still serving
    finally:
        app.close()


@pytest.mark.parametrize("attack", ["unsigned", "unknown key", "manifest edited after signing",
                                    "another bundle's signature", "file swapped inside a signed bundle"])
def test_a_bundle_the_owner_did_not_sign_is_refused(fleet, device, attacks, attack):
    path, reason = attacks[attack]
    running = device.engine.current.sha
    sha = smuggle(fleet, path)
    dep = fleet_client(fleet).deploy(sha, ["cam-1"])
    refused(fleet, device, dep["id"], reason, running)


def test_a_lower_serial_after_a_higher_one_is_refused(fleet, device, bundles):
    running = device.engine.current.sha  # v2, serial 2
    client = fleet_client(fleet)
    v1 = client.upload_bundle(bundles["v1"])["sha256"]  # serial 1, validly signed
    dep = client.deploy(v1, ["cam-1"])
    refused(fleet, device, dep["id"], "lower than 2", running)


# --- attacks on the desired message itself ------------------------------------------------------------
def controller_key(fleet):
    return signing.load_private(fleet.data_dir / "keys" / "controller.key")


def publish_raw(fleet, device_id: str, msg, retain=True) -> None:
    info = fleet.link._client.publish(protocol.topic(device_id, protocol.DESIRED), protocol.encode(msg), qos=1,
                                      retain=retain)
    info.wait_for_publish(30)


def forged(fleet, sha, dep_id, *, key=None, device_id="cam-1", expires=None, counter=None, rollback=False):
    row = fleet.store.bundle(sha)
    d = protocol.Desired(deployment_id=dep_id, name=row["name"], version=row["version"],
                         url=f"{fleet.public_url.rstrip('/')}/bundles/{sha}", sha256=sha, size=row["size"],
                         time=time.time(), device_id=device_id, rollback=rollback,
                         expires=expires if expires is not None else time.time() + 3600,
                         counter=counter if counter is not None else int(time.time() * 1000))
    return signing.sign_message(key or controller_key(fleet), d)


def test_forged_desired_messages_are_refused(fleet, device, bundles, tmp_path):
    """With the broker's admin rights (the controller's connection) but not the controller's key, or with the
    key but an old, expired or another device's message: the device refuses each, naming why."""
    client = fleet_client(fleet)
    running = device.engine.current.sha
    v1 = client.upload_bundle(bundles["v1"])["sha256"]
    stranger = signing.load_private(signing.generate(tmp_path, "not-the-controller")[0])
    cases = [
        ("dep-wrong-key", dict(key=stranger), "not the controller's"),
        ("dep-other-device", dict(device_id="cam-2"), "is for device cam-2, not this one (cam-1)"),
        # expired by the time the controller signed what the device accepted last (this machine's OS may say
        # its clock is not synchronised, and then only that is judged)
        ("dep-expired", dict(expires=device.ledger.issued - 1), "expired at"),
        ("dep-replay", dict(counter=1), "an old message replayed"),
    ]
    for dep_id, changes, reason in cases:
        fleet.store.add_deployment(dep_id, v1, ["cam-1"])
        publish_raw(fleet, "cam-1", forged(fleet, v1, dep_id, **changes))
        refused(fleet, device, dep_id, reason, running)
    # and unsigned: what the broker takes from anyone with its admin rights
    fleet.store.add_deployment("dep-unsigned", v1, ["cam-1"])
    plain = msgspec.structs.replace(forged(fleet, v1, "dep-unsigned"), sig="", keyid="")
    publish_raw(fleet, "cam-1", plain)
    refused(fleet, device, "dep-unsigned", "is not signed by the controller", running)


def test_a_valid_desired_replayed_after_a_newer_one_is_refused(fleet, device, bundles):
    """The controller's own, valid message for an earlier deployment, captured and published again."""
    client = fleet_client(fleet)
    running = device.engine.current.sha
    topic = protocol.topic("cam-1", protocol.DESIRED)

    def deploy():
        dep = client.deploy(running, ["cam-1"])
        wait_for(lambda: client.deployment(dep["id"])["devices"][0]["phase"] == "active", TIMEOUT, what="active")
        return dep["id"]

    first_id = deploy()
    captured = []
    fleet.link._client.message_callback_add(topic, lambda c, u, m: captured.append(m.payload))
    fleet.link._client.subscribe(topic, qos=1)
    try:
        first = protocol.decode(protocol.DESIRED, wait_for(lambda: captured, 30, what="the retained desired")[0])
    finally:
        fleet.link._client.unsubscribe(topic)
        fleet.link._client.message_callback_remove(topic)
    assert first.deployment_id == first_id and first.sig
    deploy()  # a newer one
    assert device.ledger.desired_counter > first.counter
    publish_raw(fleet, "cam-1", first)
    wait_for(lambda: any("an old message replayed" in e["reason"] and e["deployment_id"] == first_id
                         for e in client.health("cam-1")["events"]), TIMEOUT, what="the replay refused")
    assert device.engine.current.sha == running


def test_a_rotated_out_key_is_refused(fleet, device, bundles, tmp_path):
    """A second release key, trusted through a statement the first signed, then removed by the controller:
    bundles it signed are refused from then on."""
    client = fleet_client(fleet)
    key, _ = release_key()
    second_key, second_pub = signing.generate(tmp_path, "second")
    second = signing.load_private(second_key)
    st = signing.add_statement(key, signing.load_public(second_pub), time.time())
    client.add_key(second_pub.read_text(), name="second", statement=msgspec.to_builtins(st))
    by_second = resign(bundles["v2"], tmp_path / "by-second.tar", second, version="second", serial=3)
    sha = client.upload_bundle(by_second)["sha256"]
    client.remove_key(signing.load_public(second_pub).keyid)
    running = device.engine.current.sha
    dep = fleet_client(fleet).deploy(sha, ["cam-1"])
    refused(fleet, device, dep["id"], "removed", running)


# --- the positive paths ----------------------------------------------------------------------------------
@pytest.fixture
def fresh_device(tmp_path, fleet, request):
    """A new device (its id from the test's name: each test its own retained desired)."""
    device_id = {"test_key_rotation_without_a_refused_update": "cam-9"}.get(request.node.name, "cam-10")
    cfg = agent_config(fleet, tmp_path / device_id, device_id, api="127.0.0.1:0", telemetry_interval_s=0.5,
                       rollback_window_s=0)
    agent = Agent(cfg)
    agent.start()
    yield agent
    agent.stop()


def active(client, dep_id):
    row = client.deployment(dep_id)["devices"][0]
    assert row["phase"] != "failed", row
    return row["phase"] == "active"


def test_key_rotation_without_a_refused_update(fleet, fresh_device, bundles, tmp_path):
    """The old key vouches for a new one; the controller passes the statement on with the next desired; a
    bundle signed by the new key only is accepted, and the device names the key that signed what it runs."""
    client = fleet_client(fleet)
    old, _ = release_key()
    new_key, new_pub = signing.generate(tmp_path, "rotated")
    st = signing.add_statement(old, signing.load_public(new_pub), time.time())
    client.add_key(new_pub.read_text(), name="rotated", statement=msgspec.to_builtins(st))
    path = resign(bundles["v2"], tmp_path / "rotated.tar", signing.load_private(new_key), version="rotated",
                  serial=5)
    sha = client.upload_bundle(path)["sha256"]
    dep = client.deploy(sha, ["cam-9"])
    wait_for(lambda: active(client, dep["id"]), TIMEOUT, what="the bundle signed by the new key active")
    new_id = signing.load_public(new_pub).keyid
    assert fresh_device.engine.current.signed_by == new_id
    assert any(r["keyid"] == new_id and r["trusted"] for r in fresh_device.trust.listing())
    signer = wait_for(lambda: (s := client.health("cam-9").get("signer") or {}).get("keyid") == new_id and s,
                      TIMEOUT, what="the controller to show the signer")
    assert (signer["name"], signer["serial"], signer["source"]) == ("rotated", 5, "device")


def test_a_rollback_signed_by_the_controller_may_lower_the_serial(fleet, fresh_device, bundles):
    """v1 (serial 1) then v2 (serial 2); a plain deploy of v1 is refused, the same as a signed rollback is
    accepted (the device ran v1 before)."""
    client = fleet_client(fleet)
    v1 = client.upload_bundle(bundles["v1"])["sha256"]
    v2 = client.upload_bundle(bundles["v2"])["sha256"]
    for sha in (v1, v2):
        dep = client.deploy(sha, ["cam-10"])
        wait_for(lambda: active(client, dep["id"]), TIMEOUT, what="active")
    dep = client.deploy(v1, ["cam-10"])
    wait_for(lambda: client.deployment(dep["id"])["devices"][0]["phase"] == "failed", TIMEOUT, what="refusal")
    dep = client.deploy(v1, ["cam-10"], rollback=True)
    wait_for(lambda: active(client, dep["id"]), TIMEOUT, what="the signed rollback active")
    assert fresh_device.engine.current.sha == v1
