"""The accuracy gate: how far a variant may drift from the fp32 reference before it is refused.

The gate judges one output (the model's first, or ``--gate-output NAME``) in one metric, with the threshold in
that metric's own unit:

  top1, top5  agreement with fp32 (%)            drop below 100 % at most ``--max-accuracy-drop``
  accuracy    task accuracy with ``--labels``    drop below the fp32 accuracy at most ``--max-accuracy-drop``
  kl          mean KL(fp32 || variant)           at most ``--max-kl``
  sqnr        SQNR in dB over all elements       at least ``--min-sqnr`` (default 30 dB)

By default a classifier output ([N, C], C >= 2) is gated on top1 (accuracy with labels), any other output on
sqnr; ``--min-sqnr`` or ``--max-kl`` given alone pick their metric. The gate is on when any of ``--gate``,
``--max-accuracy-drop``, ``--min-sqnr`` or ``--max-kl`` is given; otherwise every variant is measured in the
same metric and emitted. A refused variant names its worst outputs; the target then tries the next rung of
the fallback chain (``converter.plan.RUNGS``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from converter import ConvertError
from converter.measure import CLASSIFIER, KINDS, output_kind

METRICS = {"top1": "top-1 agreement", "top5": "top-5 agreement", "kl": "mean KL", "sqnr": "SQNR",
           "accuracy": "task accuracy"}
DROP_METRICS = ("top1", "top5", "accuracy")  # judged by --max-accuracy-drop, in percentage points
DEFAULT_MIN_SQNR = 30.0  # dB: the quantization noise at most a thousandth of the signal's power
_FLAGS = {"top1": "--max-accuracy-drop", "top5": "--max-accuracy-drop", "accuracy": "--max-accuracy-drop",
          "kl": "--max-kl", "sqnr": "--min-sqnr"}


def parse_drop(text: str | float | None) -> float | None:
    """``1%`` or ``0.01`` -> 0.01; None stays None."""
    if text is None:
        return None
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConvertError(f"--max-accuracy-drop {raw!r} is not a number or a percentage (e.g. 1% or 0.01)") from None
    if not 0 <= value < 1:
        raise ConvertError(f"--max-accuracy-drop {raw!r} must be at least 0 and below 100 %")
    return value


@dataclass(frozen=True)
class Options:
    """What the user asked of the gate, checked before any work (``options(...)`` builds it)."""

    metric: str | None = None
    output: str | None = None
    max_drop: float | None = None
    min_sqnr: float | None = None
    max_kl: float | None = None
    kinds: dict[str, str] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.metric, self.max_drop, self.min_sqnr, self.max_kl))


def options(*, metric: str | None = None, output: str | None = None, max_accuracy_drop: str | float | None = None,
            min_sqnr: float | None = None, max_kl: float | None = None,
            output_kinds: dict[str, str] | None = None) -> Options:
    """The gate's flags, each checked: one line naming the problem."""
    if metric is not None and metric not in METRICS:
        raise ConvertError(f"--gate {metric!r}: choose one of {', '.join(METRICS)}")
    if min_sqnr is not None and not (isinstance(min_sqnr, (int, float)) and math.isfinite(min_sqnr)):
        raise ConvertError(f"--min-sqnr {min_sqnr!r} is not a number of dB (e.g. 30)")
    if max_kl is not None and not (isinstance(max_kl, (int, float)) and math.isfinite(max_kl) and max_kl >= 0):
        raise ConvertError(f"--max-kl {max_kl!r} must be a number at least 0 (e.g. 0.01)")
    kinds = dict(output_kinds or {})
    for name, kind in kinds.items():
        if kind not in KINDS:
            raise ConvertError(f"--output-kind {name}={kind}: the kind is one of {', '.join(KINDS)}")
    opts = Options(metric, output, parse_drop(max_accuracy_drop), None if min_sqnr is None else float(min_sqnr),
                   None if max_kl is None else float(max_kl), kinds)
    if metric in ("top1", "top5", "accuracy") and opts.max_drop is None:
        raise ConvertError(f"--gate {metric} needs --max-accuracy-drop X (e.g. 1%)")
    if metric == "kl" and opts.max_kl is None:
        raise ConvertError("--gate kl needs --max-kl X (e.g. 0.01)")
    return opts


@dataclass(frozen=True)
class Rule:
    """The gate for one model, resolved against its fp32 outputs: which output, in which metric, how strict."""

    metric: str
    output: str
    kind: str
    threshold: float | None  # None: not gated (the metric is still measured and shown)
    chosen_by: str  # why this metric: "--gate", "--min-sqnr", "default for a classifier output", ...
    kinds: dict[str, str]  # every output's kind
    labels_output: str | None  # the output --labels refer to
    default_threshold: bool = False  # the threshold is DEFAULT_MIN_SQNR, not the user's

    @property
    def active(self) -> bool:
        return self.threshold is not None

    def limit(self) -> str:
        if self.threshold is None:
            return "not gated"
        if self.metric in DROP_METRICS:
            return f"drop <= {self.threshold:.2%}"
        if self.metric == "sqnr":
            return f">= {self.threshold:g} dB" + (" (the default --min-sqnr)" if self.default_threshold else "")
        return f"<= {self.threshold:g}"

    def describe(self) -> dict:
        return {"metric": self.metric, "metric_name": METRICS[self.metric], "output": self.output, "kind": self.kind,
                "threshold": self.threshold, "limit": self.limit(), "chosen_by": self.chosen_by,
                "output_kinds": self.kinds}


def resolve(opts: Options, reference: dict[str, np.ndarray], labels: bool) -> Rule:
    """The gate's output, metric and threshold for this model (``reference``: its fp32 outputs)."""
    names = list(reference)
    for name in [*opts.kinds, *([opts.output] if opts.output is not None else [])]:
        if name not in reference:
            raise ConvertError(f"the model has no output {name!r} (its outputs: {', '.join(names)})")
    kinds = {}
    for name, ref in reference.items():
        kinds[name] = output_kind(ref, opts.kinds.get(name))
        if kinds[name] == CLASSIFIER and not (np.ndim(ref) == 2 and np.shape(ref)[1] >= 2):
            raise ConvertError(f"--output-kind {name}=classifier: {name!r} is shaped {list(np.shape(ref))}, "
                               "a classifier output is [N, classes] with at least 2 classes")
    output = opts.output if opts.output is not None else names[0]
    kind = kinds[output]
    labels_output = output if kind == CLASSIFIER else next((k for k in names if kinds[k] == CLASSIFIER), None)
    if labels and labels_output is None:
        raise ConvertError("--labels needs a classifier output ([N, classes]); this model has none")

    default = ("accuracy" if labels else "top1") if kind == CLASSIFIER else "sqnr"
    named = [m for m, given in (("sqnr", opts.min_sqnr), ("kl", opts.max_kl)) if given is not None]
    if opts.metric is not None:
        metric, chosen_by = opts.metric, "--gate"
    elif opts.max_drop is None and len(named) == 1 and named[0] != default:
        metric, chosen_by = named[0], _FLAGS[named[0]]
    elif opts.max_drop is None and len(named) == 2 and default not in named:
        raise ConvertError("--min-sqnr and --max-kl name different metrics for a classifier: choose with --gate")
    else:
        metric, chosen_by = default, f"default for a {kind} output" + (" with --labels" if labels and
                                                                          kind == CLASSIFIER else "")
    if metric in ("top1", "top5", "kl") and kind != CLASSIFIER:
        raise ConvertError(f"--gate {metric} needs a classifier output ([N, classes]); {output!r} is dense "
                           f"(shaped {list(np.shape(reference[output]))}); name one with --gate-output")
    if metric == "accuracy" and not labels:
        raise ConvertError("--gate accuracy needs --labels LABELS.npy")
    if metric == "accuracy" and kind != CLASSIFIER:
        raise ConvertError(f"--gate accuracy needs a classifier output; {output!r} is dense")

    threshold = None
    if opts.active:
        if metric in DROP_METRICS:
            threshold = opts.max_drop
            if threshold is None:
                raise ConvertError(f"gating on {metric} needs --max-accuracy-drop X (e.g. 1%)")
        elif metric == "kl":
            threshold = opts.max_kl
        else:
            threshold = DEFAULT_MIN_SQNR if opts.min_sqnr is None else opts.min_sqnr
    return Rule(metric, output, kind, threshold, chosen_by, kinds, labels_output,
                default_threshold=metric == "sqnr" and threshold is not None and opts.min_sqnr is None)


def task_accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray | None, output: str | None) -> float | None:
    if labels is None or output is None:
        return None
    return float((np.asarray(outputs[output]).argmax(1) == labels).mean())


def measured(rule: Rule, agreement: dict, accuracy: float | None, reference_accuracy: float | None) -> dict:
    """The gate's metric for one variant: {"metric", "value", "reference", "drop", "text"}."""
    entry = agreement["outputs"][rule.output]
    name = METRICS[rule.metric]
    if rule.metric == "accuracy":
        drop = round(max(0.0, reference_accuracy - accuracy), 6)
        return {"metric": "accuracy", "value": accuracy, "reference": reference_accuracy, "drop": drop,
                "text": f"{name} {accuracy:.1%} vs {reference_accuracy:.1%} fp32 (drop {drop:.2%})"}
    if rule.metric in ("top1", "top5"):
        value = entry[rule.metric]
        drop = round(1.0 - value, 6)
        return {"metric": rule.metric, "value": value, "reference": 1.0, "drop": drop,
                "text": f"{name} {value:.1%} (drop {drop:.2%})"}
    if rule.metric == "kl":
        value = entry["kl"]
        return {"metric": "kl", "value": value, "reference": 0.0, "drop": None,
                "text": f"{name} {'undefined (non-finite output)' if value is None else f'{value:.4g}'}"}
    value = entry["sqnr_db"]
    return {"metric": "sqnr", "value": value, "reference": None, "drop": None, "text": f"{name} {value:.1f} dB"}


def judge(rule: Rule, agreement: dict, accuracy: float | None, reference_accuracy: float | None) -> dict:
    """Pass or refuse one variant in the rule's metric; a refusal says why and names the worst outputs."""
    m = measured(rule, agreement, accuracy, reference_accuracy)
    verdict = {**m, "metric_name": METRICS[rule.metric], "output": rule.output, "threshold": rule.threshold,
               "limit": rule.limit(), "chosen_by": rule.chosen_by}
    if not rule.active:
        return {**verdict, "passed": None,
                "reason": f"{m['text']}; not gated (no --gate, --max-accuracy-drop, --min-sqnr or --max-kl given)"}
    value, t = m["value"], rule.threshold
    if rule.metric in DROP_METRICS:
        ok = m["drop"] <= t + 1e-12
    elif rule.metric == "kl":
        ok = value is not None and value <= t + 1e-12
    else:
        ok = value >= t
    where = f" on output {rule.output!r}" if len(agreement["outputs"]) > 1 else ""
    if ok:
        return {**verdict, "passed": True, "reason": f"{m['text']}{where} passes {rule.limit()}"}
    worst = sorted(agreement["outputs"].items(), key=lambda kv: kv[1]["sqnr_db"])[:3]
    names = ", ".join(f"{k} ({_figures(e)})" for k, e in worst)
    return {**verdict, "passed": False,
            "reason": f"{m['text']}{where} fails {rule.limit()}; worst outputs: {names}"}


def _figures(entry: dict) -> str:
    bits = [] if entry.get("top1") is None else [f"top-1 {entry['top1']:.1%}"]
    bits.append(f"SQNR {entry['sqnr_db']:.1f} dB")
    if entry.get("max_abs_err") is not None:
        bits.append(f"max abs err {entry['max_abs_err']:.3g}")
    return ", ".join(bits)


def fidelity(rule: Rule, agreement: dict, accuracy: float | None) -> tuple[float, ...]:
    """A sort key, higher is more faithful: the gate's metric first, then the judged output's KL (classifiers)
    and SQNR, which separate variants a top-1 count on a few held-out samples calls equal."""
    entry = agreement["outputs"][rule.output]
    kl = entry.get("kl")
    kl_key = -kl if kl is not None and math.isfinite(kl) else -math.inf
    if rule.metric == "accuracy":
        first = accuracy if accuracy is not None else -math.inf
    elif rule.metric in ("top1", "top5"):
        first = entry[rule.metric]
    elif rule.metric == "kl":
        first = kl_key
    else:
        first = entry["sqnr_db"]
    return (first, kl_key, entry["sqnr_db"])
