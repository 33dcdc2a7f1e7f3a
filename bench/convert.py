"""Benchmark: the converter on real models, every target this machine has the toolchain for.

    .venv/bin/python bench/convert.py [--models resnet18,mobilenetv2,ocr-cls,ocr-det] [--out DIR] [--samples N]

For each model it runs ``convert(..., target="all")`` and prints one table: variant x size x p50
latency x speedup x agreement with fp32 (top-1/top-5 and KL for classifiers, SQNR for dense outputs, and the
metric the gate judges). Speedups are ratios against ONNX Runtime fp32 on the same model measured in the
same run (batch 1, 1 thread), so they hold on a shared, noisy machine where absolute times do not. Writes
DIR/convert.md and DIR/convert.json as well.

The trained MobileNetV2 is converted four ways (MOBILENET_RUNS: plain, gated with the recipe search, pruned 30 %,
pruned 30 % + distilled) and gets a second table (``side_by_side``): every variant's bundle unpacked and loaded as a
device does, the fp32 source in ONNX Runtime and NNCF's own defaults on the fp32 OpenVINO IR (``nncf_defaults``),
timed in interleaved rounds, with top-1 / top-5 agreement and KL vs fp32 on the 40 held-out crops, and the issue's
goals for pruning and distillation as ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def resnet18(work: Path, n: int):
    import resnet

    x = resnet.photos(n + 64, seed=1)
    model = resnet.build(work / "resnet18.onnx", x[n:])  # the head is standardised on photos not used below
    return model, {"input": x[:n]}, {"input": [1, 3, 224, 224]}, "ResNet-18 (architecture; random weights, seeded)"


def ocr_cls(work: Path, n: int):
    from edgefleet.data import text_direction
    from edgefleet.models import model_path

    x, _ = text_direction(n)
    return model_path("ocr-cls"), {"x": x}, {"x": [1, 3, 48, 192]}, "PP-OCR text-direction classifier (real)"


def ocr_det(work: Path, n: int):
    import skimage.data
    from skimage.transform import resize

    from edgefleet.models import model_path

    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
    page, text = skimage.data.page(), skimage.data.text()
    rng = np.random.default_rng(0)
    x = np.empty((n, 3, 320, 320), np.float32)
    for i in range(n):
        img = (page, text)[i % 2]
        h, w = img.shape
        side = int(rng.uniform(0.5, 1.0) * min(h, w))
        y0, x0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = resize(img[y0 : y0 + side, x0 : x0 + side], (320, 320), anti_aliasing=True).astype(np.float32)
        x[i] = (np.repeat(crop[None], 3, 0) - mean) / std
    return model_path("ocr-det"), {"x": x}, {"x": [1, 3, 320, 320]}, "PP-OCRv4 text detector (real), 320x320"


def mobilenetv2(work: Path, n: int):
    from edgefleet.data import photo_crops
    from edgefleet.models import model_path

    x = photo_crops(MOBILENET_CROPS, seed=0)  # always 200 (160 calibrate, 40 held out), whatever --samples says
    return model_path("mobilenetv2"), {"input": x}, {"input": [1, 3, 224, 224]}, \
        f"MobileNetV2 (trained, ImageNet), {MOBILENET_CROPS} crops of scikit-image's photos"


MODELS = {"resnet18": resnet18, "mobilenetv2": mobilenetv2, "ocr-cls": ocr_cls, "ocr-det": ocr_det}
MOBILENET_CROPS = 200


def metrics(v: dict) -> str:
    """top-1 | top-5 | KL | SQNR dB | agreement cells: the classifier columns for a classifier output, SQNR for a
    dense one, then the gated metric and the max abs error (of the gated output: converter/gate.py)."""
    from converter.report import gated_by

    a = v["agreement"]
    e = a["outputs"][a["output"]]
    cells = ([f"{e['top1']:.1%}", f"{e['top5']:.1%}", "–" if e["kl"] is None else f"{e['kl']:.2e}", "–"]
             if e["kind"] == "classifier" else ["–", "–", "–", f"{e['sqnr_db']:.1f}"])
    err = "–" if e["max_abs_err"] is None else f"{e['max_abs_err']:.3g}"
    return " | ".join([*cells, f"{gated_by(v)}, max abs err {err}"])


# The trained MobileNetV2 is converted four ways (--mobilenet-runs picks which): plain (no gate, no search); gated at
# 1 % of top-5 agreement
# with the recipe search on (top-1 is no gate on these crops: 14 of the 40 held-out ones have fp32's top two
# classes within 0.1 of probability, so a top-1 flip there is a coin toss); pruned 30 %; pruned 30 % and distilled
# on 600 other crops of the same photos (lr 3e-4, at most 15 epochs). The pruned runs are not gated: they show
# what pruning costs.
MOBILENET_RUNS = {
    "plain": {},  # no gate, no search: each target's own recipe, every int8 emitted (the baseline for pruning)
    "gated": {"gate_metric": "top5", "max_accuracy_drop": "1%", "search": "on"},
    "pruned": {"prune": "30%"},
    "distilled": {"prune": "30%", "distill": True, "train_data": "train.npz", "distill_lr": 3e-4,
                  "distill_epochs": 15},
}
TRAIN_CROPS = 600


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--samples", type=int, default=120, help="calibration + held-out samples per model")
    parser.add_argument("--target", default="all")
    parser.add_argument("--mobilenet-runs", default=",".join(MOBILENET_RUNS),
                        help=f"which conversions of the MobileNetV2 to run: {', '.join(MOBILENET_RUNS)}")
    args = parser.parse_args()
    from converter.convert import convert

    args.out.mkdir(parents=True, exist_ok=True)
    rows, results, side = [], {}, {}
    for name in args.models.split(","):
        work = args.out / name
        work.mkdir(parents=True, exist_ok=True)
        model, arrays, shapes, what = MODELS[name](work, args.samples)
        np.savez(work / "calib.npz", **arrays)
        runs = {"": {}}
        if name == "mobilenetv2":
            runs = {run: MOBILENET_RUNS[run] for run in args.mobilenet_runs.split(",")}
            if "distilled" in runs:
                from edgefleet.data import photo_crops

                np.savez(work / "train.npz", input=photo_crops(TRAIN_CROPS, seed=1))
        reports = {}
        for run, options in runs.items():
            label = f"{name}{'/' + run if run else ''}"
            options = {k: (str(work / v) if k == "train_data" else v) for k, v in options.items()}
            t0 = time.monotonic()
            report = convert(model, target=args.target, calib=work / "calib.npz", out=work / (run or "bundles"),
                             name=name, input_shapes=shapes, **options,
                             progress=lambda line, label=label: print(f"  {label}: {line}", file=sys.stderr))
            reports[run] = report
            results[label] = report
            ref = report["reference_latency_ms"]["p50"]
            rows.append(f"| {label} | source | ORT fp32 | {report['source']['size_bytes'] / 1e6:.2f} MB | {ref:.2f} | "
                        f"1.00x | | | | | reference |")
            for v in report["variants"] + report["refused"]:
                rows.append(f"| {label} | {v['target']} | {v['variant']} ({v['runtime']}) | "
                            f"{v['size_bytes'] / 1e6:.2f} MB | {v['latency_ms']['p50']:.2f} | "
                            f"{v['speedup_vs_fp32']:.2f}x | {metrics(v)} |")
            for s in report["skipped"]:
                rows.append(f"| {label} | {s['target']} | skipped: {s['reason']} | | | | | | | | |")
            print(f"  {label}: {what}, converted in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        if name == "mobilenetv2":
            side[name] = side_by_side(model, arrays, reports, work)
    host = next(iter(results.values()))["host"]
    lines = [f"Host: {host['cpu']}, {host['cpus']} CPUs, ISA {', '.join(host['flags'])}. Batch 1, 1 thread; speedup "
             f"= ORT fp32 p50 / variant p50, both measured in this run; accuracy on the held-out samples (the last "
             f"20 %) against the fp32 reference.", "",
             "| model | target | variant | size | p50 ms | speedup | top-1 | top-5 | KL | SQNR dB | agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|", *rows]
    for report in results.values():
        from converter.report import search_lines

        lines += [f"- {line}" for line in search_lines(report)]
    for name, table in side.items():
        lines += ["", side_by_side_markdown(name, table)]
    text = "\n".join(lines)
    print(text)
    (args.out / "convert.md").write_text(text + "\n")
    (args.out / "convert.json").write_text(json.dumps({**results, "side_by_side": side}, indent=2))
    return 0


# ---- the trained MobileNetV2: every variant and NNCF's defaults side by side ---------------------------------

ROUNDS = 7  # interleaved latency rounds per session
NNCF_SUBSET = 160


def classifier_agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    """Against the fp32 logits ``ref`` [N, C]: top-1 agreement, top-5 agreement (fp32's top-1 class among the
    variant's 5 highest) and mean KL(fp32 || variant) of the softmaxes, in nats."""
    ref, got = ref.astype(np.float64), np.asarray(got, np.float64).reshape(ref.shape)
    top1 = ref.argmax(1)
    top5 = np.argsort(-got, 1)[:, :5]

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lr, lg = log_softmax(ref), log_softmax(got)
    return {"top1": float((top1 == got.argmax(1)).mean()), "top5": float((top5 == top1[:, None]).any(1).mean()),
            "kl": float((np.exp(lr) * (lr - lg)).sum(1).mean())}


def nncf_defaults(model: Path, calib: dict[str, np.ndarray], out: Path) -> dict:
    """What a user of NNCF writes: ``nncf.quantize(ov_model, nncf.Dataset(feeds), subset_size=160)`` on the fp32
    OpenVINO IR of ``model``, every other option at its default. Saved as ``out/model.xml`` (weights as
    quantized, no fp16 compression, like the converter's ov-int8); returns what ran."""
    import contextlib
    import io
    import logging

    import nncf
    import openvino as ov

    feeds = [{k: v[i : i + 1] for k, v in calib.items()} for i in range(len(next(iter(calib.values()))))]
    nncf.set_log_level(logging.ERROR)
    t0 = time.monotonic()
    with contextlib.redirect_stdout(io.StringIO()):
        quantized = nncf.quantize(ov.convert_model(str(model)), nncf.Dataset(feeds), subset_size=NNCF_SUBSET)
    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out / "model.xml"), compress_to_fp16=False)
    return {"call": f"nncf.quantize(ov.convert_model(model), nncf.Dataset(feeds), subset_size={NNCF_SUBSET})",
            "calibration_samples": len(feeds), "nncf": nncf.__version__, "openvino": ov.get_version().split("-")[0],
            "seconds": round(time.monotonic() - t0, 1)}


def side_by_side(model: Path, arrays: dict[str, np.ndarray], reports: dict[str, dict], work: Path) -> dict:
    """Every emitted variant of every run (its bundle unpacked and loaded as a device does), the fp32 source in ONNX
    Runtime and NNCF's defaults compiled like the converter's ov-int8 (1 thread, f32, latency hint), run on the
    same held-out crops and timed in ``ROUNDS`` interleaved rounds (median of each session's p50s), so that a
    neighbour's load on this shared machine falls on all of them alike."""
    from agent import runtimes
    from agent.bundle import safe_unpack
    from converter import measure

    first = next(iter(reports.values()))
    n = len(next(iter(arrays.values())))
    held_n = first["calibration"]["held_out_samples"]
    calib = {k: v[: n - held_n] for k, v in arrays.items()}
    held = {k: v[n - held_n :] for k, v in arrays.items()}
    one = {k: v[:1] for k, v in held.items()}
    baseline = nncf_defaults(model, calib, work / "nncf-defaults")
    ov_int8 = next((v for r in reports.values() for v in r["variants"] if v["variant"] == "ov-int8"), None)
    ref_key = ("", "source", "ORT fp32")
    sessions = {ref_key: measure.open_session(model.parent, model.name)}
    sizes = {ref_key: first["source"]["size_bytes"]}
    for run, report in reports.items():
        for v in report["variants"]:
            dest = work / "unpacked" / run / v["bundle"].removesuffix(".tar")
            dest.parent.mkdir(parents=True, exist_ok=True)
            manifest = safe_unpack(Path(v["path"]), dest)
            key = (run, v["target"], v["variant"])
            sessions[key] = runtimes.load(dest, manifest)
            sizes[key] = v["size_bytes"]
    settings = {**measure.SETTINGS, **(ov_int8["latency_ms"]["settings"] if ov_int8 else
                                       {"inference_precision": "f32"})}
    nncf_key = ("", "intel", "NNCF defaults")
    sessions[nncf_key] = measure.open_session(work / "nncf-defaults", "model.xml", "openvino", settings)
    sizes[nncf_key] = sum(f.stat().st_size for f in (work / "nncf-defaults").iterdir())
    try:
        outputs = {key: next(iter(measure.run_batched(s, held, 1).values())) for key, s in sessions.items()}
        p50s: dict[tuple, list[float]] = {key: [] for key in sessions}
        for _ in range(ROUNDS):
            for key, s in sessions.items():
                p50s[key].append(measure.latency(s, one, runs=100, seconds=3.0)["p50"])
    finally:
        for s in sessions.values():
            s.close()
    ref_ms = float(np.median(p50s[ref_key]))
    rows = []
    for key in sessions:
        ms = float(np.median(p50s[key]))
        rows.append({"run": key[0], "target": key[1], "variant": key[2], "size_bytes": sizes[key],
                     "p50_ms": round(ms, 3), "p50_ms_rounds": p50s[key], "speedup_vs_fp32": round(ref_ms / ms, 3),
                     **classifier_agreement(outputs[ref_key], outputs[key])})
    return {"rows": rows, "held_out": held_n, "rounds": ROUNDS, "nncf_defaults": baseline, "settings": settings,
            "goals": goals(rows)}


def goals(rows: list[dict]) -> dict:
    """The issue's goals for pruning and distillation, per target: the pruned+distilled int8 against the unpruned
    int8 of the plain run (speed) and the top-1 agreement pruning lost before and after distillation (fp32-class
    variants)."""
    def row(run, target, variant):
        return next((r for r in rows if r["run"] == run and r["target"] == target and r["variant"] == variant), None)

    out = {}
    for target, int8, fp32 in (("cpu", "int8", "fp32"), ("intel", "ov-int8", "ov-fp16"),
                               ("arm", "tflite-int8", "tflite-fp32")):
        base, dist = row("plain", target, int8), row("distilled", target, int8)
        pruned, distilled = row("pruned", target, fp32), row("distilled", target, fp32)
        if base and dist:
            out[f"{target} pruned+distilled {int8} vs {int8}"] = round(base["p50_ms"] / dist["p50_ms"], 3)
        if pruned and distilled:
            out[f"{target} {fp32} top-1 lost to pruning"] = round(1 - pruned["top1"], 3)
            out[f"{target} {fp32} top-1 lost after distillation"] = round(1 - distilled["top1"], 3)
    return out


def side_by_side_markdown(name: str, table: dict) -> str:
    lines = [f"{name}: every variant, the fp32 source and NNCF's defaults ({table['nncf_defaults']['call']}, "
             f"compiled with {table['settings']}) in {table['rounds']} interleaved latency rounds; agreement with "
             f"fp32 on {table['held_out']} held-out crops.", "",
             "| run | target | variant | size | p50 ms | speed-up vs ORT fp32 | top-1 | top-5 | KL (nats) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['run']} | {r['target']} | {r['variant']} | {r['size_bytes'] / 1e6:.2f} MB | "
                     f"{r['p50_ms']:.2f} | {r['speedup_vs_fp32']:.2f}x | {r['top1']:.1%} | {r['top5']:.1%} | "
                     f"{r['kl']:.4f} |")
    lines += ["", *(f"- {k}: {v}" for k, v in table["goals"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
