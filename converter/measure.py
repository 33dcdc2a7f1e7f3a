"""Measurements of a variant in its own runtime: host latency and agreement with the fp32 reference.

A variant is loaded the way a device loads it: ``agent.runtimes.load(model_dir, manifest)`` on a
directory laid out like an unpacked bundle. What measures never writes bundles or prints.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

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


def agreement(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict:
    """Per output: cosine similarity per sample (min, mean), max abs error, and top-1 agreement for
    classifier outputs ([N, C], C > 1). The summary takes the worst over outputs."""
    per = {}
    for name, ref in reference.items():
        if name not in got:
            raise ValueError(f"output {name!r} is missing from the variant")
        r = ref.reshape(len(ref), -1).astype(np.float64)
        g = np.asarray(got[name]).reshape(len(ref), -1).astype(np.float64)
        cos = _cosine(r, g)
        entry = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                 "max_abs_err": float(np.abs(r - g).max()) if r.size else 0.0}
        if ref.ndim == 2 and ref.shape[1] > 1:
            entry["top1"] = float((ref.argmax(1) == np.asarray(got[name]).argmax(1)).mean())
        per[name] = entry
    top1 = [e["top1"] for e in per.values() if "top1" in e]
    return {
        "samples": len(next(iter(reference.values()))),
        "top1": min(top1) if top1 else None,
        "min_cosine": min(e["min_cosine"] for e in per.values()),
        "max_abs_err": max(e["max_abs_err"] for e in per.values()),
        "outputs": per,
    }


def _cosine(r: np.ndarray, g: np.ndarray) -> np.ndarray:
    nr, ng = np.linalg.norm(r, axis=1), np.linalg.norm(g, axis=1)
    dot = (r * g).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (nr * ng)
    cos = np.where((nr == 0) & (ng == 0), 1.0, cos)
    return np.nan_to_num(np.clip(cos, -1.0, 1.0), nan=0.0)


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
