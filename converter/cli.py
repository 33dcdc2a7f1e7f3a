"""`edgefleet convert`: a thin wrapper over ``converter.convert.convert``."""

from __future__ import annotations

import argparse
import json
import sys

from converter import ConvertError

DESCRIPTION = """\
Quantize and compile an ONNX model for a target and write one validated bundle per variant.

For --target cpu (ONNX Runtime) two variants are built:
  fp32  the ONNX Runtime graph optimizations saved offline (extended level; portable across CPUs)
  int8  static QDQ quantization, per-channel int8 weights, calibrated on DATA.npz

Each variant is measured in its own runtime through the same loader a device uses: host latency
(batch 1, 1 thread) and agreement with the original model on held-out samples (top-1 for
classifiers, cosine similarity and max abs error for every output). Bundles are written as
DIR/NAME-VERSION-TARGET-PRECISION.tar with DIR/report.json, only when every step succeeded."""

EPILOG = """\
calibration data:
  DATA.npz holds one array per model input, keyed by input name, samples along the first axis
  (np.savez("calib.npz", x=batch)). The last 20 % of the samples (at least one) are held out for
  evaluation; the rest calibrate the int8 variant. At least 2 samples are needed.

example:
  edgefleet convert cls.onnx --target cpu --calib calib.npz --out dist/ --name ocr-cls --version 3"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through the CLI root, like every other bad input
        raise ConvertError(f"{message} (see edgefleet convert --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgefleet convert", description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL.onnx", help="the trained model (ONNX, fp32)")
    p.add_argument("--target", default="cpu", metavar="TARGET",
                   help="cpu: ONNX Runtime on any CPU (intel and arm are planned) [default: cpu]")
    p.add_argument("--calib", required=True, metavar="DATA.npz",
                   help="calibration and evaluation samples: one array per model input (see below)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the bundles and report.json")
    p.add_argument("--name", help="bundle name [default: the model file's stem]")
    p.add_argument("--version", default="1", help="bundle version [default: 1]")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x48x192",
                   help="fix an input's dynamic dims (the first, batch, stays dynamic); repeat per input "
                        "[default: the calibration data's shape]")
    p.add_argument("--calib-method", choices=["minmax", "entropy", "percentile"], default="minmax",
                   help="how int8 activation ranges are calibrated [default: minmax]")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    return p


def parse_input_shapes(items: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition("=")
        try:
            shape = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            shape = None
        if not sep or not name or not shape:
            raise ConvertError(f"--input-shape {item!r} is not NAME=DxDx...D (e.g. x=1x3x48x192)")
        if name in shapes:
            raise ConvertError(f"--input-shape names {name!r} twice")
        shapes[name] = shape
    return shapes


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from converter.convert import convert

    report = convert(
        args.model, target=args.target, calib=args.calib, out=args.out, name=args.name, version=args.version,
        input_shapes=parse_input_shapes(args.input_shape), calib_method=args.calib_method,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(table(report))
    return 0


def table(report: dict) -> str:
    ref = report["reference_latency_ms"]
    rows = [("variant", "runtime", "precision", "size", "p50 ms", "p95 ms", "speedup", "top-1", "min cos",
             "max abs err")]
    rows.append(("source", "onnxruntime", "fp32", _size(report["source"]["size_bytes"]), f"{ref['p50']:.2f}",
                 f"{ref['p95']:.2f}", "1.00x", "ref", "ref", "ref"))
    for v in report["variants"]:
        a, lat = v["agreement"], v["latency_ms"]
        rows.append((v["variant"], v["runtime"], v["precision"], _size(v["size_bytes"]), f"{lat['p50']:.2f}",
                     f"{lat['p95']:.2f}", f"{v['speedup_vs_fp32']:.2f}x" if v["speedup_vs_fp32"] else "-",
                     "-" if a["top1"] is None else f"{a['top1']:.1%}", f"{a['min_cosine']:.5f}",
                     f"{a['max_abs_err']:.3g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n = report["calibration"]["held_out_samples"]
    host = report["host"]
    isa = ", ".join(f for f in host["flags"] if "vnni" in f or "amx" in f or f in ("avx2", "asimddp", "i8mm"))
    batch = report["variants"][0]["latency_ms"]["batch"] if report["variants"] else 1
    lines.append("")
    lines.append(f"latency: batch {batch}, 1 thread, on {host['cpu']} ({isa or host['machine']}); "
                 f"agreement with the source model on {n} held-out samples")
    for v in report["variants"]:
        lines.append(f"wrote {v['path']}  ({_size(v['bundle_bytes'])}, sha256 {v['bundle_sha256'][:16]}…)")
    lines.append(f"wrote {report['out']}/report.json")
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"
