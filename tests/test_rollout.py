"""The rollout state machine on its own: no controller, no clock (time is a number the test moves)."""

from __future__ import annotations

import json

import pytest

from fleet.rollout import (Halt, Health, Observation, Publish, Rollback, RolloutError, act, dump, load, new,
                           options, parse_duration, parse_waves, plan_waves, step)

NEW, OLD, OTHER = "n" * 64, "o" * 64, "x" * 64
DEVICES = ["d1", "d2", "d3", "d4"]


class Sim:
    """One rollout and what its devices report; ``step(dt)`` moves time and steps the machine."""

    def __init__(self, devices=DEVICES, roundtrip=False, **opts):
        self.r = new("ro-1", NEW, ["all"], list(devices), options(**opts), now=0.0)
        self.now = 0.0
        self.roundtrip = roundtrip  # serialize and load the rollout between steps, as a restarted driver does
        self.obs = {d: Observation(active_sha=OLD, active_known=True, online=True) for d in devices}
        self.actions: list = []

    def step(self, dt: float = 0.0) -> list:
        self.now += dt
        if self.roundtrip:
            self.r = load(json.loads(json.dumps(dump(self.r))))
        self.r, acts = step(self.r, self.obs, self.now)
        self.actions += acts
        return acts

    def act(self, action: str) -> list:
        self.r, acts = act(self.r, action, self.now)
        self.actions += acts
        return acts

    def report(self, device: str, phase: str, reason: str = "") -> None:
        o = self.obs[device]
        o.phase, o.since, o.reason = phase, self.now, reason
        if phase == "active":
            o.active_sha = NEW

    def traffic(self, device: str, inferences: int, errors: int = 0, p95: float | None = 5.0,
                baseline: float | None = None) -> None:
        self.obs[device].health = Health(inferences, errors, p95)
        if baseline is not None:
            self.obs[device].baseline = Health(100, 0, baseline)

    def wave_devices(self, i: int) -> list[str]:
        return self.r.waves[i].devices

    def phases(self) -> dict[str, str]:
        return {d: dev.phase for d, dev in self.r.devices.items()}


def publishes(actions) -> list[tuple[str, list[str]]]:
    return [(a.sha256, a.devices) for a in actions if type(a) is Publish]


def rollbacks(actions) -> list[tuple[str, list[str]]]:
    return [(a.sha256, a.devices) for a in actions if isinstance(a, Rollback)]


def halts(actions) -> list[str]:
    return [a.reason for a in actions if isinstance(a, Halt)]


def activate(sim: Sim, wave: int) -> None:
    for d in sim.wave_devices(wave):
        sim.report(d, "active")


# -- waves ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("roundtrip", [False, True], ids=["in-memory", "persisted-every-step"])
def test_waves_advance_only_after_every_device_is_active_and_has_soaked(roundtrip):
    sim = Sim(waves="1,50%,100%", soak="10s", roundtrip=roundtrip)
    assert [w.devices for w in sim.r.waves] == [["d1"], ["d2"], ["d3", "d4"]]
    assert publishes(sim.step()) == [(NEW, ["d1"])]
    assert sim.r.waves[0].deployment_id == "ro-1-w1"
    assert sim.phases() == {"d1": "pending", "d2": "waiting", "d3": "waiting", "d4": "waiting"}
    assert sim.r.devices["d1"].previous == OLD

    assert sim.step(100) == []  # published long ago, but not active: nothing moves
    sim.report("d1", "downloading")
    assert sim.step(1) == [] and sim.phases()["d1"] == "downloading"
    sim.report("d1", "active")
    assert sim.step(1) == []  # active, not soaked
    assert sim.step(8.9) == []
    assert publishes(sim.step(0.2)) == [(NEW, ["d2"])]  # 10.1 s after it became active
    assert sim.r.waves[0].status == "passed" and sim.r.waves[1].status == "rolling"
    assert sim.phases()["d3"] == "waiting"

    sim.report("d2", "active")
    assert sim.step(5) == []
    assert publishes(sim.step(5)) == [(NEW, ["d3", "d4"])]
    sim.report("d3", "active")
    assert sim.step(20) == []  # d4 is not active yet: the wave waits for every device
    sim.report("d4", "active")
    assert sim.step(9) == []
    assert sim.step(1) == []
    assert sim.r.status == "completed" and [w.status for w in sim.r.waves] == ["passed"] * 3
    assert sim.step(100) == [] and sim.r.status == "completed"  # a finished rollout stays finished
    assert not halts(sim.actions) and not rollbacks(sim.actions)


def test_one_wave_and_no_soak_by_default():
    sim = Sim()
    assert sim.r.options.soak_s == 0 and sim.r.options.waves == ["100%"]
    assert publishes(sim.step()) == [(NEW, DEVICES)]
    for d in DEVICES:
        sim.report(d, "active")
    sim.step(0.5)
    assert sim.r.status == "completed"
    assert options(waves="1,100%").soak_s == 300  # with waves, 5 minutes unless told


def test_step_never_changes_its_argument():
    sim = Sim(waves="1,100%")
    before = dump(sim.r)
    step(sim.r, sim.obs, 1.0)
    assert dump(sim.r) == before


def test_a_device_that_already_runs_the_bundle_passes():
    sim = Sim(devices=["d1"])
    sim.obs["d1"].active_sha = NEW
    sim.step()
    assert sim.r.devices["d1"].previous is None and "already" in sim.r.devices["d1"].note
    sim.report("d1", "active")
    sim.step(1)
    assert sim.r.status == "completed"


# -- wave sizes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,waves,sizes", [
    (3, "10%,100%", [1, 2]),  # 10 % of 3 is at least 1
    (3, "1,10%,50%,100%", [1, 1, 1]),  # waves that add nobody after rounding are dropped
    (10, "1,10%,50%,100%", [1, 4, 5]),
    (100, "1,10%,50%,100%", [1, 9, 40, 50]),
    (4, "1,50%,100%", [1, 1, 2]),
    (4, "2,4", [2, 2]),
    (1, "1,10%,50%,100%", [1]),
])
def test_wave_sizes_are_cumulative_and_round_up(n, waves, sizes):
    devices = [f"dev-{i:03d}" for i in reversed(range(n))]
    plan = plan_waves(devices, parse_waves(waves))
    assert [len(w) for w in plan] == sizes
    assert [d for w in plan for d in w] == sorted(devices)  # in id order, each once


@pytest.mark.parametrize("waves,needle", [
    ("10%,5%,100%", "must increase"),
    ("2,1,100%", "must increase"),
    ("1,50%", "must end at 100%"),
    ("0,100%", "count >= 1"),
    ("1,150%", "(0%, 100%]"),
    ("1,abc,100%", "count >= 1 or a percentage"),
    ("1,,100%", "empty"),
    ("", "empty"),
])
def test_malformed_waves_are_refused(waves, needle):
    with pytest.raises(RolloutError, match=__import__("re").escape(needle)):
        parse_waves(waves)


@pytest.mark.parametrize("n,waves,needle", [
    (3, "5,100%", "asks for 5 devices"),
    (3, "2", "must end at 100%"),
    (4, "75%,2,100%", "must increase"),
])
def test_waves_that_do_not_fit_the_targets_are_refused(n, waves, needle):
    with pytest.raises(RolloutError, match=needle):
        plan_waves([f"d{i}" for i in range(n)], parse_waves(waves))


@pytest.mark.parametrize("kw,needle", [
    ({"max_error_rate": "150%"}, "max error rate"),
    ({"max_error_rate": -0.1}, "max error rate"),
    ({"max_error_rate": "lots"}, "not a percentage"),
    ({"max_p95_ms": 0}, "max p95"),
    ({"max_p95_ms": -3.0}, "max p95"),
    ({"max_p95_regression": "0%"}, "regression"),
    ({"soak": "5 minutes"}, "not a duration"),
    ({"soak": -1}, ">= 0"),
    ({"soak": "10m", "wave_timeout": "5m"}, "longer than the soak"),
    ({"min_inferences": -1}, "min inferences"),
    ({"max_drift_psi": 0}, "max drift psi"),
    ({"max_drift_psi": "lots"}, "max drift psi"),
    ({"min_canary_agreement": "0%"}, "min canary agreement"),
    ({"min_canary_agreement": "101%"}, "min canary agreement"),
    ({"max_accuracy_drop": "100%"}, "max accuracy drop"),
    ({"min_labels": 0}, "min labels"),
])
def test_options_out_of_range_are_refused(kw, needle):
    with pytest.raises(RolloutError, match=needle) as e:
        options(**kw)
    assert e.value.status == 400


def test_durations():
    assert [parse_duration(t, "soak") for t in ("30s", "5m", "1h", "1h30m", "90", "2.5s", 0)] == \
        [30, 300, 3600, 5400, 90, 2.5, 0]


# -- halts -------------------------------------------------------------------------------------------------


def soaking(**opts) -> Sim:
    """Wave 1 (d1) active and soaking; d2..d4 in later waves."""
    sim = Sim(waves="1,50%,100%", soak="60s", **opts)
    sim.step()
    sim.report("d1", "active")
    sim.step(1)
    return sim


@pytest.mark.parametrize("opts,traffic,needle", [
    ({"max_error_rate": "1%"}, dict(inferences=95, errors=5), "error rate 5.0% > 1.0% over 100 inferences"),
    ({"max_p95_ms": 10}, dict(inferences=50, p95=12.5), "p95 latency 12.5 ms > 10 ms over 50 inferences"),
    ({"max_p95_regression": "20%"}, dict(inferences=50, p95=13.0, baseline=10.0),
     "p95 latency 13 ms is 30% above the previous model's 10 ms (limit +20%) over 50 inferences"),
])
def test_a_threshold_crossed_halts_and_sends_the_wave_back(opts, traffic, needle):
    sim = soaking(**opts)
    sim.traffic("d1", **traffic)
    acts = sim.step(1)
    assert sim.r.status == "halted" and sim.r.waves[0].status == "failed"
    assert halts(acts) == [f"wave 1: d1 {needle}"]
    assert rollbacks(acts) == [(OLD, ["d1"])]
    assert acts[-1].deployment_id == "ro-1-rb1"
    assert sim.r.devices["d1"].rollback == f"sent back to {OLD[:12]}"
    assert publishes(sim.actions) == [(NEW, ["d1"])]  # the other waves were never published
    assert [sim.r.devices[d].phase for d in ("d2", "d3", "d4")] == ["waiting"] * 3
    assert sim.step(100) == []  # halted stays halted


def test_figures_within_the_thresholds_pass():
    sim = soaking(max_error_rate="1%", max_p95_ms=10, max_p95_regression="50%")
    sim.traffic("d1", inferences=1000, errors=5, p95=9.0, baseline=8.0)
    assert publishes(sim.step(60)) == [(NEW, ["d2"])]
    assert sim.r.devices["d1"].health.error_rate == 5 / 1005


@pytest.mark.parametrize("opts,health,baseline,needle", [
    ({"min_canary_agreement": "95%"}, Health(canary_runs=16, canary_agree=12), None,
     "canary agreement 75% (12 of 16 golden inputs agree with fp32) < 95%"),
    ({"max_drift_psi": 0.25}, Health(inferences=200, served=200, drift_psi=1.5, drift_p=1e-9), None,
     "output drift PSI 1.50 > 0.25 against the bundle's reference over 200 outputs (p 1e-09)"),
    ({"max_accuracy_drop": "5%", "min_labels": 40}, Health(inferences=100, labels=40, correct=30),
     Health(labels=50, correct=45), "accuracy 75.0% over 40 labels is 15.0 points below the previous model's "
     "90.0% over 50 (limit 5)"),
])
def test_a_quality_gate_crossed_halts_and_sends_the_wave_back(opts, health, baseline, needle):
    sim = soaking(**opts)
    sim.obs["d1"].health = health
    sim.obs["d1"].baseline = baseline
    acts = sim.step(1)
    assert sim.r.status == "halted" and halts(acts) == [f"wave 1: d1 {needle}"]
    assert rollbacks(acts) == [(OLD, ["d1"])]


@pytest.mark.parametrize("opts,health,baseline", [
    # the canary agrees enough
    ({"min_canary_agreement": "90%"}, Health(canary_runs=16, canary_agree=15), None),
    # a large PSI that sampling alone could give (p not < 0.001), or too few outputs folded yet
    ({"max_drift_psi": 0.25}, Health(inferences=200, served=200, drift_psi=0.6, drift_p=0.01), None),
    ({"max_drift_psi": 0.25}, Health(inferences=20, served=20, drift_psi=3.0, drift_p=1e-9), None),
    # too few labels on either side, or a drop within the limit
    ({"max_accuracy_drop": "5%"}, Health(inferences=100, labels=29, correct=0), Health(labels=50, correct=50)),
    ({"max_accuracy_drop": "5%"}, Health(inferences=100, labels=50, correct=0), Health(labels=29, correct=29)),
    ({"max_accuracy_drop": "5%"}, Health(inferences=100, labels=100, correct=86), Health(labels=100, correct=90)),
    ({"max_accuracy_drop": "5%"}, Health(inferences=100, labels=100, correct=0), None),  # no baseline at all
])
def test_quality_within_the_gates_or_not_yet_judged_passes(opts, health, baseline):
    sim = soaking(**opts)
    sim.obs["d1"].health = health
    sim.obs["d1"].baseline = baseline
    assert publishes(sim.step(60)) == [(NEW, ["d2"])] and sim.r.status == "running"


def test_regression_without_a_baseline_is_not_judged():
    sim = soaking(max_p95_regression="10%")
    sim.traffic("d1", inferences=100, p95=500.0)  # no windows on the previous model
    assert publishes(sim.step(60)) == [(NEW, ["d2"])]


@pytest.mark.parametrize("phase", ["failed", "rolled_back"])
def test_a_device_reporting_failure_halts(phase):
    sim = Sim(waves="2,100%", soak="60s")
    sim.step()
    sim.report("d1", "active")
    sim.report("d2", phase, "smoke test: latency 3.2 ms over the budget")
    acts = sim.step(1)
    assert halts(acts) == [f"wave 1: d2 reported {phase}: smoke test: latency 3.2 ms over the budget"]
    assert rollbacks(acts) == [(OLD, ["d1", "d2"])]  # the whole wave, the healthy device too


def test_a_wave_that_does_not_pass_in_time_halts_as_timed_out():
    sim = Sim(waves="2,100%", soak="10s", wave_timeout="5m")
    sim.step()
    sim.report("d1", "active")
    assert sim.step(299) == []  # d2 is offline: the wave waits
    acts = sim.step(1)
    assert sim.r.status == "halted" and sim.r.waves[0].status == "timed_out"
    assert halts(acts) == ["wave 1 timed out after 5m: 1 device(s) not active and soaked: d2 (pending)"]
    assert rollbacks(acts) == [(OLD, ["d1", "d2"])]  # d2 gets the previous model too when it returns


def test_no_auto_rollback_halts_and_leaves_devices_alone():
    sim = soaking(max_error_rate=0.01, auto_rollback=False)
    sim.traffic("d1", inferences=10, errors=10)
    acts = sim.step(1)
    assert sim.r.status == "halted" and halts(acts) and not rollbacks(acts)
    # the user can still send it back
    assert rollbacks(sim.act("rollback")) == [(OLD, ["d1"])]
    assert sim.r.status == "rolled_back"


def test_min_inferences_holds_the_soak_and_the_verdict():
    sim = soaking(max_error_rate="10%", min_inferences=20)
    sim.traffic("d1", inferences=1, errors=1)  # 50 % of two: too little to judge
    assert sim.step(100) == []  # and too little to pass
    sim.traffic("d1", inferences=25, errors=1)
    assert publishes(sim.step(1)) == [(NEW, ["d2"])]


def test_with_the_canary_gate_a_device_has_not_soaked_until_its_canary_is_in():
    """Else a canary that comes late (or never: quality off on the device) lets the wave pass unjudged on it."""
    sim = Sim(devices=["d1", "d2"], waves="1,100%", soak="10s", wave_timeout="5m", min_canary_agreement="95%")
    sim.step()
    sim.report("d1", "active")
    assert sim.step(60) == []  # soaked long since, but no canary: wave 2 waits
    sim.obs["d1"].health = Health(canary_runs=8, canary_agree=8)
    assert publishes(sim.step(1)) == [(NEW, ["d2"])]
    sim.report("d2", "active")
    acts = sim.step(300)
    assert halts(acts) == ["wave 2 timed out after 5m: 1 device(s) not active and soaked: d2 (active, no canary "
                           "reported)"]


def test_a_device_of_an_earlier_wave_failing_later_halts_and_goes_back_too():
    sim = soaking()
    sim.step(60)  # wave 1 passed; wave 2 (d2) published
    sim.report("d1", "rolled_back", "p95 over its budget on real traffic")
    acts = sim.step(1)
    assert halts(acts) == ["wave 1: d1 reported rolled_back: p95 over its budget on real traffic"]
    assert rollbacks(acts) == [(OLD, ["d2", "d1"])]  # the wave in progress, and the device that failed
    assert [w.status for w in sim.r.waves] == ["passed", "failed", "waiting"]


def test_devices_without_a_known_previous_model_are_left_and_said_so():
    sim = Sim(devices=["d1", "d2", "d3"], waves="100%", max_error_rate="1%")
    sim.obs["d1"].active_sha = None  # a new device: no model yet
    sim.obs["d2"].active_sha, sim.obs["d2"].active_known = OTHER, False  # came with a model the controller lacks
    sim.step()
    sim.report("d3", "failed", "no runtime")
    acts = sim.step(1)
    assert rollbacks(acts) == [(OLD, ["d3"])]
    assert "ran no model before" in sim.r.devices["d1"].rollback
    assert "not in the controller's bundle store" in sim.r.devices["d2"].rollback


def test_devices_go_back_to_what_each_ran():
    sim = Sim(devices=["d1", "d2", "d3"], max_error_rate=0.0)
    sim.obs["d2"].active_sha = OTHER
    sim.step()
    sim.report("d1", "failed")
    acts = sim.step(1)
    assert sorted(rollbacks(acts)) == sorted([(OLD, ["d1", "d3"]), (OTHER, ["d2"])])
    assert len({a.deployment_id for a in acts if isinstance(a, Rollback)}) == 2


# -- what users do ----------------------------------------------------------------------------------------------


def test_pause_holds_the_next_wave_and_resume_releases_it():
    sim = soaking(wave_timeout="2m")
    sim.act("pause")
    assert sim.step(120) == []  # soaked, but paused; and the pause does not count against the timeout
    assert sim.r.status == "paused" and sim.r.waves[1].started is None
    sim.act("resume")
    assert publishes(sim.step()) == [(NEW, ["d2"])]


def test_a_paused_rollout_still_halts_on_a_failure():
    sim = soaking()
    sim.act("pause")
    sim.report("d1", "rolled_back", "crashed")
    assert halts(sim.step(1)) and sim.r.status == "halted"


def test_resume_moves_the_wave_deadline_by_the_pause():
    sim = Sim(waves="1,100%", soak="10s", wave_timeout="1m")
    sim.step()
    deadline = sim.r.waves[0].deadline
    sim.act("pause")
    sim.step(600)
    sim.act("resume")
    assert sim.r.waves[0].deadline == deadline + 600
    assert sim.step(30) == []
    assert halts(sim.step(30))


def test_abort_stops_without_sending_anyone_back():
    sim = soaking()
    assert sim.act("abort") == []
    assert sim.r.status == "aborted" and sim.r.waves[0].status == "stopped"
    assert sim.step(100) == [] and sim.phases()["d2"] == "waiting"


def test_rollback_sends_every_device_touched_back():
    sim = soaking()
    sim.step(60)
    sim.report("d2", "active")
    acts = sim.act("rollback")
    assert rollbacks(acts) == [(OLD, ["d1", "d2"])] and sim.r.status == "rolled_back"
    assert sim.step(100) == []


def test_a_completed_rollout_can_be_rolled_back():
    sim = Sim(devices=["d1"])
    sim.step()
    sim.report("d1", "active")
    sim.step(1)
    assert rollbacks(sim.act("rollback")) == [(OLD, ["d1"])]


@pytest.mark.parametrize("status,action", [
    ("running", "resume"), ("paused", "pause"), ("aborted", "abort"), ("aborted", "pause"),
    ("rolled_back", "rollback"), ("completed", "resume"),
])
def test_actions_the_status_does_not_allow_are_conflicts(status, action):
    sim = Sim(devices=["d1"])
    sim.step()
    if status == "paused":
        sim.act("pause")
    elif status in ("aborted", "rolled_back"):
        sim.act({"aborted": "abort", "rolled_back": "rollback"}[status])
    elif status == "completed":
        sim.report("d1", "active")
        sim.step(1)
    assert sim.r.status == status
    with pytest.raises(RolloutError) as e:
        sim.act(action)
    assert e.value.status == 409


def test_unknown_action():
    with pytest.raises(RolloutError, match="unknown action"):
        act(Sim().r, "explode", 0.0)


# -- restart --------------------------------------------------------------------------------------------------


def test_a_rollout_survives_serialization_mid_wave():
    """The driver persists after every step; a new controller loads that and carries on, same as before."""
    a = soaking(max_error_rate="1%")
    b_rollout = load(json.loads(json.dumps(dump(a.r))))
    assert b_rollout == a.r
    a.traffic("d1", inferences=10)
    ra, acts_a = step(a.r, a.obs, a.now + 60)
    rb, acts_b = step(b_rollout, a.obs, a.now + 60)
    assert ra == rb and acts_a == acts_b == [Publish("ro-1-w2", NEW, ["d2"])]
