"""Pass ``prune``: structured channel pruning of Conv output channels on an ONNX graph (onnx + numpy).

1. ``Constant`` nodes become initializers and constant subgraphs are folded (a bias reshaped to
   [1, C, 1, 1] becomes a constant the pruner can cut); each BatchNorm that follows a Conv is folded
   into it (exporters in eval mode often did that already: both kinds of graph work).
2. The channel groups are found (``_channels``): a residual ``Add`` unites every producer feeding it,
   a squeeze-excitation ``Mul`` unites the gate's Conv with the gated tensor, depthwise Convs follow
   their producer, ``Concat`` joins groups at their offsets. A group that reaches a node the pruner
   cannot adjust is skipped, with the reason.
3. In each other group the ``ratio`` of channels with the smallest summed L1 (or L2) filter norm go
   (the count kept rounded up to a multiple of ``round_to``, 8 by default, for ORT's blocked kernels),
   from the producers and from every consumer (next Conv's input channels, depthwise weights and
   groups, BatchNorm, per-channel constants, a Gemm/MatMul after global pooling).
4. The result must run in ONNX Runtime with the input's input and output shapes (checked before it
   is written); the report gives parameters, MACs, file size and ORT fp32 latency before and after.

    python -m converter.passes.prune MODEL.onnx --ratio 30% --out OUT.onnx [--input-shape x=1x3x48x192]

At ratio 0 nothing is folded or cut: the output computes exactly what the input does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from agent.errors import EdgefleetError
from converter import ConvertError
from converter.passes import Pass, PassResult

RUNS = 60  # timed runs per model for the latency figures (interleaved, median)
WARMUP = 5
ROUND_TO = 8


class PruneConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    ratio: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)]  # fraction of each group's channels to remove
    norm: Literal["l1", "l2"] = "l1"  # how filters are ranked
    # keep a multiple of this many channels per group: ORT's blocked (NCHWc) kernels want multiples of 8/16;
    # odd counts made the pruned ocr-cls no faster at all (0.93-1.05x) where multiples of 8 gave 1.3x
    round_to: Annotated[int, msgspec.Meta(ge=1)] = ROUND_TO
    input_shapes: dict[str, list[int]] | None = None  # for MACs and latency; default: declared, batch 1
    latency_runs: int = RUNS  # 0: do not measure latency
    mask_only: bool = False  # zero the chosen channels instead of removing them (to check what pruning removes)


class Prune(Pass):
    name = "prune"
    Config = PruneConfig
    toolchain = ("onnx", "onnxruntime", "numpy")

    def run(self, model_path: Path, config: PruneConfig, out_path: Path) -> PassResult:
        import onnx

        from converter.passes import _channels, _onnxgraph as og

        model_path, out_path = Path(model_path), Path(out_path)
        if out_path.resolve() == model_path.resolve():
            raise ConvertError(f"{out_path}: the pruned model must go to a new file, not over its input")
        original = og.load(model_path)
        shapes_in = og.input_shapes(original, config.input_shapes)
        before = {"params": og.count_params(original), "size": model_path.stat().st_size,
                  "macs": og.count_macs(original, og.infer_shapes(original, shapes_in))}

        model = onnx.ModelProto()
        model.CopyFrom(original)
        og.constants_to_initializers(model)
        constants = og.fold_constants(model)
        folded = og.fold_batchnorm(model) if config.ratio > 0 else []
        analysis = _channels.analyse(model, og.infer_shapes(model, shapes_in))
        groups = _channels.groups(analysis)
        if config.ratio > 0 and groups and all(g.reasons for g in groups.values()):
            first = next(iter(groups.values()))
            raise ConvertError(f"{model_path.name}: no channel group can be pruned safely "
                               f"({', '.join(first.producers)}: {first.reasons[0]}; and {len(groups) - 1} more)")
        if config.ratio > 0 and not groups:
            raise ConvertError(f"{model_path.name}: nothing to prune (no Conv whose output channels can be removed)")
        _channels.choose(analysis, groups, config.ratio, config.norm, config.round_to)
        _channels.apply(analysis, groups, mask=config.mask_only)
        og.cleanup(model)
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            raise ConvertError(f"the pruned model is not valid ONNX: {str(e).splitlines()[0]}") from None

        data = model.SerializeToString()
        feeds = _feeds(original, shapes_in)
        sessions = [_session(original.SerializeToString()), _session(data, check=True)]
        ref, got = (s.run(None, feeds) for s in sessions)
        if [r.shape for r in ref] != [g.shape for g in got]:
            raise ConvertError(f"the pruned model's outputs {[g.shape for g in got]} differ in shape from the "
                               f"original's {[r.shape for r in ref]}")
        latency = _latency(sessions, feeds, config.latency_runs) if config.latency_runs > 0 else None

        _write_new(out_path, data)
        after = {"params": og.count_params(model), "size": out_path.stat().st_size,
                 "macs": og.count_macs(model, og.infer_shapes(model, shapes_in))}
        pruned = [g for g in groups.values() if not g.reasons]
        notes = {
            "input_shapes": shapes_in,
            "batchnorm_folded": len(folded),
            "constants_folded": constants,
            **{k: {"before": before[k], "after": after[k],
                   "ratio": round(after[k] / before[k], 4) if before[k] else None} for k in ("params", "macs", "size")},
            "latency_ms": latency,
            "channels": {"in_pruned_groups": sum(g.channels for g in pruned),
                         "removed": sum(g.channels - len(g.keep) for g in pruned)},
            "groups": {"pruned": [g.report() for g in pruned],
                       "skipped": [g.report() for g in groups.values() if g.reasons]},
        }
        return self.result(config, out_path, notes)


PASS = Prune()


def prune(model_path: Path | str, out_path: Path | str, ratio: float | str, norm: str = "l1", *,
          input_shapes: dict[str, list[int]] | None = None, round_to: int = ROUND_TO, latency_runs: int = RUNS,
          mask_only: bool = False) -> dict[str, Any]:
    """Prune ``ratio`` ("30%" or 0.3) of the channels of every safe group; write ``out_path``; the report."""
    config = PASS.config(ratio=parse_ratio(ratio), norm=norm, input_shapes=input_shapes, round_to=round_to,
                         latency_runs=latency_runs, mask_only=mask_only)
    return PASS.run(Path(model_path), config, Path(out_path)).report()


def parse_ratio(value: float | str) -> float:
    """``"30%"``, ``"30 %"`` or a fraction (``0.3``, ``"0.3"``) -> 0.3; from 0 up to, not including, 100 %."""
    text = str(value).strip()
    try:
        ratio = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ConvertError(f"pruning ratio {text!r} is not a percentage like 30% or a fraction like 0.3") from None
    if not (0 <= ratio < 1):
        raise ConvertError(f"pruning ratio {text!r} is out of range: give 0% up to (not including) 100%, "
                           "or a fraction below 1")
    return ratio


def _session(data: bytes, check: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        if not check:
            raise ConvertError(f"the model does not load in ONNX Runtime: {str(e).splitlines()[0]}") from None
        raise ConvertError(f"the pruned model does not load in ONNX Runtime: {str(e).splitlines()[0]}") from None


def _feeds(model, shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    from onnx import helper

    rng = np.random.default_rng(0)
    types = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    return {name: rng.standard_normal(shape).astype(types[name]) if np.issubdtype(types[name], np.floating)
            else np.zeros(shape, types[name]) for name, shape in shapes.items()}


def _latency(sessions, feeds, runs: int) -> dict:
    """Median ms of ``runs`` inferences of each session, alternated in rounds so both see the same machine."""
    for s in sessions:
        for _ in range(WARMUP):
            s.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    rounds = max(1, runs // 10)
    for r in range(rounds):
        for k, s in enumerate(sessions):
            for _ in range(runs // rounds + (r < runs % rounds)):
                t0 = time.perf_counter()
                s.run(None, feeds)
                times[k].append((time.perf_counter() - t0) * 1e3)
    before, after = (float(np.median(t)) for t in times)
    return {"before": round(before, 4), "after": round(after, 4), "speedup": round(before / after, 3),
            "runs": runs, "threads": 1, "runtime": "onnxruntime fp32 (CPUExecutionProvider)"}


def _write_new(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def render(report: dict) -> str:
    n = report["notes"]
    lines = [f"pruned -> {report['out_path']}: {report['config']['ratio']:.0%} of each group's channels "
             f"({report['config']['norm'].upper()} norm), {n['batchnorm_folded']} BatchNorm folded",
             f"{'':14}{'before':>14}{'after':>14}{'after/before':>14}"]
    for key, title in (("params", "parameters"), ("macs", "MACs"), ("size", "file bytes")):
        lines.append(f"{title:14}{n[key]['before']:>14,}{n[key]['after']:>14,}{n[key]['ratio']:>14.3f}")
    if n["latency_ms"]:
        lat = n["latency_ms"]
        lines.append(f"{'latency ms':14}{lat['before']:>14.3f}{lat['after']:>14.3f}{1 / lat['speedup']:>14.3f}"
                     f"   ({lat['speedup']:.2f}x faster; ORT fp32, 1 thread, median of {lat['runs']})")
    pruned, skipped = n["groups"]["pruned"], n["groups"]["skipped"]
    lines.append(f"groups pruned ({len(pruned)}, {n['channels']['removed']} of {n['channels']['in_pruned_groups']} "
                 "channels removed):")
    lines += [f"  {' + '.join(g['convs'])}: {g['channels']} -> {g['kept']}" for g in pruned]
    lines.append(f"groups skipped ({len(skipped)}):")
    lines += [f"  {' + '.join(g['convs'])} ({g['channels']} channels): {g['reason']}" for g in skipped]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConvertError(f"{message} (see --help)")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m converter.passes.prune", description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--ratio", required=True, help="share of each group's channels to remove: 30%% or 0.3")
    p.add_argument("--out", required=True, metavar="OUT.onnx", help="the pruned model (a new file)")
    p.add_argument("--norm", default="l1", choices=("l1", "l2"), help="rank filters by L1 or L2 norm [l1]")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x48x192",
                   help="shape for MACs and latency where the model's is dynamic (batch defaults to 1)")
    p.add_argument("--round-to", type=int, default=ROUND_TO, metavar="N",
                   help=f"keep a multiple of N channels per group (fast kernels); 1: exactly the ratio [{ROUND_TO}]")
    p.add_argument("--runs", type=int, default=RUNS, help=f"timed runs per model, 0 for none [{RUNS}]")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    try:
        from converter.cli import parse_input_shapes

        args = p.parse_args(argv)
        report = prune(args.model, args.out, args.ratio, args.norm,
                       input_shapes=parse_input_shapes(args.input_shape) or None, round_to=args.round_to,
                       latency_runs=args.runs)
    except EdgefleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
