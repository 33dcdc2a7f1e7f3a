"""The device agent proven on aarch64 (issue 13): the real `edgefleet agent enroll` and `edgefleet agent run`, this
checkout's code, inside the emulated aarch64 (converter/arm64.py: Debian 12 arm64, qemu-user cortex-a76, the
agent's aarch64 runtime wheels), against a real controller and mosquitto on this host over loopback (mutual TLS,
the one-time enrollment token). An `arm` bundle made by the converter and signed with the tests' release key is
deployed to it; the held-out crops are served through its local API from the host.

Checked: the controller sees the device as aarch64; telemetry arrives (the inferences counted, the agent's RSS);
the agent's answers are the bundle's own outputs computed independently inside the emulated aarch64 (the same
top-1 on every crop, floats within 1e-5); and their agreement with the fp32 reference on the held-out crops is the
number in the converter's report. Skipped only when the emulated aarch64 cannot be had here (arm64.unavailable()).
Slow under emulation (the emulated code is ~10-30x slower): waits are bounds of minutes, never timing asserts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from util import fleet_client, release_key, release_pub, wait_for

from converter import arm64

OUTPUT = "save_infer_model/scale_0.tmp_1"
VARIANT = "ort-int8-arm"  # the cheapest real ARM bundle: ONNX Runtime's int8 kernels for ARM64
SAMPLES = 100  # 80 calibrate, 20 held out: the 20 crops the device serves
DEVICE = "arm-1"
EMULATED = 600.0  # bound on one emulated step (enroll, start, load a bundle, one batch of work)
# The converter sets a bundle's latency budget from the build host's speed (20 x its p95, at least 250 ms); the
# agent's smoke test and probation hold the device to it. Emulated code is ~10-30x slower than this host and one
# inference of this classifier takes 100-300 ms there: over the budget, the agent refuses the bundle (rightly). The
# deployed bundle is the converter's, re-signed with a budget for an emulated device (a bound, not a measure).
EMULATED_BUDGET_MS = 60_000.0

pytestmark = pytest.mark.skipif(arm64.unavailable() is not None,
                                reason=f"no emulated aarch64 here: {arm64.unavailable()}")

# the bundle run independently of the agent, in a fresh emulated python: unpacked and loaded the way a device does
# (agent.bundle, agent.runtimes), one crop a run as the API serves them
INDEPENDENT = """
import sys, numpy as np
from pathlib import Path
from agent import bundle, runtimes
tar, crops, out, work = sys.argv[1:5]
manifest = bundle.safe_unpack(Path(tar), Path(work))
session = runtimes.load(Path(work), manifest)
name = manifest.outputs[0].name
x = np.load(crops)["x"]
np.savez(out, y=np.concatenate([session.run({"x": x[i : i + 1]})[name] for i in range(len(x))]))
session.close()
"""


@pytest.fixture(scope="module")
def emulator() -> Path:
    return arm64.ensure()  # made by the set-up; made here (once, ~10 min) if it was not


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The real classifier converted for the arm target, signed with the tests' release key; the ``VARIANT``
    bundle, its report entry, the held-out crops and the fp32 reference's outputs on them."""
    import onnxruntime as ort

    from converter.convert import convert
    from edgefleet.data import text_direction
    from edgefleet.models import model_path

    d = tmp_path_factory.mktemp("arm-bundles")
    x, _ = text_direction(SAMPLES)
    np.savez(d / "calib.npz", x=x)
    report = convert(model_path("ocr-cls"), target="arm", calib=d / "calib.npz", out=d / "out", name="ocr-cls",
                     version="1", input_shapes={"x": [1, 3, 48, 192]}, sign_key=release_key()[0])
    entry = next(v for v in report["variants"] if v["variant"] == VARIANT)
    held = x[SAMPLES - report["calibration"]["held_out_samples"]:]
    reference = ort.InferenceSession(str(model_path("ocr-cls")), providers=["CPUExecutionProvider"]).run(
        [OUTPUT], {"x": held})[0]
    return _with_budget(Path(entry["path"]), d / "emulated", EMULATED_BUDGET_MS), entry, held, reference


def _with_budget(tar: Path, work: Path, budget_ms: float) -> Path:
    """``tar`` with ``budget_ms`` as its latency budget, signed again with the release key (same serial); every
    other byte of every file as the converter wrote it."""
    import msgspec

    from agent import bundle

    work.mkdir()
    manifest = bundle.safe_unpack(tar, work / "files")
    out = work / tar.name
    bundle.write_bundle(out, msgspec.structs.replace(manifest, latency_budget_ms=budget_ms),
                        {f.path: work / "files" / f.path for f in manifest.files}, sign_key=release_key()[0],
                        serial=manifest.serial)
    assert bundle.read_manifest(out).model == manifest.model
    return out


@pytest.fixture
def fleet(tmp_path):
    from fleet.app import Fleet

    f = Fleet(tmp_path / "fleet", release_keys=[release_pub()], http_port=0,
              mqtt_listen="127.0.0.1:0").start_background()
    yield f
    f.stop()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the agent's process group (proot, the emulated python), SIGKILL if it has not gone in a minute."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:  # whatever the emulation left in the group (nothing, when the agent stopped as it should)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_the_agent_serves_an_arm_bundle_on_aarch64(emulator, converted, fleet, tmp_path, free_port):
    from agent.api import AgentClient

    t0 = time.monotonic()
    tar, entry, held, reference = converted
    binds = {tmp_path: str(tmp_path)}  # the same path on both sides: agent.toml's paths work in the guest as here
    state = tmp_path / DEVICE
    state.mkdir()
    api = f"127.0.0.1:{free_port}"
    config = state / "agent.toml"
    config.write_text(f'state_dir = "{state}"\napi = "{api}"\ntelemetry_interval_s = 1.0\n'
                      f'trust_dir = "{state / "trust"}"\n')
    pub = tmp_path / "release.pub"
    shutil.copy(release_pub(), pub)

    # enrollment as on a device: the administrator's one-time token, the device's own key, the pinned CA
    token = fleet.enrollment.create_token(device_id=DEVICE)
    enrolling = time.monotonic()
    enrolled = arm64.run(["python", "-m", "edgefleet.cli", "agent", "enroll", "--controller", token["controller"],
                          "--token", token["token"], "--ca-fingerprint", token["ca_fingerprint"],
                          "--config", str(config), "--trust", str(pub)],
                         binds=binds, capture_output=True, text=True, timeout=EMULATED)
    assert enrolled.returncode == 0, enrolled.stderr
    assert f"enrolled as {DEVICE}" in enrolled.stdout
    enroll_s = time.monotonic() - enrolling

    client = fleet_client(fleet)
    log = open(tmp_path / "agent.log", "w")
    started = time.monotonic()
    agent = subprocess.Popen(arm64.command(["python", "-m", "edgefleet.cli", "agent", "run", "--config", str(config)],
                                           binds=binds),
                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        def online():
            assert agent.poll() is None, f"the agent exited with {agent.returncode}: {_tail(tmp_path / 'agent.log')}"
            return next((d for d in client.devices() if d["id"] == DEVICE and d["online"]), None)

        device = wait_for(online, EMULATED, what="the emulated agent online", every=1.0)
        online_s = time.monotonic() - started
        sha = client.upload_bundle(tar)["sha256"]
        client.deploy(sha, [DEVICE])
        local = AgentClient(api, timeout=EMULATED)
        wait_for(lambda: (local.status().get("active") or {}).get("sha256") == sha, EMULATED,
                 what=f"the {VARIANT} bundle active on the emulated agent", every=1.0)
        served = np.concatenate([local.infer({"x": held[i : i + 1]})[OUTPUT] for i in range(len(held))])
        local.close()
        health = wait_for(lambda: (h := client.health(DEVICE))["inferences"] >= len(held) and h["rss_bytes"] and h,
                          EMULATED, what="the agent's telemetry counting the inferences", every=1.0)
    finally:
        _stop(agent)
        log.close()
    assert agent.returncode == 0, _tail(tmp_path / "agent.log")  # it stopped cleanly on SIGTERM

    # the bundle's outputs on the same crops, computed apart from the agent inside the emulated aarch64
    np.savez(tmp_path / "held.npz", x=held)
    shutil.copy(tar, tmp_path / tar.name)  # where the guest sees it
    independent = arm64.run(["python", "-c", INDEPENDENT, str(tmp_path / tar.name), str(tmp_path / "held.npz"),
                             str(tmp_path / "independent.npz"), str(tmp_path / "unpacked")],
                            binds=binds, capture_output=True, text=True, timeout=EMULATED)
    assert independent.returncode == 0, independent.stderr
    expected = np.load(tmp_path / "independent.npz")["y"]

    # the device is an aarch64 one, as it says and as the controller recorded
    assert device["arch"] == "aarch64" and health["identity"]["arch"] == "aarch64"
    assert "onnxruntime" in device["runtimes"]
    assert health["model"]["sha256"] == sha and health["model"]["precision"] == "int8"
    # telemetry: every inference counted, none failed, the agent's own RSS and latency
    assert health["inferences"] == len(held) and health["errors"] == 0
    assert health["rss_bytes"] > 10 << 20 and health["latency_ms"]["p50"] > 0
    # the agent's answers are the bundle's outputs on ARM kernels
    assert served.shape == expected.shape == (len(held), 2)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
    assert (served.argmax(1) == expected.argmax(1)).all()
    # and they agree with the fp32 reference as often as the converter's report says
    agreement = float((served.argmax(1) == reference.argmax(1)).mean())
    assert agreement == pytest.approx(entry["agreement"]["outputs"][OUTPUT]["top1"]), (
        f"on the device {agreement}, in the report {entry['agreement']['outputs'][OUTPUT]['top1']}")
    print(f"\naarch64 agent: enrolled in {enroll_s:.0f} s, online {online_s:.0f} s after start, "
          f"RSS {health['rss_bytes'] / 2**20:.0f} MiB, "
          f"p50 {health['latency_ms']['p50']:.0f} ms (emulated), top-1 agreement {agreement:.2f}, "
          f"test {time.monotonic() - t0:.0f} s")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return str(e)
