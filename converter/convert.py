"""The converter's composition root: ``convert(...)`` is what the CLI, the demo and the tests call.

model + calibration npz -> checked inputs -> the target's passes (one new model each) -> each variant
measured in its own runtime (latency, agreement with the ORIGINAL model in ONNX Runtime) -> one bundle
per variant, re-opened with ``safe_unpack`` + ``agent.runtimes.load`` as a device would -> bundles and
``report.json`` moved into ``out``. All work happens in a temporary directory beside ``out``; nothing
reaches ``out`` unless every step succeeded.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from agent.bundle import Manifest, TensorSpec, safe_unpack, sha256_file, write_bundle
from agent.errors import EdgefleetError
from converter import ConvertError, arm_check, calib as calibration, gate, measure
from converter.plan import RUNGS, SPEED_TIE, Step, Variant

# target -> module with plan(...) (see converter/cpu.py); a target is one file.
TARGETS = {"cpu": "converter.cpu", "intel": "converter.intel", "arm": "converter.arm"}
SEARCH = ("auto", "on", "off")
# the reference profile (agent/quality.py) and golden feeds with their fp32 outputs, in every bundle
PROFILE, GOLDEN = "profile.json", "golden.npz"
GOLDEN_MAX, GOLDEN_BYTES = 16, 1 << 20  # at most 16 golden feeds, within 1 MiB of inputs (at least one)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def convert(model: str | Path, *, target: str = "cpu", calib: str | Path, out: str | Path, name: str | None = None,
            version: str = "1", input_shapes: dict[str, list[int]] | None = None, calib_method: str = "auto",
            labels: str | Path | None = None, max_accuracy_drop: float | str | None = None,
            gate_metric: str | None = None, gate_output: str | None = None, min_sqnr: float | None = None,
            max_kl: float | None = None, output_kinds: dict[str, str] | None = None, sign_key=None,
            serial: int | None = None, prune: float | str | None = None, search: str = "auto",
            reference: str | Path | None = None, distill: bool = False,
            train_data: str | Path | None = None, distill_epochs: int | None = None,
            distill_lr: float | None = None, require_arm_check: bool = False, serving: dict | None = None,
            progress: Callable[[str], None] | None = None) -> dict:
    """Convert ``model`` for ``target`` (or ``"all"``) into bundles in ``out``; returns the report
    (also ``out/report.json`` and ``out/report.html``).

    ``sign_key`` (an ed25519 private key, agent/signing.py; the CLI loads it before any work) signs every bundle
    with the same ``serial`` (default: the time in seconds), which must grow with every release of ``name``.
    Without it the bundles are unsigned, and devices and the controller refuse them until `edgefleet sign`.

    The gate (converter/gate.py) judges ``gate_output`` (default the first output) in ``gate_metric`` (top1, top5,
    kl, sqnr, accuracy; default by the output's kind) against ``max_accuracy_drop``, ``min_sqnr`` or ``max_kl``;
    ``output_kinds`` ({name: "classifier" | "dense"}) overrides how an output is judged.

    ``prune`` ("30%" or 0.3) prunes that fraction of the channels of every safe Conv group
    (converter/passes/prune.py) before the targets' passes; every variant is still judged against the original
    model, so the report shows what pruning cost.

    ``distill`` (with ``prune``) fine-tunes the pruned model against the original's outputs in ONNX Runtime
    (converter/passes/distill.py, torch) on ``train_data`` (same formats as ``calib``; default: the calibration
    split, never the held-out samples), for at most ``distill_epochs`` epochs with early stop, before the targets'
    passes; the report's ``distillation`` section says what it did.

    ``search`` ("auto": on when the gate is; "on"; "off") lets each target try several recipes for its int8
    variants and keep the fastest that passes the gate (``_search``); off, each uses its library's defaults.

    A ``.tflite`` model is measured, gated and bundled as given (target arm only; converter/tflite_source.py),
    against itself or against ``reference`` (an fp32 .onnx or .tflite).

    The ``arm`` target's variants are judged on ARM kernels (converter/arm_check.py): natively on an aarch64 host,
    else in the emulated aarch64 when `edgefleet toolchain arm64` has made it; their golden outputs are then their own
    outputs on those kernels. Where neither is possible the host's kernels judge, with a warning in the report;
    ``require_arm_check`` makes that (and an emulated run that fails) an error."""
    model, calib, out = Path(model), Path(calib), Path(out)
    signature = _signature(sign_key, serial)
    say = progress or (lambda line: None)
    targets = _targets(target)
    arm = _arm_judge(targets, require_arm_check, say)
    gating = gate.options(metric=gate_metric, output=gate_output, max_accuracy_drop=max_accuracy_drop,
                          min_sqnr=min_sqnr, max_kl=max_kl, output_kinds=output_kinds)
    max_drop = gating.max_drop
    if search not in SEARCH:
        raise ConvertError(f"--search {search!r}: choose one of {', '.join(SEARCH)}")
    searching = search == "on" or (search == "auto" and gating.active)
    if prune is not None:
        from converter.passes.prune import parse_ratio

        prune = parse_ratio(prune)  # a bad ratio fails before any work
    distiller = _distiller(distill, prune, train_data, distill_epochs, output_kinds, distill_lr)
    name = _safe(name if name is not None else re.sub(r"[^A-Za-z0-9._+-]+", "-", model.stem).strip("-.") or "model",
                 "--name")
    version = _safe(str(version), "--version")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} exists and is not a directory")
    if model.suffix.lower() == ".tflite":  # bundled as given: one variant, no passes
        from converter.tflite_source import convert_tflite

        return convert_tflite(model, target=target, calib=calib, out=out, name=name, version=version,
                              input_shapes=input_shapes, calib_method=calib_method, labels=labels, gating=gating,
                              reference=reference, sign_key=sign_key, signature=signature, say=say, arm=arm,
                              serving=serving,
                              onnx_only={"--prune": prune, "--distill": distill or None,
                                         "--search on": search == "on" or None})
    if reference is not None:
        raise ConvertError("--reference is for a .tflite model; an ONNX model is its own fp32 reference")

    source, declared = _load_source(model)
    shaped = calibration.apply_input_shapes(declared, input_shapes)
    data = calibration.load(calib, shaped)
    specs = data.specs  # the dims the model leaves dynamic, fixed by --input-shape or by the data
    calibration.require_static(specs, data.feeds)
    label_array = calibration.load_labels(labels, data) if labels is not None else None
    train_feeds = _train_feeds(train_data, specs) if distiller else None
    # a fixed batch dim (stacked samples are joined into batches of it), or None (dynamic, or one feed a run)
    batch = specs[0].shape[0] if data.feeds.stacked and specs[0].shape[0] > 0 else None
    if batch and (data.n_eval < batch or data.samples - data.n_eval < batch):
        raise ConvertError(f"the model has a fixed batch of {batch}: the calibration file needs at least {batch} "
                           f"samples to calibrate and {batch} to hold out (it has {data.samples})")
    held = data.held_out()
    held_labels = None if label_array is None else label_array[data.samples - data.n_eval :]
    one = next(held.batches(batch or 1))  # the smoke-test sample: one feed (batch 1, or the model's fixed batch)

    staging = _staging_dir(out)
    try:
        work = staging / "work"
        say(f"checking {model.name} and {calib.name} ({data.describe()}: {data.samples} feeds, "
            f"{data.samples - data.n_eval} calibrate, {data.n_eval} held out); inputs "
            f"{', '.join(f'{s.name}{calibration._fmt(s.shape)}' for s in specs)}; running the fp32 reference in "
            f"ONNX Runtime ...")
        session = _session(model.parent, model.name, "source model")
        try:
            parts = calibration.run_feeds(session.run, held, batch, measure.EVAL_BATCH)
            reference = held.join(parts)
            parts.append(session.run(one))
            golden = _golden(held, session.run) if not batch or batch == 1 else [(one, session.run(one))]
        except Exception as e:
            raise ConvertError(f"the source model fails on the calibration data: {_first_line(e)}") from None
        rule = gate.resolve(gating, reference, labels=held_labels is not None)
        ref_accuracy = gate.task_accuracy(reference, held_labels, rule.labels_output)
        common = {
            "calibration": {"sha256": data.sha256, "format": data.format, "samples": data.samples,
                            "calibration_samples": data.samples - data.n_eval, "held_out_samples": data.n_eval,
                            "method": calib_method, "labels": held_labels is not None,
                            "dims_from_data": {}},
            "toolchain": measure.toolchain(), "host": measure.host(),
            "reference_latency_ms": measure.latency(session, one),
        }
        session.close()
        fixed = work / "fixed.onnx"
        specs, kept = _fix_shapes(model, fixed, specs, shaped)
        for line in kept:
            say(f"note: {line}")
        common["calibration"]["dims_kept_dynamic"] = kept
        common["calibration"]["dims_from_data"] = {  # dims neither the model nor --input-shape fixed
            s.name: axes for s, given in zip(specs, shaped)
            if (axes := [a for a, (d, g) in enumerate(zip(s.shape, given.shape)) if d > 0 and g < 0])}
        outputs, warnings = _outputs_from_reference(_output_specs(fixed), parts,
                                                    dynamic_batch=data.feeds.stacked and batch is None)
        for line in warnings:
            say(f"warning: {line}")
        common["warnings"] = warnings
        ctx = _Context(held, one, batch, reference, held_labels, rule, ref_accuracy, common, say)
        ctx.quality, ctx.arm = _quality_files(reference, rule.kinds, golden), arm
        common["quality_profile"] = {"id": ctx.quality["profile_id"], "golden_inputs": len(golden),
                                     "files": [PROFILE, GOLDEN], "golden_from": GOLDEN_FP32}
        ctx.passes.append(_fix_shapes_record(specs, kept))
        if prune:
            from converter.passes.prune import prune as prune_model

            say(f"pruning {prune:.0%} of the channels of every safe Conv group ...")
            pruned = work / "pruned.onnx"
            common["pruning"] = {k: v for k, v in prune_model(fixed, pruned, prune).items() if k != "out_path"}
            ctx.passes.append(common["pruning"])
            fixed = pruned  # the targets start from it; the reference stays the original model
        if distiller:
            step, config = distiller
            distilled = work / "distilled.onnx"
            result = step.run(fixed, config, distilled, teacher=model,
                              data=train_feeds if train_feeds is not None else data.calibration_split(), progress=say)
            common["distillation"] = {"train_data": str(train_data) if train_data is not None else
                                      "the calibration split", **{k: v for k, v in result.report().items()
                                                                  if k != "out_path"}}
            ctx.passes.append({k: v for k, v in result.report().items() if k != "out_path"})
            fixed = distilled  # pruned + distilled: the targets start from it, judged against the original

        built, refused, skipped, chosen = [], [], [], {}
        for t in targets:
            module = importlib.import_module(TARGETS[t])
            if (why := module.missing()) is not None:
                if target != "all":
                    raise ConvertError(f"target {t!r} cannot be built here: {why}")
                skipped.append({"target": t, "reason": why})
                say(f"[{t}] skipped: {why}")
                continue
            try:
                steps = module.plan(fixed, specs, data.calibration_split(), work / t, calib_method=calib_method,
                                    cpu_flags=measure.cpu_flags(), **_plan_options(module, max_drop, searching, rule))
                ok, bad, chosen[t] = _run_target(t, steps, ctx)
            except Exception as e:  # e.g. an op this target cannot take: the other targets still convert
                if target != "all":
                    if isinstance(e, EdgefleetError):
                        raise
                    raise ConvertError(f"target {t!r} failed: {type(e).__name__}: {_first_line(e)}") from None
                why = str(e) if isinstance(e, EdgefleetError) else f"{type(e).__name__}: {_first_line(e)}"
                skipped.append({"target": t, "reason": why})
                say(f"[{t}] skipped: {why}")
                continue
            built += ok
            refused += bad
        if not built:
            why = "; ".join(f"{v['target']}/{v['variant']}: {v['gate']['reason']}" for v in refused) or \
                "; ".join(f"{s['target']}: {s['reason']}" for s in skipped)
            raise ConvertError(f"no variant could be emitted ({why})")

        say(f"writing {len(built)} bundles and checking each unpacks and runs as on a device ...")
        source_sha = sha256_file(model)
        entries = []
        for v, rep, sample_out in built:
            rep, settings = _throughput(v, rep, specs, outputs, ctx.one)
            settings = {**settings, **(serving or {})}  # --setting: the user's word over the recommendation
            manifest = Manifest(
                name=name, version=version, target=rep["target"], runtime=v.runtime, precision=v.precision,
                model=v.path.name, files=[], inputs=specs, outputs=outputs,
                sample="sample.npz", latency_budget_ms=round(max(250.0, 20 * rep["latency_ms"]["p95"]), 1),
                settings=settings, report={**rep, "gate": {**rep["gate"], "chain": chosen[rep["target"]]}},
                source_sha256=source_sha,
            )
            file = f"{name}-{version}-{rep['target']}-{v.name}.tar"
            files = {f.name: f for f in sorted(v.path.parent.iterdir()) if f.is_file()}
            digest = write_bundle(staging / file, manifest, files, sign_key=sign_key,
                                  serial=signature["serial"] if signature else None)
            diff = _round_trip(staging / file, staging / f"unpacked-{rep['target']}-{v.name}", sample_out)
            entries.append({**rep, "bundle": file, "bundle_sha256": digest,
                            "bundle_bytes": os.path.getsize(staging / file),
                            "round_trip": {"ok": True, "max_abs_diff": diff}})

        report = {
            "name": name, "version": version, "target": target,
            "source": {"path": str(model), "sha256": source_sha, "size_bytes": os.path.getsize(model),
                       "opset": _opset(source), "inputs": [_spec_dict(s) for s in specs],
                       "outputs": [_spec_dict(s) for s in outputs]},
            "reference_accuracy": ref_accuracy,
            **common,
            "gate": {"max_accuracy_drop": max_drop, **rule.describe(), "chosen": {t: _chosen_text(c) for t, c in chosen.items()},
                     "chains": chosen},
            "variants": entries, "refused": refused,
            "skipped": skipped, "signed": signature,
        }
        if arm is not None and "arm" not in {s["target"] for s in skipped}:
            report["arm_check"] = arm_summary(arm, entries + refused)
            report["warnings"] = warnings + report["arm_check"]["warnings"]
        return _publish(staging, out, report)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _distiller(distill: bool, prune, train_data, epochs: int | None, output_kinds: dict | None,
               lr: float | None = None):
    """(the distill pass, its config) when ``distill``, else None; refuses flags that need --distill or --prune,
    and a missing torch, before any work."""
    if not distill:
        given = [flag for flag, v in (("--train-data", train_data), ("--distill-epochs", epochs),
                                      ("--distill-lr", lr)) if v is not None]
        if given:
            raise ConvertError(f"{given[0]} needs --distill")
        return None
    if not prune:
        raise ConvertError("--distill fine-tunes the pruned model: give --prune too (e.g. --prune 30%)")
    from converter.passes import distill as distill_pass

    distill_pass.require()
    values = {"output_kinds": dict(output_kinds or {})}
    if epochs is not None:
        values["epochs"] = epochs
    if lr is not None:
        values["learning_rate"] = lr
    return distill_pass.PASS, distill_pass.PASS.config(**values)


def _train_feeds(path: str | Path | None, specs: list[TensorSpec]):
    """--train-data checked against the model's inputs as the calibration fixed them (None: the calibration split)."""
    if path is None:
        return None
    try:
        return calibration.load(path, specs).feeds
    except ConvertError as e:  # "calibration array 'x' is float64 ..." -> "--train-data T.npz: array 'x' is ..."
        raise ConvertError(f"--train-data {Path(path).name}: {re.sub(r'^calibration ', '', str(e))}") from None


class _Context:
    """What every variant is measured against."""

    def __init__(self, held, one, batch, reference, labels, rule, ref_accuracy, common, say):
        self.held, self.one, self.batch, self.reference = held, one, batch, reference
        self.labels, self.rule, self.ref_accuracy = labels, rule, ref_accuracy
        self.common, self.say = common, say
        self.quality: dict | None = None  # profile.json bytes and golden.npz arrays, when the converter made them
        self.arm: dict | None = None  # where the arm target's variants are judged (_arm_judge), when it is built
        self.passes: list[dict] = []  # the passes every target starts from (fix_shapes, prune, ...), as recorded


def _plan_options(module, max_drop: float | None, search: bool, rule=None) -> dict:
    """Keywords a target's plan() takes beyond the common ones (e.g. intel's accuracy-controlled rung, which
    validates in the gate's own metric: ``gate``, the resolved gate.Rule)."""
    import inspect

    params = inspect.signature(module.plan).parameters
    given = {"max_accuracy_drop": max_drop, "search": search, "gate": rule}
    return {k: v for k, v in given.items() if k in params}


def _run_target(target: str, steps: list[Step], ctx: _Context) -> tuple[list, list, list]:
    """Run a target's steps; measure and gate each variant; build fallback rungs only while needed. Steps that
    write the same variant by different recipes (``Step.candidate``) are a search: see ``_search``.

    Returns (emitted [(variant, report, sample outputs)], refused [report], the chain [rung records])."""
    emitted, refused, chain = [], [], []
    regular = _groups([s for s in steps if not s.fallback])
    fallback = _groups([s for s in steps if s.fallback])
    n = len(regular) + len(fallback)

    def build(i: int, group: list[Step]) -> None:
        measured = []
        for k, step in enumerate(group, 1):
            which = f" [{k}/{len(group)}: {step.candidate}]" if len(group) > 1 else ""
            ctx.say(f"[{target} {i}/{n}] {step.text}{which} ...")
            v = step.run()
            if v is None:
                continue
            ctx.say(f"[{target} {i}/{n}] measuring {v.name}{which} in {v.runtime} (batch {ctx.batch or 1}, 1 thread; "
                    f"{len(ctx.reference[next(iter(ctx.reference))])} held-out samples) ...")
            rep, sample_out = _measure(v, target, ctx)
            if v.recipe.get("warning"):
                ctx.say(f"[{target}] warning: {v.name}: {v.recipe['warning']}")
            measured.append((v, rep, sample_out, step.candidate))
        if not measured:
            return
        v, rep, sample_out = _search(target, measured, ctx) if len(measured) > 1 else measured[0][:3]
        v.kept = True
        if rep["gate"]["passed"] is False:
            refused.append(rep)
            ctx.say(f"[{target}] refused {v.name}: {rep['gate']['reason']}")
        else:
            emitted.append((v, rep, sample_out))
        if v.rung is not None:
            g = rep["gate"]
            chain.append({"rung": v.rung, "variant": v.name, "passed": g["passed"], "metric": g["metric"],
                          "value": g["value"], "drop": g["drop"], "text": g["text"], "reason": g["reason"]})

    for i, group in enumerate(regular, 1):
        build(i, group)
    if ctx.rule.active:
        def passed(rung: str) -> bool:
            return any(c["rung"] == rung and c["passed"] for c in chain)

        for rung in RUNGS:
            if not passed(rung):
                for i, group in enumerate(fallback, len(regular) + 1):
                    if group[0].rung == rung:
                        build(i, group)
            if passed(rung):
                break  # the best rung that passes is found: no fallback below it is needed
    order = {r: k for k, r in enumerate(RUNGS)}
    chain.sort(key=lambda c: order[c["rung"]])
    return emitted, refused, chain


def _groups(steps: list[Step]) -> list[list[Step]]:
    """Steps in order, the candidates of one variant (same ``produces``, ``candidate`` set) together."""
    groups: list[list[Step]] = []
    for step in steps:
        if step.candidate is not None and groups and groups[-1][0].candidate is not None \
                and groups[-1][0].produces == step.produces:
            groups[-1].append(step)
        else:
            groups.append([step])
    return groups


def _search(target: str, measured: list, ctx: _Context) -> tuple[Variant, dict, dict]:
    """Keep one of several recipes for a variant: of those the gate passes (all when it is off), the fastest, and
    of those within SPEED_TIE of it the most faithful; when the gate refuses all, the most faithful (refused).
    Latencies are timed again side by side in interleaved rounds (one candidate after another), so a
    neighbour's load on a shared machine weighs on all of them alike. The kept variant's report carries the
    search: every candidate's recipe, speed-up and gate figure."""
    eligible = [m for m in measured if m[1]["gate"]["passed"] is not False]
    times = _race([m[0] for m in (eligible or measured)], ctx)
    faithful = {id(m[0]): gate.fidelity(ctx.rule, m[1]["agreement"], m[1]["accuracy"]) for m in measured}
    if eligible:
        fastest = min(times[id(m[0])] for m in eligible)
        near = [m for m in eligible if times[id(m[0])] <= fastest * (1 + SPEED_TIE)]
        kept = max(near, key=lambda m: faithful[id(m[0])])
        why = ("the fastest that passes the gate" if ctx.rule.active else "the fastest") + \
            f" (within {SPEED_TIE:.0%} of it, the most faithful)"
    else:
        kept = max(measured, key=lambda m: faithful[id(m[0])])
        why = "none passes the gate: the most faithful is shown refused"
    rows = []
    for v, rep, _, candidate in measured:
        p50 = times.get(id(v))
        rows.append({"candidate": candidate, "recipe": _recipe_summary(v.recipe), "kept": v is kept[0],
                     "raced_p50_ms": p50, "speedup_vs_fp32": rep["speedup_vs_fp32"],
                     "relative_latency": round(p50 / min(times.values()), 3) if p50 else None,
                     "size_bytes": rep["size_bytes"], "gate": {k: rep["gate"][k] for k in ("metric", "value",
                                                                                             "text", "passed")},
                     "agreement": _agreement_summary(rep["agreement"], ctx.rule.output)})
    v, rep, sample_out, candidate = kept
    rep = {**rep, "search": {"candidates": rows, "kept": candidate, "rule": why, "speed_tie": SPEED_TIE}}
    ctx.say(f"[{target}] search for {v.name}: kept {candidate} ({why}); "
            + "; ".join(f"{r['candidate']}: {r['gate']['text']}"
                        + (f", {r['relative_latency']:.2f}x the fastest's latency" if r["relative_latency"] else "")
                        for r in rows))
    return v, rep, sample_out


RACE_ROUNDS = 5
RACE_RUNS = 20


def _race(variants: list[Variant], ctx: _Context) -> dict[int, float]:
    """Each variant's median p50 over RACE_ROUNDS interleaved rounds of RACE_RUNS runs (id(variant) -> ms)."""
    sessions = []
    try:
        for v in variants:
            sessions.append((v, _session(v.path.parent, v.path.name, f"{v.name} variant", v.runtime, _settings(v))))
        p50s: dict[int, list[float]] = {id(v): [] for v in variants}
        for _ in range(RACE_ROUNDS):
            for v, session in sessions:
                p50s[id(v)].append(measure.latency(session, ctx.one, warmup=2, runs=RACE_RUNS)["p50"])
    finally:
        for _, session in sessions:
            session.close()
    return {k: round(float(np.median(t)), 4) for k, t in p50s.items()}


def _recipe_summary(recipe: dict) -> dict:
    """A candidate's recipe without its bulky parts (toolchain versions, node lists), for the search table."""
    return {k: v for k, v in recipe.items() if k not in ("toolchain", "input_shapes", "passes")
            and not (isinstance(v, (list, dict)) and len(str(v)) > 120)}


def _agreement_summary(agreement: dict, output: str) -> dict:
    entry = agreement["outputs"][output]
    return {k: entry.get(k) for k in ("top1", "top5", "kl", "sqnr_db") if entry.get(k) is not None}


def _chosen_text(chain: list[dict]) -> str:
    passed = [c for c in chain if c["passed"]]
    if not chain:
        return "no variant on the fallback chain"
    if chain[0]["passed"] is None:
        return "not gated (no --gate, --max-accuracy-drop, --min-sqnr or --max-kl)"
    if not passed:
        return "every rung was refused"
    best = passed[0]
    before = [f"{c['rung']} ({c['variant']}) refused: {c['text']}" for c in chain
              if RUNGS.index(c["rung"]) < RUNGS.index(best["rung"]) and not c["passed"]]
    return f"rung {best['rung']} ({best['variant']}) passed" + (f" after {'; '.join(before)}" if before else "")


def _measure(v: Variant, target: str, ctx: _Context) -> tuple[dict, dict]:
    """Load the variant from a directory laid out like an unpacked bundle and measure it there.

    Latency is always the host's. Fidelity (agreement, accuracy, the gate) is judged on the outputs of the kernels
    ``_arm_outputs`` names for an ``arm`` variant (ARM kernels when it can), else of the host's.

    Returns the variant's report (it goes into the manifest) and its outputs on the sample (the host's: the bundle's
    round trip runs here)."""
    if target == "arm" and ctx.arm is not None and (said := ctx.arm.pop("say", None)):
        ctx.say(said)  # once, at the first arm variant
    np.savez_compressed(v.path.parent / "sample.npz", **ctx.one)
    if ctx.quality is not None:  # the reference profile every bundle carries (agent/quality.py)
        (v.path.parent / PROFILE).write_bytes(ctx.quality["profile"])
    arm_native = target == "arm" and ctx.arm is not None and ctx.arm["native"]
    session = _session(v.path.parent, v.path.name, f"{target} {v.name} variant", v.runtime, _settings(v))
    try:
        try:
            got = measure.run_batched(session, ctx.held, ctx.batch)
            sample_out = session.run(ctx.one)
            # on an aarch64 host the host's kernels are ARM kernels: the golden outputs are the variant's own
            native_golden = [session.run(f) for f in ctx.quality["feeds"]] if arm_native and ctx.quality else None
        except Exception as e:
            raise ConvertError(f"{target} {v.name} variant fails in {v.runtime}: {_first_line(e)}") from None
        lat = measure.latency(session, ctx.one)
    finally:
        session.close()
    host = arm_check.host_label()
    judged_on, check, golden_out, host_got = host, None, native_golden, None
    if target == "arm" and ctx.arm is not None:
        judged_on, check, arm_got, arm_golden = _arm_outputs(v, target, ctx, got, sample_out)
        if arm_got is not got:
            host_got, got = got, arm_got
            golden_out = arm_golden
    if ctx.quality is not None:  # golden.npz: the fp32 reference's outputs, or this variant's own on ARM kernels
        np.savez_compressed(v.path.parent / GOLDEN, **_golden_arrays(ctx.quality, golden_out))
    ref_p50 = ctx.common["reference_latency_ms"]["p50"]
    try:
        agreement = measure.agreement(ctx.reference, got, ctx.rule.kinds, ctx.rule.output)
        host_agreement = None if host_got is None else \
            measure.agreement(ctx.reference, host_got, ctx.rule.kinds, ctx.rule.output)
    except ValueError as e:
        raise ConvertError(f"{target} {v.name} variant: {e}") from None
    accuracy = gate.task_accuracy(got, ctx.labels, ctx.rule.labels_output)
    verdict = gate.judge(ctx.rule, agreement, accuracy, ctx.ref_accuracy)
    report = {
        "target": target, "variant": v.name, "runtime": v.runtime, "precision": v.precision, "rung": v.rung,
        "size_bytes": sum(f.stat().st_size for f in v.path.parent.iterdir()
                          if f.name not in ("sample.npz", PROFILE, GOLDEN)),
        "recipe": {**v.recipe, "passes": ctx.passes + list(v.recipe.get("passes", []))},
        "latency_ms": {**lat, "batch": ctx.batch or 1, "settings": _settings(v), "measured_on": host},
        "speedup_vs_fp32": round(ref_p50 / lat["p50"], 3) if lat["p50"] > 0 else None,
        "judged_on": judged_on,
        "agreement": agreement, "accuracy": accuracy, "gate": verdict,
        **ctx.common,
    }
    if host_agreement is not None:
        report["host_agreement"] = host_agreement
        report["host_accuracy"] = gate.task_accuracy(host_got, ctx.labels, ctx.rule.labels_output)
    if check is not None:
        report["arm_check"] = check
    if ctx.quality is not None and "quality_profile" in ctx.common:
        report["quality_profile"] = {"golden_from": GOLDEN_FP32, **ctx.common["quality_profile"],
                                     **({"golden_from": judged_on} if golden_out is not None else {})}
    return report, sample_out


GOLDEN_FP32 = "fp32 reference"  # quality_profile.golden_from when golden.npz holds the reference's outputs
LATENCY_NOTE = "latency is measured on this host: emulated timing means nothing"


def _arm_judge(targets: list[str], require: bool, say) -> dict | None:
    """Where the arm target's variants are judged (converter/arm_check.where), said once; None without the arm
    target. ``require``: an error, before any work, when that is not on ARM kernels."""
    if "arm" not in targets:
        if require:
            raise ConvertError("--require-arm-check is for --target arm (or all)")
        return None
    from converter import arm64

    judged_on, why, emulated = arm_check.where()
    if why is not None and require:
        raise ConvertError(f"--require-arm-check: {why}")
    # said when the first arm variant is measured (_measure): bad input found before then stays one line
    said = (f"[arm] warning: {why}; the arm target's variants are judged on the {judged_on}'s kernels" if why else
            f"[arm] the variants are judged on ARM kernels: {judged_on}; {LATENCY_NOTE}")
    return {"judged_on": judged_on, "reason": why, "emulated": emulated, "native": arm64.native(),
            "require": require, "say": said}


def _arm_outputs(v: Variant, target: str, ctx: _Context, got: dict, sample_out: dict):
    """The variant's held-out outputs on ARM kernels: (judged_on, the report's ``arm_check`` record, the outputs
    the gate judges, its outputs on the golden feeds or None). Natively (an aarch64 host) those are the host's;
    emulated, one run in the emulated aarch64 of the same batches, the sample and the golden feeds; where that
    cannot be (not set up, or the run fails: warned, an error with --require-arm-check) the host's, and None."""
    arm = ctx.arm
    if arm["native"]:
        return arm["judged_on"], {"status": "native", "judged_on": arm["judged_on"]}, got, None
    if not arm["emulated"]:
        return arm["judged_on"], {"status": "not checked", "reason": arm["reason"]}, got, None
    from converter import arm64

    batches = list(ctx.held.batches(ctx.batch or measure.EVAL_BATCH, whole=bool(ctx.batch)))
    golden = ctx.quality["feeds"] if ctx.quality is not None else []
    ctx.say(f"[{target}] judging {v.name} on ARM kernels: {len(batches) + 1 + len(golden)} runs in the emulated "
            f"aarch64 ({arm['judged_on']}) ...")
    t0 = time.monotonic()
    try:
        outs = arm_check.run(v.path.parent, v.runtime, v.path.name, _settings(v), [*batches, ctx.one, *golden],
                             precision=v.precision, work=v.path.parent.parent)
        arm_got = ctx.held.join(outs[: len(batches)])
        for name in ctx.reference:
            if name not in arm_got:
                raise arm64.EmulationError(f"the emulated run returned no output {name!r}")
    except arm64.EmulationError as e:
        why = f"{arm_check.NOT_CHECKED} for arm/{v.name}: {e}"
        if arm["require"]:
            raise ConvertError(f"--require-arm-check: {why}") from None
        ctx.say(f"[{target}] warning: {why}; judged on the {arm_check.host_label()}'s kernels instead")
        return arm_check.host_label(), {"status": "failed", "reason": str(e),
                                        "fallback": f"judged on the {arm_check.host_label()}'s kernels"}, got, None
    sample_arm = outs[len(batches)]
    check = {"status": "emulated", "judged_on": arm["judged_on"], "cpu": arm64.CPU,
             "runs": len(outs), "seconds": round(time.monotonic() - t0, 1),
             "sample_max_abs_diff_vs_host": max(
                 (float(np.abs(np.asarray(sample_arm[k], np.float64) - np.asarray(sample_out[k], np.float64)).max(
                     initial=0.0)) for k in sample_out if k in sample_arm and np.shape(sample_arm[k]) ==
                  np.shape(sample_out[k])), default=None)}
    out = ctx.rule.output
    h, a = np.asarray(got[out]), np.asarray(arm_got[out])
    if h.ndim == 2 and h.shape == a.shape and h.shape[1] >= 2:
        check["top1_differs_from_host"] = int((h.argmax(1) != a.argmax(1)).sum())
        check["samples"] = int(h.shape[0])
    ctx.say(f"[{target}] {v.name} on ARM kernels: {check['seconds']:.0f} s"
            + (f"; top-1 differs from the host's on {check['top1_differs_from_host']} of {check['samples']} held-out "
               f"samples" if "samples" in check else ""))
    return arm["judged_on"], check, arm_got, outs[len(batches) + 1 :]


def arm_summary(arm: dict, variants: list[dict]) -> dict:
    """The report's ``arm_check`` section: where the arm variants were judged, and the warnings to show."""
    mine = [v for v in variants if v["target"] == "arm"]
    warnings = [] if arm["reason"] is None else [f"{arm['reason']}; the host's kernels judged the arm variants"]
    warnings += [f"{arm_check.NOT_CHECKED} for arm/{v['variant']}: {v['arm_check']['reason']}; "
                 f"{v['arm_check']['fallback']}" for v in mine if v.get("arm_check", {}).get("status") == "failed"]
    return {"judged_on": arm["judged_on"], "emulated": arm["emulated"], "native": arm["native"],
            "reason": arm["reason"], "required": arm["require"], "latency": LATENCY_NOTE,
            "variants": {v["variant"]: v.get("judged_on") for v in mine}, "warnings": warnings}


def _golden_arrays(quality: dict, outputs: list[dict] | None) -> dict:
    """golden.npz's arrays: the golden feeds with the fp32 reference's outputs, or with ``outputs`` (the variant's
    own, one dict a golden feed, computed on ARM kernels) for the outputs the reference has."""
    arrays = dict(quality["golden"])
    if outputs is None:
        return arrays
    for key in [k for k in arrays if k.startswith("output/")]:
        name, i = key[len("output/"):].rsplit("/", 1)
        if name not in outputs[int(i)]:
            raise ConvertError(f"the golden run on ARM kernels returned no output {name!r}")
        arrays[key] = np.asarray(outputs[int(i)][name])
    return arrays


def _publish(staging: Path, out: Path, report: dict) -> dict:
    """Move the bundles, report.json and report.html from ``staging`` into ``out`` (each move a rename)."""
    from converter.report import to_html

    out.mkdir(parents=True, exist_ok=True)
    for entry in report["variants"]:
        entry["path"] = str(out / entry["bundle"])
    report = {**report, "out": str(out)}
    (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (staging / "report.html").write_text(to_html(report))
    for entry in report["variants"]:
        os.replace(staging / entry["bundle"], out / entry["bundle"])
    os.replace(staging / "report.json", out / "report.json")
    os.replace(staging / "report.html", out / "report.html")
    return report


def _signature(sign_key, serial: int | None) -> dict | None:
    """What the report says about the bundles' signature: the release key's id and the serial, or None."""
    if serial is not None and not 1 <= serial <= 2**53:
        raise ConvertError(f"--serial {serial}: give a positive integer")
    if sign_key is None:
        if serial is not None:
            raise ConvertError("--serial needs --sign-key (an unsigned bundle carries no serial)")
        return None
    from agent.signing import keyid

    return {"keyid": keyid(sign_key.public_key()), "serial": serial or int(time.time())}


def _targets(target: str) -> list[str]:
    if target == "all":
        return list(TARGETS)
    if target in TARGETS:
        return [target]
    raise ConvertError(f"unknown target {target!r} (choose from {', '.join(TARGETS)}, all)")


def _safe(value: str, flag: str) -> str:
    if not _SAFE_NAME.match(value):
        raise ConvertError(f"{flag} {value!r} must be letters, digits, '.', '_', '+' or '-' (it names files)")
    return value


def _load_source(path: Path):
    """The source model, checked, and its inputs (shape -1 where a dim is dynamic)."""
    if not path.exists():
        raise ConvertError(f"model file not found: {path}")
    if not path.is_file():
        raise ConvertError(f"model {path} is not a file")
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise ConvertError(f"{path} is not an ONNX model (cannot parse it: {_first_line(e)})") from None
    if not model.graph.node or not model.graph.output:
        raise ConvertError(f"{path} is not an ONNX model (it holds no graph)")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ConvertError(f"{path} is not a valid ONNX model: {_first_line(e)}") from None
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tt = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not tt.HasField("shape"):
            raise ConvertError(f"model input {value.name!r} is not a tensor of known rank")
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim]
        specs.append(TensorSpec(value.name, shape, np.dtype(tensor_dtype_to_np_dtype(tt.elem_type)).name))
    if not specs:
        raise ConvertError(f"{path} has no inputs to feed")
    return model, specs


def _throughput(v: Variant, rep: dict, specs: list[TensorSpec], outputs: list[TensorSpec], one: dict) -> tuple:
    """(the report with the variant's ``throughput``, the bundle's settings with the recommended ``concurrency``
    and ``max_batch``): measured served by the agent's own Runner (measure.serving), for the bundles only. A
    variant that cannot be measured so keeps the default settings, the reason in its report."""
    settings = _settings(v)
    manifest = Manifest(name="measure", version="0", target=rep["target"], runtime=v.runtime, precision=v.precision,
                        model=v.path.name, files=[], inputs=specs, outputs=outputs, settings=settings)
    try:
        figures = measure.serving(v.path.parent, manifest, one)
    except Exception as e:  # a runtime that fails under concurrent runs: the bundle serves one at a time
        return {**rep, "throughput": {"error": f"{type(e).__name__}: {_first_line(e)}"}}, settings
    return {**rep, "throughput": figures}, {**settings, **figures["recommended"]}


def _settings(v) -> dict:
    """The runtime settings a variant's bundle carries: the measuring defaults, then the variant's own."""
    return {**measure.SETTINGS, **v.settings}


def _session(model_dir: Path, model: str, what: str, runtime: str = "onnxruntime", settings: dict | None = None):
    try:
        return measure.open_session(model_dir, model, runtime, settings)
    except EdgefleetError:
        raise
    except Exception as e:
        raise ConvertError(f"{runtime} cannot load the {what}: {_first_line(e)}") from None


def _golden(held, run) -> list[tuple[dict, dict]]:
    """The first held-out feeds (at most GOLDEN_MAX, within GOLDEN_BYTES of inputs, at least one) and their fp32
    outputs: what a device runs at activation and every canary interval to check its runtime computes the same.
    (A model with a fixed batch above 1 gets its one smoke-test batch instead.)"""
    out, used = [], 0
    for i in range(min(GOLDEN_MAX, len(held))):
        feed = held[i]
        size = sum(np.asarray(v).nbytes for v in feed.values())
        if out and used + size > GOLDEN_BYTES:
            break
        out.append((feed, {k: np.asarray(v) for k, v in run(feed).items()}))
        used += size
    return out


def _quality_files(reference: dict, kinds: dict, golden: list) -> dict:
    """profile.json (the fp32 reference's histograms, agent/quality.py) and golden.npz (INPUT/INDEX and
    output/NAME/INDEX entries, the indexed calibration layout)."""
    import msgspec

    from agent import quality

    profile = quality.build(reference, kinds)
    arrays = {}
    for i, (feed, outputs) in enumerate(golden):
        arrays.update({f"{k}/{i}": np.asarray(v) for k, v in feed.items()})
        arrays.update({f"output/{k}/{i}": v for k, v in outputs.items()})
    return {"profile": msgspec.json.encode(profile), "profile_id": profile.id, "golden": arrays,
            "feeds": [feed for feed, _ in golden]}


def _fix_shapes_record(specs: list[TensorSpec], kept: list[str]) -> dict:
    """The first pass of every recipe, recorded like the others (converter/passes PassResult.report())."""
    from converter.passes import versions

    return {"name": "fix_shapes", "config": {"input_shapes": {s.name: list(s.shape) for s in specs}},
            "out_path": "fixed.onnx", "toolchain": versions(("onnx", "onnxruntime")),
            "notes": {"kept_dynamic": kept}}


def _output_specs(path: Path) -> list[TensorSpec]:
    """The outputs as the model declares them (after ONNX shape inference); -1 where a dim is not fixed."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(path))
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:
        pass  # declared shapes are enough; dims we cannot pin stay -1
    specs = []
    for value in model.graph.output:
        tt = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim]
        specs.append(TensorSpec(value.name, shape, np.dtype(tensor_dtype_to_np_dtype(tt.elem_type)).name))
    return specs


def _fix_shapes(model: Path, fixed: Path, specs: list[TensorSpec], shaped: list[TensorSpec]):
    """Write ``model`` with its inputs' dims fixed to ``specs``. A dim the DATA fixed (not the model, not
    --input-shape) that ONNX Runtime cannot load the graph with (e.g. shape inference failing in an ``If``
    branch the data never takes) stays dynamic. Returns (the specs written, what stayed dynamic and why)."""
    from converter.cpu import fix_shapes

    def loads(candidate: list[TensorSpec]) -> str | None:
        fix_shapes(model, fixed, candidate)
        try:
            _session(fixed.parent, fixed.name, "model with fixed input shapes").close()
            return None
        except ConvertError as e:
            return str(e).split(": ", 1)[-1]

    if (why := loads(specs)) is None:
        return specs, []
    current = [TensorSpec(s.name, list(s.shape), s.dtype) for s in shaped]
    kept = []
    for i, (spec, before) in enumerate(zip(specs, shaped)):
        for axis, (want, had) in enumerate(zip(spec.shape, before.shape)):
            if want == had:
                continue
            trial = [TensorSpec(s.name, list(s.shape), s.dtype) for s in current]
            trial[i].shape[axis] = want
            if (err := loads(trial)) is None:
                current = trial
            else:
                kept.append(f"input {spec.name!r} dimension {axis} stays dynamic (the data gives it {want}, but ONNX "
                            f"Runtime cannot load the graph with it fixed: {_first_line(Exception(err))[:160]})")
    if (err := loads(current)) is not None:
        raise ConvertError(f"ONNX Runtime cannot load the model with its input shapes fixed: {err or why}")
    return current, kept


def _outputs_from_reference(declared: list[TensorSpec], parts: list[dict[str, np.ndarray]], *,
                            dynamic_batch: bool) -> tuple[list[TensorSpec], list[str]]:
    """Each output's real shape, from the fp32 reference's runs (``parts``): a dim is fixed where every run
    gave it the same size, else -1 (as is axis 0 when stacked samples go along it). A declared shape that
    disagrees (rank, or a fixed size) is corrected, with a warning; the manifest carries the real shapes."""
    outputs, warnings = [], []
    for spec in declared:
        shapes = {tuple(np.shape(p[spec.name])) for p in parts if spec.name in p}
        ranks = {len(s) for s in shapes}
        if len(ranks) != 1:
            outputs.append(spec)  # no run, or runs of different ranks: keep what the model says
            continue
        rank = ranks.pop()
        real = [next(iter({s[a] for s in shapes})) if len({s[a] for s in shapes}) == 1 else -1 for a in range(rank)]
        if dynamic_batch and real:
            real[0] = -1
        wrong = len(spec.shape) != rank or any(d > 0 and d != r for d, r in zip(spec.shape, real))
        if wrong:
            warnings.append(f"output {spec.name!r}: the model declares shape {calibration._fmt(spec.shape)} but "
                            f"returns {calibration._fmt(real)} (seen: "
                            f"{', '.join(str(list(s)) for s in sorted(shapes)[:3])}); the manifest says "
                            f"{calibration._fmt(real)}")
        outputs.append(TensorSpec(spec.name, real, spec.dtype))
    return outputs, warnings


def _round_trip(bundle: Path, dest: Path, expected: dict[str, np.ndarray]) -> float:
    """Unpack the written bundle and run its sample the way a device does; returns the max abs diff."""
    from agent import runtimes

    manifest = safe_unpack(bundle, dest)
    with np.load(dest / manifest.sample, allow_pickle=False) as npz:
        feeds = {k: npz[k] for k in npz.files}
    session = runtimes.load(dest, manifest)
    try:
        got = session.run(feeds)
    finally:
        session.close()
    diff = 0.0
    for spec in manifest.outputs:
        value = np.asarray(got[spec.name])
        if len(value.shape) != len(spec.shape) or any(w not in (-1, h) for w, h in zip(spec.shape, value.shape)):
            raise ConvertError(f"bundle {bundle.name}: output {spec.name!r} has shape {list(value.shape)}, "
                               f"manifest says {spec.shape}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ConvertError(f"bundle {bundle.name}: output {spec.name!r} is not finite")
        diff = max(diff, float(np.abs(value.astype(np.float64) - expected[spec.name]).max(initial=0.0)))
    if diff > 1e-4:
        raise ConvertError(f"bundle {bundle.name} does not reproduce its measured outputs (max abs diff {diff:g})")
    return diff


def _staging_dir(out: Path) -> Path:
    """A temporary directory beside ``out`` (same filesystem, so the final moves are renames)."""
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    try:
        return Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".convert"))
    except OSError as e:
        raise ConvertError(f"cannot write beside {out}: {e.strerror or e}") from None


def _opset(model) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _spec_dict(spec: TensorSpec) -> dict:
    return {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}


def _first_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0]
