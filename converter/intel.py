"""Target ``intel``: OpenVINO IR on Intel CPUs, int8 by NNCF. Every variant is a directory holding
``model.xml`` + ``model.bin``; the batch dim stays dynamic (-1) in the IR. Each step is a chain of passes
(converter/passes/: ``ov_convert``, ``ov_compress``, ``nncf_quantize``, ``nncf_accuracy``) and each variant's
recipe lists them (``recipe["passes"]``: name, config, toolchain versions, notes).

- ``ov-fp16``: ``openvino.convert_model`` of the ONNX, saved with fp16-compressed weights, run at f32.
- ``ov-fp16-bf16``: the same IR run at bf16 -- built only on CPUs with AMX-BF16/AVX512-BF16, where bf16 is
  OpenVINO's default: the report then shows what that default does to accuracy. Not on the fallback chain.
- ``ov-int8``: NNCF post-training quantization of the fp32 IR, calibrated one sample at a time, saved as NNCF's
  users save it (``ov.save_model``'s default: float constants left, e.g. of layers kept in float, in fp16). With the search
  on, a few recipes (CANDIDATES: NNCF's defaults always among them) are each quantized, measured and gated, and
  the converter keeps the fastest that passes; with it off, NNCF's defaults only.
- ``ov-int8-mixed`` (fallback rung ``int8-mixed``): NNCF quantization with accuracy control, validated in the
  gate's own metric (top-1/top-5 agreement, KL, SQNR) against the fp32 IR: the groups of layers whose
  quantization most disturbs the outputs go back to float until the drop is within the gate's. Saved with
  fp16-compressed float weights (never larger than ``ov-fp16``); its int8 layers still run in int8.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from agent.bundle import TensorSpec
from converter import ConvertError
from converter.calib import Feeds, as_feeds
from converter.passes import load as load_pass
from converter.passes import _openvino as ovh
from converter.plan import Step, Variant

TARGET = "intel"
RUNTIME = "openvino"
MODEL = "model.xml"
# With an explicit --calib-method: symmetric int8 weights, asymmetric activations. On the PP-OCR classifier
# (MobileNetV3: hard-swish outputs go negative) "performance" (symmetric activations) flipped 2 of 40 held-out
# top-1s and "mixed" none, at the same latency on a VNNI/AMX CPU.
PRESET = "mixed"
SUBSET = 300  # calibration samples at most (NNCF's default subset_size)
VALIDATION = 200  # samples the accuracy-controlled rung validates on, at most
# samples it ranks groups of layers on, at most: NNCF compiles the model once per group and runs these through it
# (80 groups on the PP-OCR classifier); the outputs' NMSE ranks them finely on few samples
RANKING = 50
MAX_ITERATIONS = 10  # groups of layers it may put back in float, at most
DEFAULT_MAX_DROP = 0.01
MARGIN = 0.5  # the accuracy-controlled rung aims at half the gate's allowed drop (it validates on other samples)
SQNR_MARGIN_DB = 3.0
DEFAULT_MIN_SQNR = 30.0  # dB, the gate's default for a dense output (converter/gate.py)
# --calib-method -> NNCF's activation range estimator (weights keep NNCF's min/max)
# auto: NNCF's own defaults (preset, target device, range estimators): on the trained MobileNetV2 its activation
# ranges halve the KL divergence from fp32 that plain min/max gives, at the same speed
RANGE_ESTIMATORS = {"auto": None, "minmax": "MINMAX", "percentile": "MEAN_QUANTILE", "entropy": "HISTOGRAM"}
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})

# The ov-int8 search (--search on, or a gate): name -> (nncf_quantize config beyond the defaults, what it changes
# vs NNCF's defaults). Chosen by measurement (40 held-out samples, KL of the softmax vs fp32; README):
# - trained MobileNetV2: defaults top-1 82.5 %, KL 0.062; mixed preset 77.5 %, 0.081; first/last layers in float
#   85 %, 0.056; full BiasCorrection identical to the defaults; MINMAX / MEAN_QUANTILE activation ranges 67.5 % /
#   72.5 %, KL 0.11 / 0.51;
# - PP-OCR classifier: defaults KL 0.046; mixed preset 0.0022; ends in float 0.0057; mixed + ends 0.0078; full
#   BiasCorrection 0.046.
# So: NNCF's defaults (always), the mixed preset, the ends in float; BiasCorrection and the range estimators
# never won and cost a quantization each (MEAN_QUANTILE 3-9x the time of the defaults).
CANDIDATES: dict[str, tuple[dict, str]] = {
    "nncf-defaults": ({}, "nothing: nncf.quantize(model, dataset, subset_size=N)"),
    "mixed-preset": ({"preset": "mixed"}, "asymmetric activations (preset mixed; NNCF's default, performance, "
                     "makes them symmetric)"),
    "ends-in-float": ({"ignored": "ends"}, "the first and last Convolution/MatMul stay in float (ignored_scope)"),
}


def missing() -> str | None:
    return ovh.missing()


def plan(source: Path, specs: list[TensorSpec], calib: Feeds, work: Path, *,
         calib_method: str = "auto", cpu_flags: frozenset[str] = frozenset(),
         max_accuracy_drop: float | None = None, search: bool = False, gate=None) -> list[Step]:
    """The passes for this target, in order; the steps that produce a variant return it. ``gate`` (a
    converter.gate.Rule, when the converter has one) sets the accuracy-controlled rung's metric and threshold."""
    if calib_method not in RANGE_ESTIMATORS:
        raise ConvertError(f"unknown calibration method {calib_method!r} (choose from {', '.join(RANGE_ESTIMATORS)})")
    max_drop = DEFAULT_MAX_DROP if max_accuracy_drop is None else float(max_accuracy_drop)
    calib = as_feeds(calib)
    samples = len(calib)
    subset = min(SUBSET, samples)
    shapes = " ".join(f"{s.name}={'x'.join('N' if d < 0 else str(d) for d in s.shape)}" for s in specs)
    fp32_ir = work / "ir-fp32" / MODEL
    base = {"input_shapes": shapes}
    done: dict[str, dict] = {}

    def ir() -> dict:
        """The ov_convert pass (run once; every variant starts from its fp32 IR)."""
        if "ir" not in done:
            step = load_pass("ov_convert")
            done["ir"] = step.run(source, step.config(), fp32_ir).report()
        return done["ir"]

    def compressed(name: str, fp16: bool) -> tuple[Path, list[dict]]:
        first = ir()
        step = load_pass("ov_compress")
        out = work / name / MODEL
        return out, [first, step.run(fp32_ir, step.config(compress_to_fp16=fp16), out).report()]

    def fp16() -> Variant:
        out, passes = compressed("ov-fp16", True)
        return Variant("ov-fp16", "fp16", out, RUNTIME, {**base, **_fp16_recipe("f32"), "passes": passes},
                       {"inference_precision": "f32"}, rung="fp16")

    def fp16_bf16() -> Variant:
        out, passes = compressed("ov-fp16-bf16", True)  # its own copy of the files, like every variant
        return Variant("ov-fp16-bf16", "bf16", out, RUNTIME, {**base, **_fp16_recipe("bf16"), "passes": passes},
                       {"inference_precision": "bf16"}, rung=None)

    def fp32() -> Variant:
        out, passes = compressed("ov-fp32", False)
        return Variant("ov-fp32", "fp32", out, RUNTIME,
                       {**base, **_fp16_recipe("f32"), "weights": "fp32", "passes": passes},
                       {"inference_precision": "f32"}, rung="fp32")

    def int8(candidate: str, options: dict, changes: str):
        def run() -> Variant:
            first = ir()
            step = load_pass("nncf_quantize")
            out = work / (f"ov-int8@{candidate}" if search else "ov-int8") / MODEL
            config = step.config(subset_size=SUBSET, compress_to_fp16=True, **options)
            result = step.run(fp32_ir, config, out, calib=calib).report()
            recipe = {**base, **_int8_recipe(result, candidate if search else None, changes),
                      "passes": [first, result]}
            return Variant("ov-int8", "int8", out, RUNTIME, recipe, {"inference_precision": "f32"}, rung="int8")
        return run

    def int8_mixed() -> Variant:
        first = ir()
        step = load_pass("nncf_accuracy")
        out = work / "ov-int8-mixed" / MODEL
        config = step.config(**_accuracy_options(gate, max_drop), **_method_options(calib_method),
                             subset_size=SUBSET, validation_samples=VALIDATION, ranking_subset_size=RANKING,
                             max_num_iterations=MAX_ITERATIONS, compress_to_fp16=True)
        result = step.run(fp32_ir, config, out, calib=calib).report()
        notes = result["notes"]
        recipe = {**base, **_int8_recipe(result, None, None), "weights": "int8, float layers fp16 (compress_to_fp16)",
                  "accuracy_control": {k: notes[k] for k in (
                      "metric", "drop_type", "max_drop", "validation_samples", "ranking_subset_size", "ranking",
                      "validation_value", "quantized_operations", "outcome", "executed_precisions")}
                  | {"max_num_iterations": MAX_ITERATIONS},
                  "reverted_to_float": notes["reverted_to_float"], "passes": [first, result]}
        return Variant("ov-int8-mixed", "mixed", out, RUNTIME, recipe, {"inference_precision": "f32"},
                       rung="int8-mixed")

    steps = [Step("converting to OpenVINO IR (openvino.convert_model), fp16 weights, run at f32", fp16, "ov-fp16")]
    if cpu_flags & BF16_FLAGS:
        steps.append(Step("the same fp16 IR run at bf16 (OpenVINO's default on this CPU: "
                          f"{', '.join(sorted(cpu_flags & BF16_FLAGS))})", fp16_bf16, "ov-fp16-bf16"))
    if calib_method == "auto":
        own = [("nncf-defaults", *CANDIDATES["nncf-defaults"])]
        extra = [(k, *v) for k, v in CANDIDATES.items() if k != "nncf-defaults"]
    else:  # the user's method is the recipe; NNCF's defaults stay a candidate when searching
        own = [(f"{calib_method}-ranges", _method_options(calib_method),
                f"preset {PRESET}, target device CPU, activation ranges {RANGE_ESTIMATORS[calib_method]}")]
        extra = [("nncf-defaults", *CANDIDATES["nncf-defaults"])]
    chosen = own + extra if search else own
    for name, options, changes in chosen:
        what = "NNCF's defaults" if name == "nncf-defaults" else changes
        steps.append(Step(f"quantizing int8 (NNCF post-training, {what}, on {subset} samples)",
                          int8(name, options, changes), "ov-int8", candidate=name if search else None))
    steps.append(Step("quantizing int8 with accuracy control (NNCF: the groups of layers that most disturb the "
                      "outputs go back to float until the gate's metric is met)", int8_mixed, "ov-int8-mixed",
                      fallback=True, rung="int8-mixed"))
    steps.append(Step("saving the IR with fp32 weights (the last rung of the fallback chain)", fp32, "ov-fp32",
                      fallback=True, rung="fp32"))
    return steps


def _method_options(calib_method: str) -> dict:
    """nncf_quantize/nncf_accuracy config fields for an explicit --calib-method (none for auto)."""
    if calib_method == "auto":
        return {}
    return {"preset": PRESET, "target_device": "CPU", "activations_range": RANGE_ESTIMATORS[calib_method]}


def _accuracy_options(rule, max_drop: float) -> dict:
    """The accuracy-controlled rung's metric, from the converter's gate rule where NNCF can compute it without
    labels (task accuracy falls back to top-1 agreement), else by the output's kind. NNCF validates on the
    calibration split and the gate judges the held-out samples, which may be harder: NNCF aims at MARGIN of the
    gate's allowance (and SQNR_MARGIN_DB above its SQNR floor)."""
    if rule is None or getattr(rule, "threshold", None) is None:
        return {"metric": "auto", "max_drop": max_drop * MARGIN, "min_sqnr": DEFAULT_MIN_SQNR + SQNR_MARGIN_DB}
    options = {"output": rule.output}
    if rule.metric in ("top1", "top5", "kl"):
        return {**options, "metric": rule.metric, "max_drop": rule.threshold * MARGIN}
    if rule.metric == "sqnr":
        return {**options, "metric": "sqnr", "min_sqnr": rule.threshold + SQNR_MARGIN_DB}
    return {**options, "metric": "top1", "max_drop": rule.threshold * MARGIN}  # accuracy: labels stay with the gate


def _fp16_recipe(precision: str) -> dict:
    return {"toolchain": toolchain(), "converter": "openvino.convert_model", "weights": "fp16 (compress_to_fp16)",
            "inference_precision": precision}


def _int8_recipe(result: dict, candidate: str | None, changes: str | None) -> dict:
    config, notes = result["config"], result["notes"]
    recipe = {"toolchain": toolchain(), "method": "NNCF post-training quantization",
              "preset": "NNCF default" if config["preset"] == "default" else config["preset"],
              "target_device": "NNCF default" if config["target_device"] == "default" else config["target_device"],
              "activation_range_estimator": "NNCF default" if config["activations_range"] == "default"
              else config["activations_range"],
              "weight_range_estimator": "NNCF default" if config["weights_range"] == "default"
              else config["weights_range"],
              "subset_size": notes["subset_size"], "calibration_samples": notes["calibration_samples"],
              "calibration_batch": 1, "fast_bias_correction": config["fast_bias_correction"],
              "changed_from_nncf_defaults": notes["changed_from_nncf_defaults"], "inference_precision": "f32",
              "fake_quantize_nodes": notes["fake_quantize_nodes"],
              "int8_weight_constants": notes["int8_weight_constants"]}
    if candidate is not None:
        recipe["candidate"] = candidate
        recipe["changes"] = changes
    return recipe


# ---- helpers ---------------------------------------------------------------------------------------


def toolchain() -> dict:
    import openvino as ov

    versions = {"openvino": ov.get_version().split("-")[0]}
    if importlib.util.find_spec("nncf") is not None:
        import nncf

        versions["nncf"] = nncf.__version__
    return versions
