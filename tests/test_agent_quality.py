"""Model quality on the device (issue 12, step 2), on real parts: bundles the real converter made from the PP-OCR
classifier (fp32 and int8, each with its profile.json and golden.npz), an in-process Agent serving them through
its real local API, a real mosquitto with the fleet's ACL, and a subscriber with the controller's identity that
decodes what arrives. The only fake is a clock (feedback expiry)."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import uuid
from pathlib import Path

import msgspec
import numpy as np
import onnxruntime as ort
import pytest
from util import issue_tls, preload, release_key, wait_for

from agent import bundle, protocol, quality
from agent.api import AgentClient, FeedbackRefused, to_npz
from agent.config import AgentConfig, ConfigError, validate
from agent.daemon import Agent

OUTPUT = "save_infer_model/scale_0.tmp_1"


@pytest.fixture(scope="module")
def converted(tmp_path_factory, crops):
    """fp32 and int8 bundles of the PP-OCR classifier from the converter, signed with the tests' release key."""
    from converter.convert import convert
    from edgefleet.models import model_path

    d = tmp_path_factory.mktemp("quality-convert")
    np.savez(d / "calib.npz", x=crops[0])
    report = convert(model_path("ocr-cls"), target="cpu", calib=d / "calib.npz", out=d / "dist", name="ocr-cls",
                     version="1", input_shapes={"x": [1, 3, 48, 192]}, search="off", sign_key=release_key()[0],
                     serial=1)
    paths = {v["precision"]: Path(v["path"]) for v in report["variants"] if "dynamic" not in Path(v["path"]).name}
    return paths


class Watcher:
    """Every message of device d1 on the broker, decoded the way the controller decodes them (with its identity:
    only it may read a device's reports): (kind, message, raw payload)."""

    def __init__(self, broker) -> None:
        from agent.transport import make_client, parse_url

        self.got: list[tuple[str, object, bytes]] = []
        self._lock = threading.Lock()
        url = parse_url(broker.url)
        self._c = make_client(url, f"watcher-{uuid.uuid4().hex[:8]}", broker.pki.controller_tls())
        self._c.on_connect = lambda c, *_: c.subscribe("edgefleet/v1/d1/#", qos=1)
        self._c.on_message = self._on_message
        self._c.connect(url.host, url.port)
        self._c.loop_start()
        wait_for(lambda: self._c.is_connected(), what="the watcher's connection")

    def _on_message(self, client, userdata, m) -> None:
        _, kind = protocol.parse_topic(m.topic)
        if kind == protocol.STATE:
            return
        with self._lock:
            self.got.append((kind, protocol.decode(kind, m.payload), m.payload))

    def of(self, kind: str) -> list:
        with self._lock:
            return [msg for k, msg, _ in self.got if k == kind]

    def raw(self, kind: str) -> list[bytes]:
        with self._lock:
            return [p for k, _, p in self.got if k == kind]

    def close(self) -> None:
        self._c.disconnect()
        self._c.loop_stop()


@pytest.fixture
def watcher(mosquitto):
    w = Watcher(mosquitto)
    yield w
    w.close()


@pytest.fixture
def make_agent(tmp_path, mosquitto, free_port):
    """An in-process Agent as device d1 on the broker, serving ``tar`` from its state dir; config keys as given
    (by default no telemetry tick of its own: the test calls publish_telemetry() to close a window)."""
    started = []

    def make(tar: Path, **kw) -> Agent:
        state = tmp_path / f"state{len(started)}"
        preload(state, tar)
        tls = issue_tls(mosquitto.pki, "d1", tmp_path / "tls")
        kw.setdefault("telemetry_interval_s", 3600.0)
        cfg = validate(AgentConfig(state_dir=str(state), device_id="d1", broker=mosquitto.url,
                                   controller="https://127.0.0.1:9", tls_ca=tls.ca, tls_cert=tls.cert,
                                   tls_key=tls.key, api=f"127.0.0.1:{free_port}", trust_dir=str(release_key()[1]),
                                   **kw))
        a = Agent(cfg)
        a.start()
        started.append(a)
        wait_for(lambda: a.link.connected, what="the agent's broker link")
        return a

    yield make
    for a in started:
        a.stop()


def profile_of(agent: Agent) -> quality.Profile:
    cur = agent.engine.current
    return msgspec.json.decode((cur.dir / "profile.json").read_bytes(), type=quality.Profile)


def sent(agent: Agent) -> None:
    """Close a window, and wait until everything queued has been acknowledged by the broker."""
    agent.publish_telemetry()
    wait_for(lambda: agent.outbox.pending_count == 0, what="the outbox to drain")


def summed(bins_list: list[list[dict]]) -> list[dict]:
    out = [{f: [0] * len(c) for f, c in b.items()} for b in bins_list[0]]
    for bins in bins_list:
        for acc, b in zip(out, bins):
            for f, c in b.items():
                acc[f] = [x + y for x, y in zip(acc[f], c)]
    return out


# ---- folding, and the quality message -----------------------------------------------------------------------------
def test_served_outputs_arrive_as_bins_that_match_the_folder(converted, make_agent, watcher, crops):
    agent = make_agent(converted["int8"])
    sha = agent.engine.current.sha
    client = AgentClient(agent.api.address)
    x, _ = crops
    outputs = [client.infer({"x": x[i: i + 1]}) for i in range(25)]
    sent(agent)
    tele = wait_for(lambda: watcher.of(protocol.TELEMETRY), what="telemetry")
    qual = wait_for(lambda: watcher.of(protocol.QUALITY), what="the quality message")
    assert sum(t.inferences for t in tele) == 25
    (msg,) = qual
    assert msg.seq == tele[-1].seq + 1  # right after the telemetry, from the same counter
    assert (msg.sha256, msg.version, msg.profile) == (sha, "1", profile_of(agent).id)
    assert msg.served == 25 and msg.interval_s == agent.config.telemetry_interval_s
    # the same counts the shared Folder gives on the same outputs, request by request
    want = quality.Folder(profile_of(agent))
    for out in outputs:
        want.add(out)
    assert msg.bins == [want.counts[OUTPUT]]
    assert all(sum(c) == 25 for c in msg.bins[0].values())
    assert msg.canary is not None and msg.canary.runs > 0  # the activation's canary, in the first window


def test_a_window_with_nothing_to_say_sends_no_quality_message(converted, make_agent, watcher):
    agent = make_agent(converted["fp32"])
    sent(agent)  # the activation canary
    sent(agent)  # nothing: no quality message
    wait_for(lambda: len(watcher.of(protocol.TELEMETRY)) == 2, what="two telemetry messages")
    assert len(watcher.of(protocol.QUALITY)) == 1


def test_the_canary_at_activation_agrees_with_fp32_and_reports_the_max_error(converted, make_agent, watcher,
                                                                            tmp_path):
    for precision in ("fp32", "int8"):
        agent = make_agent(converted[precision])
        sent(agent)
        msg = wait_for(lambda: [q for q in watcher.of(protocol.QUALITY) if q.sha256 == agent.engine.current.sha],
                       what=f"the {precision} quality message")[0]
        # by hand: the bundle's model in ONNX Runtime on each golden input, against the fp32 output in golden.npz
        d = agent.engine.current.dir
        session = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        errs, agree = [], 0
        with np.load(d / "golden.npz") as g:
            n = len([k for k in g.files if k.startswith("x/")])
            for i in range(n):
                got = session.run([OUTPUT], {"x": g[f"x/{i}"]})[0]
                ref = g[f"output/{OUTPUT}/{i}"]
                errs.append(float(np.abs(got.astype(np.float64) - ref).max()))
                agree += int(got.argmax() == ref.argmax())
        assert n > 0 and msg.canary.runs == n and msg.canary.agree == agree == n
        assert msg.canary.max_abs_err == pytest.approx(max(errs), rel=1e-9, abs=1e-12)
        assert msg.served == 0  # the canary is not a served inference
        agent.stop()
    assert msg.canary.max_abs_err > 1e-3  # int8 does differ from fp32 (and says by how much)


def test_the_canary_reruns_every_interval_and_is_never_counted_as_served(converted, make_agent, watcher):
    agent = make_agent(converted["fp32"], canary_interval_s=0.001)  # due again at every window
    first = agent.engine.current.quality.canary_at
    for _ in range(3):
        sent(agent)
    quals = wait_for(lambda: len(watcher.of(protocol.QUALITY)) >= 3 and watcher.of(protocol.QUALITY),
                     what="three quality messages")
    with np.load(agent.engine.current.dir / "golden.npz") as g:
        n = len([k for k in g.files if k.startswith("x/")])
    # the first window: the activation's canary and the one due at its end; then one a window
    assert [q.canary.runs for q in quals] == [2 * n, n, n] and all(q.canary.agree == q.canary.runs for q in quals)
    assert agent.engine.current.quality.canary_at > first
    tele = watcher.of(protocol.TELEMETRY)
    assert len(tele) == 3 and all(t.inferences == 0 and t.latency_ms is None for t in tele)
    assert all(q.served == 0 and all(sum(c) == 0 for c in q.bins[0].values()) for q in quals)
    assert agent.engine.window.total == 0 and agent.engine.current.stats.served == 0


def test_canary_interval_zero_runs_only_at_activation(converted, make_agent, watcher):
    agent = make_agent(converted["fp32"], canary_interval_s=0)
    sent(agent)
    first = agent.engine.current.quality.canary_at
    sent(agent)
    wait_for(lambda: len(watcher.of(protocol.TELEMETRY)) == 2, what="two windows")
    assert agent.engine.current.quality.canary_at == first and len(watcher.of(protocol.QUALITY)) == 1


@pytest.mark.parametrize("key,value", [("canary_interval_s", -1.0), ("canary_interval_s", float("nan")),
                                       ("feedback_buffer", 0), ("feedback_ttl_s", 0.0),
                                       ("feedback_max_per_window", -1)])
def test_bad_quality_config_values_are_refused_naming_the_field(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key):
        validate(AgentConfig(state_dir=str(tmp_path), **{key: value}))


def test_quality_false_sends_none(converted, make_agent, watcher, crops):
    agent = make_agent(converted["int8"], quality=False)
    client = AgentClient(agent.api.address)
    client.infer({"x": crops[0][:1]})
    sent(agent)
    sent(agent)
    tele = wait_for(lambda: len(watcher.of(protocol.TELEMETRY)) == 2 and watcher.of(protocol.TELEMETRY),
                    what="two telemetry messages")
    # the outbox sends in seq order: a quality message queued after the first telemetry would have come before
    # the second one, and taken a seq between them
    assert tele[1].seq == tele[0].seq + 1 and watcher.of(protocol.QUALITY) == []
    assert agent.engine.current.quality.canary_at is None  # no canary either
    assert client.status()["quality"] is None
    with pytest.raises(FeedbackRefused) as e:
        client.feedback("0" * 16, 0)
    assert e.value.reason == "disabled"


def test_a_profile_that_does_not_decode_serves_without_quality(converted, make_agent, crops, caplog):
    agent = make_agent(converted["fp32"])
    cur = agent.engine.current
    agent.stop()
    (cur.dir / "profile.json").write_bytes(b'{"outputs": "not a list"}')
    from agent.engine import Loaded

    loaded = Loaded(cur.sha, cur.dir, cur.manifest)
    assert loaded.quality is None and loaded.canary() is None
    assert "profile.json is not usable" in caplog.text
    assert loaded.session.run({"x": crops[0][:1]})[OUTPUT].shape == (1, 2)  # it still serves
    loaded.close()


# ---- request ids --------------------------------------------------------------------------------------------------
def test_every_inference_gets_a_request_id(converted, make_agent, crops):
    agent = make_agent(converted["fp32"])
    host, port = agent.api.address.rsplit(":", 1)
    x = crops[0][:1]
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/infer", body=to_npz({"x": x}), headers={"Content-Type": "application/x-npz"})
    r = conn.getresponse()
    r.read()
    npz_id = r.getheader("X-Request-Id")
    conn.request("POST", "/v1/infer", body=json.dumps({"inputs": {"x": x.tolist()}}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    body = json.loads(r.read())
    assert r.status == 200 and body["id"] == r.getheader("X-Request-Id")
    out, rid = AgentClient(agent.api.address).infer({"x": x}, with_id=True)
    ids = [npz_id, body["id"], rid]
    assert all(isinstance(i, str) and len(i) == 16 and int(i, 16) >= 0 for i in ids) and len(set(ids)) == 3
    assert out[OUTPUT].shape == (1, 2)
    assert list(AgentClient(agent.api.address).infer({"x": x})) == [OUTPUT]  # the old signature is unchanged


# ---- feedback ---------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_feedback_joins_labels_and_refuses_each_bad_one_by_reason(converted, make_agent, watcher, crops):
    agent = make_agent(converted["int8"], feedback_ttl_s=60.0)
    clock = agent.engine.feedback.clock = Clock()
    client = AgentClient(agent.api.address)
    x, labels = crops
    classes = profile_of(agent).outputs[0].classes  # the class bins, in order; then "other"
    preds = []
    for i in range(8):
        out, rid = client.infer({"x": x[i: i + 1]}, with_id=True)
        preds.append((rid, int(out[OUTPUT].argmax()), int(labels[i])))
    for rid, _, label in preds[:6]:
        client.feedback(rid, label)
    # the confusion by hand: [true bin, predicted bin, count]
    want = {}
    for _, pred, label in preds[:6]:
        key = (classes.index(label), classes.index(pred))
        want[key] = want.get(key, 0) + 1

    def refused(rid, label, reason):
        with pytest.raises(FeedbackRefused) as e:
            client.feedback(rid, label)
        assert e.value.reason == reason and "\n" not in str(e.value)

    refused(preds[0][0], preds[0][2], "duplicate")
    refused("0123456789abcdef", 0, "unknown_id")
    refused(preds[6][0], 2, "label_out_of_range")  # the model has 2 classes
    refused(preds[6][0], -1, "label_out_of_range")
    refused(preds[6][0], "1", "bad_request")
    clock.now += 61  # past feedback_ttl_s
    refused(preds[7][0], 0, "expired")
    sent(agent)
    msg = wait_for(lambda: watcher.of(protocol.QUALITY), what="the quality message")[0]
    fb = msg.feedback
    assert fb.labels == 6 and {(t, p): n for t, p, n in fb.confusion} == want
    assert fb.refused == {"duplicate": 1, "unknown_id": 1, "label_out_of_range": 2, "bad_request": 1, "expired": 1}
    assert client.status()["quality"]["feedback"] == {"labels": 0, "refused": {}}  # a new window


def test_the_ring_overwrites_the_oldest_prediction(converted, make_agent, crops):
    agent = make_agent(converted["fp32"], feedback_buffer=4)
    client = AgentClient(agent.api.address)
    ids = [client.infer({"x": crops[0][i: i + 1]}, with_id=True)[1] for i in range(5)]
    with pytest.raises(FeedbackRefused) as e:
        client.feedback(ids[0], 0)
    assert e.value.reason == "unknown_id"
    client.feedback(ids[1], 0)  # the four newest are kept
    assert client.status()["quality"]["feedback"] == {"labels": 1, "refused": {"unknown_id": 1}}


def test_a_flood_of_feedback_is_refused_beyond_the_window_limit(converted, make_agent, watcher, crops):
    agent = make_agent(converted["fp32"], feedback_max_per_window=3)
    client = AgentClient(agent.api.address)
    ids = [client.infer({"x": crops[0][i: i + 1]}, with_id=True)[1] for i in range(5)]
    for rid in ids[:3]:
        client.feedback(rid, 0)
    with pytest.raises(FeedbackRefused) as e:
        client.feedback(ids[3], 0)
    assert e.value.reason == "flood"
    sent(agent)  # a new window: labels are taken again
    client.feedback(ids[4], 0)
    sent(agent)
    quals = wait_for(lambda: len(watcher.of(protocol.QUALITY)) == 2 and watcher.of(protocol.QUALITY),
                     what="two quality messages")
    assert (quals[0].feedback.labels, quals[0].feedback.refused) == (3, {"flood": 1})
    assert (quals[1].feedback.labels, quals[1].feedback.refused) == (1, {})


def test_feedback_bodies_that_are_not_feedback_get_one_line_400(converted, make_agent):
    agent = make_agent(converted["fp32"])
    host, port = agent.api.address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    for body in (b"not json", b"[1, 2]", b'{"id": "x"}', b'{"labels": []}'):
        conn.request("POST", "/v1/feedback", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        doc = json.loads(r.read())
        assert r.status == 400 and doc["kind"] == "bad_request" and "\n" not in doc["error"], (body, doc)
    conn.request("POST", "/v1/feedback", body=b"x" * (64 * 1024 + 1), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    assert r.status == 413
    assert AgentClient(agent.api.address).status()["quality"]["feedback"]["refused"] == {"bad_request": 4}


def test_the_list_form_counts_each_label(converted, make_agent, crops):
    agent = make_agent(converted["fp32"])
    client = AgentClient(agent.api.address)
    ids = [client.infer({"x": crops[0][i: i + 1]}, with_id=True)[1] for i in range(2)]
    host, port = agent.api.address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    doc = {"labels": [{"id": ids[0], "label": 1}, {"id": ids[1], "label": 0}, {"id": ids[1], "label": 0},
                      {"id": "nope", "label": 0}]}
    conn.request("POST", "/v1/feedback", body=json.dumps(doc), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read()) == {"accepted": 2, "refused": {"duplicate": 1,
                                                                                   "unknown_id": 1}}


def test_status_has_a_quality_section(converted, make_agent, crops):
    agent = make_agent(converted["int8"])
    client = AgentClient(agent.api.address)
    for i in range(3):
        client.infer({"x": crops[0][i: i + 1]})
    q = client.status()["quality"]
    canary = agent.engine.current.quality.last_canary
    assert q["profile"] == profile_of(agent).id and q["served"] == 3
    assert q["canary"] == {"runs": canary.runs, "agree": canary.agree, "max_abs_err": canary.max_abs_err,
                           "time": canary.time}


# ---- an update between a prediction and its label ------------------------------------------------------------------
def test_a_swap_sends_the_old_bundles_window_under_its_own_sha(converted, make_agent, watcher, crops):
    from agent.engine import Loaded

    agent = make_agent(converted["fp32"])
    old = agent.engine.current
    client = AgentClient(agent.api.address)
    _, early = client.infer({"x": crops[0][:1]}, with_id=True)
    client.infer({"x": crops[0][1:2]})
    store = agent.store
    new_sha = hashlib.sha256(converted["int8"].read_bytes()).hexdigest()
    bundle.safe_unpack(converted["int8"], store.models / new_sha)
    agent.engine.swap(Loaded(new_sha, store.models / new_sha, store.manifest(store.models / new_sha)))
    client.infer({"x": crops[0][2:3]})
    client.feedback(early, 0)  # the previous bundle is still loaded: counted for it
    sent(agent)
    quals = wait_for(lambda: len(watcher.of(protocol.QUALITY)) == 2 and watcher.of(protocol.QUALITY),
                     what="a quality message per bundle")
    by_sha = {q.sha256: q for q in quals}
    assert by_sha[old.sha].served == 2 and by_sha[old.sha].feedback.labels == 1
    assert by_sha[new_sha].served == 1 and by_sha[new_sha].feedback is None
    # a third bundle unloads the first: a label for its prediction is then other_model
    _, mid = client.infer({"x": crops[0][3:4]}, with_id=True)
    agent.engine.swap(Loaded(old.sha, old.dir, old.manifest))
    agent.engine.swap(Loaded(new_sha, store.models / new_sha, store.manifest(store.models / new_sha)))
    with pytest.raises(FeedbackRefused) as e:
        client.feedback(mid, 0)
    assert e.value.reason == "other_model"


# ---- the contract: an older broker ACL, an older controller -------------------------------------------------------
def test_a_broker_without_the_quality_line_refuses_it_and_the_rest_flows(converted, mosquitto, make_agent, watcher,
                                                                         crops):
    """A fleet whose broker ACL predates the quality topic (fleet/broker.acl_text before issue 12): the device's
    quality messages are refused by the broker (PUBACK 0x87), counted in link.refused and dropped from the outbox;
    telemetry and events keep flowing and the outbox never blocks."""
    from fleet.broker import acl_text

    old = acl_text().replace("pattern write edgefleet/v1/%u/quality\n", "")
    assert "quality" not in old and "pattern write edgefleet/v1/%u/telemetry" in old
    mosquitto.acl_path.write_text(old)
    assert mosquitto.reload()
    agent = make_agent(converted["int8"])
    client = AgentClient(agent.api.address)
    for round_ in range(3):
        client.infer({"x": crops[0][round_: round_ + 1]})
        agent._queue_error(f"round {round_}")  # an event
        sent(agent)
    wait_for(lambda: len(watcher.of(protocol.TELEMETRY)) == 3 and len(watcher.of(protocol.EVENTS)) == 3,
             what="three telemetry messages and three events")
    assert watcher.of(protocol.QUALITY) == []
    assert sum(agent.link.refused.values()) == 3 and all("authori" in r.lower() for r in agent.link.refused)
    assert agent.outbox.pending_count == 0


def test_telemetry_carries_no_quality_field_and_decodes_as_before(converted, make_agent, watcher, crops):
    agent = make_agent(converted["int8"])
    AgentClient(agent.api.address).infer({"x": crops[0][:1]})
    sent(agent)
    raw = wait_for(lambda: watcher.raw(protocol.TELEMETRY), what="telemetry")[0]
    doc = json.loads(raw)
    # the fields a controller from before issue 12 knows (protocol.Telemetry is unchanged by it), no more
    before = {"device_id", "boot_id", "seq", "time", "interval_s", "inferences", "errors", "latency_ms", "histogram",
              "active", "cpu_percent", "rss_bytes", "memory_percent", "disk_free_bytes", "temperature_c", "load1",
              "outbox_pending", "outbox_dropped", "storage", "clock_synced", "v"}
    # (issue 14 adds accelerators, additive: a controller from before ignores it)
    assert set(doc) - {"accelerators"} <= before and not {k for k in doc if "quality" in k or "bins" in k or "canary" in k}
    assert protocol.decode(protocol.TELEMETRY, raw).inferences == 1
    from agent.accel import Sampler

    assert [a["name"] for a in doc["accelerators"]] == [a.name for a in Sampler().sample()]  # this machine's
