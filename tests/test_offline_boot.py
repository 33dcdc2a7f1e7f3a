"""A device that boots with no network: it serves its model from disk at once, tells systemd it is ready, says
why it cannot reach its broker (or its controller, at first boot), and connects, enrolls and delivers what it
queued when the network comes. Real processes, a real mosquitto stopped and started on one port, a real
controller, a real model; no timing thresholds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from test_outage import has_all, outbox_on_disk, received
from test_systemd import NotifySocket
from util import agent_config, fleet_client, wait_for, release_pub

from agent.api import AgentClient
from agent.config import AgentConfig, dumps, validate
from agent.daemon import Agent
from fleet.app import Fleet
from fleet.broker import Mosquitto, free_port
from fleet.pki import PKI

OUTPUT = "save_infer_model/scale_0.tmp_1"
DEVICE = "edge-1"  # what test_outage's helpers read


@pytest.fixture
def broker(tmp_path):
    """The fleet's mosquitto on a port of its own, so it can be stopped and started again at the same URL."""
    pki = PKI(tmp_path / "pki").ensure(["localhost", "127.0.0.1"])
    b = Mosquitto(tmp_path / "mosquitto", port=free_port(), pki=pki).start()
    yield b
    b.stop()


@pytest.fixture
def fleet(tmp_path, broker):
    f = Fleet(tmp_path / "fleet", release_keys=[release_pub()],
              broker_url=broker.url, http_port=0, pki_dir=broker.pki.root).start_background()
    yield f
    f.stop()


def _status(api: AgentClient) -> dict:
    """The agent's status, or {} while its API is not up yet."""
    from agent.errors import EdgefleetError

    try:
        return api.status()
    except EdgefleetError:
        return {}


def _run(config: Path, log: Path, notify: NotifySocket) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": notify.address}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "edgefleet.cli", "agent", "run", "--config", str(config)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def test_a_device_boots_with_its_broker_down_serves_at_once_and_delivers_what_it_queued(tmp_path, broker, fleet,
                                                                                       bundles, crops):
    cfg = agent_config(fleet, tmp_path / "device", DEVICE, api=f"unix:{tmp_path}/agent.sock",
                       telemetry_interval_s=0.3)
    config, log = tmp_path / "agent.toml", tmp_path / "agent.log"
    config.write_text(dumps(cfg))
    notify = NotifySocket(f"@edgefleet-test-{uuid.uuid4().hex}")
    proc = _run(config, log, notify)
    client = fleet_client(fleet)
    try:  # a first life with the network: it gets its model
        sha = client.upload_bundle(bundles["v1"])["sha256"]
        client.deploy(sha, [DEVICE])
        api = AgentClient(cfg.api)
        wait_for(lambda: (_status(api).get("active") or {}).get("sha256") == sha if proc.poll() is None else
                 pytest.fail(log.read_text()), what="the model active")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()

        # a power cut: it comes back before the uplink (here: the broker is down)
        broker.stop()
        notify.messages.clear()
        proc = _run(config, log, notify)
        wait_for(lambda: "READY=1" in notify.lines() or proc.poll() is not None, what="READY=1 without a broker")
        assert proc.poll() is None, log.read_text()
        api = AgentClient(cfg.api)
        x, labels = crops
        out = [api.infer({"x": x[i : i + 1]})[OUTPUT] for i in range(20)]  # serving at once, from disk
        assert all(o.shape == (1, 2) for o in out)
        status = api.status()
        assert status["active"]["sha256"] == sha and status["broker_connected"] is False
        wait_for(lambda: "cannot reach broker" in (api.status()["broker_error"] or ""), what="the reason, said")
        assert any(line.startswith("STATUS=serving ocr-cls 1; waiting for") for line in notify.lines())
        # it queues its telemetry meanwhile
        wait_for(lambda: len(outbox_on_disk(Path(cfg.state_dir))[1]) >= 5, what="windows queued offline")
        queued = outbox_on_disk(Path(cfg.state_dir))[0]

        broker.start()  # the uplink returns: it connects by itself, and everything it queued arrives
        wait_for(lambda: has_all(fleet, queued), timeout=120, what="the queued windows at the controller")
        wait_for(lambda: any(line.startswith("STATUS=serving ocr-cls 1; connected to") for line in notify.lines()),
                 what="systemd told it is connected")
        assert api.status()["broker_connected"] is True and api.status()["broker_error"] is None
        assert client.health(DEVICE)["inferences"] >= 20 and proc.poll() is None
        assert "Traceback" not in log.read_text()
        assert all(n == 1 for n in __import__("collections").Counter(s for s, _ in received(fleet)).values())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_first_boot_enrollment_waits_for_the_controller_and_the_agent_serves_meanwhile(tmp_path):
    data, port = tmp_path / "fleet", free_port()

    def controller() -> Fleet:
        return Fleet(data, release_keys=[release_pub()], http_port=port, mqtt_listen="127.0.0.1:0").start_background()

    f = controller()
    token = f.enrollment.create_token(count=1, prefix="cam-", ttl_s=600)
    url = f.http_url
    f.stop()  # the controller's host is down when the device first boots
    (tmp_path / "provision.token").write_text(token["token"])
    agent = Agent(validate(AgentConfig(
        state_dir=str(tmp_path / "device"), api="127.0.0.1:0", device_id="cam-{random}", controller=url,
        ca_fingerprint=token["ca_fingerprint"], provision_token_file=str(tmp_path / "provision.token"))))
    agent.PROVISION_RETRY_S = (0.2, 1.0)
    agent.start()  # returns at once
    f = None
    try:
        api = AgentClient(agent.api.address)
        assert api.status()["enrollment"] == "pending"  # the local API answers before it has an identity
        wait_for(lambda: "cannot reach the controller" in (api.status()["enrollment_error"] or ""),
                 what="why it is not enrolled yet")
        assert agent._wedged() is None  # not a reason for systemd to restart it
        f = controller()  # the controller comes back: the device enrolls and connects by itself
        wait_for(lambda: api.status()["enrollment"] == "enrolled", what="the enrollment")
        wait_for(lambda: agent.link is not None, what="the link the enrolled agent starts")  # right after enrolling
        assert agent.link.wait_connected(60)
        wait_for(lambda: [d["id"] for d in fleet_client(f).devices()] == [agent.config.device_id],
                 what="the device registered")
        assert agent.config.device_id.startswith("cam-") and api.status()["enrollment_error"] is None
    finally:
        agent.stop()
        if f is not None:
            f.stop()
