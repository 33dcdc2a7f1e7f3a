"""Model quality in fixed bins: what the converter records from the fp32 reference, what the agent folds every
served output into, and the statistics the controller computes from the counts (issue 12, step 1).

One module for all three, so the bins are the same everywhere. numpy only (the agent's path stays light).

- A ``Profile`` is built once, by the converter, from the fp32 reference's outputs on the held-out data. For a
  classifier output ([N, C], C >= 2) it keeps four histograms: the top-1 class (the reference's ``CLASS_BINS``
  most frequent classes, every other class folded into one last bin), the top-1 probability, the top-1 minus
  top-2 margin (both ``UNIT_BINS`` equal bins on [0, 1]) and the entropy (``UNIT_BINS`` equal bins on
  [0, ln C]). For any other output, the value distribution: ``DENSE_BINS`` equal bins between the reference's
  0.5 % and 99.5 % quantiles, with an underflow and an overflow bin. Its ``id`` is the sha256 of its bins (not
  of the counts), so counts sent by a device can be checked against the bundle's profile.
- ``Folder`` adds outputs to counts laid out like the profile's (integers; fixed memory).
- ``psi`` and ``jensen_shannon`` compare two histograms, ``drift_p`` says how likely sampling alone gives a PSI as
  large, ``drift`` puts the three and a band together; ``wilson`` bounds a proportion; ``scores`` gives per-class
  and macro precision / recall / F1 from a confusion matrix.

Why PSI here is smoothed and comes with a p-value: the bands (0.1 / 0.25) were made for samples of thousands. A
bundle's reference holds its held-out samples (often 100-500) and a device's window a few hundred outputs; with the
usual floor for empty bins, two samples of the *same* scene (111 reference outputs of the demo's text classifier
against 100 more) gave a PSI of 0.45 on average, "significant". Adding ``SMOOTHING`` (0.5, Jeffreys' prior) to every
bin's count before taking shares brings that to 0.17, and ``drift_p`` (n_eff * PSI is about chi-square with k - 1
degrees of freedom when both samples come from one distribution, n_eff = n_e n_a / (n_e + n_a)) tells sampling noise
from a shift: in 100 such same-scene trials none had p < ``NOISE_P``, while 50 outputs of a changed scene had p
below 1e-4. A band above "stable" is only given when p < ``NOISE_P``.
"""

from __future__ import annotations

import hashlib
import math

import msgspec
import numpy as np

CLASS_BINS = 32  # classes tracked one by one; the rest share the last bin
UNIT_BINS = 10
DENSE_BINS = 16
DENSE_QUANTILES = (0.005, 0.995)
SMOOTHING = 0.5  # added to every bin's count before PSI takes shares: an empty bin is not infinitely far
CANARY_DENSE_TOLERANCE = 0.05  # a dense golden output agrees within this share of the profile's bin range
PSI_BANDS = (0.1, 0.25)  # below 0.1: no shift; 0.1-0.25: moderate; above: significant
NOISE_P = 0.001  # a PSI that sampling alone gives with a probability above this is not called a shift
CLASSIFIER_FEATURES = ("class", "confidence", "margin", "entropy")


class OutputProfile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    kind: str  # "classifier" | "dense"
    # classifier: the class ids with a bin of their own, in bin order (the last bin is every other class)
    classes: list[int] = []
    n_classes: int = 0
    # classifier: the reference's rows are probabilities (a softmax in the model) rather than scores; decided once
    # here, from the fp32 reference, so that a quantized variant's probabilities (rows summing to 1 +- 0.01) are
    # binned as probabilities too, not softmaxed again
    probabilities: bool = False
    # dense: the inner bin edges (DENSE_BINS + 1 values); bin 0 is below edges[0], the last above edges[-1]
    edges: list[float] = []
    counts: dict[str, list[int]] = {}  # feature -> the reference's counts


class Profile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    outputs: list[OutputProfile]
    samples: int  # how many reference samples the counts hold
    format: int = 1

    @property
    def id(self) -> str:
        """sha256 of the bins (not the counts): two profiles with the same id fold outputs the same way."""
        bins = [(o.name, o.kind, o.classes, o.n_classes, o.edges) + ((True,) if o.probabilities else ())
                for o in self.outputs]
        return hashlib.sha256(msgspec.json.encode(bins)).hexdigest()

    def empty(self) -> dict[str, dict[str, list[int]]]:
        """Zero counts laid out like this profile's: output -> feature -> counts."""
        return {o.name: {f: [0] * len(c) for f, c in o.counts.items()} for o in self.outputs}


def build(outputs: dict[str, np.ndarray], kinds: dict[str, str]) -> Profile:
    """The profile of the fp32 reference's ``outputs`` (name -> [N, ...] array) judged as ``kinds`` (name ->
    "classifier" | "dense"): the bins, and the reference's own counts in them."""
    profiles, samples = [], 0
    for name, value in outputs.items():
        value = np.asarray(value)
        samples = max(samples, len(value) if value.ndim else 1)
        if kinds.get(name) == "classifier":
            rows = _rows(value)
            ids, freq = np.unique(rows.argmax(1), return_counts=True)
            order = sorted(zip(-freq, ids))[:CLASS_BINS]
            profile = OutputProfile(name=name, kind="classifier", classes=[int(i) for _, i in order],
                                    n_classes=int(rows.shape[1]), probabilities=_are_probabilities(rows))
        else:
            flat = value.astype(np.float64).ravel()
            flat = flat[np.isfinite(flat)]
            lo, hi = (np.quantile(flat, DENSE_QUANTILES) if flat.size else (0.0, 1.0))
            if not hi > lo:
                hi = lo + 1.0
            profile = OutputProfile(name=name, kind="dense",
                                    edges=[float(e) for e in np.linspace(lo, hi, DENSE_BINS + 1)])
        profile.counts = {f: [0] * n for f, n in _sizes(profile).items()}
        profiles.append(profile)
    prof = Profile(outputs=profiles, samples=samples)
    Folder(prof, counts={o.name: o.counts for o in profiles}).add(outputs)
    return prof


class Folder:
    """Adds served outputs to counts laid out like ``profile``'s (fixed memory: a few lists of integers)."""

    def __init__(self, profile: Profile, counts: dict[str, dict[str, list[int]]] | None = None):
        self.profile = profile
        self.counts = profile.empty() if counts is None else counts
        self._index = {o.name: _class_index(o) for o in profile.outputs if o.kind == "classifier"}

    def add(self, outputs: dict[str, np.ndarray]) -> None:
        """Fold one batch of outputs (name -> [N, ...]); outputs the profile does not know are ignored."""
        for o in self.profile.outputs:
            if o.name not in outputs:
                continue
            counts = self.counts[o.name]
            value = np.asarray(outputs[o.name])
            if o.kind == "classifier":
                for feature, bins in _classifier_bins(o, value, self._index[o.name]).items():
                    _accumulate(counts[feature], bins)
            else:
                flat = value.astype(np.float64).ravel()
                flat = flat[np.isfinite(flat)]
                _accumulate(counts["value"], np.searchsorted(np.asarray(o.edges), flat, side="right"))

    def take(self) -> dict[str, dict[str, list[int]]]:
        """The counts so far, and start again from zero (one telemetry window)."""
        counts, self.counts = self.counts, self.profile.empty()
        return counts


def class_index(o: OutputProfile) -> np.ndarray:
    """For a classifier output: class id -> its bin in ``counts["class"]`` (the same index ``Folder`` uses; every
    class without a bin of its own -> the last bin, "other")."""
    return _class_index(o)


def canary_compare(o: OutputProfile, device: np.ndarray, fp32: np.ndarray) -> tuple[bool, float]:
    """Whether one golden output computed on a device agrees with its fp32 reference, and max |device - fp32|.

    A classifier output agrees when every row's top-1 class is the fp32 one; any other output when
    max |device - fp32| <= CANARY_DENSE_TOLERANCE * (edges[-1] - edges[0]) of its profile (5 % of the range
    between the reference's 0.5 % and 99.5 % quantiles). A shape mismatch or a non-finite value disagrees
    (its error is then inf)."""
    d, f = np.asarray(device, np.float64), np.asarray(fp32, np.float64)
    if d.shape != f.shape:
        return False, math.inf
    err = float(np.abs(d - f).max()) if d.size else 0.0
    if not math.isfinite(err):
        return False, math.inf
    if o.kind == "classifier":
        rows = d.shape[0] if d.ndim >= 2 else 1
        return bool((d.reshape(rows, -1).argmax(1) == f.reshape(rows, -1).argmax(1)).all()), err
    return err <= CANARY_DENSE_TOLERANCE * (o.edges[-1] - o.edges[0]), err


def _sizes(o: OutputProfile) -> dict[str, int]:
    if o.kind == "classifier":
        return {"class": len(o.classes) + 1, "confidence": UNIT_BINS, "margin": UNIT_BINS, "entropy": UNIT_BINS}
    return {"value": DENSE_BINS + 2}


def _class_index(o: OutputProfile) -> np.ndarray:
    """class id -> its bin (every class without a bin of its own -> the last bin)."""
    index = np.full(o.n_classes, len(o.classes), np.int64)
    index[np.asarray(o.classes, np.int64)] = np.arange(len(o.classes))
    return index


def _rows(scores: np.ndarray) -> np.ndarray:
    """[N, C] in the outputs' own float type (float32 stays float32: the converter's reference and the device's
    outputs are binned by the same arithmetic), other types as float64."""
    s = np.asarray(scores)
    s = s.reshape(len(s), -1) if s.ndim else s.reshape(1, -1)
    return s if s.dtype in (np.float32, np.float64) else s.astype(np.float64)


def _are_probabilities(s: np.ndarray) -> bool:
    return bool(s.min() >= 0) and bool(np.abs(s.sum(1) - 1.0).max() <= 1e-3)


def _classifier_bins(o: OutputProfile, scores: np.ndarray, index: np.ndarray) -> dict[str, np.ndarray]:
    s = _rows(scores)
    rows = np.arange(len(s))
    top = s.argmax(1)
    if s.shape[1] >= 2:  # the runner-up: the largest once the top is masked (a partition costs 20x more)
        masked = s.copy()
        masked[rows, top] = -np.inf
        second = masked.max(1)
    else:
        second = None
    if o.probabilities:  # as the reference's were (normalised: a quantized softmax sums to 1 +- 0.01)
        total = np.maximum(s, 0).sum(1)
        total = np.where(total > 0, total, 1.0)
        p = np.maximum(s, 0) / total[:, None]
        p1, p2 = p[rows, top], (np.zeros(len(s), s.dtype) if second is None else np.maximum(second, 0) / total)
        entropy = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(1)
    else:  # softmax without dividing the whole array: p = e / Z, H = ln Z - sum(e z) / Z with z = s - max
        z = s - s[rows, top][:, None]
        e = np.exp(z)
        total = e.sum(1)
        p1 = 1.0 / total
        p2 = np.zeros(len(s), s.dtype) if second is None else np.exp(second - s[rows, top]) / total
        entropy = np.log(total) - np.einsum("ij,ij->i", e, z) / total
    unit = lambda x: np.clip((x * UNIT_BINS).astype(np.int64), 0, UNIT_BINS - 1)  # noqa: E731
    return {"class": index[top], "confidence": unit(p1), "margin": unit(p1 - p2),
            "entropy": unit(entropy / math.log(max(o.n_classes, 2)))}


def _accumulate(counts: list[int], bins: np.ndarray) -> None:
    added = np.bincount(bins.ravel(), minlength=len(counts))
    for b in np.flatnonzero(added):
        counts[int(b)] += int(added[b])


# ---- statistics over counts ----------------------------------------------------------------------------------


def _shares(counts) -> np.ndarray:
    c = np.asarray(counts, np.float64)
    total = c.sum()
    if total <= 0:
        raise ValueError("a histogram with no counts has no distribution")
    return c / total


def psi(expected, actual, smoothing: float = SMOOTHING) -> float:
    """Population stability index: sum over bins of (a - e) * ln(a / e), where e and a are the bins' shares after
    ``smoothing`` is added to every count."""
    e, a = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    if e.shape != a.shape:
        raise ValueError(f"histograms of {e.size} and {a.size} bins cannot be compared")
    _shares(e), _shares(a)  # neither may be empty
    e, a = _shares(e + smoothing), _shares(a + smoothing)
    return float(((a - e) * np.log(a / e)).sum())


def psi_band(value: float) -> str:
    return "stable" if value < PSI_BANDS[0] else ("moderate" if value < PSI_BANDS[1] else "significant")


def drift_p(expected, actual, value: float | None = None) -> float:
    """The probability that two samples of one distribution, of these sizes, give a PSI at least ``value`` (the
    PSI of ``expected`` and ``actual`` when not given): n_eff * PSI against chi-square with k - 1 degrees of freedom
    (k: the bins either sample reached), its tail by the Wilson-Hilferty approximation."""
    e, a = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    value = psi(e, a) if value is None else value
    n_e, n_a = e.sum(), a.sum()
    k = int(((e + a) > 0).sum()) - 1
    if k <= 0 or value <= 0:
        return 1.0
    x = value * n_e * n_a / (n_e + n_a)
    z = ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


class Drift(msgspec.Struct, kw_only=True):
    psi: float
    js: float  # Jensen-Shannon divergence, bits
    p: float  # drift_p: how likely sampling alone gives this PSI
    band: str  # "stable" | "moderate" | "significant" (a band above stable only when p < NOISE_P)


def drift(expected, actual) -> Drift:
    """PSI, Jensen-Shannon, the p-value and the band of ``actual`` against ``expected`` (two histograms)."""
    value = psi(expected, actual)
    p = drift_p(expected, actual, value)
    return Drift(psi=value, js=jensen_shannon(expected, actual), p=p,
                 band=psi_band(value) if p < NOISE_P else "stable")


def jensen_shannon(p, q) -> float:
    """Jensen-Shannon divergence in bits (0: the same distribution, 1: disjoint)."""
    p, q = _shares(p), _shares(q)
    if p.shape != q.shape:
        raise ValueError(f"histograms of {p.size} and {q.size} bins cannot be compared")
    m = (p + q) / 2

    def kl(x, y):
        nz = x > 0
        return float((x[nz] * np.log2(x[nz] / y[nz])).sum())

    return max(0.0, (kl(p, m) + kl(q, m)) / 2)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default); (0, 1) with no observations."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def scores(confusion) -> dict:
    """From a confusion matrix (rows: true label, columns: prediction): accuracy, and per class and macro
    precision, recall and F1 with the counts they rest on. A class never predicted has precision None."""
    m = np.asarray(confusion, np.int64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a confusion matrix is square; got shape {list(m.shape)}")
    tp = np.diag(m)
    predicted, actual, total = m.sum(0), m.sum(1), int(m.sum())
    per_class = []
    for k in range(len(m)):
        precision = float(tp[k] / predicted[k]) if predicted[k] else None
        recall = float(tp[k] / actual[k]) if actual[k] else None
        f1 = (2 * precision * recall / (precision + recall) if precision and recall else
              (0.0 if precision is not None and recall is not None else None))
        per_class.append({"class": k, "precision": precision, "recall": recall, "f1": f1,
                          "support": int(actual[k]), "predicted": int(predicted[k])})

    def macro(key):
        values = [c[key] for c in per_class if c[key] is not None]
        return float(np.mean(values)) if values else None

    correct = int(tp.sum())
    return {"accuracy": correct / total if total else None, "accuracy_interval": wilson(correct, total),
            "labels": total, "per_class": per_class,
            "macro": {"precision": macro("precision"), "recall": macro("recall"), "f1": macro("f1")}}
