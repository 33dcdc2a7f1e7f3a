"""The accuracy gate: how far a variant may drift from the fp32 reference before it is refused.

The metric is, in order of preference: task accuracy when labels are given (drop = reference accuracy
minus the variant's), top-1 agreement for classifiers (drop = 1 - agreement), else the worst output's
mean cosine similarity (drop = 1 - cosine). A refused variant names its worst outputs; the target then
tries the next rung of the fallback chain (``converter.plan.RUNGS``).
"""

from __future__ import annotations

import numpy as np

from converter import ConvertError


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


def classifier_output(reference: dict[str, np.ndarray]) -> str | None:
    """The first output shaped [N, C] with C > 1: the one labels and top-1 refer to."""
    return next((k for k, v in reference.items() if v.ndim == 2 and v.shape[1] > 1), None)


def task_accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray | None, output: str | None) -> float | None:
    if labels is None or output is None:
        return None
    return float((np.asarray(outputs[output]).argmax(1) == labels).mean())


def measure_drop(agreement: dict, accuracy: float | None, reference_accuracy: float | None) -> dict:
    """The gate's metric for one variant: {"metric", "value", "drop"}."""
    if accuracy is not None and reference_accuracy is not None:
        return {"metric": "task accuracy", "value": accuracy, "reference": reference_accuracy,
                "drop": round(max(0.0, reference_accuracy - accuracy), 6)}
    if agreement.get("top1") is not None:
        return {"metric": "top-1 agreement", "value": agreement["top1"], "reference": 1.0,
                "drop": round(1.0 - agreement["top1"], 6)}
    worst = min(e["mean_cosine"] for e in agreement["outputs"].values())
    return {"metric": "mean cosine similarity", "value": worst, "reference": 1.0, "drop": round(1.0 - worst, 6)}


def judge(measured: dict, agreement: dict, max_drop: float | None) -> dict:
    """Pass or refuse one variant; a refusal says why and names the worst outputs."""
    verdict = {**measured, "max_drop": max_drop}
    if max_drop is None:
        return {**verdict, "passed": None, "reason": "no --max-accuracy-drop given"}
    if measured["drop"] <= max_drop + 1e-12:
        return {**verdict, "passed": True, "reason": f"{measured['metric']} drop {measured['drop']:.2%} "
                                                       f"<= {max_drop:.2%}"}
    worst = sorted(agreement["outputs"].items(), key=lambda kv: kv[1]["mean_cosine"])[:3]
    names = ", ".join(f"{k} (cosine {e['mean_cosine']:.4f}, max abs err {e['max_abs_err']:.3g})" for k, e in worst)
    return {**verdict, "passed": False,
            "reason": f"{measured['metric']} drop {measured['drop']:.2%} > {max_drop:.2%}; worst outputs: {names}"}
