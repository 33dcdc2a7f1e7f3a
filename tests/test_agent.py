"""The agent on real parts: a real controller and mosquitto, a real model in ONNX Runtime."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from util import agent_config, fleet_client, wait_for, release_pub

from agent import protocol
from agent.api import AgentClient
from agent.daemon import Agent
from agent.errors import EdgefleetError

OUTPUT = "save_infer_model/scale_0.tmp_1"




@pytest.fixture
def fleet(tmp_path):
    from fleet.app import Fleet

    f = Fleet(tmp_path / "fleet", release_keys=[release_pub()],
              http_port=0, mqtt_listen="127.0.0.1:0").start_background()
    yield f
    f.stop()


def _config(tmp_path, fleet, free_port, device_id="dev-1", **kw):
    return agent_config(fleet, tmp_path / device_id, device_id, api=f"127.0.0.1:{free_port}", **kw)


@pytest.fixture
def agent(tmp_path, fleet, free_port):
    a = Agent(_config(tmp_path, fleet, free_port))
    a.start()
    yield a
    a.stop()


def deploy(fleet, path, device="dev-1"):

    client = fleet_client(fleet)
    sha = client.upload_bundle(path)["sha256"]
    return client.deploy(sha, [device]), sha


def events(fleet, device="dev-1"):

    return fleet_client(fleet).health(device)["events"]


def test_deploy_activates_serves_and_reports(fleet, agent, bundles, crops):
    _, sha = deploy(fleet, bundles["v1"])
    wait_for(lambda: agent.engine.current and agent.engine.current.sha == sha, what="activation")
    assert (agent.store.root / "current").resolve().name == sha

    x, labels = crops
    client = AgentClient(agent.api.address)
    right = sum(int(client.infer({"x": x[i : i + 1]})[OUTPUT].argmax(1)[0] == labels[i]) for i in range(len(x)))
    assert right / len(x) > 0.85  # the real model reads the real text's direction


    health = wait_for(lambda: (h := fleet_client(fleet).health("dev-1"))["inferences"] >= len(x) and h,
                      what="telemetry")
    assert health["online"] is True
    assert health["model"]["version"] == "1" and health["model"]["sha256"] == sha
    kinds = [e["kind"] for e in events(fleet)]
    assert {"downloading", "verifying", "activating", "active"} <= set(kinds)
    assert health["latency_ms"]["p50"] > 0 and health["rss_bytes"] > 0 and health["cpu_percent"] is not None
    # what really runs it (issue 14), and what each runtime could use here (listed once, in a child process)
    assert agent.status()["active"]["serving"] == {"device": "CPU", "provider": "CPUExecutionProvider",
                                                   "fallback": ""}
    assert agent._birth().active.serving == protocol.Serving(device="CPU", provider="CPUExecutionProvider")
    wait_for(lambda: agent.status()["devices"], what="the runtimes' devices")
    from agent import runtimes

    assert agent._birth().devices == runtimes.devices()


def test_bad_input_is_refused_and_counted(agent, fleet, bundles):
    deploy(fleet, bundles["v1"])
    wait_for(lambda: agent.engine.current, what="activation")
    client = AgentClient(agent.api.address)
    with pytest.raises(EdgefleetError, match="shape"):
        client.infer({"x": np.zeros((1, 3, 48, 100), np.float32)})
    with pytest.raises(EdgefleetError, match="float32"):
        client.infer({"x": np.zeros((1, 3, 48, 192), np.float64)})
    with pytest.raises(EdgefleetError, match="do not match"):
        client.infer({"y": np.zeros((1, 3, 48, 192), np.float32)})
    count, errors, _, _ = agent.engine.window.snapshot()
    assert count == 0 and errors == {"bad_input": 3}


def test_an_accelerator_lost_at_run_time_is_an_event_and_the_state_names_the_cpu(agent, fleet, bundles, crops):
    """Issue 14: the model's accelerator dies under a request (a stand-in: this machine has none); the application
    still gets its answer, the controller gets an error event, and the device's state says the CPU serves now."""
    from test_accelerators import DyingAccelerator, put_on

    _, sha = deploy(fleet, bundles["v1"])
    wait_for(lambda: agent.engine.current and agent.engine.current.sha == sha, what="activation")
    model = agent.engine.current
    put_on(model, DyingAccelerator(model.session, works=1))
    agent.link.publish_state()
    wait_for(lambda: (fleet_client(fleet).health("dev-1")["serving"] or {}).get("device") == "GPU",
             what="the state naming the GPU")
    client = AgentClient(agent.api.address)
    x, _ = crops
    for i in range(3):
        assert client.infer({"x": x[i:i + 1]})[OUTPUT].shape == (1, 2)  # the second meets the loss: run again
    error = wait_for(lambda: [e for e in events(fleet) if e["kind"] == "error" and "falls back" in e["reason"]],
                     what="the fallback event")
    assert error[0]["reason"].startswith(f"model ocr-cls 1 ({sha[:12]}) falls back to the CPU: GPU "
                                         f"(CUDAExecutionProvider) failed at run time: RuntimeError: CUDA failure 999")
    serving = wait_for(lambda: (s := fleet_client(fleet).health("dev-1")["serving"]) and s["device"] == "CPU" and s,
                       what="the state naming the CPU")
    assert serving["provider"] == "CPUExecutionProvider" and "failed at run time" in serving["fallback"]
    assert agent.engine.window.snapshot()[1] == {}  # no request failed


@pytest.mark.parametrize("which,reason", [("slow", "latency budget"), ("badshape", "shape")])
def test_a_bad_update_fails_and_the_previous_model_keeps_serving(agent, fleet, bundles, crops, which, reason):
    _, good = deploy(fleet, bundles["v1"])
    wait_for(lambda: agent.engine.current and agent.engine.current.sha == good, what="v1 active")
    dep, bad = deploy(fleet, bundles[which])
    failed = wait_for(lambda: [e for e in events(fleet) if e["kind"] == "failed" and e["sha256"] == bad],
                      what="failed event")
    assert reason in failed[0]["reason"]
    assert agent.engine.current.sha == good
    assert (agent.store.root / "current").resolve().name == good
    assert not (agent.store.models / bad).exists()
    out = AgentClient(agent.api.address).infer({"x": crops[0][:1]})
    assert out[OUTPUT].shape == (1, 2)


def test_a_bundle_whose_sha256_does_not_match_is_refused(agent, fleet, bundles):
    """The controller says one sha256, the bytes it serves have another: refused, reported, nothing kept."""

    client = fleet_client(fleet)
    real = client.upload_bundle(bundles["v1"])
    liar = protocol.Desired(deployment_id="dep-liar", name="ocr-cls", version="1",
                            url=f"{fleet.http_url}/bundles/{real['sha256']}", sha256="0" * 64, size=real["size"])
    fleet.link.publish_desired("dev-1", liar)
    failed = wait_for(lambda: [e for e in events(fleet) if e["kind"] == "failed"], what="failed event")
    assert "sha256 mismatch" in failed[0]["reason"]
    assert agent.engine.current is None
    assert not list(agent.store.downloads.iterdir())


def test_restart_serves_the_current_model_from_disk(tmp_path, fleet, bundles, free_port, crops):
    cfg = _config(tmp_path, fleet, free_port)
    a = Agent(cfg)
    a.start()
    try:
        _, sha = deploy(fleet, bundles["v2"])
        wait_for(lambda: a.engine.current and a.engine.current.sha == sha, what="activation")
    finally:
        a.stop()
    b = Agent(cfg)
    b.start()
    try:
        assert b.engine.current.sha == sha  # loaded before any message from the broker
        assert AgentClient(b.api.address).infer({"x": crops[0][:1]})[OUTPUT].shape == (1, 2)
    finally:
        b.stop()


def _run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "edgefleet.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("body,needle", [
    ('state_dir = "/tmp/s"\ncolour = 1\n', "unknown field `colour`"),
    ('state_dir = "/tmp/s"\ntelemetry_interval_s = "often"\n', "telemetry_interval_s"),
    ('device_id = "d"\n', "missing required field `state_dir`"),
    ('device_id = "a/b"\nstate_dir = "/tmp/s"\n', "device_id"),
    ('device_id = "{serial}"\nstate_dir = "/tmp/s"\n', "unknown field {serial}"),
    ('state_dir = "/tmp/s"\nbroker = "http://x"\n', "mqtts://"),
    ('state_dir = "/tmp/s"\nbroker = "mqtt://127.0.0.1:1"\n', "plaintext"),
    ('state_dir = "/tmp/s"\ncontroller = "http://x"\n', "plaintext http"),
    ('state_dir = "/tmp/s"\ntls_cert = "/x.crt"\n', "tls_cert and tls_key"),
    ('state_dir = "/tmp/s"\nca_fingerprint = "ab:cd"\n', "fingerprint"),
    ('state_dir = "/tmp/s"\nprovision_token_file = "/t"\n', "provision_token_file needs"),
    ('state_dir = "/tmp/s"\ninsecure = true\n', "insecure = true needs"),
    ("this is [not toml", "not valid TOML"),
])
def test_config_errors_are_one_line_naming_the_field(tmp_path, body, needle):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(body)
    r = _run_cli("agent", "run", "--config", str(cfg))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr


def test_a_missing_config_or_an_unenrolled_device_fails_at_once(tmp_path):
    r = _run_cli("agent", "run", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and "not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "s"}"\napi = "127.0.0.1:0"\n')
    r = _run_cli("agent", "run", "--config", str(cfg))
    assert r.returncode == 2 and "not enrolled" in r.stderr and "edgefleet agent enroll" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    cfg.write_text(f'state_dir = "{tmp_path / "s"}"\napi = "127.0.0.1:0"\ncontroller = "https://127.0.0.1:1"\n'
                   f'device_id = "cam-{{mac}}"\nca_fingerprint = "{"ab" * 32}"\n'
                   f'provision_token_file = "{tmp_path / "missing.token"}"\n')
    r = _run_cli("agent", "run", "--config", str(cfg))  # first boot, but the token file is not there
    assert r.returncode == 2 and "provision_token_file" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_infer_cli_against_a_running_agent(agent, fleet, bundles, crops, tmp_path):
    deploy(fleet, bundles["v1"])
    wait_for(lambda: agent.engine.current, what="activation")
    np.savez(tmp_path / "in.npz", x=crops[0][:2])
    r = _run_cli("agent", "infer", "--api", agent.api.address, "--input", str(tmp_path / "in.npz"), "--json")
    assert r.returncode == 0, r.stderr
    import json

    out = np.array(json.loads(r.stdout)[OUTPUT])
    assert out.shape == (2, 2) and np.allclose(out.sum(1), 1, atol=1e-4)
    r = _run_cli("agent", "infer", "--api", agent.api.address, "--input", str(tmp_path / "missing.npz"))
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
