"""`edgefleet convert --target all` on the real model, and every bundle it writes deployed to a real agent
(through a real controller and mosquitto), activated and serving: the onnxruntime, openvino and tflite
runtime plugins each on the device path."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from util import fleet_client, wait_for, release_pub

from agent.api import AgentClient
from agent.bundle import read_manifest
from agent.daemon import Agent

OUTPUT = "save_infer_model/scale_0.tmp_1"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from edgefleet.data import text_direction
    from edgefleet.models import model_path

    d = tmp_path_factory.mktemp("all")
    x, labels = text_direction(60)
    np.savez(d / "calib.npz", x=x)
    proc = subprocess.run(
        [sys.executable, "-m", "edgefleet.cli", "convert", str(model_path("ocr-cls")), "--target", "all",
         "--calib", str(d / "calib.npz"), "--input-shape", "x=1x3x48x192", "--out", str(d / "out"), "--json",
         "--name", "ocr-cls"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    from agent.bundle import sign_bundle
    from util import release_key

    for path in (d / "out").glob("*.tar"):  # signed as a build host would (`edgefleet sign`)
        sign_bundle(path, release_key()[0])
    import onnxruntime as ort

    reference = ort.InferenceSession(str(model_path("ocr-cls")), providers=["CPUExecutionProvider"]).run(
        [OUTPUT], {"x": x[-12:]})[0]
    return d / "out", json.loads(proc.stdout), x, reference


@pytest.mark.slow
def test_target_all_builds_every_target(converted):
    out, report, _, _ = converted
    assert report["skipped"] == []
    built = {(v["target"], v["variant"]) for v in report["variants"]}
    assert {("cpu", "fp32"), ("cpu", "int8"), ("intel", "ov-fp16"), ("intel", "ov-int8"), ("arm", "tflite-fp32"),
            ("arm", "tflite-fp16"), ("arm", "tflite-int8"), ("arm", "ort-int8-arm")} <= built
    assert {v["runtime"] for v in report["variants"]} == {"onnxruntime", "openvino", "tflite"}
    for v in report["variants"]:
        assert v["agreement"]["top1"] >= 0.9, v["variant"]
        assert (out / v["bundle"]).exists()
    html = (out / "report.html").read_text()
    for t in ("cpu/int8", "intel/ov-int8", "arm/tflite-int8"):
        assert t in html
    m = read_manifest(out / "ocr-cls-1-intel-ov-int8.tar")
    assert m.report["host"]["flags"] and m.report["calibration"]["sha256"] and m.source_sha256
    assert "openvino" in json.dumps(m.report["recipe"]) and m.report["toolchain"]["onnxruntime"]


@pytest.fixture
def fleet(tmp_path):
    from fleet.app import Fleet

    f = Fleet(tmp_path / "fleet", release_keys=[release_pub()],
              http_port=0, mqtt_listen="127.0.0.1:0").start_background()
    yield f
    f.stop()


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["cpu-int8", "intel-ov-int8", "intel-ov-fp16", "arm-tflite-int8",
                                    "arm-tflite-fp16", "arm-ort-int8-arm"])
def test_every_runtime_serves_on_the_agent(converted, fleet, tmp_path, free_port, bundle):
    from util import agent_config

    out, _, x, reference = converted
    agent = Agent(agent_config(fleet, tmp_path / "dev", "dev-1", api=f"127.0.0.1:{free_port}",
                               telemetry_interval_s=1.0))
    agent.start()
    try:
        client = fleet_client(fleet)
        sha = client.upload_bundle(out / f"ocr-cls-1-{bundle}.tar")["sha256"]
        client.deploy(sha, ["dev-1"])
        wait_for(lambda: agent.engine.current and agent.engine.current.sha == sha, timeout=120, what="activation")
        api = AgentClient(agent.api.address)
        got = np.concatenate([api.infer({"x": x[i : i + 1]})[OUTPUT] for i in range(len(x) - 12, len(x))])
        from agent import runtimes

        assert agent.engine.current.manifest.runtime in runtimes.available()
        assert got.shape == (12, 2) and np.isfinite(got).all() and np.allclose(got.sum(1), 1, atol=1e-2)
        assert (got.argmax(1) == reference.argmax(1)).mean() >= 0.9  # served by the device as converted
        status = api.status()
        assert status["active"]["sha256"] == sha
    finally:
        agent.stop()
