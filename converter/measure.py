"""Measurements of a variant in its own runtime: host latency and agreement with the fp32 reference
(classifier outputs: top-1/top-5 agreement, KL, confident top-1; every output: SQNR, relative L2, max abs error).

A variant is loaded the way a device loads it: ``agent.runtimes.load(model_dir, manifest)`` on a
directory laid out like an unpacked bundle. What measures never writes bundles or prints.
"""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path

import msgspec
import numpy as np

from agent import runtimes
from agent.bundle import Manifest

WARMUP = 5
RUNS = 50
SECONDS = 2.0
EVAL_BATCH = 16
SETTINGS = {"intra_op_threads": 1}
FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
         "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",  # x86
         "asimd", "asimddp", "i8mm", "bf16", "sve", "fphp", "asimdhp")  # arm64


def open_session(model_dir: Path, model: str = "model.onnx", runtime: str = "onnxruntime",
                 settings: dict | None = None):
    """A runtime session on ``model_dir/model`` through the agent's runtime plugins."""
    manifest = Manifest(name="measure", version="0", target="cpu", runtime=runtime, precision="?", model=model,
                        files=[], inputs=[], outputs=[], settings=dict(settings or SETTINGS))
    return runtimes.load(model_dir, manifest)


def run_batched(session, inputs, batch: int | None = None) -> dict[str, np.ndarray]:
    """Run every feed (``converter.calib.Feeds``; stacked arrays are samples along axis 0) in batches of
    ``batch`` (the model's fixed batch, or EVAL_BATCH stacked samples); one row of output per feed."""
    from converter.calib import as_feeds, run_feeds

    feeds = as_feeds(inputs)
    return feeds.join(run_feeds(session.run, feeds, batch, EVAL_BATCH))


def latency(session, feeds: dict[str, np.ndarray], *, warmup: int = WARMUP, runs: int = RUNS,
            seconds: float = SECONDS) -> dict:
    """p50/p95 of ``runs`` inferences or as many as fit in ``seconds`` (at least 5), after a warm-up."""
    for _ in range(warmup):
        session.run(feeds)
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < runs and (len(times) < 5 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        session.run(feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.array(times)
    return {"p50": round(float(np.percentile(t, 50)), 4), "p95": round(float(np.percentile(t, 95)), 4),
            "mean": round(float(t.mean()), 4), "runs": len(t)}


CLASSIFIER, DENSE = "classifier", "dense"
KINDS = (CLASSIFIER, DENSE)
SQNR_CAP_DB = 200.0  # identical outputs: SQNR is infinite; reported as this (JSON has no infinity)
CONFIDENT = 0.9  # fp32 top-1 probability at or above which a sample counts as confident
TOP_K = 5
_PROB_TOLERANCE = 1e-3  # rows of probabilities sum to 1 within this
_EPS = 1e-12  # probabilities are clipped to this before a log: an int8 softmax may output an exact 0


def output_kind(reference: np.ndarray, override: str | None = None) -> str:
    """``classifier`` for a floating [N, C] output with C >= 2 (scores over classes), else ``dense``;
    ``override`` (the user's word) wins."""
    if override is not None:
        return override
    ref = np.asarray(reference)
    return CLASSIFIER if ref.ndim == 2 and ref.shape[1] >= 2 and ref.dtype.kind == "f" else DENSE


def agreement(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], kinds: dict[str, str] | None = None,
              primary: str | None = None) -> dict:
    """Every output's agreement with the fp32 reference: dense metrics (SQNR, relative L2, max abs error over
    all elements) for all, classifier metrics (top-1/top-5 agreement, KL, confident top-1) for classifiers.

    The top level repeats the ``primary`` output's figures (default the first output): the one the gate judges.
    """
    kinds = kinds or {}
    per = {}
    for name, ref in reference.items():
        if name not in got:
            raise ValueError(f"output {name!r} is missing from the variant")
        out = np.asarray(got[name])
        if out.size != np.size(ref):
            raise ValueError(f"output {name!r} has shape {list(out.shape)}, the fp32 reference {list(np.shape(ref))}")
        out = out.reshape(np.shape(ref))
        kind = output_kind(ref, kinds.get(name))
        entry = {"kind": kind, **dense_metrics(ref, out)}
        if kind == CLASSIFIER:
            entry.update(classifier_metrics(ref, out))
        per[name] = entry
    primary = primary or next(iter(reference))
    first = per[primary]
    return {"samples": len(next(iter(reference.values()))), "output": primary, "kind": first["kind"],
            "top1": first.get("top1"), "top5": first.get("top5"), "kl": first.get("kl"),
            "sqnr_db": first["sqnr_db"], "rel_l2": first["rel_l2"], "max_abs_err": first["max_abs_err"],
            "outputs": per}


def dense_metrics(reference: np.ndarray, got: np.ndarray) -> dict:
    """Over all elements: SQNR in dB (10 log10(sum ref^2 / sum (ref - got)^2), capped at +-SQNR_CAP_DB),
    the relative L2 error ||ref - got|| / ||ref|| (None when the reference is all zeros and the output is
    not) and the max abs error. A variant with NaN or inf in its output gets the worst SQNR and no error."""
    r = np.asarray(reference, np.float64).ravel()
    g = np.asarray(got, np.float64).ravel()
    nonfinite = int(g.size - np.isfinite(g).sum())
    if nonfinite:
        return {"sqnr_db": -SQNR_CAP_DB, "rel_l2": None, "max_abs_err": None, "nonfinite": nonfinite}
    signal, noise = float(r @ r), float((r - g) @ (r - g))
    return {"sqnr_db": sqnr_db(signal, noise),
            "rel_l2": (0.0 if noise == 0 else None) if signal == 0 else math.sqrt(noise / signal),
            "max_abs_err": float(np.abs(r - g).max()) if r.size else 0.0}


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB, within +-SQNR_CAP_DB (identical: +cap; a zero signal with noise: -cap)."""
    if noise == 0:
        return SQNR_CAP_DB
    if signal == 0:
        return -SQNR_CAP_DB
    return float(np.clip(10 * math.log10(signal / noise), -SQNR_CAP_DB, SQNR_CAP_DB))


def classifier_metrics(reference: np.ndarray, got: np.ndarray) -> dict:
    """For [N, C] scores: top-1 agreement with fp32; top-5 agreement (the fp32 top-1 is within the variant's
    top-5; k = min(5, C)) and the mean overlap of the two top-5 sets; mean KL(fp32 || variant) over the class
    distributions (softmax of the scores unless the fp32 rows already are probabilities); and top-1 agreement
    on the samples where fp32's top-1 probability is at least CONFIDENT (None when there are none)."""
    r = np.asarray(reference, np.float64)
    g = np.asarray(got, np.float64)
    n, c = r.shape
    k = min(TOP_K, c)
    ref_top1 = r.argmax(1)
    same = ref_top1 == g.argmax(1)
    ref_topk = np.argsort(-r, axis=1, kind="stable")[:, :k]
    got_topk = np.argsort(-g, axis=1, kind="stable")[:, :k]
    in_topk = (got_topk == ref_top1[:, None]).any(1)
    overlap = np.array([len(set(a) & set(b)) / k for a, b in zip(ref_topk, got_topk)])
    probabilities = is_probability(r)
    log_p, log_q = _log_distribution(r, probabilities), _log_distribution(g, probabilities)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(1) if n else np.zeros(0)
    confident = np.exp(log_p.max(1)) >= CONFIDENT if n else np.zeros(0, bool)
    return {
        "top1": _mean(same), "top5": _mean(in_topk), "top5_k": k, "top5_overlap": _mean(overlap),
        "kl": None if not np.isfinite(kl).all() else max(0.0, _mean(kl)),
        "softmax_applied": not probabilities,
        "confident_samples": int(confident.sum()),
        "top1_confident": _mean(same[confident]) if confident.any() else None,
    }


def is_probability(scores: np.ndarray) -> bool:
    """Rows in [0, 1] that sum to 1 (within 1e-3): already a distribution, no softmax needed."""
    s = np.asarray(scores, np.float64)
    return bool(s.size and (s >= 0).all() and (s <= 1).all() and np.allclose(s.sum(1), 1.0, atol=_PROB_TOLERANCE))


def _log_distribution(scores: np.ndarray, probabilities: bool) -> np.ndarray:
    if probabilities:  # clipped and renormalised: an int8 output may hold exact zeros or sum to 0.99
        p = np.clip(scores, _EPS, None)
        return np.log(p / p.sum(1, keepdims=True))
    shifted = scores - scores.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags (x86 ``flags`` / arm64 ``Features``) from /proc/cpuinfo; empty if unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def host() -> dict:
    """What the latency figures were measured on: the ISA matters more than the clock."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "CPU part"):
                model = value.strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    return {"machine": platform.machine(), "cpu": model, "cpus": os.cpu_count(),
            "flags": sorted(f for f in FLAGS if f in flags)}


def toolchain() -> dict:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


CLIENTS = (1, 2, 4)  # client threads the throughput is measured at
SERVING = ((1, 1), (2, 1), (1, 8), (2, 8))  # (concurrency, max_batch) set-ups, the one preferred first
SERVING_SECONDS = 0.08  # per figure and round: 4 set-ups x 3 client counts x 2 rounds stay within ~2 s a variant
SERVING_ROUNDS = 2  # interleaved: a neighbour's burst of load lowers one round of a set-up, not all of its rounds
NEAR_BEST = 0.9  # the recommended set-up: the first within 10% of the best throughput at the most clients


def serving(model_dir: Path, manifest: Manifest, feeds: dict[str, np.ndarray],
            seconds: float = SERVING_SECONDS, rounds: int = SERVING_ROUNDS) -> dict:
    """Throughput (inferences/s) of the variant served the way a device serves it (``agent.serving.Runner``
    over a session loaded with the set-up's settings), at 1, 2 and 4 client threads, for each (concurrency,
    max_batch) of SERVING (batching only where the model's batch axis is dynamic); the best of ``rounds``
    interleaved rounds (load from others only ever lowers a figure); and the set-up to recommend: the first in
    SERVING order within NEAR_BEST of the best throughput at the most clients."""
    from agent import serving as agent_serving

    loaded = []  # (concurrency, max_batch, session, runner)
    try:
        for concurrency, max_batch in SERVING:
            settings = {**manifest.settings, "concurrency": concurrency, "max_batch": max_batch}
            m = msgspec.structs.replace(manifest, settings=settings)
            if max_batch > 1 and not agent_serving.batchable(m):
                continue
            session = runtimes.load(model_dir, m)
            loaded.append((concurrency, max_batch, session, agent_serving.Runner(session, m)))
        figures = [{c: 0.0 for c in CLIENTS} for _ in loaded]
        for _ in range(rounds):
            for (_, _, _, runner), best in zip(loaded, figures):
                for c in CLIENTS:
                    best[c] = max(best[c], agent_serving.throughput(runner.run, feeds, c, seconds, warmup=1))
    finally:
        for _, _, session, runner in loaded:
            runner.close()
            session.close()
    setups = [{"concurrency": conc, "max_batch": batch,
               "inferences_per_s": {str(c): round(f[c], 1) for c in CLIENTS}}
              for (conc, batch, _, _), f in zip(loaded, figures)]
    most = str(CLIENTS[-1])
    best = max(s["inferences_per_s"][most] for s in setups)
    pick = next(s for s in setups if s["inferences_per_s"][most] >= NEAR_BEST * best)
    return {"clients": list(CLIENTS), "seconds_each": seconds, "rounds": rounds, "setups": setups,
            "recommended": {"concurrency": pick["concurrency"], "max_batch": pick["max_batch"]},
            "rule": f"the first set-up within {1 - NEAR_BEST:.0%} of the best throughput at {most} clients"}
