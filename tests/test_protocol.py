"""The wire contract: topics, round trips, and what is refused (with the field named)."""

import json

import pytest

from agent import protocol as p


def test_topics_are_built_and_parsed_in_one_place():
    t = p.topic("cam-1", p.TELEMETRY)
    assert t == "edgefleet/v1/cam-1/telemetry"
    assert p.parse_topic(t) == ("cam-1", "telemetry")
    assert p.subscription(p.STATE) == "edgefleet/v1/+/state"


@pytest.mark.parametrize("bad", ["edgefleet/v2/cam-1/state", "edgefleet/v1/cam-1/nope", "edgefleet/v1/a/b/state",
                                 "edgefleet/v1/cam 1/state", "x"])
def test_foreign_topics_are_refused(bad):
    with pytest.raises(p.ProtocolError):
        p.parse_topic(bad)


@pytest.mark.parametrize("device_id", ["", "a/b", "a+b", "#", "x" * 129, "cam 1"])
def test_device_ids_that_would_break_topics_are_refused(device_id):
    with pytest.raises(p.ProtocolError, match="invalid device id"):
        p.topic(device_id, p.STATE)


def test_every_message_round_trips():
    active = p.ActiveModel(name="m", version="1", sha256="ab" * 32, runtime="onnxruntime", precision="int8")
    msgs = {
        p.STATE: p.State(device_id="d", online=True, time=1.0, boot_id="b", active=active, runtimes=["onnxruntime"]),
        p.TELEMETRY: p.Telemetry(device_id="d", boot_id="b", seq=3, time=2.0, interval_s=10, inferences=5,
                                 errors={"bad_input": 1}, histogram=[1, 4],
                                 latency_ms=p.Latency(p50=1, p95=2, p99=3, max=4, mean=1.5), active=active),
        p.EVENTS: p.Event(device_id="d", boot_id="b", seq=4, time=3.0, kind="failed", reason="sha256 mismatch"),
        p.DESIRED: p.Desired(deployment_id="dep-1", name="m", version="1", url="http://h/bundles/x",
                             sha256="cd" * 32, size=10),
        p.CMD: p.Cmd(id="c1", kind="ping"),
        p.QUALITY: p.Quality(device_id="d", boot_id="b", seq=5, time=4.0, interval_s=10, sha256="ab" * 32,
                             version="1", profile="ef" * 32, served=3,
                             bins=[{"class": [2, 1, 0], "confidence": [0] * 9 + [3]}],
                             canary=p.Canary(runs=16, agree=15, max_abs_err=0.02, time=3.5),
                             feedback=p.Feedback(labels=2, confusion=[[0, 0, 1], [1, 0, 1]],
                                                 refused={"unknown_id": 1})),
    }
    for kind, msg in msgs.items():
        data = p.encode(msg)
        assert json.loads(data)["v"] == 1
        assert p.decode(kind, data) == msg


def test_unknown_field_is_named():
    data = json.dumps({"v": 1, "device_id": "d", "online": True, "time": 1, "colour": "red"}).encode()
    with pytest.raises(p.ProtocolError, match="colour"):
        p.decode(p.STATE, data)


def test_ill_typed_field_is_named():
    data = json.dumps({"v": 1, "device_id": "d", "boot_id": "b", "seq": "three", "time": 1,
                       "interval_s": 1, "inferences": 0}).encode()
    with pytest.raises(p.ProtocolError, match=r"\$\.seq"):
        p.decode(p.TELEMETRY, data)


def test_wrong_version_and_garbage_are_refused():
    with pytest.raises(p.ProtocolError, match="version 2"):
        p.decode(p.CMD, json.dumps({"v": 2, "id": "c", "kind": "ping"}).encode())
    with pytest.raises(p.ProtocolError, match="not JSON"):
        p.decode(p.CMD, b"\x00not json")
    with pytest.raises(p.ProtocolError, match="kind"):
        p.decode(p.EVENTS, json.dumps({"v": 1, "device_id": "d", "boot_id": "b", "seq": 1, "time": 1,
                                       "kind": "exploded"}).encode())


# --- the bounds: every id has a pattern, every string, list and map a length, every number a range ----------

@pytest.mark.parametrize("device_id", ["Cam-1", "c\u0430m-1", "x" * 64, "-cam", ".cam", "_cam", "cam-1\n", "cam/1"])
def test_device_ids_are_ascii_lowercase_with_no_look_alikes(device_id):
    with pytest.raises(p.ProtocolError, match="invalid device id"):
        p.check_device_id(device_id)
    data = json.dumps({"v": 1, "device_id": device_id, "online": True, "time": 1}).encode()
    with pytest.raises(p.ProtocolError, match=r"\$\.device_id"):
        p.decode(p.STATE, data)


@pytest.mark.parametrize("device_id", ["cam-1", "d", "x" * 63, "dev.7_b-2", "0"])
def test_device_ids_in_the_pattern_are_accepted(device_id):
    assert p.check_device_id(device_id) == device_id
    assert p.parse_topic(p.topic(device_id, p.STATE)) == (device_id, p.STATE)


def _desired(**kw):
    doc = {"v": 1, "deployment_id": "dep-1", "name": "m", "version": "1", "url": "http://h/bundles/x",
           "sha256": "cd" * 32, "size": 10}
    doc.update(kw)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("sha", ["../../victim", "c" * 63, "C" * 64, "c" * 65, "c" * 64 + "\n", "g" * 64, ""])
def test_a_sha256_is_64_lowercase_hex_digits(sha):
    with pytest.raises(p.ProtocolError, match=r"\$\.sha256"):
        p.decode(p.DESIRED, _desired(sha256=sha))
    with pytest.raises(p.ProtocolError, match="invalid sha256"):
        p.check_sha256(sha)


def test_the_ids_the_fleet_and_the_agent_make_fit_their_patterns(tmp_path):
    from agent.config import AgentConfig
    from agent.daemon import Agent
    from fleet.api import new_deployment_id
    from fleet.rollouts import new_rollout_id

    ro = new_rollout_id()
    for dep in (new_deployment_id(), f"{ro}-w12", f"{ro}-rb3"):  # a deployment, a rollout's wave and rollback
        assert p.decode(p.DESIRED, _desired(deployment_id=dep)).deployment_id == dep
        assert p.decode(p.CMD, json.dumps({"v": 1, "id": dep, "kind": "ping"}).encode()).id == dep
    agent = Agent(AgentConfig(device_id="cam-1", broker="mqtt://127.0.0.1:1", controller="http://127.0.0.1:1",
                              state_dir=str(tmp_path)))  # built, not started: nothing is opened
    ev = p.Event(device_id="cam-1", boot_id=agent.boot_id, seq=0, time=1.0, kind="active")
    assert p.decode(p.EVENTS, p.encode(ev)) == ev


def _telemetry(**kw):
    doc = {"v": 1, "device_id": "d", "boot_id": "b", "seq": 1, "time": 1, "interval_s": 10, "inferences": 0}
    doc.update(kw)
    return json.dumps(doc).encode()


def _quality(**kw):
    doc = {"v": 1, "device_id": "d", "boot_id": "b", "seq": 1, "time": 1, "interval_s": 10, "sha256": "ab" * 32,
           "version": "1", "profile": "cd" * 32}
    doc.update(kw)
    return json.dumps(doc).encode()


def _state(**kw):
    doc = {"v": 1, "device_id": "d", "online": True, "time": 1}
    doc.update(kw)
    return json.dumps(doc).encode()


def _event(**kw):
    doc = {"v": 1, "device_id": "d", "boot_id": "b", "seq": 1, "time": 1, "kind": "failed"}
    doc.update(kw)
    return json.dumps(doc).encode()


ACTIVE = {"name": "m", "version": "1", "sha256": "ab" * 32, "runtime": "onnxruntime", "precision": "int8"}

BAD = [
    # (kind, payload, the field the error must name)
    (p.DESIRED, _desired(deployment_id="../x"), "deployment_id"),
    (p.DESIRED, _desired(deployment_id="d" * 65), "deployment_id"),
    (p.DESIRED, _desired(name="n" * 129), "name"),
    (p.DESIRED, _desired(name="<img src=x onerror=alert(1)>"), "name"),
    (p.DESIRED, _desired(version="v" * 65), "version"),
    (p.DESIRED, _desired(url=""), "url"),
    (p.DESIRED, _desired(url="http://h/" + "x" * p.MAX_URL), "url"),
    (p.DESIRED, _desired(size=0), "size"),
    (p.DESIRED, _desired(size=-1), "size"),
    (p.DESIRED, _desired(size=p.MAX_SIZE + 1), "size"),
    (p.DESIRED, _desired(settings={f"k{i}": 1 for i in range(p.MAX_SETTINGS + 1)}), "settings"),
    (p.DESIRED, _desired(settings={"k" * 65: 1}), "settings"),
    (p.DESIRED, _desired(settings={"k": "v" * (p.MAX_SETTING_CHARS + 1)}), "settings"),
    (p.DESIRED, _desired(settings={"k": [1]}), "settings"),
    (p.DESIRED, _desired(time=-1), "time"),
    (p.CMD, json.dumps({"v": 1, "id": "c" * 65, "kind": "ping"}).encode(), "id"),
    (p.CMD, json.dumps({"v": 1, "id": "c 1", "kind": "ping"}).encode(), "id"),
    (p.EVENTS, _event(reason="r" * (p.MAX_REASON + 1)), "reason"),
    (p.EVENTS, _event(seq=-1), "seq"),
    (p.EVENTS, _event(boot_id=""), "boot_id"),
    (p.EVENTS, _event(boot_id="b" * 65), "boot_id"),
    (p.EVENTS, _event(sha256="AB" * 32), "sha256"),
    (p.EVENTS, _event(version="1\n"), "version"),
    (p.TELEMETRY, _telemetry(errors={f"k{i}": 1 for i in range(65)}), "errors"),
    (p.TELEMETRY, _telemetry(errors={"k" * 65: 1}), "errors"),
    (p.TELEMETRY, _telemetry(errors={"bad_input": -1}), "errors"),
    (p.TELEMETRY, _telemetry(histogram=[1] * 65), "histogram"),
    (p.TELEMETRY, _telemetry(histogram=[-1]), "histogram"),
    (p.TELEMETRY, _telemetry(inferences=-5), "inferences"),
    (p.TELEMETRY, _telemetry(interval_s=0), "interval_s"),
    (p.TELEMETRY, _telemetry(memory_percent=101), "memory_percent"),
    (p.TELEMETRY, _telemetry(temperature_c=-300), "temperature_c"),
    (p.TELEMETRY, _telemetry(outbox_dropped=-1), "outbox_dropped"),
    (p.TELEMETRY, _telemetry(latency_ms={"p50": -1, "p95": 1, "p99": 1, "max": 1, "mean": 1}), "latency_ms.p50"),
    (p.TELEMETRY, _telemetry(active={**ACTIVE, "runtime": "r" * 33}), "active.runtime"),
    (p.QUALITY, _quality(profile="x"), "profile"),
    (p.QUALITY, _quality(bins=[{"class": [1]}] * (p.MAX_QUALITY_OUTPUTS + 1)), "bins"),
    (p.QUALITY, _quality(bins=[{"class": [1] * (p.MAX_QUALITY_BINS + 1)}]), "bins"),
    (p.QUALITY, _quality(bins=[{"class": [-1]}]), "bins"),
    (p.QUALITY, _quality(bins=[{"Class!": [1]}]), "bins"),
    (p.QUALITY, _quality(canary={"runs": -1, "agree": 0}), "canary.runs"),
    (p.QUALITY, _quality(feedback={"confusion": [[0, 1]]}), "feedback.confusion"),
    (p.QUALITY, _quality(feedback={"confusion": [[0, 0, 1]] * (p.MAX_CONFUSION + 1)}), "feedback.confusion"),
    (p.QUALITY, _quality(feedback={"refused": {f"r{i}": 1 for i in range(17)}}), "feedback.refused"),
    (p.STATE, _state(agent_version="v" * 65), "agent_version"),
    (p.STATE, _state(arch="x86 64"), "arch"),
    (p.STATE, _state(cpu_flags=["avx2"] * 65), "cpu_flags"),
    (p.STATE, _state(cpu_flags=["f" * 33]), r"cpu_flags\[0\]"),
    (p.STATE, _state(runtimes=["onnxruntime"] * 17), "runtimes"),
    (p.STATE, _state(boot_id="b" * 65), "boot_id"),
    (p.STATE, _state(active={**ACTIVE, "precision": "p" * 33}), "active.precision"),
    (p.STATE, _state(active={**ACTIVE, "deployment_id": "x" * 65}), "active.deployment_id"),
]


@pytest.mark.parametrize("kind, payload, field", BAD, ids=[f"{k}.{f}" for k, _, f in BAD])
def test_every_string_list_map_and_number_is_bounded_and_the_field_named(kind, payload, field):
    with pytest.raises(p.ProtocolError, match=rf"\$\.{field}"):
        p.decode(kind, payload)


def test_values_at_the_bounds_are_accepted():
    d = p.decode(p.DESIRED, _desired(size=p.MAX_SIZE, settings={f"k{i}": "v" * p.MAX_SETTING_CHARS
                                                                 for i in range(p.MAX_SETTINGS)}))
    assert d.size == p.MAX_SIZE
    assert p.decode(p.EVENTS, _event(reason="r" * p.MAX_REASON)).reason == "r" * p.MAX_REASON
    assert p.decode(p.STATE, json.dumps({"v": 1, "device_id": "d", "online": False, "time": 0}).encode()).boot_id == ""


def test_deep_nesting_is_refused_without_a_traceback():
    with pytest.raises(p.ProtocolError):
        p.decode(p.DESIRED, b'{"settings": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")


def test_clip_keeps_what_the_agent_builds_inside_the_contract():
    assert p.clip("short") == "short"
    long = p.clip("x" * 10_000)
    assert len(long) == p.MAX_REASON and long.endswith("…")
    ev = p.Event(device_id="d", boot_id="b", seq=1, time=1.0, kind="error", reason=long)
    assert p.decode(p.EVENTS, p.encode(ev)) == ev


def test_check_validates_a_struct_built_in_process():
    built = p.Desired(deployment_id="dep-1", name="m", version="1", url="http://h/x", sha256="../../x", size=1)
    with pytest.raises(p.ProtocolError, match=r"\$\.sha256"):
        p.check(built)


@pytest.mark.parametrize("payload, expected", [
    (_desired(sha256="../../x"), ("dep-1", None, "1")),
    (_desired(deployment_id="../x", size=0), (None, "cd" * 32, "1")),
    (b"not json", (None, None, None)),
    (b"[1, 2]", (None, None, None)),
    (json.dumps({"deployment_id": ["x"], "sha256": "ab" * 32}).encode(), (None, "ab" * 32, None)),
])
def test_named_keeps_only_the_valid_ids_of_a_refused_desired(payload, expected):
    n = p.named(payload)
    assert (n.deployment_id, n.sha256, n.version) == expected
