"""Model quality on the controller (issue 12, fleet/quality.py): storage, refusals, and every figure against a value
computed by hand; then end to end over a real mosquitto with a real bundle's profile and the PP-OCR direction
classifier's real outputs folded by ``agent.quality.Folder``."""

from __future__ import annotations

import json
import math
import sqlite3
import time

import msgspec
import numpy as np
import pytest
from test_fleet import assert_one_error_line, client, devices, fleet, http, run_cli  # noqa: F401
from util import cli_args, release_key, wait_for

from agent import protocol
from agent import quality as aq
from agent.bundle import Manifest, TensorSpec, write_bundle
from fleet import quality
from fleet import rollout as machine
from fleet.retention import Policy, compact
from fleet.rollouts import Rollouts
from fleet.store import Store

T0 = 1_800_000_000.0
SHA = "ab" * 32
OTHER_SHA = "cd" * 32
BARE_SHA = "ef" * 32  # a bundle without a profile
UNIT = [0] * 9 + [100]


def hand_profile(classes=(50, 50, 0)) -> aq.Profile:
    """A classifier output (classes 0 and 1 with bins of their own, then "other") and a dense one (16 inner bins
    on [0, 16]), with reference counts simple enough to compute with."""
    return aq.Profile(samples=100, outputs=[
        aq.OutputProfile(name="y", kind="classifier", classes=[0, 1], n_classes=2,
                         counts={"class": list(classes), "confidence": UNIT, "margin": UNIT,
                                 "entropy": UNIT[::-1]}),
        aq.OutputProfile(name="z", kind="dense", edges=[float(i) for i in range(17)],
                         counts={"value": [0] + [10] * 16 + [0]})])


PROFILE = hand_profile()


def bins(cls, value=None) -> list[dict[str, list[int]]]:
    """A window's bins: ``cls`` for the class feature, the other classifier features as the reference's shares
    (PSI 0), the dense output's values as the reference's (PSI 0) unless given."""
    n = sum(cls)
    return [{"class": list(cls), "confidence": [0] * 9 + [n], "margin": [0] * 9 + [n], "entropy": [n] + [0] * 9},
            {"value": value or [0] + [n] * 16 + [0]}]


def manifest(version="1") -> dict:
    return {"name": "cls", "version": version, "target": "cpu", "runtime": "onnxruntime", "precision": "int8"}


@pytest.fixture
def store(store_url):
    s = Store(store_url).open()
    s.add_bundle(SHA, 1000, manifest(), profile=msgspec.json.encode(PROFILE))
    s.add_bundle(BARE_SHA, 1000, manifest("bare"))
    yield s
    s.close()


def qmsg(device: str, seq: int, t: float, b=None, *, sha=SHA, served=None, canary=None, feedback=None,
         profile=None, boot="b1") -> protocol.Quality:
    b = bins((25, 25, 0)) if b is None else b
    return protocol.Quality(device_id=device, boot_id=boot, seq=seq, time=t, interval_s=10.0, sha256=sha,
                            version="1", profile=profile or PROFILE.id,
                            served=sum(b[0]["class"]) if served is None and b else (served or 0), bins=b,
                            canary=canary, feedback=feedback)


def record(store, msg) -> bool:
    """As the link does, with the device's clock right (sent = received): filed at ``msg.time``."""
    return store.record_quality(msg, received=msg.time)


def psi(e, a) -> float:
    """PSI written out, for the hand-computed values: 0.5 added to every bin's count, then shares."""
    e = [(x + 0.5) / (sum(e) + 0.5 * len(e)) for x in e]
    a = [(x + 0.5) / (sum(a) + 0.5 * len(a)) for x in a]
    return sum((y - x) * math.log(y / x) for x, y in zip(e, a))


# -- drift ------------------------------------------------------------------------------------------------------------


def test_drift_against_the_reference_sums_the_windows_of_the_window(store):
    record(store, qmsg("cam-1", 1, T0 + 10, bins((40, 10, 0))))
    record(store, qmsg("cam-1", 2, T0 + 20, bins((35, 15, 0))))
    d = quality.device(store, "cam-1", T0, T0 + 30)
    assert (d["sha256"], d["version"], d["profile"], d["windows"], d["served"]) == (SHA, "1", PROFILE.id, 2, 100)
    ref = d["drift"]["reference"]
    # summed: 75 / 25 / 0 against 50 / 50 / 0, each bin + 0.5: shares 75.5/101.5 ... (the empty bin: 0 on both)
    assert ref["psi"] == pytest.approx(psi([50, 50, 0], [75, 25, 0]), abs=1e-6)
    assert ref["psi"] == pytest.approx(0.267353, abs=1e-6) and ref["band"] == "significant"
    assert ref["p"] == pytest.approx(aq.drift_p([50, 50, 0], [75, 25, 0])) and ref["p"] < 1e-3
    # JS in bits: m = (.625, .375); (KL(p||m) + KL(q||m)) / 2
    kl = lambda p, m: sum(x * math.log2(x / y) for x, y in zip(p, m) if x)  # noqa: E731
    js = (kl([.5, .5], [.625, .375]) + kl([.75, .25], [.625, .375])) / 2
    assert ref["js"] == pytest.approx(js, abs=1e-6) and js == pytest.approx(0.048795, abs=1e-6)
    assert ref["worst"] == {"output": "y", "feature": "class"}
    by = {(f["output"], f["feature"]): f for f in ref["features"]}
    assert set(by) == {("y", "class"), ("y", "confidence"), ("y", "margin"), ("y", "entropy"), ("z", "value")}
    # the same shares as the reference: 0 where the totals match too, nearly 0 where smoothing sees 100 vs 1600
    assert by["y", "confidence"]["psi"] == 0.0
    assert by["z", "value"]["psi"] == pytest.approx(psi([0] + [10] * 16 + [0], [0] + [100] * 16 + [0]), abs=1e-6)
    assert by["z", "value"]["psi"] < 0.02 and by["z", "value"]["band"] == "stable"
    assert by["y", "class"]["count"] == 100 and by["z", "value"]["count"] == 1600
    assert ref["served"] == 100 and ref["expected_served"] == 100

    # [since, until): since is in, until is out
    first = quality.device(store, "cam-1", T0, T0 + 20)["drift"]["reference"]
    assert first["psi"] == pytest.approx(psi([50, 50, 0], [40, 10, 0]), abs=1e-6)  # 0.8 / 0.2
    second = quality.device(store, "cam-1", T0 + 20, T0 + 30)["drift"]["reference"]
    assert second["psi"] == pytest.approx(psi([50, 50, 0], [35, 15, 0]), abs=1e-6)  # 0.7 / 0.3: 0.16
    # a moderate PSI, but one that 50 outputs against 100 give by chance often enough (p about 0.02): stable
    assert 0.1 < second["psi"] < 0.25 and 1e-3 < second["p"] < 0.05 and second["band"] == "stable"


def test_the_drift_of_a_device_is_its_worst_feature(store):
    # classes as the reference; the dense output's values all in one inner bin: 1 bin of 16 gets everything
    value = [0, 50] + [0] * 16
    record(store, qmsg("cam-1", 1, T0 + 10, bins((25, 25, 0), value)))
    ref = quality.device(store, "cam-1", T0, T0 + 30)["drift"]["reference"]
    expected = psi([0] + [10] * 16 + [0], value)
    assert ref["psi"] == pytest.approx(expected, abs=1e-6) and ref["worst"] == {"output": "z", "feature": "value"}
    assert ref["band"] == "significant"
    by = {(f["output"], f["feature"]): f["psi"] for f in ref["features"]}
    assert by["y", "class"] == pytest.approx(psi([50, 50, 0], [25, 25, 0]), abs=1e-6) and by["y", "class"] < 0.01


def test_drift_is_not_judged_below_the_minimum_served(store):
    assert quality.MIN_SERVED == 50
    record(store, qmsg("cam-1", 1, T0 + 10, bins((40, 9, 0))))  # 49 outputs
    d = quality.device(store, "cam-1", T0, T0 + 15)
    assert d["served"] == 49
    assert d["drift"]["reference"] == {"psi": None, "p": None, "js": None, "band": "too few", "worst": None,
                                       "served": 49,
                                       "expected_served": 100, "features": []}
    record(store, qmsg("cam-1", 2, T0 + 20, bins((1, 0, 0))))  # 50 with the next window
    d = quality.device(store, "cam-1", T0, T0 + 30)["drift"]["reference"]
    assert d["band"] == "significant" and d["psi"] == pytest.approx(psi([50, 50, 0], [41, 9, 0]), abs=1e-6)


def test_drift_against_the_rest_of_the_fleet_on_the_same_bundle(store):
    store.add_bundle(OTHER_SHA, 1000, manifest("2"), profile=msgspec.json.encode(PROFILE))
    record(store, qmsg("cam-a", 1, T0 + 10, bins((75, 25, 0))))
    record(store, qmsg("cam-b", 1, T0 + 10, bins((50, 50, 0))))
    record(store, qmsg("cam-c", 1, T0 + 10, bins((50, 50, 0))))
    record(store, qmsg("cam-d", 1, T0 + 10, bins((0, 100, 0)), sha=OTHER_SHA))  # another version: not compared
    a = quality.device(store, "cam-a", T0, T0 + 30)["drift"]["fleet"]
    # the others' sum: 100 / 100 / 0 -> the same as against the reference
    assert a["psi"] == pytest.approx(psi([100, 100, 0], [75, 25, 0]), abs=1e-6) and a["band"] == "significant"
    assert (a["devices"], a["expected_served"]) == (2, 200)
    b = quality.device(store, "cam-b", T0, T0 + 30)["drift"]["fleet"]
    # the others (a + c): 125 / 75 / 0 against 50 / 50 / 0
    assert b["psi"] == pytest.approx(psi([125, 75, 0], [50, 50, 0]), abs=1e-6)
    assert b["psi"] == pytest.approx(0.064653, abs=1e-6) and b["band"] == "stable"
    d = quality.device(store, "cam-d", T0, T0 + 30)["drift"]["fleet"]
    assert (d["psi"], d["band"], d["devices"]) == (None, "too few", 0)  # alone on its version

    store.add_bundle("12" * 32, 1000, manifest("3"), profile=msgspec.json.encode(PROFILE))
    record(store, qmsg("cam-e", 1, T0 + 10, bins((50, 50, 0)), sha="12" * 32))
    record(store, qmsg("cam-f", 1, T0 + 10, bins((20, 20, 0)), sha="12" * 32))  # 40: too few to be the expected
    e = quality.device(store, "cam-e", T0, T0 + 30)["drift"]
    assert e["fleet"]["band"] == "too few" and e["fleet"]["devices"] == 1 and e["reference"]["band"] == "stable"


# -- canary and feedback --------------------------------------------------------------------------------------------


def test_canary_agreement_with_its_wilson_interval(store):
    record(store, qmsg("cam-1", 1, T0 + 10, canary=protocol.Canary(runs=10, agree=9, max_abs_err=0.25, time=T0 + 8)))
    record(store, qmsg("cam-1", 2, T0 + 20, canary=protocol.Canary(runs=10, agree=10, max_abs_err=0.125,
                                                                   time=T0 + 17)))
    record(store, qmsg("cam-1", 3, T0 + 30))  # no canary in this window
    c = quality.device(store, "cam-1", T0, T0 + 40)["canary"]
    assert (c["runs"], c["agree"], c["agreement"], c["max_abs_err"]) == (20, 19, 0.95, 0.25)
    # Wilson, z = 1.96, 19 of 20, worked on paper: centre 0.877491, half width 0.113627
    assert c["interval"] == pytest.approx([0.763864, 0.991118], abs=1e-5)
    assert c["last_time"] == T0 + 17  # the device's clock is right here: its own time
    assert quality.device(store, "cam-1", T0 + 25, T0 + 40)["canary"] == {
        "runs": 0, "agree": 0, "agreement": None, "interval": None, "max_abs_err": None, "last_time": None}


def test_the_rollout_gates_count_the_windows_that_ended_before_active_was_stored(store):
    """The agent runs the canary as it activates, then serves; the windows holding them can end (and be stored)
    before the ``active`` event: the gates read the new bundle's windows from the wave's start, not from
    ``active``."""
    now = time.time()
    r, _ = machine.step(machine.new("ro-1", SHA, ["all"], ["cam-1"], machine.options(min_canary_agreement="95%"),
                                    now=now - 5), {}, now - 5)
    store.add_deployment(r.waves[0].deployment_id, SHA, ["cam-1"])
    record(store, qmsg("cam-1", 1, now - 3, canary=protocol.Canary(runs=8, agree=0, time=now - 4)))
    active = protocol.ActiveModel(name="cls", version="1", sha256=SHA, runtime="onnxruntime", precision="int8")
    store.record_telemetry(protocol.Telemetry(device_id="cam-1", boot_id="b1", seq=2, time=now - 2, interval_s=10.0,
                                              inferences=7, errors={"timeout": 1}, active=active),
                           received=now - 2)
    store.set_phase(r.waves[0].deployment_id, "cam-1", "active")  # stored now: after the windows above
    observed = Rollouts(store, link=None, public_url=lambda: "")._observe(r)["cam-1"]
    assert observed.phase == "active" and observed.since > now - 2
    assert (observed.health.canary_runs, observed.health.canary_agree) == (8, 0)
    assert (observed.health.inferences, observed.health.errors) == (7, 1)
    r, _ = machine.step(r, {"cam-1": observed}, time.time())
    assert r.status == "halted" and r.reason.startswith("wave 1: cam-1 canary agreement 0% (0 of 8"), r.reason


def test_feedback_accuracy_precision_recall_f1_and_the_confusion_matrix(store):
    fb1 = protocol.Feedback(labels=15, confusion=[[0, 0, 8], [0, 1, 2], [1, 1, 5]], refused={"unknown id": 2})
    fb2 = protocol.Feedback(labels=5, confusion=[[1, 0, 1], [1, 1, 4]],
                            refused={"unknown id": 1, "label out of range": 3})
    record(store, qmsg("cam-1", 1, T0 + 10, feedback=fb1))
    record(store, qmsg("cam-1", 2, T0 + 20, feedback=fb2))
    d = quality.device(store, "cam-1", T0, T0 + 30)
    f = d["feedback"]
    assert f["classes"] == [0, 1, "other"]
    assert f["confusion"] == [[8, 2, 0], [1, 9, 0], [0, 0, 0]]
    assert (f["labels"], f["scored"], f["accuracy"]) == (20, 20, 17 / 20)
    assert f["accuracy_interval"] == pytest.approx(list(aq.wilson(17, 20)))
    c0, c1, other = f["per_class"]
    assert (c0["class"], c0["tp"], c0["support"], c0["predicted"]) == (0, 8, 10, 9)
    assert (c0["precision"], c0["recall"]) == pytest.approx((8 / 9, 8 / 10))
    assert c0["f1"] == pytest.approx(16 / 19)  # 2tp / (2tp + fp + fn)
    assert (c1["precision"], c1["recall"], c1["f1"]) == pytest.approx((9 / 11, 9 / 10, 18 / 21))
    assert c0["precision_interval"] == pytest.approx(list(aq.wilson(8, 9)))
    assert c1["recall_interval"] == pytest.approx(list(aq.wilson(9, 10)))
    assert other == {"class": "other", "precision": None, "recall": None, "f1": None, "support": 0, "predicted": 0,
                     "tp": 0, "precision_interval": None, "recall_interval": None}
    assert f["macro"] == pytest.approx({"precision": (8 / 9 + 9 / 11) / 2, "recall": (0.8 + 0.9) / 2,
                                        "f1": (16 / 19 + 18 / 21) / 2})
    assert d["refused"] == {"label out of range": 3, "unknown id": 3}


# -- the fleet view and the series ------------------------------------------------------------------------------------


def test_summary_is_about_the_bundle_a_device_runs_now(store):
    """After a rollback the device's latest window may be the bad bundle's last one: the row is still about the
    bundle it runs (when it reported on it in the window), as the health table's model column is."""
    store.add_bundle(OTHER_SHA, 1000, manifest("2"), profile=msgspec.json.encode(PROFILE))
    record(store, qmsg("cam-1", 1, T0 + 10, bins((50, 50, 0))))
    record(store, qmsg("cam-1", 2, T0 + 20, bins((5, 5, 0)), sha=OTHER_SHA))  # the bad bundle's last window
    [row] = quality.summary(store, T0, T0 + 30)
    assert row["sha256"] == OTHER_SHA and row["served"] == 10  # unknown which one it runs: the latest
    store.record_state(protocol.State(device_id="cam-1", online=True, time=T0 + 25, boot_id="b1", active=protocol
                                      .ActiveModel(name="m", version="1", sha256=SHA, runtime="onnxruntime",
                                                   precision="fp32")), received=T0 + 25)
    [row] = quality.summary(store, T0, T0 + 30)
    assert (row["sha256"], row["served"], row["band_ref"]) == (SHA, 100, "stable")


def test_summary_worst_first_and_the_series(store):
    record(store, qmsg("cam-ok", 1, T0 + 10, bins((50, 50, 0)),
                       canary=protocol.Canary(runs=4, agree=4), feedback=protocol.Feedback(
                           labels=4, confusion=[[0, 0, 2], [1, 1, 2]])))
    record(store, qmsg("cam-bad", 1, T0 + 10, bins((90, 10, 0)), canary=protocol.Canary(runs=4, agree=3)))
    record(store, qmsg("cam-mid", 1, T0 + 10, bins((62, 38, 0))))
    record(store, qmsg("cam-few", 1, T0 + 10, bins((5, 5, 0))))
    rows = quality.summary(store, T0, T0 + 30)
    # cam-ok matches the reference but not a fleet that cam-bad pulls its way (the others: 157 / 53 / 0): the
    # worse of its two bands is its band
    assert [r["device_id"] for r in rows] == ["cam-bad", "cam-ok", "cam-mid", "cam-few"]
    bad, ok, mid, few = rows
    assert (ok["band_ref"], ok["band_fleet"], ok["band"]) == ("stable", "significant", "significant")
    assert ok["psi_fleet"] == pytest.approx(psi([157, 53, 0], [50, 50, 0]), abs=1e-6)
    assert ok["psi_fleet"] < bad["psi_ref"]
    assert bad["psi_ref"] == pytest.approx(psi([50, 50, 0], [90, 10, 0]), abs=1e-6) and bad["band"] == "significant"
    # cam-mid against the others (cam-ok + cam-bad + cam-few: 145 / 65 / 0)
    assert mid["psi_fleet"] == pytest.approx(psi([145, 65, 0], [62, 38, 0]), abs=1e-6)
    assert mid["psi_ref"] == pytest.approx(psi([50, 50, 0], [62, 38, 0]), abs=1e-6)
    assert (mid["band_ref"], mid["band_fleet"], mid["band"]) == ("stable", "stable", "stable")
    assert (ok["canary_agreement"], ok["accuracy"], ok["labels"], bad["canary_agreement"]) == (1.0, 1.0, 4, 0.75)
    assert (few["band"], few["psi_ref"], few["served"]) == ("too few", None, 10)
    assert [r["device_id"] for r in quality.summary(store, T0, T0 + 30, ["cam-ok", "cam-few"])] == \
        ["cam-ok", "cam-few"]
    assert quality.summary(store, T0 + 10.5, T0 + 30) == []

    record(store, qmsg("cam-bad", 2, T0 + 20, bins((25, 25, 0)), canary=protocol.Canary(runs=2, agree=2)))
    record(store, qmsg("cam-bad", 3, T0 + 30, bins((10, 10, 0))))
    s = quality.series(store, "cam-bad", T0, T0 + 40)
    assert s["sha256"] == SHA and s["step"] is None
    assert [p["time"] for p in s["points"]] == [T0 + 10, T0 + 20, T0 + 30]
    assert [p["band"] for p in s["points"]] == ["significant", "stable", "too few"]
    assert s["points"][0]["psi"] == pytest.approx(bad["psi_ref"]) and s["points"][1]["psi"] < 0.05
    assert [p["canary_agreement"] for p in s["points"]] == [0.75, 1.0, None]
    b = quality.series(store, "cam-bad", T0, T0 + 40, step=20)  # buckets [T0, T0+20) and [T0+20, T0+40)
    assert [(p["time"], p["windows"], p["served"]) for p in b["points"]] == [(T0, 1, 100), (T0 + 20, 2, 70)]
    # 35 / 35 / 0 and the reference's shares elsewhere: the worst feature is the one smoothing moves most
    assert b["points"][1]["psi"] == pytest.approx(max(
        psi([50, 50, 0], [35, 35, 0]), psi(UNIT, [0] * 9 + [70]), psi(UNIT[::-1], [70] + [0] * 9),
        psi([0] + [10] * 16 + [0], [0] + [70] * 16 + [0])), abs=1e-6)
    assert b["points"][1]["canary_agreement"] == 1.0

    for bad_window in ((T0 + 5, T0), (float("nan"), T0), (T0 - 500 * 86400, T0)):
        with pytest.raises(quality.WindowError):
            quality.device(store, "cam-bad", *bad_window)
    with pytest.raises(quality.WindowError, match="step"):
        quality.series(store, "cam-bad", T0, T0 + 40, step=0.5)
    assert quality.device(store, "cam-nobody", T0, T0 + 40) is None


# -- storage: refusals, seq, duplicates, retention, migration -------------------------------------------------------


def test_messages_that_do_not_fit_the_bundle_are_refused_counted_and_not_stored(store):
    record(store, qmsg("cam-1", 1, T0 + 10, bins((40, 10, 0))))
    before = quality.device(store, "cam-1", T0, T0 + 100)
    wrong_layout = [
        bins((40, 10, 0))[:1],  # one output of two
        [{**bins((40, 10, 0))[0], "class": [40, 10]}, bins((40, 10, 0))[1]],  # 2 class bins, the profile has 3
        [{**{k: v for k, v in bins((40, 10, 0))[0].items() if k != "margin"}, "spread": [0] * 9 + [50]},
         bins((40, 10, 0))[1]],  # a feature the profile does not have
        [], ]  # no bins while served says 50
    bad = [(qmsg("cam-1", 2, T0 + 20, sha="99" * 32), quality.UNKNOWN_BUNDLE),
           (qmsg("cam-1", 3, T0 + 20, sha=BARE_SHA), quality.NO_PROFILE),
           (qmsg("cam-1", 4, T0 + 20, profile="00" * 32), quality.WRONG_PROFILE),
           *[(qmsg("cam-1", 5 + i, T0 + 20, b, served=50), quality.WRONG_BINS) for i, b in enumerate(wrong_layout)],
           (qmsg("cam-1", 9, T0 + 20, feedback=protocol.Feedback(labels=1, confusion=[[3, 0, 1]])),
            quality.BAD_CONFUSION),
           (qmsg("cam-1", 10, T0 + 20, feedback=protocol.Feedback(labels=1, confusion=[[0, 3, 1]])),
            quality.BAD_CONFUSION)]
    for msg, reason in bad:
        with pytest.raises(quality.Refused) as e:
            record(store, msg)
        assert str(e.value) == reason
    assert quality.refused(store) == {quality.UNKNOWN_BUNDLE: 1, quality.NO_PROFILE: 1, quality.WRONG_PROFILE: 1,
                                      quality.WRONG_BINS: 4, quality.BAD_CONFUSION: 2}
    assert store.query("SELECT count(*) FROM quality")[0][0] == 1
    assert quality.device(store, "cam-1", T0, T0 + 100) == before  # nothing skewed
    # a window that served nothing may come without bins (its canary or feedback still counts)
    assert record(store, qmsg("cam-1", 11, T0 + 30, [], canary=protocol.Canary(runs=1, agree=1)))
    d = quality.device(store, "cam-1", T0, T0 + 100)
    assert (d["served"], d["windows"], d["canary"]["runs"]) == (50, 2, 1)
    assert d["drift"]["reference"]["psi"] == before["drift"]["reference"]["psi"]


def test_quality_seqs_count_with_telemetry_and_events_and_a_redelivery_counts_once(store):
    store.record_telemetry(protocol.Telemetry(device_id="cam-1", boot_id="b1", seq=1, time=T0, interval_s=10.0,
                                              inferences=5), received=T0)
    assert record(store, qmsg("cam-1", 2, T0 + 10))
    store.record_event(protocol.Event(device_id="cam-1", boot_id="b1", seq=4, time=T0 + 11, kind="error"),
                       received=T0 + 11)
    assert not record(store, qmsg("cam-1", 2, T0 + 10))  # the same (boot, seq) again
    h = store.health("cam-1", now=T0 + 12)[0]
    assert (h["seq_gaps"], h["duplicates"]) == (1, 1)  # seq 3 never came
    assert record(store, qmsg("cam-1", 3, T0 + 12))  # late: closes the gap
    assert store.health("cam-1", now=T0 + 13)[0]["seq_gaps"] == 0
    assert quality.device(store, "cam-1", T0, T0 + 20)["windows"] == 2


def test_quality_is_filed_at_the_controller_time(store):
    # a device whose clock is 400 days behind: its windows are filed at the controller's time
    behind = 400 * 86400
    record_at = lambda seq, t: store.record_quality(qmsg("cam-1", seq, t - behind), received=t)  # noqa: E731
    record_at(1, T0 + 10)
    record_at(2, T0 + 20)
    assert quality.device(store, "cam-1", T0, T0 + 30)["windows"] == 2
    rows = store.query("SELECT time, device_time FROM quality ORDER BY seq")
    assert [tuple(r) for r in rows] == [(T0 + 10, T0 + 10 - behind), (T0 + 20, T0 + 20 - behind)]


def test_quality_windows_age_out_with_raw_telemetry(store):
    now = T0 + 10 * 86400
    record(store, qmsg("cam-1", 1, T0 + 10))  # ten days old
    record(store, qmsg("cam-1", 2, now - 3600))
    assert compact(store, now, Policy())["quality"] == 1
    assert [r[0] for r in store.query("SELECT seq FROM quality")] == [2]


def test_a_version_6_database_is_migrated_and_profiles_are_read_from_the_bundle_files(tmp_path, real):
    from fleet.store import schema as store_module

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(store_module.BASE + ";INSERT INTO schema_version VALUES (2);")
    for v in (2, 3, 4, 5):
        db.executescript(store_module.MIGRATIONS[v])
    for sha in (real["sha"], BARE_SHA):
        db.execute("INSERT INTO bundles (sha256, size, name, version, target, runtime, precision, manifest, uploaded) "
                   "VALUES (?, 1, 'ocr-cls', '1', 'cpu', 'onnxruntime', 'fp32', '{}', 0)", (sha,))
    db.commit()
    db.close()
    bundles_dir = tmp_path / "bundles"
    bundles_dir.mkdir()
    (bundles_dir / f"{real['sha']}.tar").write_bytes(real["path"].read_bytes())  # BARE_SHA's file is gone
    s = Store(path).open()
    try:
        assert s.query("SELECT version FROM schema_version")[0][0] == store_module.SCHEMA_VERSION == 10
        assert s.reference(real["sha"]) is None  # not read yet
        assert s.read_profiles(bundles_dir) == 1
        profile_id, profile = s.reference(real["sha"])
        assert profile_id == real["profile"].id and profile == real["profile"]
        assert s.reference(BARE_SHA) is None
        assert s.query("SELECT profile FROM bundles WHERE sha256 = ?", (BARE_SHA,))[0][0] == ""
        assert s.read_profiles(bundles_dir) == 0  # each bundle is read once
    finally:
        s.close()


# -- end to end: a real bundle's profile, real outputs, a real broker ----------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The PP-OCR direction classifier's real outputs on real text crops (labels: 0 upright, 1 turned), its
    reference profile built from a held-out half (both directions), and a signed bundle carrying it."""
    import hashlib

    import onnxruntime as ort

    from conftest import OUTPUT
    from edgefleet.data import text_direction
    from edgefleet.models import model_path

    x, labels = text_direction()
    session = ort.InferenceSession(str(model_path("ocr-cls")))
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    held = slice(0, len(x) // 2)
    profile = aq.build({OUTPUT: out[held]}, {OUTPUT: "classifier"})
    d = tmp_path_factory.mktemp("quality-bundle")
    (d / "profile.json").write_bytes(msgspec.json.encode(profile))
    np.savez(d / "sample.npz", x=x[:1])
    m = Manifest(name="ocr-cls", version="1", target="cpu", runtime="onnxruntime", precision="fp32",
                 model="model.onnx", files=[],
                 inputs=[TensorSpec(name="x", shape=[-1, 3, 48, 192], dtype="float32")],
                 outputs=[TensorSpec(name=OUTPUT, shape=[-1, 2], dtype="float32")])
    path = d / "ocr-1.tar"
    write_bundle(path, m, {"model.onnx": model_path("ocr-cls"), "sample.npz": d / "sample.npz",
                           "profile.json": d / "profile.json"}, sign_key=release_key()[0], serial=1)
    return {"path": path, "sha": hashlib.sha256(path.read_bytes()).hexdigest(), "profile": profile,
            "outputs": out[held.stop:], "labels": labels[held.stop:], "output": OUTPUT}


def folded(real, rows) -> list[dict[str, list[int]]]:
    """The bins a device sends for these served outputs: agent.quality.Folder over them."""
    f = aq.Folder(real["profile"])
    f.add({real["output"]: real["outputs"][rows]})
    return [f.take()[o.name] for o in real["profile"].outputs]


def confusion(real, rows) -> list[list[int]]:
    """The sparse confusion an agent would send for labelled predictions: class bins of the profile."""
    index = {c: i for i, c in enumerate(real["profile"].outputs[0].classes)}
    other = len(index)
    cells: dict[tuple[int, int], int] = {}
    for truth, pred in zip(real["labels"][rows], real["outputs"][rows].argmax(1)):
        k = (index.get(int(truth), other), index.get(int(pred), other))
        cells[k] = cells.get(k, 0) + 1
    return [[t, p, n] for (t, p), n in sorted(cells.items())]


def test_quality_over_mqtt_from_real_outputs(fleet, client, devices, real):
    up = client.upload_bundle(real["path"])
    assert up["sha256"] == real["sha"]
    assert fleet.store.reference(real["sha"])[0] == real["profile"].id
    labels, out = real["labels"], real["outputs"]
    turned = np.flatnonzero(labels == 1)
    mixed = np.arange(len(labels))

    def send(dev, seq, rows, **kw):
        msg = protocol.Quality(device_id=dev.id, boot_id=dev.boot_id, seq=seq, time=time.time(),
                               interval_s=10.0, sha256=real["sha"], version="1", profile=real["profile"].id,
                               served=len(rows), bins=folded(real, rows), **kw)
        dev.send(msg)
        return msg

    cam_ok, cam_turned = devices("cam-ok"), devices("cam-turned")
    send(cam_ok, 1, mixed, feedback=protocol.Feedback(labels=len(mixed), confusion=confusion(real, mixed)),
         canary=protocol.Canary(runs=16, agree=16, max_abs_err=0.0))
    send(cam_turned, 1, turned[:100], canary=protocol.Canary(runs=16, agree=15, max_abs_err=0.5))
    # what does not fit the bundle: refused by reason at the link, never stored
    base = dict(device_id="cam-ok", boot_id="boot-1", time=0.0, interval_s=10.0, version="1")
    cam_ok.send(protocol.Quality(seq=2, sha256="99" * 32, profile=real["profile"].id, **base))
    cam_ok.send(protocol.Quality(seq=3, sha256=real["sha"], profile="00" * 32, **base))
    cam_ok.send(protocol.Quality(seq=4, sha256=real["sha"], profile=real["profile"].id, served=3,
                                 bins=[{"class": [1, 2]}], **base))
    cam_ok.send(protocol.Quality(seq=5, sha256=real["sha"], profile=real["profile"].id,
                                 feedback=protocol.Feedback(labels=1, confusion=[[0, 40, 1]]), **base))
    status = wait_for(lambda: (s := client.status())["invalid"].get(quality.BAD_CONFUSION) and s,
                      what="the four refusals")
    assert {k: v for k, v in status["invalid"].items() if k.startswith("quality")} == {
        quality.UNKNOWN_BUNDLE: 1, quality.WRONG_PROFILE: 1, quality.WRONG_BINS: 1, quality.BAD_CONFUSION: 1}
    assert status["received"] == 2

    ok = quality.device(fleet.store, "cam-ok")
    turned_q = quality.device(fleet.store, "cam-turned")
    assert ok["served"] == len(mixed) and turned_q["served"] == 100
    # the reference is held-out crops of both directions; the other half (cam-ok) differs from it by sampling
    # noise only (its largest PSI, on the sparse margin and entropy bins, measured 0.096), turned text by far more
    ok_psi = ok["drift"]["reference"]["psi"]
    assert ok["drift"]["reference"]["band"] != "significant"
    assert turned_q["drift"]["reference"]["band"] == "significant"
    assert turned_q["drift"]["reference"]["psi"] > 10 * ok_psi
    assert turned_q["drift"]["reference"]["worst"] == {"output": real["output"], "feature": "class"}
    assert turned_q["drift"]["reference"]["psi"] == pytest.approx(
        max(aq.psi(real["profile"].outputs[0].counts[f], c) for f, c in folded(real, turned[:100])[0].items()))
    assert turned_q["drift"]["fleet"]["band"] == "significant" and turned_q["drift"]["fleet"]["devices"] == 1
    # feedback: the model's real accuracy on those crops
    correct = int((out.argmax(1) == labels).sum())
    assert ok["feedback"]["accuracy"] == pytest.approx(correct / len(labels))
    assert ok["feedback"]["labels"] == len(labels)
    assert turned_q["canary"]["agreement"] == 15 / 16 and ok["canary"]["agreement"] == 1.0


def test_quality_in_health_the_api_and_metrics(fleet, client, devices, real, capsys, tmp_path):
    client.upload_bundle(real["path"])
    labels = real["labels"]
    turned = np.flatnonzero(labels == 1)
    mixed = np.arange(len(labels))
    pid = real["profile"].id

    def send(dev, seq, rows, **kw):
        dev.send(protocol.Quality(device_id=dev.id, boot_id=dev.boot_id, seq=seq, time=time.time(), interval_s=10.0,
                                  sha256=real["sha"], version="1", profile=pid, served=len(rows),
                                  bins=folded(real, rows), **kw))

    ok, bad, quiet = devices("cam-ok"), devices("cam-turned"), devices("cam-quiet")
    send(ok, 1, mixed, feedback=protocol.Feedback(labels=len(mixed), confusion=confusion(real, mixed)),
         canary=protocol.Canary(runs=16, agree=16))
    send(bad, 1, turned[:100], canary=protocol.Canary(runs=16, agree=12, max_abs_err=0.5, time=time.time()),
         feedback=protocol.Feedback(labels=3, confusion=confusion(real, turned[:3])))
    quiet.telemetry(1)  # no quality at all
    bad.send(protocol.Quality(device_id="cam-turned", boot_id="boot-1", seq=2, time=time.time(), interval_s=10.0,
                              sha256=real["sha"], version="1", profile="00" * 32))  # refused
    wait_for(lambda: client.status()["received"] == 3 and client.status()["invalid"], what="the messages")

    # the fleet table: drift vs reference with its band, canary agreement, accuracy with its labels
    code, out, err = run_cli(capsys, "health", "--sort", "drift", *cli_args(fleet))
    assert code == 0, err
    lines = out.strip().splitlines()
    header = lines[0]
    for column in ("drift PSI", "canary %", "acc % (labels)"):
        assert column in header
    rows = {line.split()[0]: line for line in lines[1:]}
    assert [line.split()[0] for line in lines[1:]] == ["cam-turned", "cam-ok", "cam-quiet"]  # the most drifted first
    h = {x["device_id"]: x for x in client.health()}
    tq, oq = h["cam-turned"]["quality"], h["cam-ok"]["quality"]
    assert f"{tq['psi_ref']:.3f} significant" in rows["cam-turned"] and " 75.0 " in rows["cam-turned"]
    assert f"{oq['accuracy'] * 100:.1f} ({len(mixed)})" in rows["cam-ok"] and " 100.0 " in rows["cam-ok"]
    assert h["cam-quiet"]["quality"] is None and rows["cam-quiet"].count(" - ") >= 3
    assert (tq["window_s"], tq["canary_runs"], tq["labels"], tq["sha256"]) == (600.0, 16, 3, real["sha"])
    assert [x["device_id"] for x in client.health(sort="canary")][:2] == ["cam-turned", "cam-ok"]

    # the device report: a quality section; --json carries it
    code, out, err = run_cli(capsys, "health", "cam-turned", *cli_args(fleet))
    assert code == 0, err
    report = client.health("cam-turned")["quality_report"]
    for needle in ("quality (the last 10 min, version 1", "100 outputs served",
                   f"drift vs reference: PSI {report['drift']['reference']['psi']:.3f} significant",
                   f"(worst: {real['output']} class)", "drift vs fleet (1 other device(s)): PSI",
                   "canary: 12/16 agree with fp32, 75.0 % (95 % CI", "max abs error 0.5, last",
                   "feedback: 3 labels, accuracy"):
        assert needle in out, (needle, out)
    code, out, _ = run_cli(capsys, "health", "cam-turned", "--json", *cli_args(fleet))
    assert json.loads(out)["quality_report"]["drift"] == report["drift"]
    code, out, _ = run_cli(capsys, "health", "cam-quiet", *cli_args(fleet))
    assert "quality: nothing reported in the last 10 min" in out

    # the JSON API
    url = fleet.http_url
    status, _, body = http("GET", f"{url}/api/devices/cam-turned/quality", ca=fleet)
    doc = json.loads(body)
    assert status == 200 and doc["sha256"] == real["sha"] and doc["drift"]["reference"]["band"] == "significant"
    assert doc["feedback"]["classes"] == [*real["profile"].outputs[0].classes, "other"]
    assert doc["canary"]["agreement"] == 0.75
    now = time.time()
    status, _, body = http("GET", f"{url}/api/devices/cam-turned/quality?since={now - 3600}&until={now - 1800}",
                           ca=fleet)
    assert status == 200 and json.loads(body)["sha256"] is None  # nothing then
    status, _, body = http("GET", f"{url}/api/devices/cam-turned/quality/series", ca=fleet)
    s = json.loads(body)
    assert status == 200 and len(s["points"]) == 1 and s["points"][0]["band"] == "significant"
    status, _, body = http("GET", f"{url}/api/quality?limit=1", ca=fleet)
    page = json.loads(body)
    assert status == 200 and page["total"] == 2 and page["next"] == 1
    assert [d["device_id"] for d in page["devices"]] == ["cam-turned"]
    assert page["refused"] == {quality.WRONG_PROFILE: 1}
    status, _, body = http("GET", f"{url}/api/quality?limit=1&offset=1", ca=fleet)
    assert [d["device_id"] for d in json.loads(body)["devices"]] == ["cam-ok"] and json.loads(body)["next"] is None
    for path, needle in (("/api/devices/cam-ok/quality?since=abc", "since='abc' is not a unix time"),
                         (f"/api/devices/cam-ok/quality?since={now}&until={now - 5}", "must be before until"),
                         ("/api/devices/cam-ok/quality?sha256=xyz", "sha256='xyz' is not a sha256"),
                         ("/api/devices/cam-ok/quality?window=1", "unknown query parameter 'window'"),
                         ("/api/devices/cam-ok/quality/series?step=0", "step='0'"),
                         ("/api/quality?limit=0", "limit='0' is out of range"),
                         ("/api/quality?offset=-1", "offset='-1' is out of range"),
                         ("/api/quality?since=1&since=2", "since is given more than once"),
                         ("/api/quality?since=0&until=99999999999", "at most")):
        status, _, body = http("GET", url + path, ca=fleet)
        assert status == 400 and needle in json.loads(body)["error"], (path, body)
        assert "\n" not in json.loads(body)["error"]
    for path in ("/api/devices/cam-nobody/quality", "/api/devices/cam-nobody/quality/series"):
        assert http("GET", url + path, ca=fleet)[0] == 404
    assert http("GET", f"{url}/api/quality", headers={"Authorization": ""}, ca=fleet)[0] == 401

    # /metrics
    status, _, body = http("GET", f"{url}/metrics", ca=fleet)
    text = body.decode()
    base = 'device="cam-turned",model="",version=""'
    assert f'edgefleet_quality_drift_psi{{{base},against="reference"}} {tq["psi_ref"]!r}' in text
    assert f'edgefleet_quality_drift_psi{{{base},against="fleet"}} {tq["psi_fleet"]!r}' in text
    assert f"edgefleet_canary_agreement{{{base}}} 0.75" in text
    assert f"edgefleet_feedback_labels{{{base}}} 3" in text
    assert 'edgefleet_feedback_accuracy{device="cam-ok",model="",version=""} ' in text
    assert "cam-quiet" not in "".join(x for x in text.splitlines() if x.startswith(("edgefleet_quality",
                                                                                       "edgefleet_canary")))
    assert f'edgefleet_quality_refused_total{{reason="{quality.WRONG_PROFILE}"}} 1' in text

    # a bundle whose profile.json is not a profile is refused at upload, in one line, and not kept
    broken = tmp_path / "profile.json"
    broken.write_text('{"outputs": "no"}')
    m = Manifest(name="ocr-cls", version="broken", target="cpu", runtime="onnxruntime", precision="fp32",
                 model="model.onnx", files=[], inputs=[TensorSpec(name="x", shape=[-1, 3, 48, 192], dtype="float32")],
                 outputs=[TensorSpec(name=real["output"], shape=[-1, 2], dtype="float32")])
    path = tmp_path / "broken.tar"
    sample = real["path"].parent / "sample.npz"
    write_bundle(path, m, {"model.onnx": sample, "sample.npz": sample, "profile.json": broken},
                 sign_key=release_key()[0], serial=3)
    code, out, err = run_cli(capsys, "deploy", str(path), "--to", "cam-ok", *cli_args(fleet))
    assert code == 2 and "profile.json is not a quality profile" in err
    assert_one_error_line(err, "profile.json is not a quality profile")
    assert [b["version"] for b in client.bundles()] == ["1"]


def test_the_dashboard_series_of_an_empty_range_has_no_quality_points(store):
    """The telemetry series takes any range; quality's [since, until) must not be empty (found by schemathesis:
    since=5e-324 seconds made since == until)."""
    from fleet.series import series

    record(store, qmsg("cam-1", 1, time.time() - 5))
    s = series(store, "cam-1", since_s=5e-324)
    assert s.quality is not None and s.quality.points == 0 and s.quality.psi == []
    assert series(store, "cam-1", since_s=60).quality.points == 1
