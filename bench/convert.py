"""Benchmark: the converter on real models, every target this machine has the toolchain for.

    .venv/bin/python bench/convert.py [--models resnet18,mobilenetv2,ocr-cls,ocr-det] [--out DIR] [--samples N]

For each model it runs ``convert(..., target="all")`` and prints one table: variant x size x p50
latency x speedup x agreement with fp32 (top-1/top-5 and KL for classifiers, SQNR for dense outputs, and the
metric the gate judges). Speedups are ratios against ONNX Runtime fp32 on the same model measured in the
same run (batch 1, 1 thread), so they hold on a shared, noisy machine where absolute times do not. Writes
DIR/convert.md and DIR/convert.json as well.

The trained MobileNetV2 gets a second table (``side_by_side``): every variant's bundle unpacked and loaded as a
device does, the fp32 source in ONNX Runtime and NNCF's own defaults on the fp32 OpenVINO IR (``nncf_defaults``),
timed in interleaved rounds, with top-1 / top-5 agreement and KL vs fp32 on the 40 held-out crops.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--samples", type=int, default=120, help="calibration + held-out samples per model")
    parser.add_argument("--target", default="all")
    args = parser.parse_args()
    from converter.convert import convert

    args.out.mkdir(parents=True, exist_ok=True)
    rows, results, side = [], {}, {}
    for name in args.models.split(","):
        work = args.out / name
        work.mkdir(parents=True, exist_ok=True)
        model, arrays, shapes, what = MODELS[name](work, args.samples)
        np.savez(work / "calib.npz", **arrays)
        t0 = time.monotonic()
        report = convert(model, target=args.target, calib=work / "calib.npz", out=work / "bundles", name=name,
                         input_shapes=shapes, progress=lambda line: print(f"  {name}: {line}", file=sys.stderr))
        results[name] = report
        if name == "mobilenetv2":
            side[name] = side_by_side(model, arrays, report, work)
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


def side_by_side(model: Path, arrays: dict[str, np.ndarray], report: dict, work: Path) -> dict:
    """Every emitted variant (its bundle unpacked and loaded as a device does), the fp32 source in ONNX Runtime
    and NNCF's defaults compiled like the converter's ov-int8 (1 thread, f32, latency hint), run on the same
    held-out crops and timed in ``ROUNDS`` interleaved rounds (median of each session's p50s), so that a
    neighbour's load on this shared machine falls on all of them alike."""
    from agent import runtimes
    from agent.bundle import safe_unpack
    from converter import measure

    n = len(next(iter(arrays.values())))
    held_n = report["calibration"]["held_out_samples"]
    calib = {k: v[: n - held_n] for k, v in arrays.items()}
    held = {k: v[n - held_n :] for k, v in arrays.items()}
    one = {k: v[:1] for k, v in held.items()}
    baseline = nncf_defaults(model, calib, work / "nncf-defaults")
    ov_int8 = next((v for v in report["variants"] if v["variant"] == "ov-int8"), None)
    sessions = {("source", "ORT fp32"): measure.open_session(model.parent, model.name)}
    for v in report["variants"]:
        dest = work / "unpacked" / v["bundle"].removesuffix(".tar")
        dest.parent.mkdir(parents=True, exist_ok=True)
        manifest = safe_unpack(Path(v["path"]), dest)
        sessions[(v["target"], v["variant"])] = runtimes.load(dest, manifest)
    settings = {**measure.SETTINGS, **(ov_int8["latency_ms"]["settings"] if ov_int8 else
                                       {"inference_precision": "f32"})}
    sessions[("intel", "NNCF defaults")] = measure.open_session(work / "nncf-defaults", "model.xml", "openvino",
                                                                settings)
    try:
        outputs = {key: next(iter(measure.run_batched(s, held, 1).values())) for key, s in sessions.items()}
        p50s: dict[tuple, list[float]] = {key: [] for key in sessions}
        for _ in range(ROUNDS):
            for key, s in sessions.items():
                p50s[key].append(measure.latency(s, one, runs=100, seconds=3.0)["p50"])
    finally:
        for s in sessions.values():
            s.close()
    ref_key = ("source", "ORT fp32")
    ref_ms = float(np.median(p50s[ref_key]))
    sizes = {(v["target"], v["variant"]): v["size_bytes"] for v in report["variants"]}
    sizes[ref_key] = report["source"]["size_bytes"]
    sizes[("intel", "NNCF defaults")] = sum(f.stat().st_size for f in (work / "nncf-defaults").iterdir())
    rows = []
    for key in sessions:
        ms = float(np.median(p50s[key]))
        rows.append({"target": key[0], "variant": key[1], "size_bytes": sizes[key], "p50_ms": round(ms, 3),
                     "p50_ms_rounds": p50s[key], "speedup_vs_fp32": round(ref_ms / ms, 3),
                     **classifier_agreement(outputs[ref_key], outputs[key])})
    return {"rows": rows, "held_out": held_n, "rounds": ROUNDS, "nncf_defaults": baseline, "settings": settings}


def side_by_side_markdown(name: str, table: dict) -> str:
    lines = [f"{name}: every variant, the fp32 source and NNCF's defaults ({table['nncf_defaults']['call']}, "
             f"compiled with {table['settings']}) in {table['rounds']} interleaved latency rounds; agreement with "
             f"fp32 on {table['held_out']} held-out crops.", "",
             "| target | variant | size | p50 ms | speed-up vs ORT fp32 | top-1 | top-5 | KL (nats) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['target']} | {r['variant']} | {r['size_bytes'] / 1e6:.2f} MB | {r['p50_ms']:.2f} | "
                     f"{r['speedup_vs_fp32']:.2f}x | {r['top1']:.1%} | {r['top5']:.1%} | {r['kl']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
