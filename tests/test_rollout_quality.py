"""Rollouts halted on model quality (issue 12), end to end: a real controller and mosquitto, real agents in-process,
real PP-OCR bundles carrying a reference profile and golden feeds built from the model's own outputs on real text
crops, as the converter builds them.

Each gate catches what the others cannot: the canary a bundle whose runtime does not compute what its fp32
reference did (no traffic needed), drift a device whose outputs leave the reference's distribution, and the
accuracy drop a model whose predictions look as confident as before but are wrong (its label order reversed)."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import onnxruntime as ort
import pytest
from test_rollout_e2e import TIMEOUT, finished, fleet, start_agents  # noqa: F401 (fleet: a fixture)
from util import fleet_client, wait_for

from agent import bundle, quality
from agent.api import AgentClient

OUTPUT = "save_infer_model/scale_0.tmp_1"
DEVICES = ["dev-1", "dev-2"]


@pytest.fixture(scope="module")
def data():
    from edgefleet.data import text_direction

    x, y = text_direction()
    return x, y


def low_light(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The same crops seen in poor light: a quarter of the contrast and sensor noise (the demo's scene change)."""
    rng = np.random.default_rng(seed)
    return np.clip(x * 0.25 + rng.normal(0, 0.35, x.shape), -1, 1).astype(np.float32)


@pytest.fixture(scope="module")
def qbundles(tmp_path_factory, data):
    """v1 and three v2s, each with profile.json (the model's own outputs on 200 held-out crops) and golden.npz (8
    of them with their outputs): ``v2`` the same model; ``v2-canary`` whose golden outputs are not what the model
    computes (as if its runtime computed differently: top-1 flipped); ``v2-swapped`` the model with its two
    classes in the wrong order (a real export mistake: the label map reversed)."""
    import onnx
    from onnx import helper, numpy_helper

    from edgefleet.models import model_path
    from util import release_key

    key, _ = release_key()
    d = tmp_path_factory.mktemp("qbundles")
    x, _ = data
    held = x[:200]
    np.savez(d / "sample.npz", x=x[:1])
    swapped = d / "swapped.onnx"
    m = onnx.load(str(model_path("ocr-cls")))
    out = m.graph.output[0].name
    for node in m.graph.node:
        node.output[:] = [o + ".raw" if o == out else o for o in node.output]
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, 0], np.int64), "swap"))
    m.graph.node.append(helper.make_node("Gather", [out + ".raw", "swap"], [out], axis=1))
    onnx.save(m, str(swapped))

    def make(version: str, model, flip_golden: bool = False, serial: int = 2):
        s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        ref = np.concatenate([s.run(None, {"x": held[i:i + 25]})[0] for i in range(0, len(held), 25)])
        profile = quality.build({OUTPUT: ref}, {OUTPUT: "classifier"})
        vd = d / version
        vd.mkdir()
        (vd / "profile.json").write_bytes(msgspec.json.encode(profile))
        golden = {}
        for i in range(8):
            golden[f"x/{i}"] = held[i:i + 1]
            golden[f"output/{OUTPUT}/{i}"] = ref[i:i + 1][:, ::-1].copy() if flip_golden else ref[i:i + 1]
        np.savez(vd / "golden.npz", **golden)
        man = bundle.Manifest(
            name="ocr-cls", version=version, target="cpu", runtime="onnxruntime", precision="fp32",
            model="model.onnx", files=[], latency_budget_ms=10_000.0,
            inputs=[bundle.TensorSpec(name="x", shape=[-1, 3, 48, 192], dtype="float32")],
            outputs=[bundle.TensorSpec(name=OUTPUT, shape=[-1, 2], dtype="float32")])
        path = d / f"ocr-{version}.tar"
        bundle.write_bundle(path, man, {"model.onnx": model, "sample.npz": d / "sample.npz",
                                        "profile.json": vd / "profile.json", "golden.npz": vd / "golden.npz"},
                            sign_key=key, serial=serial)
        return path

    return {"v1": make("1", model_path("ocr-cls"), serial=1), "v2": make("2", model_path("ocr-cls")),
            "v2-canary": make("2c", model_path("ocr-cls"), flip_golden=True),
            "v2-swapped": make("2s", swapped)}


@pytest.fixture
def agents(tmp_path, fleet):  # noqa: F811
    made = start_agents(tmp_path, fleet, DEVICES)
    yield made
    for a in made:
        a.stop()


def on_v1(client, agents, qbundles) -> str:
    v1 = client.upload_bundle(qbundles["v1"])["sha256"]
    ro = client.create_rollout(v1, ["all"])
    wait_for(lambda: finished(client, ro["id"], "completed"), TIMEOUT, what="v1 on every agent")
    return v1


def serve(agent, x, labels=None) -> int:
    """Each crop through the agent's local API; with ``labels``, the application's feedback too. Returns how
    many predictions were right."""
    api = AgentClient(agent.api.address)
    right = 0
    try:
        for i in range(len(x)):
            out, rid = api.infer({"x": x[i:i + 1]}, with_id=True)
            if labels is not None:
                api.feedback(rid, int(labels[i]))
                right += int(out[OUTPUT].argmax(1)[0] == labels[i])
    finally:
        api.close()
    return right


def halted(client, rollout_id: str) -> dict:
    doc = wait_for(lambda: finished(client, rollout_id), TIMEOUT, what="the rollout to halt")
    assert doc["status"] == "halted", json.dumps(doc, indent=2)
    return doc


def device(doc: dict, device_id: str) -> dict:
    return next(d for w in doc["waves"] for d in w["devices"] if d["device_id"] == device_id)


def test_a_bundle_whose_canary_disagrees_is_halted_without_any_traffic(fleet, agents, qbundles):
    client = fleet_client(fleet)
    v1 = on_v1(client, agents, qbundles)
    bad = client.upload_bundle(qbundles["v2-canary"])["sha256"]
    ro = client.create_rollout(bad, ["all"], waves="1,100%", soak="30s", min_canary_agreement=0.95)
    doc = halted(client, ro["id"])
    assert doc["reason"].startswith("wave 1: dev-1 canary agreement 0% (0 of 8 golden inputs agree with fp32) "
                                    "< 95%"), doc["reason"]
    wait_for(lambda: agents[0].engine.current.sha == v1, TIMEOUT, what="dev-1 back on v1")
    assert agents[1].engine.current.sha == v1  # wave 2 was never published
    [d1] = doc["waves"][0]["devices"]
    assert d1["canary_agreement"] == 0.0 and d1["inferences"] == 0


def test_a_device_whose_outputs_drift_from_the_reference_is_halted(fleet, agents, qbundles, data):
    client = fleet_client(fleet)
    v1 = on_v1(client, agents, qbundles)
    v2 = client.upload_bundle(qbundles["v2"])["sha256"]
    # the soak outlasts the traffic, so the last quality window is in when dev-1 is judged; were it not, dev-1
    # would halt the rollout from wave 2 instead (a device of an earlier wave is watched until the end)
    ro = client.create_rollout(v2, ["all"], waves="1,100%", soak="3s", min_inferences=120, max_drift_psi=0.25,
                               min_canary_agreement=0.95)
    wait_for(lambda: agents[0].engine.current.sha == v2, TIMEOUT, what="dev-1 on v2")
    # the canary's result is a message of its own: in before the drift, so that the halt is judged with it
    wait_for(lambda: device(client.rollout(ro["id"]), "dev-1")["canary_agreement"] is not None, TIMEOUT,
             what="dev-1's canary result")
    x, _ = data
    serve(agents[0], low_light(x[200:320]))  # dev-1's camera now sees the text in poor light
    doc = halted(client, ro["id"])
    assert ": dev-1 output drift PSI " in doc["reason"] and "against the bundle's reference" in doc["reason"], \
        doc["reason"]
    d1 = device(doc, "dev-1")
    assert d1["drift_psi"] > 0.25 and d1["canary_agreement"] == 1.0  # the runtime computes right: the scene moved
    wait_for(lambda: agents[0].engine.current.sha == v1, TIMEOUT, what="dev-1 back on v1")


def test_a_model_with_its_labels_reversed_is_halted_on_the_feedback_accuracy_drop(fleet, agents, qbundles, data):
    client = fleet_client(fleet)
    v1 = on_v1(client, agents, qbundles)
    x, y = data
    right = serve(agents[0], x[200:260], y[200:260])  # the application labels what it learns, on v1
    assert right >= 54
    wait_for(lambda: (client.health("dev-1").get("quality_report") or {}).get("feedback", {}).get("scored", 0)
             >= 60, TIMEOUT, what="v1's labels at the controller")
    swapped = client.upload_bundle(qbundles["v2-swapped"])["sha256"]
    ro = client.create_rollout(swapped, ["all"], waves="1,100%", soak="3s", min_inferences=60,
                               max_accuracy_drop="10%", min_labels=40, max_drift_psi=0.25,
                               min_canary_agreement=0.95)
    wait_for(lambda: agents[0].engine.current.sha == swapped, TIMEOUT, what="dev-1 on the swapped model")
    right = serve(agents[0], x[260:320], y[260:320])
    assert right <= 6  # it answers as confidently as before, and wrongly
    doc = halted(client, ro["id"])
    assert ": dev-1 accuracy " in doc["reason"] and "points below the previous model's" in doc["reason"], \
        doc["reason"]
    d1 = device(doc, "dev-1")
    assert d1["accuracy"] <= 0.1 and d1["baseline_accuracy"] >= 0.9 and d1["labels"] >= 40
    # neither the canary (its golden outputs are its own) nor drift (two classes, as confident: drift is judged
    # before accuracy, so the reason above says it did not cross) saw it
    assert d1["canary_agreement"] == 1.0 and d1["drift_psi"] is not None
    wait_for(lambda: agents[0].engine.current.sha == v1, TIMEOUT, what="dev-1 back on v1")
