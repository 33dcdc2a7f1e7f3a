"""Updates that cannot strand a device: bad bundles refused, crashes at every step of an update survived,
a misbehaving new model rolled back by itself. Real agents (processes where a kill matters), a real
controller and mosquitto, real models."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import OUTPUT
from util import fleet_client, wait_for, release_pub

from agent import bundle, faults, protocol
from agent.api import AgentClient
from agent.config import AgentConfig, dumps
from agent.daemon import Agent


@pytest.fixture
def fleet(tmp_path):
    from fleet.app import Fleet

    f = Fleet(tmp_path / "fleet", release_keys=[release_pub()],
              http_port=0, mqtt_listen="127.0.0.1:0").start_background()
    yield f
    f.stop()


def _config(tmp_path, fleet, port, **kw) -> AgentConfig:
    from util import agent_config

    return agent_config(fleet, tmp_path / "dev-1", "dev-1", api=f"127.0.0.1:{port}", telemetry_interval_s=0.5, **kw)


def _client(fleet):

    return fleet_client(fleet)


def _deploy(fleet, path) -> str:
    client = _client(fleet)
    sha = client.upload_bundle(path)["sha256"]
    client.deploy(sha, ["dev-1"])
    return sha


def _events(fleet, kind=None, sha=None):
    return [e for e in _client(fleet).health("dev-1")["events"]
            if (kind is None or e["kind"] == kind) and (sha is None or e["sha256"] == sha)]


def _verified(state_dir: Path, clean: bool = True) -> str:
    """The sha256 `current` names, after checking every file of it against its manifest (and, unless a
    crash has just happened, that no half-unpacked directory is left)."""
    current = (state_dir / "current").resolve()
    manifest = bundle.decode_manifest((current / bundle.MANIFEST).read_bytes())
    for f in manifest.files:
        bundle.verify_file(current / f.path, f.size, f.sha256)
    if clean:
        assert not list((state_dir / "models").glob(".*.part")), "a half-unpacked directory was left"
    return current.name


# ---- bad bundles: refused, reported, the previous model keeps serving ---------------------------------


@pytest.fixture
def running(tmp_path, fleet, free_port, bundles):
    """An in-process agent serving v1."""
    agent = Agent(_config(tmp_path, fleet, free_port))
    agent.start()
    good = _deploy(fleet, bundles["v1"])
    wait_for(lambda: agent.engine.current and agent.engine.current.sha == good, what="v1 active")
    yield agent, good
    agent.stop()


def _serve_as_is(fleet, data: bytes, version: str = "evil") -> protocol.Desired:
    """Put bytes in the controller's bundle store unchecked (a broken or compromised server) and point
    the device at them."""
    sha = __import__("hashlib").sha256(data).hexdigest()
    (fleet.data_dir / "bundles").mkdir(exist_ok=True)
    (fleet.data_dir / "bundles" / f"{sha}.tar").write_bytes(data)
    desired = protocol.Desired(deployment_id=f"dep-{version}", name="ocr-cls", version=version,
                               url=f"{fleet.http_url}/bundles/{sha}", sha256=sha, size=len(data))
    fleet.link.publish_desired("dev-1", desired)
    return desired


def _evil_tar(good: Path, member: tarfile.TarInfo, payload: bytes | None = b"x") -> bytes:
    manifest = bundle.read_manifest(good)
    data = bundle.encode_manifest(manifest)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar, tarfile.open(good) as src:
        info = tarfile.TarInfo(bundle.MANIFEST)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for m in src.getmembers():
            if m.name != bundle.MANIFEST:
                tar.addfile(m, src.extractfile(m))
        if payload is not None:
            member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("case,reason", [
    ("truncated", "size mismatch"),
    ("corrupted byte", "sha256 mismatch"),
    ("dot-dot path", "unsafe path"),
    ("absolute path", "unsafe path"),
    ("symlink", "not a regular file"),
    ("hard link", "not a regular file"),
    ("nan output", "not finite"),
    ("over latency budget", "latency budget"),
])
def test_a_bad_bundle_is_refused_and_the_previous_model_keeps_serving(running, fleet, bundles, crops, case, reason):
    agent, good = running
    if case in ("truncated", "corrupted byte"):
        sha = _client(fleet).upload_bundle(bundles["v2"])["sha256"]
        stored = fleet.data_dir / "bundles" / f"{sha}.tar"
        data = bytearray(stored.read_bytes())
        if case == "truncated":
            stored.write_bytes(bytes(data[: len(data) // 2]))
        else:
            data[len(data) // 2] ^= 0x01
            stored.write_bytes(bytes(data))
        _client(fleet).deploy(sha, ["dev-1"])
        bad = sha
    elif case in ("nan output", "over latency budget"):
        bad = _deploy(fleet, bundles["nan" if case == "nan output" else "slow"])
    else:
        member = {"dot-dot path": tarfile.TarInfo("../../escape.txt"),
                  "absolute path": tarfile.TarInfo("/tmp/edgefleet-escape.txt"),
                  "symlink": _link("evil-link", "/etc/passwd"),
                  "hard link": _link("evil-hard", "/etc/passwd", tarfile.LNKTYPE)}[case]
        payload = None if member.issym() or member.islnk() else b"escaped"
        bad = _serve_as_is(fleet, _evil_tar(bundles["v2"], member, payload)).sha256
    failed = wait_for(lambda: _events(fleet, "failed", bad), what="a failed event")
    assert reason in failed[0]["reason"]
    assert agent.engine.current.sha == good
    assert _verified(agent.store.root) == good
    assert not (agent.store.models / bad).exists()
    assert not Path("/tmp/edgefleet-escape.txt").exists()
    assert not list(agent.store.root.parent.glob("escape.txt"))
    out = AgentClient(agent.api.address).infer({"x": crops[0][:1]})
    assert out[OUTPUT].shape == (1, 2)


# ---- the new model on probation: rolled back by itself ------------------------------------------------


def test_a_slow_new_model_is_rolled_back_after_real_traffic(tmp_path, fleet, free_port, bundles, crops):
    # v1 serves; v2 passes its smoke test, then the limit is crossed on real traffic
    agent = Agent(_config(tmp_path, fleet, free_port, rollback_max_p95_ms=0.0001, rollback_min_inferences=10))
    agent.start()
    try:
        v1 = _deploy(fleet, bundles["v1"])
        wait_for(lambda: agent.engine.current and agent.engine.current.sha == v1, what="v1 active")
        v2 = _deploy(fleet, bundles["v2"])
        wait_for(lambda: agent.engine.current.sha == v2, what="v2 active")
        client = AgentClient(agent.api.address)
        for i in range(12):
            client.infer({"x": crops[0][i : i + 1]})
        back = wait_for(lambda: _events(fleet, "rolled_back", v2), what="rolled_back event")
        assert "p95 latency" in back[0]["reason"] and "back on 1" in back[0]["reason"]
        assert agent.engine.current.sha == v1 and _verified(agent.store.root) == v1
        assert client.infer({"x": crops[0][:1]})[OUTPUT].shape == (1, 2)
        health = wait_for(lambda: (h := _client(fleet).health("dev-1"))["model"]["sha256"] == v1 and h,
                          what="the controller to see v1 again")
        assert health["deployment"]["phase"] == "rolled_back"
    finally:
        agent.stop()


def test_the_rollback_command(running, fleet, bundles):
    agent, v1 = running
    v2 = _deploy(fleet, bundles["v2"])
    wait_for(lambda: agent.engine.current.sha == v2, what="v2 active")
    fleet.link.publish_cmd("dev-1", protocol.Cmd(id="c1", kind="rollback"))
    wait_for(lambda: agent.engine.current.sha == v1, what="rollback")
    assert "rollback command c1" in wait_for(lambda: _events(fleet, "rolled_back", v2), what="event")[0]["reason"]


# ---- SIGKILL at every step of an update ----------------------------------------------------------------


def _spawn(cfg_path: Path, pause: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    if pause:
        env[faults.ENV] = pause
    return subprocess.Popen([sys.executable, "-m", "edgefleet.cli", "agent", "run", "--config", str(cfg_path)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)


def _health_sha(fleet):
    h = _client(fleet).health()
    return h[0]["model"]["sha256"] if h and h[0]["model"] else None


@pytest.mark.slow
@pytest.mark.parametrize("step", faults.STEPS)
def test_killed_at_every_step_of_an_update_it_ends_verified_and_tells_the_truth(tmp_path, fleet, free_port,
                                                                                  bundles, step):
    cfg = _config(tmp_path, fleet, free_port, rollback_window_s=0)
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text(dumps(cfg))
    state = Path(cfg.state_dir)
    proc = _spawn(cfg_path)
    try:
        v1 = _deploy(fleet, bundles["v1"])
        wait_for(lambda: _health_sha(fleet) == v1, what="v1 active")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

        proc = _spawn(cfg_path, pause=step)
        wait_for(lambda: _client(fleet).health("dev-1")["online"], what="back online")
        v2 = _deploy(fleet, bundles["v2"])
        wait_for(lambda: (state / f"paused-at-{step}").exists(), what=f"the agent to reach {step}")
        proc.kill()  # SIGKILL: no goodbye, no cleanup
        proc.wait(timeout=30)
        (state / f"paused-at-{step}").unlink()

        on_disk = (state / "current").resolve().name
        assert on_disk in (v1, v2)  # whatever the kill hit, `current` names a whole model
        _verified(state, clean=False)

        proc = _spawn(cfg_path)  # restart, as systemd would
        # the retained desired state is v2: the device converges on it and says so
        wait_for(lambda: _health_sha(fleet) == v2, timeout=90, what="v2 active after the restart")
        assert _verified(state) == v2
        actives = wait_for(lambda: _events(fleet, "active", v2), what="the active event")
        assert all(e["deployment_id"] for e in actives)
        assert not _events(fleet, "failed", v2)
        assert AgentClient(cfg.api).status()["active"]["sha256"] == v2
        if step == "downloading":  # the half-done download was resumed, not restarted
            assert (state / "downloads" / f"{v2}.tar").exists() or not list((state / "downloads").glob("*.part"))
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_current_model_that_no_longer_loads_falls_back_to_the_previous(tmp_path, fleet, free_port, bundles):
    cfg = _config(tmp_path, fleet, free_port, rollback_window_s=0)
    agent = Agent(cfg)
    agent.start()
    try:
        v1 = _deploy(fleet, bundles["v1"])
        wait_for(lambda: agent.engine.current and agent.engine.current.sha == v1, what="v1")
        v2 = _deploy(fleet, bundles["v2"])
        wait_for(lambda: agent.engine.current.sha == v2, what="v2")
    finally:
        agent.stop()
    (Path(cfg.state_dir) / "models" / v2 / "model.onnx").write_bytes(b"rotten by a bad disk")
    agent = Agent(cfg)
    agent.start()
    try:
        assert agent.engine.current.sha == v1
        assert _verified(Path(cfg.state_dir)) == v1
        back = wait_for(lambda: _events(fleet, "rolled_back"), what="rolled_back event")
        assert "no longer loads" in back[0]["reason"]
    finally:
        agent.stop()
