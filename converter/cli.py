"""`edgefleet convert`: a thin wrapper over ``converter.convert.convert``."""

from __future__ import annotations

import argparse
import json
import sys

from converter import ConvertError

DESCRIPTION = """\
Quantize and compile an ONNX model for a target and write one validated bundle per variant.

targets and their variants:
  cpu    ONNX Runtime: fp32 (graph-optimized), int8 (static QDQ, per-channel), int8-dynamic;
         fallbacks int8-mixed (the layers whose int8 costs the output most, measured, kept in float)
         and fp16
  intel  OpenVINO IR: ov-fp16 (fp16-compressed weights), ov-int8 (NNCF post-training quantization);
         fallback ov-int8-mixed (NNCF accuracy-controlled quantization)      [pip install 'edgefleet[intel]']
  arm    TFLite via onnx2tf (its own venv): tflite-fp32, tflite-fp16, tflite-int8 (full integer,
         calibrated on --calib); and ort-int8-arm (ONNX Runtime int8 for ARM64)  [pip install 'edgefleet[arm]']
         Judged on ARM kernels: on an aarch64 host natively, on x86 in an emulated aarch64 (cortex-a76,
         made once by `edgefleet toolchain arm64`); latency is the host's. Else the host's kernels judge,
         and the report says ARM numerics were not checked (--require-arm-check: an error).
  all    every target whose toolchain is installed; says which it skipped and why

With a gate (or --search on), each int8 variant is made by several recipes (the library's own defaults
always among them: ORT's quantize_static defaults, NNCF's defaults), each measured and gated, and the
fastest that passes is kept; the report shows them all. Every variant's recipe lists the passes that
made it (converter/passes/), with their configs and toolchain versions, in its manifest and the report.
--prune 30% prunes channels first; --distill then fine-tunes the pruned model against the original.

A MODEL.tflite is measured, gated and bundled AS GIVEN, for --target arm only: one variant, `tflite`
(its precision told from its tensors), fed as it declares its inputs (NHWC for images; --calib must
match them). Its reference is the model itself on the host (judged on ARM kernels: whether ARM computes the
same; the report says so) unless --reference REF.onnx|REF.tflite names an fp32 model to judge it against.

Each variant runs in its own runtime, through the same loader a device uses, on held-out samples and
is compared with the one fp32 reference (ONNX Runtime on the original model). Classifier outputs
([N, C], C >= 2): top-1 and top-5 agreement, mean KL(fp32 || variant), top-1 agreement where fp32 is
confident (p >= 0.9); every output: SQNR in dB, relative L2 and max abs error over all elements; task
accuracy with --labels.

The gate judges the first output (or --gate-output) in one metric, its threshold in that metric:
  --gate top1|top5|accuracy   at most --max-accuracy-drop below fp32 (100 % agreement, or its accuracy)
  --gate kl                   mean KL at most --max-kl
  --gate sqnr                 SQNR at least --min-sqnr dB (default 30 dB)
By default a classifier is gated on top1 (accuracy with --labels), a dense output on sqnr. The gate is
on when any of these flags is given. A variant that fails it is refused (not written), its worst outputs
named, and the next rung of the fallback chain int8 -> int8-mixed -> fp16 -> fp32 is tried; the
manifest records which rung passed and why the others did not. Bundles are written as
DIR/NAME-VERSION-TARGET-VARIANT.tar with DIR/report.json and DIR/report.html (a latency-vs-accuracy
plot), only when every step succeeded."""

EPILOG = """\
calibration data (--calib; the format is told from the path and the entry names):
  stacked    DATA.npz, one array per model input, keyed by input name, samples along the first axis
             (np.savez("calib.npz", x=batch)); every input needs that axis.
  directory  DIR/ of .npz files (taken in name order), each one complete feed exactly as the model
             takes it: state inputs, scalars, the batch on any axis
             (np.savez("calib/0000.npz", input=chunk, state=state, sr=np.array(16000))).
  indexed    DATA.npz whose entries are named INPUT/INDEX, each index one complete feed
             (np.savez("calib.npz", **{"input/0": chunk, "state/0": state, "sr/0": np.array(16000), ...})).
  The last 20 % of the samples or feeds (at least one) are held out for evaluation; the rest
  calibrate the int8 variants. At least 10 are needed. Each feed must match the model's inputs
  (names, dtypes, ranks, fixed dims). A dim the model leaves dynamic is taken from the data when every
  feed gives it the same size (the first, batch, axis of stacked data stays dynamic); --input-shape is
  needed only where the data does not fix it. An output whose real shape (from the fp32 reference
  run) disagrees with the shape the model declares is reported as a warning and corrected in the
  manifests.

example:
  edgefleet convert cls.onnx --target all --calib calib.npz --labels labels.npy \\
      --input-shape x=1x3x48x192 --max-accuracy-drop 1% --out dist/ --name ocr-cls --version 3"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through the CLI root, like every other bad input
        raise ConvertError(f"{message} (see edgefleet convert --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgefleet convert", description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL.onnx|MODEL.tflite",
                   help="the trained model: ONNX (fp32), or a TFLite model to bundle as given (--target arm)")
    p.add_argument("--target", default="cpu", metavar="TARGET",
                   help="cpu, intel, arm or all (see above) [default: cpu]")
    p.add_argument("--calib", required=True, metavar="DATA.npz|DIR",
                   help="calibration and evaluation samples: stacked arrays, a directory of feeds or INPUT/INDEX "
                        "entries (see below)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the bundles and report.json")
    p.add_argument("--name", help="bundle name [default: the model file's stem]")
    p.add_argument("--version", default="1", help="bundle version [default: 1]")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x48x192",
                   help="fix an input's dynamic dims (the first, batch, stays dynamic); repeat per input; "
                        "needed only where the model and the calibration data leave dims other than batch dynamic")
    p.add_argument("--calib-method", choices=["auto", "minmax", "entropy", "percentile"], default="auto",
                   help="how int8 activation ranges are calibrated; auto: each quantizer's own default (ONNX "
                        "Runtime: minmax; NNCF: its preset and range estimators) [default: auto]")
    p.add_argument("--labels", metavar="LABELS.npy",
                   help="integer class labels, one per calibration sample: gate on task accuracy")
    p.add_argument("--max-accuracy-drop", metavar="X",
                   help="refuse variants whose accuracy drops more than X (e.g. 1%% or 0.01) below the fp32 "
                        "reference (top1, top5, accuracy gates) and fall back down the chain")
    p.add_argument("--gate", choices=["top1", "top5", "kl", "sqnr", "accuracy"], metavar="METRIC",
                   help="the metric the gate judges: top1, top5, kl, sqnr or accuracy [default: top1 for a "
                        "classifier output (accuracy with --labels), sqnr for a dense one]")
    p.add_argument("--gate-output", metavar="NAME", help="the output the gate judges [default: the first]")
    p.add_argument("--min-sqnr", type=float, metavar="DB",
                   help="the sqnr gate's minimum, in dB [default: 30 when gating on sqnr]")
    p.add_argument("--max-kl", type=float, metavar="X", help="the kl gate's maximum mean KL(fp32 || variant)")
    p.add_argument("--output-kind", action="append", default=[], metavar="NAME=KIND",
                   help="judge output NAME as a classifier or dense (an [N, C] output is taken for a classifier); "
                        "repeat per output")
    p.add_argument("--sign-key", metavar="KEY", help="sign every bundle with this release key (NAME.key from "
                   "`edgefleet keys generate`): devices and the controller refuse unsigned bundles. Loaded before "
                   "any work, so a bad key or passphrase fails at once")
    p.add_argument("--serial", type=int, metavar="N",
                   help="with --sign-key: the bundles' serial, which must grow with every release of NAME (a device "
                        "refuses a lower one than it ran) [default: the time in seconds]")
    p.add_argument("--passphrase-file", metavar="FILE",
                   help="with --sign-key: a file whose first line is the key's passphrase (default: "
                        "$EDGEFLEET_KEY_PASSPHRASE, else a prompt when stdin is a terminal)")
    p.add_argument("--prune", metavar="RATIO", help="prune this fraction of the output channels of every Conv "
                   "group it can prune safely (e.g. 30%%; L1 norm of the filters, residual, depthwise and concat groups "
                   "kept whole) before quantizing; every variant is still judged against the original model")
    p.add_argument("--search", choices=["auto", "on", "off"], default="auto", metavar="WHEN",
                   help="try several int8 recipes per target (calibration, presets, bias correction, layers kept in "
                        "float, ...) and keep the fastest that passes the gate, shown in the report; auto: when the "
                        "gate is on; off: each library's defaults only [default: auto]")
    p.add_argument("--reference", metavar="REF.onnx|REF.tflite",
                   help="with a MODEL.tflite: the fp32 model it is judged against (inputs and outputs matched by "
                        "name, else by position; 4-D NCHW/NHWC transposed by shape) [default: the model itself]")
    p.add_argument("--distill", action="store_true", help="with --prune: fine-tune the pruned model against the "
                   "original model's outputs (knowledge distillation, no labels needed) before quantizing, with early "
                   "stop on a held-out share of the training data [pip install 'edgefleet[distill]' (torch)]")
    p.add_argument("--train-data", metavar="DATA.npz|DIR", help="with --distill: unlabelled samples to distill on, in "
                   "any --calib format, matching the model's inputs [default: the calibration samples, never the "
                   "held-out ones]")
    p.add_argument("--distill-epochs", type=int, metavar="N", help="with --distill: train at most N epochs (early "
                   "stop usually ends sooner) [default: 15]")
    p.add_argument("--distill-lr", type=float, metavar="LR", help="with --distill: Adam's learning rate (3e-4 suited "
                   "the trained MobileNetV2 on 600 crops; 1e-3 stalled it) [default: 1e-4]")
    p.add_argument("--require-arm-check", action="store_true",
                   help="fail (exit 2, nothing written) unless the arm target's variants are judged on ARM kernels: "
                        "natively on an aarch64 host or in the emulated aarch64 `edgefleet toolchain arm64` makes; "
                        "without it the host's kernels judge where ARM's cannot, with a warning in the report")
    p.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                   help="a serving setting every bundle's manifest carries, over the converter's recommendation "
                   "(repeatable): accelerators=GPU,CPU (the runtime's device names, in order; the CPU is always the "
                   "last resort), concurrency=N (runs at once, 1-64), max_batch=N (dynamic batching, 1-1024), "
                   "max_wait_us=N (0-100000)")
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


def parse_output_kinds(items: list[str]) -> dict[str, str]:
    kinds = {}
    for item in items:
        name, sep, kind = item.rpartition("=")
        if not sep or not name or kind not in ("classifier", "dense"):
            raise ConvertError(f"--output-kind {item!r} is not NAME=classifier or NAME=dense")
        if name in kinds:
            raise ConvertError(f"--output-kind names {name!r} twice")
        kinds[name] = kind
    return kinds


SERVING_KEYS = ("accelerators", "concurrency", "max_batch", "max_wait_us")


def parse_settings(items: list[str]) -> dict:
    """``--setting KEY=VALUE`` items -> manifest settings, each checked as the agent will check it."""
    from agent import runtimes
    from agent.errors import EdgefleetError
    from agent.serving import serving_settings

    settings: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in SERVING_KEYS:
            raise ConvertError(f"--setting {item!r} is not KEY=VALUE with KEY one of {', '.join(SERVING_KEYS)}")
        if key in settings:
            raise ConvertError(f"--setting names {key!r} twice")
        try:
            settings[key] = value if key == "accelerators" else int(value)
        except ValueError:
            raise ConvertError(f"--setting {item!r}: {key} is a whole number") from None
        try:
            serving_settings(settings)
            runtimes.accelerators(settings)
        except EdgefleetError as e:
            raise ConvertError(f"--setting {item!r}: {e}") from None
    return settings


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    key = None
    if args.sign_key is not None:
        from edgefleet.keys import load_signing_key

        key = load_signing_key(args.sign_key, args.passphrase_file)  # before any work: a bad key fails at once
    elif args.serial is not None or args.passphrase_file is not None:
        raise ConvertError(f"{'--serial' if args.serial is not None else '--passphrase-file'} needs --sign-key KEY")
    from converter.convert import convert

    report = convert(
        args.model, target=args.target, calib=args.calib, out=args.out, name=args.name, version=args.version,
        input_shapes=parse_input_shapes(args.input_shape), calib_method=args.calib_method,
        labels=args.labels, max_accuracy_drop=args.max_accuracy_drop, gate_metric=args.gate,
        gate_output=args.gate_output, min_sqnr=args.min_sqnr, max_kl=args.max_kl,
        output_kinds=parse_output_kinds(args.output_kind), sign_key=key, serial=args.serial, prune=args.prune,
        search=args.search,
        reference=args.reference,
        distill=args.distill, train_data=args.train_data, distill_epochs=args.distill_epochs,
        distill_lr=args.distill_lr, require_arm_check=args.require_arm_check,
        serving=parse_settings(args.setting), progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if args.json:
        if key is None:
            from converter.report import signature_line

            print(signature_line(report), file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        from converter.report import table

        print(table(report))
    return 0
