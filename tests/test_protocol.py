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
