"""Model quality on the controller (issue 12): what each device's quality messages say about its model, per
device and per model version (bundle sha256), over any window [since, until) of the controller's time line.

Devices send one ``protocol.Quality`` message a window: the served outputs folded into the bins of the bundle's
reference profile (``agent.quality``), the canary (golden inputs run against their fp32 outputs) and the
feedback labels (a sparse confusion matrix over the profile's first classifier output's class bins). The store
keeps each message (``Store.record_quality``; ``refusal`` here says what it refuses) and each bundle's profile
(read from the bundle's ``profile.json`` when it is uploaded). Everything below sums the windows' counts and
computes from the sums, so a figure over an hour is the figure of every output served in that hour, not a mean
of per-window figures.

The API (read-only over the store; the dashboard and the rollout gates build on it):

- ``device(store, device_id, since, until, sha256=None) -> dict | None``: one device's quality on one bundle
  (the one given, else the device's active bundle when it reported on it in the window, else the bundle of its
  latest window): ``drift`` (vs the bundle's ``reference`` and vs the ``fleet``: every other device on the same
  bundle), ``canary``, ``feedback`` (accuracy, per-class and macro precision / recall / F1, the confusion
  matrix), the device's own ``refused`` feedback by reason and the ``versions`` it reported on. None: an unknown
  device. Shape: see ``device``'s docstring.
- ``series(store, device_id, since, until, sha256=None, step=None) -> dict``: per window (or per ``step``
  bucket), for charts: time, served, PSI vs the reference, canary agreement, accuracy.
- ``summary(store, since, until, device_ids=None) -> list[dict]``: one row a device that reported quality in the
  window (on the bundle of its latest window): PSI vs reference and vs fleet, the band, canary agreement,
  accuracy and labels; worst first (``worst_first``).

Formulas (agent/quality.py computes them):

- PSI = sum over bins (a - e) ln(a / e), a and e the bins' shares of the device's and the expected counts after
  0.5 is added to every bin's count (``agent.quality.SMOOTHING``). Bands (``agent.quality.psi_band``): "stable"
  below 0.1, "moderate" from 0.1 to 0.25, "significant" from 0.25 -- given only when sampling alone would give so
  large a PSI with probability p < 0.001 (``agent.quality.drift_p``: n_eff PSI against chi-square with k - 1
  degrees of freedom, n_eff = n_e n_a / (n_e + n_a)); otherwise "stable". A small reference (a bundle converted
  with few held-out samples) thus reads stable unless the shift is large, instead of drifting on noise.
- Jensen-Shannon divergence in bits (0: the same distribution, 1: disjoint).
- Drift is computed per output and feature (classifier: class, confidence, margin, entropy; other outputs: value);
  a device's drift is the largest over them (``psi``/``js``, and ``worst`` names where). It is judged only over
  at least ``MIN_SERVED`` served outputs (and, vs the fleet, over at least ``MIN_SERVED`` of the other devices'):
  below that ``psi`` is None and ``band`` is "too few".
- Vs the fleet: the expected distribution is the sum of every OTHER device's counts on the same bundle in the
  same window.
- Canary agreement = agree / runs, with its 95 % Wilson interval; accuracy = correct / labels with its Wilson
  interval; per class, precision = tp / predicted and recall = tp / actual (with Wilson intervals), F1 their
  harmonic mean; macro = the mean over the classes where it is defined.
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Any

import msgspec

from agent import protocol
from agent import quality as q
from agent.errors import EdgefleetError

if TYPE_CHECKING:
    from fleet.store import Store

PROFILE = "profile.json"  # the member of a bundle holding its reference profile (converter/convert.py)
MAX_PROFILE_BYTES = 1 << 20
MIN_SERVED = 50  # served outputs (the device's, and the other devices' for the fleet) before drift is judged
DEFAULT_WINDOW_S = 3600.0  # since defaults to until - this
MAX_WINDOW_S = 400 * 86400.0
MAX_POINTS = 1500  # a series with more windows than this is bucketed (step chosen to fit)
TOO_FEW = "too few"
BANDS = ("stable", "moderate", "significant")  # agent.quality.psi_band's names, in order of concern
OTHER = "other"  # the class bin every class without a bin of its own shares

# What the controller refuses (counted by reason; the message is not stored).
UNKNOWN_BUNDLE = "quality for a bundle the controller does not know"
NO_PROFILE = "quality for a bundle that has no reference profile"
WRONG_PROFILE = "quality profile id is not the bundle's profile"
WRONG_BINS = "quality bins do not match the bundle's profile"
BAD_CONFUSION = "quality confusion cell outside the profile's classes"
REASONS = (UNKNOWN_BUNDLE, NO_PROFILE, WRONG_PROFILE, WRONG_BINS, BAD_CONFUSION)


class Refused(EdgefleetError):
    """A quality message the controller does not store; the message is its reason (one of ``REASONS``)."""


class WindowError(EdgefleetError):
    """A window or query out of range; the message says which."""


# -- profiles and refusals ---------------------------------------------------------------------------------------
def load_profile(data: bytes) -> q.Profile:
    """A bundle's profile.json, or EdgefleetError naming what is wrong with it."""
    try:
        return msgspec.json.decode(data, type=q.Profile)
    except msgspec.DecodeError as e:
        raise EdgefleetError(f"{PROFILE} is not a quality profile: {e}") from None


def layout(profile: q.Profile) -> list[dict[str, int]]:
    """Per profile output: feature -> its number of bins (what a device's ``bins[i]`` must hold)."""
    return [{f: len(c) for f, c in o.counts.items()} for o in profile.outputs]


def classes(profile: q.Profile) -> list[int | str]:
    """The confusion matrix's class ids: the first classifier output's classes in bin order, then "other" ([]:
    the profile has no classifier output)."""
    o = next((o for o in profile.outputs if o.kind == "classifier"), None)
    return [] if o is None else [*o.classes, OTHER]


def refusal(msg: protocol.Quality, known: bool, profile: q.Profile | None, profile_id: str | None) -> str | None:
    """Why the controller refuses a quality message (None: it takes it). ``known``: the controller has the bundle
    ``msg.sha256``; ``profile``/``profile_id``: that bundle's reference profile (None: it has none)."""
    if not known:
        return UNKNOWN_BUNDLE
    if profile is None:
        return NO_PROFILE
    if msg.profile != profile_id:
        return WRONG_PROFILE
    if msg.bins or msg.served:  # no bins is a window that served nothing (served 0)
        want = layout(profile)
        if len(msg.bins) != len(want):
            return WRONG_BINS
        for got, features in zip(msg.bins, want):
            if set(got) != set(features) or any(len(got[f]) != n for f, n in features.items()):
                return WRONG_BINS
    if msg.feedback is not None and msg.feedback.confusion:
        n = len(classes(profile))
        if any(t >= n or p >= n for t, p, _ in msg.feedback.confusion):
            return BAD_CONFUSION
    return None


# -- windows -------------------------------------------------------------------------------------------------------
def window(since: float | None = None, until: float | None = None, now: float | None = None
           ) -> tuple[float, float]:
    """[since, until): until defaults to now, since to until - DEFAULT_WINDOW_S; WindowError when out of range."""
    until = (time.time() if now is None else now) if until is None else until
    since = max(0.0, until - DEFAULT_WINDOW_S) if since is None else since
    for name, v in (("since", since), ("until", until)):
        if not math.isfinite(v) or v < 0:
            raise WindowError(f"{name}={v!r}: must be a unix time in seconds")
    if not since < until:
        raise WindowError(f"since ({since:g}) must be before until ({until:g})")
    if until - since > MAX_WINDOW_S:
        raise WindowError(f"the window [since, until) is {until - since:g} s; at most {MAX_WINDOW_S:g}")
    return since, until


class Sums:
    """One (device, bundle)'s windows added up: counts only, so adding is exact and order-free."""

    def __init__(self) -> None:
        self.windows = self.served = self.runs = self.agree = self.labels = 0
        self.max_abs_err: float | None = None
        self.canary_time: float | None = None
        self.first: float | None = None
        self.last: float | None = None
        self.bins: list[dict[str, list[int]]] = []
        self.confusion: dict[tuple[int, int], int] = {}
        self.refused: dict[str, int] = {}

    def add_row(self, r: Any) -> "Sums":
        self.windows += 1
        self.served += r["served"]
        self.runs += r["canary_runs"]
        self.agree += r["canary_agree"]
        self.labels += r["labels"]
        if r["canary_max_abs_err"] is not None and r["canary_runs"]:
            self.max_abs_err = max(self.max_abs_err or 0.0, r["canary_max_abs_err"])
        if r["canary_time"] is not None:
            self.canary_time = max(self.canary_time or r["canary_time"], r["canary_time"])
        self.first = r["time"] if self.first is None else min(self.first, r["time"])
        self.last = r["time"] if self.last is None else max(self.last, r["time"])
        self._add_bins(json.loads(r["bins"]))
        for t, p, n in json.loads(r["confusion"]):
            self.confusion[t, p] = self.confusion.get((t, p), 0) + n
        for reason, n in json.loads(r["refused"]).items():
            self.refused[reason] = self.refused.get(reason, 0) + n
        return self

    def _add_bins(self, bins: list[dict[str, list[int]]]) -> None:
        if not bins:
            return
        if not self.bins:
            self.bins = [{f: list(c) for f, c in out.items()} for out in bins]
            return
        for mine, theirs in zip(self.bins, bins):
            for f, c in theirs.items():
                mine[f] = [a + b for a, b in zip(mine[f], c)]

    def add(self, other: "Sums") -> "Sums":
        self.windows += other.windows
        self.served += other.served
        self.runs += other.runs
        self.agree += other.agree
        self.labels += other.labels
        if other.max_abs_err is not None:
            self.max_abs_err = max(self.max_abs_err or 0.0, other.max_abs_err)
        for a in ("canary_time", "last"):
            if getattr(other, a) is not None:
                setattr(self, a, max(getattr(self, a) or getattr(other, a), getattr(other, a)))
        if other.first is not None:
            self.first = other.first if self.first is None else min(self.first, other.first)
        self._add_bins(other.bins)
        for k, n in other.confusion.items():
            self.confusion[k] = self.confusion.get(k, 0) + n
        for k, n in other.refused.items():
            self.refused[k] = self.refused.get(k, 0) + n
        return self


def _rows(store: "Store", since: float, until: float, device_id: str | None = None, sha256: str | None = None
          ) -> list[Any]:
    """Quality windows in [since, until), oldest first (``Store.quality_rows``)."""
    return store.quality_rows(since, until, device_id, sha256)


def _sums(rows: list[Any]) -> dict[tuple[str, str], Sums]:
    """(device, sha256) -> its windows summed."""
    out: dict[tuple[str, str], Sums] = {}
    for r in rows:
        out.setdefault((r["device_id"], r["sha256"]), Sums()).add_row(r)
    return out


# -- the figures ---------------------------------------------------------------------------------------------------
def _interval(successes: int, n: int) -> list[float] | None:
    return list(q.wilson(successes, n)) if n else None


def drift(profile: q.Profile, actual: Sums, expected: list[dict[str, list[int]]] | None,
          expected_served: int | None = None) -> dict[str, Any]:
    """Drift of ``actual``'s counts from ``expected`` (per output: feature -> counts; None: the profile's own
    reference counts): per output and feature PSI, its p (agent.quality.drift_p), Jensen-Shannon (bits) and band;
    the worst feature (worst band, then largest PSI) with its PSI, p and band, and the largest JS. ``expected_served``: the outputs ``expected`` holds (the fleet's; the
    reference is judged whatever its sample count). Below MIN_SERVED (either side) nothing is judged: psi/js
    None, band "too few"."""
    reference = expected is None
    expected = [o.counts for o in profile.outputs] if reference else expected
    out: dict[str, Any] = {"psi": None, "p": None, "js": None, "band": TOO_FEW, "worst": None,
                           "served": actual.served,
                           "expected_served": profile.samples if reference else expected_served, "features": []}
    if actual.served < MIN_SERVED or not actual.bins or not expected or \
            (not reference and (expected_served or 0) < MIN_SERVED):
        return out
    for o, mine, theirs in zip(profile.outputs, actual.bins, expected):
        for feature, counts in mine.items():
            e = theirs.get(feature)
            if not e or sum(e) <= 0 or sum(counts) <= 0:
                continue
            d = q.drift(e, counts)
            out["features"].append({"output": o.name, "feature": feature, "psi": round(d.psi, 6),
                                    "js": round(d.js, 6), "p": d.p, "band": d.band, "count": int(sum(counts))})
    if out["features"]:
        # the worst: the feature in the worst band (a shift beats a larger PSI sampling alone could give), then
        # the largest PSI; its PSI, p and band are the device's
        worst = max(out["features"], key=lambda f: (_band_rank(f["band"]), f["psi"]))
        out.update(psi=worst["psi"], p=worst["p"], js=max(f["js"] for f in out["features"]), band=worst["band"],
                   worst={"output": worst["output"], "feature": worst["feature"]})
    return out


def canary(s: Sums) -> dict[str, Any]:
    """runs, agree, agreement = agree / runs (None without runs) and its Wilson interval, max_abs_err, and the
    time of the last run (controller time)."""
    return {"runs": s.runs, "agree": s.agree, "agreement": s.agree / s.runs if s.runs else None,
            "interval": _interval(s.agree, s.runs), "max_abs_err": s.max_abs_err, "last_time": s.canary_time}


def feedback(profile: q.Profile, s: Sums) -> dict[str, Any]:
    """From the summed confusion matrix: labels (as the device counted them), accuracy with its Wilson interval,
    per class (its id: a class id or "other") precision / recall / F1 with their counts and Wilson intervals,
    macro precision / recall / F1, and the matrix itself (rows: true class, columns: prediction, in ``classes``
    order)."""
    ids = classes(profile)
    m = [[0] * len(ids) for _ in ids]
    for (t, p), n in s.confusion.items():
        m[t][p] += n
    out: dict[str, Any] = {"labels": s.labels, "classes": ids, "confusion": m, "scored": 0, "accuracy": None,
                           "accuracy_interval": None, "per_class": [],
                           "macro": {"precision": None, "recall": None, "f1": None}}
    if not ids:
        return out
    sc = q.scores(m)
    out.update(scored=sc["labels"], accuracy=sc["accuracy"], macro=sc["macro"],
               accuracy_interval=list(sc["accuracy_interval"]) if sc["labels"] else None)
    for c in sc["per_class"]:
        tp = m[c["class"]][c["class"]]
        out["per_class"].append({**c, "class": ids[c["class"]], "tp": tp,
                                 "precision_interval": _interval(tp, c["predicted"]),
                                 "recall_interval": _interval(tp, c["support"])})
    return out


def _others(sums: dict[tuple[str, str], Sums], device_id: str, sha256: str) -> tuple[Sums, int]:
    """Every other device's windows on ``sha256`` summed, and how many devices they are."""
    total, n = Sums(), 0
    for (d, sha), s in sums.items():
        if sha == sha256 and d != device_id:
            total.add(s)
            n += 1
    return total, n


def device(store: "Store", device_id: str, since: float | None = None, until: float | None = None,
           sha256: str | None = None, now: float | None = None, fleet: bool = True) -> dict[str, Any] | None:
    """One device's quality over [since, until) (``window``'s defaults) on one bundle; None for an unknown device.

    {"device_id", "since", "until", "sha256" (None: no quality in the window), "version", "profile" (its id),
    "min_served", "windows", "served", "first", "last" (window times),
    "versions": [{"sha256", "version", "windows", "served"}] (every bundle it reported on in the window),
    "drift": {"reference": D, "fleet": D + {"devices": other devices on the bundle}} with
        D = {"psi", "js", "band", "worst": {"output", "feature"} | None, "served", "expected_served",
             "features": [{"output", "feature", "psi", "js", "band", "count"}]},
    "canary": {"runs", "agree", "agreement", "interval": [lo, hi] | None, "max_abs_err", "last_time"},
    "feedback": {"labels", "scored", "accuracy", "accuracy_interval", "classes": [id..., "other"],
                 "confusion": [[...]], "macro": {"precision", "recall", "f1"},
                 "per_class": [{"class", "precision", "recall", "f1", "support", "predicted", "tp",
                                "precision_interval", "recall_interval"}]},
    "refused": {reason: labels the device's agent refused}}
    ``fleet=False`` leaves ``drift.fleet`` None and reads no other device's windows (the rollout gates)."""
    since, until = window(since, until, now)
    dev = store.active_shas([device_id])
    if device_id not in dev:
        return None
    rows = _rows(store, since, until, device_id)
    versions: dict[str, dict[str, Any]] = {}
    for r in rows:
        v = versions.setdefault(r["sha256"], {"sha256": r["sha256"], "version": r["version"], "windows": 0,
                                              "served": 0, "last": r["time"]})
        v["windows"] += 1
        v["served"] += r["served"]
        v["last"] = max(v["last"], r["time"])
    if sha256 is None and versions:
        active = dev[device_id]
        sha256 = active if active in versions else max(versions.values(), key=lambda v: v["last"])["sha256"]
    out: dict[str, Any] = {
        "device_id": device_id, "since": since, "until": until, "sha256": sha256,
        "version": versions[sha256]["version"] if sha256 in versions else None, "profile": None,
        "min_served": MIN_SERVED, "windows": 0, "served": 0, "first": None, "last": None,
        "versions": [{k: v[k] for k in ("sha256", "version", "windows", "served")}
                     for v in sorted(versions.values(), key=lambda v: -v["last"])],
        "drift": None, "canary": canary(Sums()), "feedback": None, "refused": {}}
    if sha256 is None:
        return out
    ref = store.reference(sha256)
    mine = _sums([r for r in rows if r["sha256"] == sha256]).get((device_id, sha256), Sums())
    out.update(windows=mine.windows, served=mine.served, first=mine.first, last=mine.last, canary=canary(mine),
               refused=dict(sorted(mine.refused.items())))
    if ref is None:
        return out
    profile_id, profile = ref
    out.update(profile=profile_id, feedback=feedback(profile, mine),
               drift={"reference": drift(profile, mine, None), "fleet": None})
    if fleet:  # every other device's windows on the bundle: read only when asked for
        others, n = _others(_sums(_rows(store, since, until, sha256=sha256)), device_id, sha256)
        out["drift"]["fleet"] = {**drift(profile, mine, others.bins, others.served), "devices": n}
    return out


def series(store: "Store", device_id: str, since: float | None = None, until: float | None = None,
           sha256: str | None = None, step: float | None = None, now: float | None = None) -> dict[str, Any]:
    """For charts: the device's windows on one bundle (as ``device`` picks it) over [since, until), one point a
    window, or a ``step``-second bucket of them (chosen when there would be more than MAX_POINTS), oldest first:
    {"device_id", "sha256", "since", "until", "step", "min_served", "points": [{"time" (a window's time, or a
    bucket's start), "windows", "served", "psi" (vs the reference; None below MIN_SERVED in the point), "band",
    "canary_runs", "canary_agreement", "labels", "accuracy"}]}"""
    since, until = window(since, until, now)
    if step is not None and not (math.isfinite(step) and 1 <= step <= until - since):
        raise WindowError(f"step={step!r}: must be seconds in [1, until - since]")
    if sha256 is None:
        found = device(store, device_id, since, until, now=now)
        sha256 = found and found["sha256"]
    out: dict[str, Any] = {"device_id": device_id, "sha256": sha256, "since": since, "until": until, "step": step,
                           "min_served": MIN_SERVED, "points": []}
    if sha256 is None:
        return out
    rows = _rows(store, since, until, device_id, sha256)
    if step is None and len(rows) > MAX_POINTS:
        step = out["step"] = float(math.ceil((until - since) / MAX_POINTS))
    points: dict[float, Sums] = {}
    for r in rows:
        t = r["time"] if step is None else math.floor(r["time"] / step) * step
        points.setdefault(t, Sums()).add_row(r)
    ref = store.reference(sha256)
    for t, s in points.items():
        d = drift(ref[1], s, None) if ref else None
        fb = feedback(ref[1], s) if ref else None
        out["points"].append({"time": t, "windows": s.windows, "served": s.served, "psi": d and d["psi"],
                              "band": d and d["band"], "canary_runs": s.runs,
                              "canary_agreement": s.agree / s.runs if s.runs else None, "labels": s.labels,
                              "accuracy": fb and fb["accuracy"]})
    return out


def summary(store: "Store", since: float | None = None, until: float | None = None,
            device_ids: list[str] | None = None, now: float | None = None) -> list[dict[str, Any]]:
    """One row a device that sent quality in [since, until) (only ``device_ids`` when given), on the bundle it runs
    now when it reported on it there, else the bundle of its latest window, worst first (``worst_first``): {"device_id", "sha256", "version", "windows",
    "served", "psi_ref", "js_ref", "band_ref", "psi_fleet", "js_fleet", "band_fleet", "band" (the worse of the
    two), "canary_runs", "canary_agreement", "accuracy", "labels"}. Reads the window's rows once."""
    since, until = window(since, until, now)
    rows = _rows(store, since, until)
    sums = _sums(rows)
    latest: dict[str, str] = {}
    for r in rows:  # oldest first: the last one wins
        latest[r["device_id"]] = r["sha256"]
    if latest:  # the bundle a device runs now, when it reported on it in the window (as ``device`` picks)
        for device_id, active in store.active_shas(list(latest)).items():
            if (device_id, active) in sums:
                latest[device_id] = active
    wanted = None if device_ids is None else set(device_ids)
    out = []
    for device_id, sha in latest.items():
        if wanted is not None and device_id not in wanted:
            continue
        s = sums[device_id, sha]
        ref = store.reference(sha)
        row = {"device_id": device_id, "sha256": sha, "version": next(r["version"] for r in rows if r["sha256"] == sha),
               "windows": s.windows, "served": s.served, "psi_ref": None, "js_ref": None, "band_ref": TOO_FEW,
               "psi_fleet": None, "js_fleet": None, "band_fleet": TOO_FEW, "band": TOO_FEW,
               "canary_runs": s.runs, "canary_agreement": s.agree / s.runs if s.runs else None,
               "accuracy": None, "labels": s.labels}
        if ref is not None:
            d_ref = drift(ref[1], s, None)
            others, _ = _others(sums, device_id, sha)
            d_fleet = drift(ref[1], s, others.bins, others.served)
            fb = feedback(ref[1], s)
            row.update(psi_ref=d_ref["psi"], js_ref=d_ref["js"], band_ref=d_ref["band"], psi_fleet=d_fleet["psi"],
                       js_fleet=d_fleet["js"], band_fleet=d_fleet["band"], accuracy=fb["accuracy"],
                       band=max(d_ref["band"], d_fleet["band"], key=_band_rank))
        out.append(row)
    return worst_first(out)


def _band_rank(band: str) -> int:
    return BANDS.index(band) if band in BANDS else -1  # "too few" below "stable"


def worst_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Summary rows, the worst first: the worse drift band, then the larger PSI (vs reference or fleet), then the
    lower canary agreement, then the lower accuracy; unknown figures last within each, ties by device id."""
    def key(r: dict[str, Any]) -> tuple:
        psi = max((p for p in (r["psi_ref"], r["psi_fleet"]) if p is not None), default=None)
        return (-_band_rank(r["band"]), -psi if psi is not None else math.inf,
                r["canary_agreement"] if r["canary_agreement"] is not None else math.inf,
                r["accuracy"] if r["accuracy"] is not None else math.inf, r["device_id"])

    return sorted(rows, key=key)


def refused(store: "Store") -> dict[str, int]:
    """Quality messages the controller refused since its database was made, by reason."""
    return store.quality_refusals()
