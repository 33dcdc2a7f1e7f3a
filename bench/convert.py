"""Benchmark: the converter on real models, every target this machine has the toolchain for.

    .venv/bin/python bench/convert.py [--models resnet18,ocr-cls,ocr-det] [--out DIR] [--samples N]

For each model it runs ``convert(..., target="all")`` and prints one table: variant x size x p50
latency x speedup x agreement with fp32 (top-1/top-5 and KL for classifiers, SQNR for dense outputs, and the
metric the gate judges). Speedups are ratios against ONNX Runtime fp32 on the same model measured in the
same run (batch 1, 1 thread), so they hold on a shared, noisy machine where absolute times do not. Writes
DIR/convert.md and DIR/convert.json as well.
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


MODELS = {"resnet18": resnet18, "ocr-cls": ocr_cls, "ocr-det": ocr_det}


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--samples", type=int, default=120, help="calibration + held-out samples per model")
    parser.add_argument("--target", default="all")
    args = parser.parse_args()
    from converter.convert import convert

    args.out.mkdir(parents=True, exist_ok=True)
    rows, results = [], {}
    for name in args.models.split(","):
        work = args.out / name
        work.mkdir(parents=True, exist_ok=True)
        model, arrays, shapes, what = MODELS[name](work, args.samples)
        np.savez(work / "calib.npz", **arrays)
        t0 = time.monotonic()
        report = convert(model, target=args.target, calib=work / "calib.npz", out=work / "bundles", name=name,
                         input_shapes=shapes, progress=lambda line: print(f"  {name}: {line}", file=sys.stderr))
        results[name] = report
        ref = report["reference_latency_ms"]["p50"]
        rows.append(f"| {name} | source | ORT fp32 | {report['source']['size_bytes'] / 1e6:.2f} MB | {ref:.2f} | "
                    f"1.00x | | | | | reference |")
        for v in report["variants"] + report["refused"]:
            rows.append(f"| {name} | {v['target']} | {v['variant']} ({v['runtime']}) | {v['size_bytes'] / 1e6:.2f} MB "
                        f"| {v['latency_ms']['p50']:.2f} | {v['speedup_vs_fp32']:.2f}x | {metrics(v)} |")
        for s in report["skipped"]:
            rows.append(f"| {name} | {s['target']} | skipped: {s['reason']} | | | | | | | | |")
        print(f"  {name}: {what}, converted in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    host = next(iter(results.values()))["host"]
    lines = [f"Host: {host['cpu']}, {host['cpus']} CPUs, ISA {', '.join(host['flags'])}. Batch 1, 1 thread; speedup "
             f"= ORT fp32 p50 / variant p50, both measured in this run; accuracy on {args.samples // 5} held-out "
             f"samples against the fp32 reference.", "",
             "| model | target | variant | size | p50 ms | speedup | top-1 | top-5 | KL | SQNR dB | agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|", *rows]
    text = "\n".join(lines)
    print(text)
    (args.out / "convert.md").write_text(text + "\n")
    (args.out / "convert.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
