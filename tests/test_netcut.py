"""A network cut to one device: the agent runs in a network namespace of its own, joined to the
controller's by a veth pair, and the test pulls the cable (sets the link down). The controller marks the
device offline within its heartbeat timeout, and when the link returns the device catches up on what it
produced meanwhile. Only addresses of the test's own namespaces are used."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from util import fleet_client, wait_for, release_pub

from agent.config import dumps


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def netns():
    """(namespace, host-side interface, host address, device address) of a fresh namespace."""
    tag = f"{os.getpid() % 10000}"
    ns, host_if, dev_if = f"ef-test-{tag}", f"efh{tag}", f"efd{tag}"
    net = f"10.231.{os.getpid() % 250}"
    try:
        _ip("netns", "add", ns)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"cannot create a network namespace here (needs root and iproute2): {e}")
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", dev_if)
        _ip("link", "set", dev_if, "netns", ns)
        _ip("addr", "add", f"{net}.1/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{net}.2/30", "dev", dev_if)
        _ip("netns", "exec", ns, "ip", "link", "set", dev_if, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, host_if, f"{net}.1"
    finally:
        _ip("link", "del", host_if, check=False)
        _ip("netns", "del", ns, check=False)


@pytest.mark.slow
def test_a_cut_device_goes_offline_and_catches_up(tmp_path, netns, bundles):
    from fleet.app import Fleet
    from util import agent_config

    ns, host_if, host_addr = netns
    fleet = Fleet(tmp_path / "fleet", release_keys=[release_pub()],
                  http_host=host_addr, http_port=0, mqtt_listen=f"{host_addr}:0")
    fleet.start_background()
    agent = None
    try:
        client = fleet_client(fleet)
        cfg = agent_config(fleet, tmp_path / "cam-9", "cam-9", api="127.0.0.1:8470", telemetry_interval_s=0.5,
                           keepalive_s=5)
        (tmp_path / "agent.toml").write_text(dumps(cfg))
        agent = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "edgefleet.cli", "agent", "run",
                                  "--config", str(tmp_path / "agent.toml")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        sha = client.upload_bundle(bundles["v1"])["sha256"]
        client.deploy(sha, ["cam-9"])
        wait_for(lambda: (client.health() or [{}])[0].get("model") and client.health()[0]["model"]["sha256"] == sha,
                 timeout=60, what="the device online with v1")
        before = client.health("cam-9")

        _ip("link", "set", host_if, "down")  # the cable is pulled
        # offline by the heartbeat timeout (3 telemetry intervals) or the last will (about 1.5 keepalives)
        wait_for(lambda: client.health("cam-9")["online"] is False, timeout=60, what="offline")
        time.sleep(3)  # the device keeps measuring while cut off

        _ip("link", "set", host_if, "up")
        after = wait_for(lambda: (h := client.health("cam-9"))["online"] and h["last_seen"] > before["last_seen"] + 3
                         and h, timeout=90, what="back online")
        assert after["model"]["sha256"] == sha
        # nothing it produced while cut off was lost: every seq arrived
        caught_up = wait_for(lambda: (h := client.health("cam-9")).get("seq_gaps") == 0 and h, timeout=60,
                             what="no gaps in the device's messages")
        assert caught_up["duplicates"] >= 0
    finally:
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(timeout=20)
            except subprocess.TimeoutExpired:
                agent.kill()
        fleet.stop()
