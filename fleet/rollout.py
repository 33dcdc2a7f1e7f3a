"""The rollout state machine: plain code, no I/O, no clock (``now`` is passed in).

A rollout sends one bundle to a target set of devices in cumulative waves (e.g. 1 device, 10 %, 50 %,
100 %), taking the devices in sorted id order; a percentage rounds up. Each wave is published, then waits
until every device in it reports ``active`` and has soaked: been active for ``soak_s`` seconds, served
``min_inferences`` inferences and, with ``min_canary_agreement``, reported its canary. Then the next wave starts.
A pause holds the next wave (a failure still halts).

It halts when a device it has touched reports ``failed`` or ``rolled_back``, when a device's figures on the
new bundle cross a threshold, or when a wave has not passed ``wave_timeout_s`` after it started. Unless
``auto_rollback`` is off, halting sends the halted wave's devices (and any other device that failed) back
to the model each ran before its wave: the sha256 it reported as active when the wave was published.

Figures, per device, over the telemetry windows it sent on the new bundle since its wave was published (it serves
nothing on it before it is active; the window of its first inferences may end before the ``active`` event is
stored):
- error rate = errors / (inferences + errors);
- p95 = the inference-weighted mean of the windows' p95 (windows without inferences do not count);
- the regression threshold compares that p95 with the same device's p95 on the model being replaced,
  taken the same way over its windows in the hour before the wave was published.
A device is judged once it has served ``max(1, min_inferences)`` inferences (errors included).

Quality figures, per device, over the quality windows (agent/protocol.Quality) it sent on the new bundle since its
wave was published, likewise (fleet/quality.py computes them; the canary runs at activation):
- drift = the PSI of its served outputs against the bundle's reference profile, the largest over the profile's
  outputs and features (agent/quality.drift), judged once ``MIN_DRIFT_SERVED`` outputs were folded and only when
  sampling alone would give so large a PSI with a probability under agent.quality.NOISE_P;
- canary agreement = golden inputs agreeing with their fp32 outputs / golden inputs run: the device runs them at
  activation, so this gate needs no traffic;
- accuracy = labels its applications fed back that match the prediction / labels; the drop compares it with the same
  device's accuracy on the model being replaced (labels before the wave was published), once both have
  ``min_labels`` labels.

``step(rollout, observations, now) -> (rollout, actions)`` never changes its argument; the driver
(``fleet/rollouts.py``) gathers observations from the store, persists the result and executes the actions
(publish a desired model, log a halt). ``act()`` applies pause / resume / abort / rollback.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any

import msgspec

from agent.errors import EdgefleetError

# rollout status
RUNNING, PAUSED, COMPLETED, HALTED, ABORTED, ROLLED_BACK = (
    "running", "paused", "completed", "halted", "aborted", "rolled_back")
LIVE = (RUNNING, PAUSED)
# wave status
W_WAITING, W_ROLLING, W_PASSED, W_FAILED, W_TIMED_OUT, W_STOPPED = (
    "waiting", "rolling", "passed", "failed", "timed_out", "stopped")
# device phase, besides the agent's own (downloading, verifying, activating, active, failed, rolled_back)
WAITING, PENDING = "waiting", "pending"
ACTIVE, FAILED, DEVICE_ROLLED_BACK = "active", "failed", "rolled_back"

ACTIONS = ("pause", "resume", "abort", "rollback")
DEFAULT_SOAK_ONE_WAVE_S = 0.0
DEFAULT_SOAK_WAVES_S = 300.0
DEFAULT_WAVE_TIMEOUT_S = 1800.0
DEFAULT_MIN_LABELS = 30
MIN_DRIFT_SERVED = 50  # outputs folded before a device's drift is judged


class RolloutError(EdgefleetError, ValueError):
    """A request the rollout cannot take; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# -- parsing what users type ----------------------------------------------------------------------------

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(value: str | float | int, what: str) -> float:
    """Seconds from ``30s``, ``5m``, ``1h``, ``1h30m`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise RolloutError(f"{what} must be a duration like 30s, 5m or 1h")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().lower()
        m = _DURATION.fullmatch(text)
        try:
            seconds = float(text)
        except ValueError:
            if not text or not m or not any(m.groups()):
                raise RolloutError(f"{what} {value!r} is not a duration like 30s, 5m or 1h") from None
            h, mi, s = (float(g) if g else 0.0 for g in m.groups())
            seconds = h * 3600 + mi * 60 + s
    if not math.isfinite(seconds) or seconds < 0:
        raise RolloutError(f"{what} must be a duration >= 0, not {value!r}")
    return seconds


def parse_fraction(value: str | float | int, what: str) -> float:
    """A fraction from ``1%`` or ``0.01``."""
    if isinstance(value, bool):
        raise RolloutError(f"{what} must be a percentage like 1% (or a fraction like 0.01)")
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise RolloutError(f"{what} {value!r} is not a percentage like 1% (or a fraction like 0.01)") from None
    else:
        number = float(value)
    if not math.isfinite(number):
        raise RolloutError(f"{what} {value!r} is not a number")
    return number


def _fraction_option(value: str | float | int | None, what: str, ok, bounds: str) -> float | None:
    """An optional percentage option: None when not given, else its fraction, which ``ok`` must accept."""
    if value is None:
        return None
    number = parse_fraction(value, what)
    if not ok(number):
        raise RolloutError(f"{what} must be in {bounds}, not {value!r}")
    return number


def parse_waves(value: str | list[str | int]) -> list[str]:
    """``"1,10%,100%"`` or ``["1", "10%", "100%"]`` -> ``["1", "10%", "100%"]``, each checked."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for i, item in enumerate(items, 1):
        text = str(item).strip()
        if isinstance(item, bool) or not text:
            raise RolloutError(f"wave {i} is empty: give counts or percentages, e.g. 1,10%,50%,100%")
        if text.endswith("%"):
            try:
                pct = float(text[:-1])
            except ValueError:
                pct = math.nan
            if not 0 < pct <= 100:
                raise RolloutError(f"wave {i} ({text}) must be a percentage in (0%, 100%]")
        elif not text.isdigit() or int(text) < 1:
            raise RolloutError(f"wave {i} ({text}) must be a device count >= 1 or a percentage like 10%")
        out.append(text)
    if not out:
        raise RolloutError("waves: give at least one, e.g. 100%")
    for kind in (True, False):  # percentages increase among themselves, and counts too
        seq = [_wave_number(w) for w in out if w.endswith("%") == kind]
        if any(b <= a for a, b in zip(seq, seq[1:])):
            raise RolloutError(f"waves {','.join(out)} must increase (each wave is cumulative)")
    if out[-1].endswith("%") and _wave_number(out[-1]) != 100:
        raise RolloutError(f"waves {','.join(out)} must end at 100%")
    return out


def _wave_number(text: str) -> float:
    return float(text[:-1]) if text.endswith("%") else float(text)


def plan_waves(devices: list[str], waves: list[str]) -> list[list[str]]:
    """Split ``devices`` (in sorted id order) into the waves' cumulative sizes; percentages round up, so a
    wave is never empty (1 device of 3 at 10 % is 1), and waves that add no device are dropped."""
    order = sorted(set(devices))
    n = len(order)
    if n == 0:
        raise RolloutError("the targets name no device")
    sizes = []
    for i, w in enumerate(waves, 1):
        size = math.ceil(_wave_number(w) * n / 100 - 1e-9) if w.endswith("%") else int(w)
        size = max(size, 1)
        if size > n:
            raise RolloutError(f"wave {i} ({w}) asks for {size} devices; the targets have {n}")
        if sizes and size < sizes[-1]:
            raise RolloutError(f"waves {','.join(waves)} must increase: wave {i} ({w}) is {size} of {n} "
                               f"devices, the wave before it {sizes[-1]}")
        sizes.append(size)
    if sizes[-1] != n:
        raise RolloutError(f"waves {','.join(waves)} must end at 100% (the last reaches {sizes[-1]} of {n} devices)")
    out, done = [], 0
    for size in sizes:
        if size > done:
            out.append(order[done:size])
            done = size
    return out


# -- the state ----------------------------------------------------------------------------------------------


@dataclass
class Options:
    """How a rollout proceeds; ``options()`` builds one from what a user typed, with defaults."""

    waves: list[str] = field(default_factory=lambda: ["100%"])
    soak_s: float = DEFAULT_SOAK_ONE_WAVE_S
    wave_timeout_s: float = DEFAULT_WAVE_TIMEOUT_S
    max_error_rate: float | None = None  # a fraction: 0.01 is 1 %
    max_p95_ms: float | None = None
    max_p95_regression: float | None = None  # a fraction: 0.2 is p95 up to 20 % above the previous model's
    min_inferences: int = 0
    auto_rollback: bool = True
    max_drift_psi: float | None = None  # halt when a device's outputs drift further from the reference
    min_canary_agreement: float | None = None  # a fraction: 0.95 is 95 % of the golden inputs agreeing
    max_accuracy_drop: float | None = None  # a fraction: 0.05 is 5 points below the previous model's accuracy
    min_labels: int = DEFAULT_MIN_LABELS  # labels on each side before accuracy is judged


def options(waves: str | list | None = None, soak: str | float | None = None,
            wave_timeout: str | float | None = None, max_error_rate: str | float | None = None,
            max_p95_ms: float | None = None, max_p95_regression: str | float | None = None,
            min_inferences: int = 0, auto_rollback: bool = True, max_drift_psi: str | float | None = None,
            min_canary_agreement: str | float | None = None, max_accuracy_drop: str | float | None = None,
            min_labels: int = DEFAULT_MIN_LABELS) -> Options:
    """Validate a rollout's options. Without waves: one wave of 100 % and no soak; with waves: 5 m soak."""
    wave_list = parse_waves(waves) if waves is not None else ["100%"]
    default_soak = DEFAULT_SOAK_ONE_WAVE_S if waves is None else DEFAULT_SOAK_WAVES_S
    soak_s = parse_duration(soak, "soak") if soak is not None else default_soak
    timeout = parse_duration(wave_timeout, "wave timeout") if wave_timeout is not None else DEFAULT_WAVE_TIMEOUT_S
    if timeout <= soak_s:
        raise RolloutError(f"the wave timeout ({timeout:g} s) must be longer than the soak ({soak_s:g} s)")
    rate = _fraction_option(max_error_rate, "max error rate", lambda f: 0 <= f < 1, "[0%, 100%)")
    p95 = None
    if max_p95_ms is not None:
        if isinstance(max_p95_ms, bool) or not isinstance(max_p95_ms, (int, float)):
            raise RolloutError(f"max p95 must be a number of milliseconds, not {max_p95_ms!r}")
        p95 = float(max_p95_ms)
        if not (math.isfinite(p95) and p95 > 0):
            raise RolloutError(f"max p95 must be > 0 ms, not {max_p95_ms!r}")
    reg = _fraction_option(max_p95_regression, "max p95 regression", lambda f: 0 < f <= 100, "(0%, 10000%]")
    if isinstance(min_inferences, bool) or not isinstance(min_inferences, int) or min_inferences < 0:
        raise RolloutError(f"min inferences must be an integer >= 0, not {min_inferences!r}")
    drift = None
    if max_drift_psi is not None:
        try:
            drift = float(max_drift_psi) if not isinstance(max_drift_psi, bool) else None
        except ValueError:
            drift = None
        if drift is None or not (math.isfinite(drift) and drift > 0):
            raise RolloutError(f"max drift psi must be a number > 0 (0.1 moderate, 0.25 significant), "
                               f"not {max_drift_psi!r}")
    agreement = _fraction_option(min_canary_agreement, "min canary agreement", lambda f: 0 < f <= 1, "(0%, 100%]")
    drop = _fraction_option(max_accuracy_drop, "max accuracy drop", lambda f: 0 <= f < 1, "[0%, 100%)")
    if isinstance(min_labels, bool) or not isinstance(min_labels, int) or min_labels < 1:
        raise RolloutError(f"min labels must be an integer >= 1, not {min_labels!r}")
    return Options(waves=wave_list, soak_s=soak_s, wave_timeout_s=timeout, max_error_rate=rate,
                   max_p95_ms=p95, max_p95_regression=reg, min_inferences=min_inferences,
                   auto_rollback=bool(auto_rollback), max_drift_psi=drift, min_canary_agreement=agreement,
                   max_accuracy_drop=drop, min_labels=min_labels)


@dataclass
class Health:
    """A device's figures over some telemetry windows."""

    inferences: int = 0
    errors: int = 0
    p95_ms: float | None = None
    # quality (fleet/quality.py), from the device's quality windows
    served: int = 0  # outputs folded into the drift bins
    drift_psi: float | None = None  # against the bundle's reference: the largest over outputs and features
    drift_p: float | None = None  # how likely sampling alone gives that PSI
    canary_runs: int = 0
    canary_agree: int = 0
    labels: int = 0
    correct: int = 0

    @property
    def total(self) -> int:
        return self.inferences + self.errors

    @property
    def canary_agreement(self) -> float | None:
        return self.canary_agree / self.canary_runs if self.canary_runs else None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labels if self.labels else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.total if self.total else None


@dataclass
class Observation:
    """What the store knows of one device, gathered by the driver for one step."""

    active_sha: str | None = None  # the model the device last said it runs
    active_known: bool = False  # that model is a bundle the controller has (so a rollback can send it)
    online: bool = False
    phase: str | None = None  # its latest phase in its wave's deployment; None: no report yet
    since: float | None = None  # when that phase was received
    reason: str = ""
    health: Health | None = None  # on the new bundle, since its wave was published
    baseline: Health | None = None  # on the model being replaced, before its wave was published


@dataclass
class Device:
    id: str
    wave: int  # index into Rollout.waves
    phase: str = WAITING
    since: float | None = None
    reason: str = ""
    online: bool = False
    previous: str | None = None  # sha256 it ran when its wave was published
    previous_known: bool = False
    note: str = ""
    active_since: float | None = None
    health: Health = field(default_factory=Health)
    baseline_p95_ms: float | None = None
    baseline_labels: int | None = None  # feedback on the model being replaced (None: not looked up yet)
    baseline_correct: int = 0
    verdict: str = ""  # why it crossed a threshold
    rollback_deployment: str | None = None
    rollback_sha: str | None = None
    rollback: str = ""  # what was done to send it back, or why nothing could be


@dataclass
class Wave:
    devices: list[str]
    deployment_id: str
    status: str = W_WAITING
    started: float | None = None
    deadline: float | None = None
    finished: float | None = None


@dataclass
class Rollout:
    id: str
    bundle: str  # sha256
    targets: list[str]
    options: Options
    waves: list[Wave]
    devices: dict[str, Device]
    created: float
    status: str = RUNNING
    reason: str = ""
    current: int = 0  # index of the wave in progress (or the last one)
    paused_at: float | None = None
    finished: float | None = None
    rollbacks: int = 0  # rollback deployments made so far (for their ids)


@dataclass
class Publish:
    """Make ``devices`` run ``sha256``: record deployment ``deployment_id`` and publish their desired model."""

    deployment_id: str
    sha256: str
    devices: list[str]


@dataclass
class Rollback(Publish):
    """A Publish that sends devices back to the model they ran before."""


@dataclass
class Halt:
    reason: str


Action = Publish | Rollback | Halt


def new(rollout_id: str, bundle: str, targets: list[str], devices: list[str], opts: Options, now: float) -> Rollout:
    """A running rollout, its waves planned; nothing is published until the first ``step``."""
    waves = [Wave(devices=ids, deployment_id=f"{rollout_id}-w{i + 1}")
             for i, ids in enumerate(plan_waves(devices, opts.waves))]
    devs = {d: Device(id=d, wave=i) for i, w in enumerate(waves) for d in w.devices}
    return Rollout(id=rollout_id, bundle=bundle, targets=list(targets), options=opts, waves=waves, devices=devs,
                   created=now)


# -- stepping ----------------------------------------------------------------------------------------------


def step(r: Rollout, observations: dict[str, Observation], now: float) -> tuple[Rollout, list[Action]]:
    """Advance ``r`` by what the devices reported; returns the new rollout and what to do."""
    if r.status not in LIVE:
        return r, []
    r = copy.deepcopy(r)
    actions: list[Action] = []
    _observe(r, observations)
    culprits = {d.id: why for d in _touched(r) if (why := _failure(r, d, now))}
    if culprits:
        first = next(iter(culprits.items()))
        more = f" (and {len(culprits) - 1} more)" if len(culprits) > 1 else ""
        _halt(r, f"wave {r.devices[first[0]].wave + 1}: {first[0]} {first[1]}{more}", now, W_FAILED,
              list(culprits), actions)
        return r, actions
    if r.status == PAUSED:
        return r, actions
    while True:
        wave = r.waves[r.current]
        if wave.started is None:
            _start(r, wave, observations, now, actions)
            break
        late = [d for d in wave.devices if not soaked(r, r.devices[d], now)]
        if not late:
            wave.status, wave.finished = W_PASSED, now
            if r.current + 1 == len(r.waves):
                r.status, r.finished = COMPLETED, now
                break
            r.current += 1
            continue
        if wave.deadline is not None and now >= wave.deadline:
            names = (", ".join(f"{d} ({_late_why(r, r.devices[d])})" for d in late[:5])
                     + (", ..." if len(late) > 5 else ""))
            _halt(r, f"wave {r.current + 1} timed out after {_dur(r.options.wave_timeout_s)}: "
                     f"{len(late)} device(s) not active and soaked: {names}", now, W_TIMED_OUT, [], actions)
        break
    return r, actions


def soaked(r: Rollout, d: Device, now: float) -> bool:
    """Active on the new bundle for the soak period, with the traffic asked for and, when the canary is a gate,
    its canary reported (a device whose canary never came in has not been judged on it)."""
    return (d.phase == ACTIVE and d.active_since is not None and now - d.active_since >= r.options.soak_s
            and d.health.total >= r.options.min_inferences and _canary_in(r, d))


def _canary_in(r: Rollout, d: Device) -> bool:
    return r.options.min_canary_agreement is None or d.health.canary_runs > 0


def _late_why(r: Rollout, d: Device) -> str:
    """Why a device of a timed-out wave had not passed, in a word or three."""
    return d.phase if d.phase != ACTIVE or _canary_in(r, d) else "active, no canary reported"


def _observe(r: Rollout, observations: dict[str, Observation]) -> None:
    for d in r.devices.values():
        if d.id in observations:
            d.online = observations[d.id].online
    for d in _touched(r):
        o = observations.get(d.id)
        if o is None:
            continue
        if o.phase is not None and o.phase != PENDING and o.phase != d.phase:
            d.phase, d.since, d.reason = o.phase, o.since, o.reason
            if o.phase == ACTIVE and d.active_since is None:
                d.active_since = o.since
        if o.health is not None and d.active_since is not None:
            d.health = copy.copy(o.health)
        if o.baseline is not None and d.baseline_p95_ms is None:
            d.baseline_p95_ms = o.baseline.p95_ms
        if o.baseline is not None and d.baseline_labels is None and o.baseline.labels:
            d.baseline_labels, d.baseline_correct = o.baseline.labels, o.baseline.correct


def _touched(r: Rollout) -> list[Device]:
    """Devices whose wave was published, in wave order."""
    return [r.devices[d] for w in r.waves if w.started is not None for d in w.devices]


def _failure(r: Rollout, d: Device, now: float) -> str | None:
    if d.phase in (FAILED, DEVICE_ROLLED_BACK):
        return f"reported {d.phase}" + (f": {d.reason}" if d.reason else "")
    if d.phase != ACTIVE:
        return None
    baseline = Health(labels=d.baseline_labels or 0, correct=d.baseline_correct)
    d.verdict = crossed(r.options, d.health, d.baseline_p95_ms, baseline) or ""
    return d.verdict or None


def crossed(o: Options, h: Health, baseline_p95_ms: float | None, baseline: Health | None = None) -> str | None:
    """The threshold ``h`` crosses, said in words; None when it crosses none (or has too little traffic yet)."""
    agreement = h.canary_agreement  # the golden inputs need no traffic: judged from the first canary
    if o.min_canary_agreement is not None and agreement is not None and agreement < o.min_canary_agreement:
        return (f"canary agreement {agreement:.0%} ({h.canary_agree} of {h.canary_runs} golden inputs agree with "
                f"fp32) < {o.min_canary_agreement:.0%}")
    if h.total < max(1, o.min_inferences):
        return None
    quality = _quality_crossed(o, h, baseline)
    if quality:
        return quality
    rate = h.error_rate
    if o.max_error_rate is not None and rate is not None and rate > o.max_error_rate:
        return f"error rate {rate:.1%} > {o.max_error_rate:.1%} over {h.total} inferences"
    if h.p95_ms is None:
        return None
    if o.max_p95_ms is not None and h.p95_ms > o.max_p95_ms:
        return f"p95 latency {h.p95_ms:g} ms > {o.max_p95_ms:g} ms over {h.inferences} inferences"
    if o.max_p95_regression is not None and baseline_p95_ms and h.p95_ms > baseline_p95_ms * (1 + o.max_p95_regression):
        return (f"p95 latency {h.p95_ms:g} ms is {h.p95_ms / baseline_p95_ms - 1:.0%} above the previous model's "
                f"{baseline_p95_ms:g} ms (limit +{o.max_p95_regression:.0%}) over {h.inferences} inferences")
    return None


def _quality_crossed(o: Options, h: Health, baseline: Health | None) -> str | None:
    from agent.quality import NOISE_P

    if (o.max_drift_psi is not None and h.drift_psi is not None and h.served >= MIN_DRIFT_SERVED
            and h.drift_psi > o.max_drift_psi and h.drift_p is not None and h.drift_p < NOISE_P):
        return (f"output drift PSI {h.drift_psi:.2f} > {o.max_drift_psi:g} against the bundle's reference over "
                f"{h.served} outputs (p {h.drift_p:.1g})")
    if (o.max_accuracy_drop is not None and baseline is not None and h.labels >= o.min_labels
            and baseline.labels >= o.min_labels):
        drop = baseline.accuracy - h.accuracy
        if drop > o.max_accuracy_drop:
            return (f"accuracy {h.accuracy:.1%} over {h.labels} labels is {drop * 100:.1f} points below the previous "
                    f"model's {baseline.accuracy:.1%} over {baseline.labels} (limit {o.max_accuracy_drop * 100:g})")
    return None


def _start(r: Rollout, wave: Wave, observations: dict[str, Observation], now: float, actions: list[Action]) -> None:
    wave.status, wave.started, wave.deadline = W_ROLLING, now, now + r.options.wave_timeout_s
    for i in wave.devices:
        d, o = r.devices[i], observations.get(i) or Observation()
        d.phase, d.since, d.online = PENDING, now, o.online
        if o.active_sha == r.bundle:
            d.note = "already ran this bundle"
        elif o.active_sha is None:
            d.note = "ran no model before"
        else:
            d.previous, d.previous_known = o.active_sha, o.active_known
    actions.append(Publish(wave.deployment_id, r.bundle, list(wave.devices)))


def _halt(r: Rollout, reason: str, now: float, wave_status: str, culprits: list[str],
          actions: list[Action]) -> None:
    wave = r.waves[r.current]
    r.status, r.reason, r.finished, r.paused_at = HALTED, reason, now, None
    wave.status, wave.finished = wave_status, now
    actions.append(Halt(reason))
    if r.options.auto_rollback:
        back = list(wave.devices) + [c for c in culprits if c not in wave.devices]
        actions.extend(_send_back(r, back))


def _send_back(r: Rollout, ids: list[str]) -> list[Action]:
    """Rollbacks of the devices in ``ids`` that were published to, grouped by the model each goes back to."""
    groups: dict[str, list[str]] = {}
    for i in ids:
        d = r.devices[i]
        if d.phase == WAITING or d.rollback:
            continue
        if d.previous is None:
            d.rollback = f"left as is: it {d.note or 'had no previous model'}"
        elif not d.previous_known:
            d.rollback = (f"left as is: the model it ran before ({d.previous[:12]}) is not in the controller's "
                          f"bundle store")
        else:
            groups.setdefault(d.previous, []).append(i)
    out: list[Action] = []
    for sha, group in groups.items():
        r.rollbacks += 1
        dep = f"{r.id}-rb{r.rollbacks}"
        for i in group:
            d = r.devices[i]
            d.rollback_deployment, d.rollback_sha, d.rollback = dep, sha, f"sent back to {sha[:12]}"
        out.append(Rollback(dep, sha, group))
    return out


# -- what users do -------------------------------------------------------------------------------------------


def act(r: Rollout, action: str, now: float) -> tuple[Rollout, list[Action]]:
    """pause, resume, abort or rollback (every device touched back to its previous model)."""
    if action not in ACTIONS:
        raise RolloutError(f"unknown action {action!r}: use {', '.join(ACTIONS)}")
    r = copy.deepcopy(r)
    if action == "pause":
        if r.status != RUNNING:
            raise RolloutError(f"rollout {r.id} is {r.status}: only a running rollout can be paused", 409)
        r.status, r.paused_at = PAUSED, now
        return r, []
    if action == "resume":
        if r.status != PAUSED:
            raise RolloutError(f"rollout {r.id} is {r.status}: only a paused rollout can be resumed", 409)
        wave = r.waves[r.current]
        if wave.deadline is not None and r.paused_at is not None:
            wave.deadline += max(0.0, now - r.paused_at)  # a pause does not count against the wave's timeout
        r.status, r.paused_at = RUNNING, None
        return r, []
    if action == "abort":
        if r.status not in LIVE:
            raise RolloutError(f"rollout {r.id} is already {r.status}", 409)
        _stop(r, ABORTED, "aborted by the user; devices stay where they are", now)
        return r, []
    if r.status == ROLLED_BACK:
        raise RolloutError(f"rollout {r.id} is already rolled back", 409)
    if r.status in LIVE:
        _stop(r, ROLLED_BACK, "rolled back by the user", now)
    else:
        r.status = ROLLED_BACK
        r.reason = f"rolled back by the user (after: {r.reason})" if r.reason else "rolled back by the user"
    return r, _send_back(r, [d.id for d in _touched(r)])


def _stop(r: Rollout, status: str, reason: str, now: float) -> None:
    wave = r.waves[r.current]
    if wave.status in (W_WAITING, W_ROLLING):
        wave.status, wave.finished = W_STOPPED, now
    r.status, r.reason, r.finished, r.paused_at = status, reason, now, None


# -- persistence and views -----------------------------------------------------------------------------------


def dump(r: Rollout) -> dict[str, Any]:
    return msgspec.to_builtins(r)


def load(doc: dict[str, Any]) -> Rollout:
    return msgspec.convert(doc, Rollout)


def dump_actions(actions: list[Action]) -> list[dict[str, Any]]:
    return [{"kind": "rollback" if isinstance(a, Rollback) else "publish", **msgspec.to_builtins(a)}
            for a in actions if isinstance(a, Publish)]


def load_actions(docs: list[dict[str, Any]]) -> list[Publish]:
    return [(Rollback if d["kind"] == "rollback" else Publish)(d["deployment_id"], d["sha256"], list(d["devices"]))
            for d in docs]


def view(r: Rollout, now: float) -> dict[str, Any]:
    """The rollout as the API shows it: each wave with each device's phase and figures."""
    o = r.options
    waves = []
    for i, w in enumerate(r.waves):
        devices = []
        for did in w.devices:
            d = r.devices[did]
            devices.append({
                "device_id": d.id, "phase": d.phase, "reason": d.reason, "online": d.online, "since": d.since,
                "active_since": d.active_since, "soaked": soaked(r, d, now),
                "inferences": d.health.inferences, "errors": d.health.errors,
                "error_rate": d.health.error_rate, "p95_ms": d.health.p95_ms,
                "baseline_p95_ms": d.baseline_p95_ms, "verdict": d.verdict,
                "served": d.health.served, "drift_psi": d.health.drift_psi,
                "canary_agreement": d.health.canary_agreement, "labels": d.health.labels,
                "accuracy": d.health.accuracy,
                "baseline_accuracy": d.baseline_correct / d.baseline_labels if d.baseline_labels else None,
                "previous": d.previous, "note": d.note,
                "rollback": None if not d.rollback else {
                    "deployment_id": d.rollback_deployment, "sha256": d.rollback_sha, "version": None,
                    "what": d.rollback, "phase": None},
            })
        waves.append({"wave": i + 1, "status": w.status, "deployment_id": w.deployment_id, "started": w.started,
                      "deadline": w.deadline, "finished": w.finished, "devices": devices})
    return {
        "id": r.id, "status": r.status, "reason": r.reason, "created": r.created, "finished": r.finished,
        "paused_at": r.paused_at, "bundle": {"sha256": r.bundle}, "targets": r.targets,
        "options": msgspec.to_builtins(o), "current_wave": r.current + 1, "wave_count": len(r.waves),
        "device_count": len(r.devices), "waves": waves,
    }


def _dur(seconds: float) -> str:
    s = int(seconds)
    if s and s % 3600 == 0:
        return f"{s // 3600}h"
    if s and s % 60 == 0:
        return f"{s // 60}m"
    return f"{seconds:g}s"
