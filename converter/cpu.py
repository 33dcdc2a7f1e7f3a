"""Target ``cpu``: ONNX Runtime on any CPU. Its variants, each written by passes (``converter/passes/``:
ort_optimize, onnx_opset, ort_preprocess, ort_quantize, ort_dynamic, ort_mixed, ort_fp16; each variant's
recipe lists them under ``passes``):

- ``fp32``: the ONNX Runtime graph optimizations saved offline at ORT_ENABLE_EXTENDED (fusions into
  standard and com.microsoft CPU ops). ORT_ENABLE_ALL would also save the NCHWc layout, which ORT
  itself warns is specific to the CPU it was optimized on; the device applies that layer at load.
- ``int8``: static QDQ quantization with per-channel weights (onnxruntime.quantization), calibrated on
  the calibration split, after ``quant_pre_process``. The opset is raised to 13 where needed
  (per-channel QDQ needs axis on Quantize/DequantizeLinear). With a search, several recipes are measured
  (``int8_candidates``, ONNX Runtime's own defaults among them) and the fastest that passes the gate is kept.
- ``int8-dynamic``: weights-only int8 for MatMul/Gemm/LSTM-heavy models.
- ``int8-mixed`` (a fallback rung): the layers whose int8 costs the output the most, MEASURED one by one on
  calibration feeds (``ort_mixed``), kept in float.
- ``fp16`` (a fallback rung).

A quantized variant in which no op ended up quantized (ORT's quantizer does not enter If/Loop subgraphs)
carries ``recipe["warning"]``: it computes in float, exactly as fp32 does.

Every pass takes a model path and writes a NEW model to a new path (Olive style); onnx and
onnxruntime are imported inside the passes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agent.bundle import TensorSpec
from converter import ConvertError, passes
from converter.calib import Feeds, as_feeds
from converter.passes.ort_dynamic import present_ops
from converter.plan import Step, Variant

TARGET = "cpu"


def missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed: pip install 'edgefleet[converter]'"
    return None


RUNTIME = "onnxruntime"
QDQ_MIN_OPSET = 13
CALIB_METHODS = ("auto", "minmax", "entropy", "percentile")  # auto: each library's own default (ORT: minmax)
BATCH_PARAM = "batch"


def plan(source: Path, specs: list[TensorSpec], calib: Feeds, work: Path, *,
         calib_method: str = "auto", cpu_flags: frozenset[str] = frozenset(), search: bool = False) -> list[Step]:
    """The passes for this target, in order; the steps that produce a variant return it.

    ``search``: offer the int8 candidates of ``int8_candidates`` (ONNX Runtime's own defaults among them), else
    only this target's recipe for the host (``int8_recipe``)."""
    if calib_method not in CALIB_METHODS:
        raise ConvertError(f"unknown calibration method {calib_method!r} (choose from {', '.join(CALIB_METHODS)})")
    fixed = source  # the converter fixed the input shapes already
    batch = specs[0].shape[0] if specs[0].shape and specs[0].shape[0] > 0 else None  # a fixed batch dim, or None
    calib = as_feeds(calib)
    shapes = " ".join(f"{s.name}={'x'.join('N' if d < 0 else str(d) for d in s.shape)}" for s in specs)
    base = int8_recipe(cpu_flags, "minmax" if calib_method == "auto" else calib_method, samples=len(calib))
    candidates = int8_candidates(base, calib_method) if search else {None: base}
    prep = Prepared(fixed, work)

    def fp32() -> Variant:
        result = run_pass("ort_optimize", fixed, work / "fp32" / "model.onnx", level="extended")
        return Variant("fp32", "fp32", Path(result.out_path), RUNTIME,
                       {"graph_optimization": "ORT_ENABLE_EXTENDED", "input_shapes": shapes,
                        "passes": [result.report()]}, rung="fp32")

    made_int8: dict[str | None, Variant] = {}  # candidate -> its variant (the converter marks the one it kept)

    def int8(candidate: str | None) -> Callable[[], Variant]:
        def run() -> Variant:
            recipe = dict(candidates[candidate])
            out = work / ("int8" if candidate is None else f"int8@{candidate}") / "model.onnx"
            made = prep.quantized(recipe, out, calib, batch, "int8")
            if candidate is not None:
                made["candidate"] = candidate
            made_int8[candidate] = Variant("int8", "int8", out, RUNTIME, {**made, "input_shapes": shapes}, rung="int8")
            return made_int8[candidate]
        return run

    def int8_dynamic() -> Variant | None:
        prepared, before = prep.prepared()
        ops = present_ops(prepared)
        if not ops:
            return None  # nothing for dynamic quantization to do in this model
        result = run_pass("ort_dynamic", prepared, work / "int8-dynamic" / "model.onnx", op_types=ops)
        recipe = {"method": "dynamic", "weight_type": "QInt8", "op_types": ops, "input_shapes": shapes,
                  "passes": [*before, result.report()]}
        if "warning" in result.notes:
            recipe["warning"] = result.notes["warning"]
        return Variant("int8-dynamic", "int8", Path(result.out_path), RUNTIME, recipe)

    def int8_mixed() -> Variant:
        return mixed_variant("int8-mixed", prep, candidates, base, made_int8, work, calib, batch, shapes)

    def fp16() -> Variant:
        result = run_pass("ort_fp16", fixed, work / "fp16" / "model.onnx")
        return Variant("fp16", "fp16", Path(result.out_path), RUNTIME,
                       {"conversion": "float16, float32 inputs and outputs", "input_shapes": shapes,
                        "passes": [result.report()]}, rung="fp16")

    steps = [Step("optimizing fp32 graph (ONNX Runtime, extended level)", fp32, "fp32")]
    for name, recipe in candidates.items():
        steps.append(Step(f"quantizing int8 ({describe(recipe)})", int8(name), "int8", candidate=name))
    steps += [
        Step("quantizing int8-dynamic (weights only ahead of time, for MatMul/Gemm-heavy models)", int8_dynamic,
             "int8-dynamic"),
        Step("quantizing int8-mixed (the layers whose int8 costs the most output accuracy, measured on calibration "
             "feeds, kept in float)", int8_mixed, "int8-mixed", fallback=True, rung="int8-mixed"),
        Step("converting to fp16 (float32 inputs and outputs)", fp16, "fp16", fallback=True, rung="fp16"),
    ]
    return steps


def mixed_variant(name: str, prep: Prepared, candidates: dict, base: dict, made: dict, work: Path, calib: Feeds,
                  batch: int | None, shapes: str) -> Variant:
    """The int8-mixed rung ``name`` (cpu's int8-mixed, arm's ort-int8-mixed-arm): the layers to keep in float are
    measured (``ort_mixed``) on the int8 model of the recipe the int8 search kept (``made``: candidate -> variant,
    the converter marks the kept one; when the gate refused every candidate it kept the most faithful), else of
    ``base``. The recipe lists every layer in float: the kept recipe's and the measured ones."""
    start = next((c for c, v in made.items() if v.kept), None)
    out = work / name / "model.onnx"
    recipe = prep.quantized(dict(candidates.get(start, base)), work / f"{name}-qdq" / "model.onnx", calib, batch, name)
    if start is not None:
        recipe["started_from"] = start
    prepared, _ = prep.prepared()
    result = run_pass("ort_mixed", Path(recipe["passes"][-1]["out_path"]), out, float_model=prepared, calib=calib,
                      batch=batch)
    before = list(recipe.get("nodes_to_exclude") or [])
    in_float = before + [n for n in result.notes["kept_in_float"] if n not in before]
    mixed = {**recipe, "nodes_to_exclude": in_float, "kept_in_float": len(in_float),
             "chosen_by": f"measured layer-wise sensitivity ({result.notes['metric']} on {result.notes['measured_on']})",
             "sensitivity": {k: result.notes[k] for k in ("metric", "int8_error", "mixed_error", "layers", "cap")},
             "passes": [*recipe["passes"], result.report()], "input_shapes": shapes}
    mixed.pop("warning", None)
    return Variant(name, "mixed", out, RUNTIME, mixed, rung="int8-mixed")


def int8_recipe(flags: frozenset[str], calib_method: str, samples: int) -> dict:
    """U8S8 (uint8 activations, int8 weights), per-channel: the fast path of ORT's x86 and ARM int8 kernels.

    Without VNNI, x86's u8*s8 multiply-add can saturate: weights then use 7 bits (reduce_range).
    """
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    x86 = bool(flags & {"sse2", "avx", "avx2"})
    return {
        "method": "static",
        "format": "QDQ",
        "per_channel": True,
        "activation_type": "QUInt8",
        "weight_type": "QInt8",
        "reduce_range": x86 and not vnni,
        "calibrate_method": calib_method,
        "calibration_samples": samples,
        "chosen_for": "x86 with VNNI" if vnni else ("x86 without VNNI" if x86 else "non-x86"),
    }


def library_defaults(samples: int) -> dict:
    """ONNX Runtime's own ``quantize_static(model, out, reader)``: QDQ, per-tensor, S8S8, MinMax."""
    return {"method": "static", "format": "QDQ", "per_channel": False, "activation_type": "QInt8",
            "weight_type": "QInt8", "reduce_range": False, "calibrate_method": "minmax",
            "calibration_samples": samples, "chosen_for": "ONNX Runtime's defaults"}


def int8_candidates(base: dict, calib_method: str = "auto") -> dict[str, dict]:
    """The int8 recipes a search measures (see the README's search table for why these):

    - ``ort-defaults``: ONNX Runtime's own defaults, always offered;
    - ``per-channel``: this target's recipe for the host (``base``: per-channel weights, U8S8 on x86);
    - ``symmetric-activations``: per-channel, int8 activations with zero point 0 (ActivationSymmetric);
    - ``ends-in-float``: ``base`` with the first and the last Conv/Gemm/MatMul kept in float;
    - ``percentile``: ``base`` calibrated by 99.999th percentile instead of min/max (clips outliers);
    - ``mean-minmax``: ``base`` with each activation's range the mean of the calibration batches' min/max
      (ORT's CalibMovingAverage; NNCF's default way), not their extremes;
    - ``ends-in-float+mean-minmax``: both.

    The int8-mixed rung starts from the candidate the search kept (the most faithful when all were refused).

    A ``calib_method`` the user chose (not ``auto``) applies to every candidate but the library's defaults.
    """
    out = {"ort-defaults": library_defaults(base["calibration_samples"]), "per-channel": dict(base)}
    out["symmetric-activations"] = {**base, "activation_type": "QInt8", "activation_symmetric": True,
                                    "reduce_range": False}
    out["ends-in-float"] = {**base, "exclude_ends": True}
    if calib_method == "auto":
        out["percentile"] = {**base, "calibrate_method": "percentile"}
    if base["calibrate_method"] == "minmax":
        out["mean-minmax"] = {**base, "moving_average": True}
        # the two that helped most on the trained MobileNetV2 (top-5 97.5 % and 95 % vs 90 %), together
        out["ends-in-float+mean-minmax"] = {**base, "exclude_ends": True, "moving_average": True}
    return out


def describe(recipe: dict) -> str:
    act = {"QUInt8": "uint8", "QInt8": "int8"}[recipe["activation_type"]]
    parts = ["static QDQ", "per-channel" if recipe["per_channel"] else "per-tensor",
             f"{act}{' symmetric' if recipe.get('activation_symmetric') else ''} activations / int8 weights",
             f"{recipe['calibrate_method']} calibration on {recipe['calibration_samples']} samples"]
    if recipe.get("exclude_ends"):
        parts.append("first and last layers in float")
    if recipe.get("moving_average"):
        parts.append("activation ranges the mean of the batches' min/max")
    return ", ".join(parts)


class Prepared:
    """The opset upgrade and ``quant_pre_process`` passes, run once per target and shared by every int8 recipe."""

    def __init__(self, source: Path, work: Path):
        self.source, self.work = source, work
        self._done: tuple[Path, list[dict]] | None = None

    def prepared(self) -> tuple[Path, list[dict]]:
        """The prepared float model and the reports of the passes that made it."""
        if self._done is None:
            upgraded = run_pass("onnx_opset", self.source, self.work / "int8-opset.onnx", opset=QDQ_MIN_OPSET)
            pre = run_pass("ort_preprocess", Path(upgraded.out_path), self.work / "int8-pre.onnx")
            self._done = (Path(pre.out_path), [upgraded.report(), pre.report()])
        return self._done

    def quantized(self, recipe: dict, out: Path, calib: Feeds, batch: int | None, variant: str) -> dict:
        """Quantize the prepared model by ``recipe`` into ``out``; returns the recipe as the variant records it
        (its summary keys, ``passes``, and ``warning`` when no op ended up quantized)."""
        prepared, before = self.prepared()
        exclude = list(recipe.get("nodes_to_exclude") or [])
        if recipe.get("exclude_ends"):
            exclude += end_layers(prepared)
            recipe["nodes_to_exclude"] = exclude
        result = run_pass("ort_quantize", prepared, out, calib=calib, batch=batch, variant=variant,
                          per_channel=recipe["per_channel"], activation_type=recipe["activation_type"],
                          weight_type=recipe["weight_type"], reduce_range=recipe["reduce_range"],
                          calibrate_method=recipe["calibrate_method"],
                          activation_symmetric=recipe.get("activation_symmetric", False),
                          moving_average=recipe.get("moving_average", False), nodes_to_exclude=exclude)
        made = {**recipe, "opset_upgraded_from": before[0]["notes"]["upgraded_from"],
                "symbolic_shape_inference": before[1]["notes"]["symbolic_shape_inference"],
                "quantized_ops": result.notes["quantized_ops"], "passes": [*before, result.report()]}
        if "warning" in result.notes:
            made["warning"] = result.notes["warning"]
        return made


def end_layers(model_path: Path) -> list[str]:
    """The first and the last Conv/Gemm/MatMul of the graph (in its node order), by name."""
    import onnx

    named = [n.name for n in onnx.load(str(model_path)).graph.node
             if n.op_type in ("Conv", "Gemm", "MatMul") and n.name]
    return list(dict.fromkeys(named[:1] + named[-1:]))


def run_pass(name: str, src: Path, out: Path, /, **options):
    """Run the pass ``converter/passes/<name>.py``: config fields from ``options`` (the ones its Config has), the
    rest (calibration feeds, other models, ...) passed to ``run`` as they are."""
    import msgspec

    step = passes.load(name)
    fields = {f.name for f in msgspec.structs.fields(step.Config)}
    config = step.config(**{k: v for k, v in options.items() if k in fields})
    return step.run(Path(src), config, Path(out), **{k: v for k, v in options.items() if k not in fields})


# ---- passes: each reads one model and writes a new one -------------------------------------------


def fix_shapes(src: Path, dst: Path, specs: list[TensorSpec]) -> None:
    """Fix each input's dims to ``specs`` (the batch dim, -1, stays dynamic, named ``batch``).

    Set per input dim, not per dim_param: exported models often reuse one name (e.g. ``?``) for
    different dims. Stale intermediate shape hints are dropped; outputs keep only sane hints.
    """
    import onnx

    model = onnx.load(str(src))
    by_name = {s.name: s for s in specs}
    for value in model.graph.input:
        spec = by_name.get(value.name)
        if spec is None:
            continue
        for dim, want in zip(value.type.tensor_type.shape.dim, spec.shape):
            if want > 0:
                dim.Clear()
                dim.dim_value = want
            elif not dim.dim_param:
                dim.Clear()
                dim.dim_param = BATCH_PARAM
    for value in model.graph.output:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.Clear()
                if axis == 0:
                    dim.dim_param = BATCH_PARAM
    del model.graph.value_info[:]
    _save(model, dst)


def _save(model, dst: Path) -> None:
    import onnx

    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))


def _first_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0]
