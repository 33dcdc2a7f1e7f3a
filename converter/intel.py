"""Target ``intel``: OpenVINO IR on Intel CPUs, int8 by NNCF. Every variant is a directory holding
``model.xml`` + ``model.bin``; the batch dim stays dynamic (-1) in the IR.

- ``ov-fp16``: ``openvino.convert_model`` of the ONNX, saved with fp16-compressed weights, run at f32.
- ``ov-fp16-bf16``: the same IR run at bf16 -- built only on CPUs with AMX-BF16/AVX512-BF16, where bf16 is
  OpenVINO's default: the report then shows what that default does to accuracy. Not on the fallback chain.
- ``ov-int8``: NNCF post-training quantization (FakeQuantize, int8 weights; ``mixed`` preset) of the fp32 IR,
  calibrated on the calibration split one sample at a time.
- ``ov-int8-mixed`` (fallback rung ``int8-mixed``): NNCF quantization with accuracy control: layers are
  put back in float until top-1 agreement with the fp32 IR (classifiers; else mean cosine similarity)
  on the calibration split drops by at most ``max_accuracy_drop``.

Every pass reads a model and writes a new one (Olive style); openvino and nncf are imported inside them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import re
import shutil
from pathlib import Path

import numpy as np

from agent.bundle import TensorSpec
from converter import ConvertError
from converter.calib import Feeds, as_feeds
from converter.plan import Step, Variant

TARGET = "intel"
RUNTIME = "openvino"
MODEL = "model.xml"
# Symmetric int8 weights, asymmetric activations. On the PP-OCR classifier (MobileNetV3: hard-swish outputs go
# negative) "performance" (symmetric activations) flipped 2 of 40 held-out top-1s and "mixed" none, at the same
# latency on a VNNI/AMX CPU.
PRESET = "mixed"
SUBSET = 300  # calibration samples at most
VALIDATION = 200  # samples the accuracy-controlled rung validates on, at most
RANKING = 100  # samples it ranks layers on, at most
MAX_ITERATIONS = 10  # groups of layers it may put back in float, at most
DEFAULT_MAX_DROP = 0.01
# --calib-method -> NNCF's activation range estimator (weights always use min/max)
# auto: NNCF's own defaults (preset, target device, range estimators): on the trained MobileNetV2 its activation
# ranges halve the KL divergence from fp32 that plain min/max gives, at the same speed
RANGE_ESTIMATORS = {"auto": None, "minmax": "MINMAX", "percentile": "MEAN_QUANTILE", "entropy": "HISTOGRAM"}
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def missing() -> str | None:
    if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None:
        return "openvino/nncf is not installed: pip install 'edgefleet[intel]'"
    return None


def plan(source: Path, specs: list[TensorSpec], calib: Feeds, work: Path, *,
         calib_method: str = "auto", cpu_flags: frozenset[str] = frozenset(),
         max_accuracy_drop: float | None = None) -> list[Step]:
    """The passes for this target, in order; the steps that produce a variant return it."""
    if calib_method not in RANGE_ESTIMATORS:
        raise ConvertError(f"unknown calibration method {calib_method!r} (choose from {', '.join(RANGE_ESTIMATORS)})")
    max_drop = DEFAULT_MAX_DROP if max_accuracy_drop is None else float(max_accuracy_drop)
    calib = as_feeds(calib)
    samples = len(calib)
    shapes = " ".join(f"{s.name}={'x'.join('N' if d < 0 else str(d) for d in s.shape)}" for s in specs)
    fp32_ir = work / "ir-fp32" / MODEL
    base = {"input_shapes": shapes}

    def ir() -> Path:
        if not fp32_ir.exists():
            to_ir(source, fp32_ir)
        return fp32_ir

    def fp16() -> Variant:
        out = work / "ov-fp16" / MODEL
        save_ir(ir(), out, compress_to_fp16=True)
        return Variant("ov-fp16", "fp16", out, RUNTIME, {**base, **_fp16_recipe("f32")},
                       {"inference_precision": "f32"}, rung="fp16")

    def fp16_bf16() -> Variant:
        out = work / "ov-fp16-bf16" / MODEL
        save_ir(ir(), out, compress_to_fp16=True)  # its own copy of the files, like every variant
        return Variant("ov-fp16-bf16", "bf16", out, RUNTIME, {**base, **_fp16_recipe("bf16")},
                       {"inference_precision": "bf16"}, rung=None)

    def int8() -> Variant:
        out = work / "ov-int8" / MODEL
        recipe = quantize(ir(), out, calib, calib_method)
        return Variant("ov-int8", "int8", out, RUNTIME, {**base, **recipe}, {"inference_precision": "f32"},
                       rung="int8")

    def int8_mixed() -> Variant:
        out = work / "ov-int8-mixed" / MODEL
        recipe = quantize_with_accuracy_control(ir(), out, calib, calib_method, max_drop)
        return Variant("ov-int8-mixed", "mixed", out, RUNTIME, {**base, **recipe}, {"inference_precision": "f32"},
                       rung="int8-mixed")

    def fp32() -> Variant:
        out = work / "ov-fp32" / MODEL
        save_ir(ir(), out, compress_to_fp16=False)
        return Variant("ov-fp32", "fp32", out, RUNTIME, {**base, **_fp16_recipe("f32"), "weights": "fp32"},
                       {"inference_precision": "f32"}, rung="fp32")

    subset = min(SUBSET, samples)
    steps = [Step("converting to OpenVINO IR (openvino.convert_model), fp16 weights, run at f32", fp16, "ov-fp16")]
    if cpu_flags & BF16_FLAGS:
        steps.append(Step("the same fp16 IR run at bf16 (OpenVINO's default on this CPU: "
                          f"{', '.join(sorted(cpu_flags & BF16_FLAGS))})", fp16_bf16, "ov-fp16-bf16"))
    how = "NNCF's defaults" if calib_method == "auto" else f"{PRESET} preset, {calib_method} ranges"
    steps.append(Step(f"quantizing int8 (NNCF post-training, {how}, on {subset} samples)", int8, "ov-int8"))
    steps.append(Step(f"quantizing int8 with accuracy control (NNCF, layers back in float until the drop is at most "
                      f"{max_drop:.2%})", int8_mixed, "ov-int8-mixed", fallback=True, rung="int8-mixed"))
    steps.append(Step("saving the IR with fp32 weights (the last rung of the fallback chain)", fp32, "ov-fp32",
                      fallback=True, rung="fp32"))
    return steps


def _fp16_recipe(precision: str) -> dict:
    return {"toolchain": toolchain(), "converter": "openvino.convert_model", "weights": "fp16 (compress_to_fp16)",
            "inference_precision": precision}


# ---- passes: each reads one model and writes a new one -------------------------------------------


def to_ir(src: Path, dst: Path) -> None:
    """ONNX -> OpenVINO IR with fp32 weights (the input of every other pass)."""
    import openvino as ov

    try:
        model = ov.convert_model(str(src))
    except Exception as e:
        raise ConvertError(f"openvino cannot convert the model: {_conversion_failure(e)}") from None
    _save(model, dst, compress_to_fp16=False)


def save_ir(src: Path, dst: Path, *, compress_to_fp16: bool) -> None:
    import openvino as ov

    _save(ov.Core().read_model(str(src)), dst, compress_to_fp16=compress_to_fp16)


def quantize(src: Path, dst: Path, calib: Feeds, calib_method: str) -> dict:
    """NNCF post-training int8 quantization of the IR at ``src``; returns its recipe."""
    import nncf
    import openvino as ov

    calib = as_feeds(calib)
    n = len(calib)
    subset = min(SUBSET, n)
    with _quiet():
        try:
            model = nncf.quantize(ov.Core().read_model(str(src)), _dataset(calib, range(n)),
                                  **_options(calib_method, "advanced_parameters"),
                                  subset_size=subset)
        except Exception as e:
            raise ConvertError(f"int8 quantization (NNCF) failed: {type(e).__name__}: {_first_line(e)}") from None
    _save(model, dst, compress_to_fp16=False)
    return {**_int8_recipe(calib_method, subset, n), **ir_stats(dst)}


def quantize_with_accuracy_control(src: Path, dst: Path, calib: Feeds, calib_method: str,
                                   max_drop: float) -> dict:
    """NNCF int8 with accuracy control: layers go back to float until the metric (agreement with the fp32 IR
    on the calibration split) drops by at most ``max_drop``; returns its recipe."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    calib = as_feeds(calib)
    n = len(calib)
    subset = min(SUBSET, n)
    val = list(range(min(VALIDATION, n)))
    core = ov.Core()
    reference = _infer(core.compile_model(core.read_model(str(src)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}),
                       calib, val)
    metric, validate, per_item = _validation_fn(calib, reference)
    with _quiet():
        try:
            model = nncf.quantize_with_accuracy_control(
                core.read_model(str(src)), _dataset(calib, range(n)), _dataset(calib, val), validate,
                max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=subset,
                **_options(calib_method, "advanced_quantization_parameters"),
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    max_num_iterations=MAX_ITERATIONS, ranking_subset_size=min(RANKING, len(val))),
            )
        except Exception as e:
            raise ConvertError(f"int8 quantization with accuracy control (NNCF) failed: {type(e).__name__}: "
                               f"{_first_line(e)}") from None
    _save(model, dst, compress_to_fp16=False)
    got = _infer(core.compile_model(core.read_model(str(dst)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), calib, val)
    return {**_int8_recipe(calib_method, subset, n), "accuracy_control": {
        "metric": metric, "drop_type": "absolute", "max_drop": max_drop, "validation_samples": len(val),
        "ranking_subset_size": min(RANKING, len(val)), "max_num_iterations": MAX_ITERATIONS,
        "validation_value": round(float(np.mean(per_item(got))), 6)}, **ir_stats(dst)}


def ir_stats(xml: Path) -> dict:
    """How much of the IR is int8: FakeQuantize/FakeConvert nodes and int8 weight constants."""
    import openvino as ov

    ops = [op for op in ov.Core().read_model(str(xml)).get_ops()]
    kinds = [op.get_type_name() for op in ops]
    int8_consts = sum(1 for op in ops if op.get_type_name() == "Constant"
                      and op.get_output_element_type(0).get_type_name() in ("i8", "u8"))
    return {"fake_quantize_nodes": kinds.count("FakeQuantize") + kinds.count("FakeConvert"),
            "int8_weight_constants": int8_consts}


# ---- helpers ---------------------------------------------------------------------------------------


def toolchain() -> dict:
    import openvino as ov

    versions = {"openvino": ov.get_version().split("-")[0]}
    if importlib.util.find_spec("nncf") is not None:
        import nncf

        versions["nncf"] = nncf.__version__
    return versions


def _int8_recipe(calib_method: str, subset: int, samples: int) -> dict:
    auto = calib_method == "auto"
    return {"toolchain": toolchain(), "method": "NNCF post-training quantization",
            "preset": "NNCF default" if auto else PRESET, "target_device": "NNCF default" if auto else "CPU",
            "calibrate_method": calib_method,
            "activation_range_estimator": "NNCF default" if auto else RANGE_ESTIMATORS[calib_method],
            "weight_range_estimator": "NNCF default" if auto else "MINMAX",
            "subset_size": subset, "calibration_samples": samples, "calibration_batch": 1,
            "fast_bias_correction": True, "inference_precision": "f32"}


def _options(calib_method: str, advanced: str) -> dict:
    """Keywords shared by nncf.quantize and quantize_with_accuracy_control (``advanced`` names the
    keyword each takes its AdvancedQuantizationParameters by)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    if calib_method == "auto":
        return {}
    estimator = getattr(RangeEstimatorParametersSet, RANGE_ESTIMATORS[calib_method])
    return {"preset": nncf.QuantizationPreset(PRESET), "target_device": nncf.TargetDevice.CPU,
            advanced: AdvancedQuantizationParameters(activations_range_estimator_params=estimator)}


def _dataset(calib: Feeds, indices):
    """Items are feed indices; each becomes its feed (NNCF calibrates one feed, a batch-1 sample, at a time)."""
    import nncf

    return nncf.Dataset(list(indices), lambda i: calib[i])


def _infer(compiled, calib: Feeds, indices) -> list[list[np.ndarray]]:
    """Per feed, every output of ``compiled`` (a compiled model), in output order."""
    outs = []
    for i in indices:
        result = compiled(calib[i])
        outs.append([np.asarray(result[j]).copy() for j in range(len(compiled.outputs))])
    return outs


def _validation_fn(calib: Feeds, reference: list[list[np.ndarray]]):
    """(metric name, NNCF's validation_fn(compiled model, sample indices) -> (metric, per-sample values),
    per_item(outputs) -> per-sample values).

    Top-1 agreement with the fp32 IR on the first classifier output ([N, C], C > 1), else the worst
    output's cosine similarity. Higher is better, as NNCF expects."""
    first = reference[0]
    classifier = next((j for j, out in enumerate(first) if out.ndim == 2 and out.shape[1] > 1), None)
    metric = "top-1 agreement" if classifier is not None else "mean cosine similarity"

    def per_item(outs: list[list[np.ndarray]], indices=None) -> list[float]:
        values = []
        for i, got in zip(range(len(reference)) if indices is None else indices, outs):
            ref = reference[i]
            if classifier is not None:
                values.append(float(ref[classifier].argmax(1)[0] == got[classifier].argmax(1)[0]))
            else:
                values.append(min(_cosine(r, g) for r, g in zip(ref, got)))
        return values

    def validate(compiled, items) -> tuple[float, list[float]]:
        indices = list(items)
        values = per_item(_infer(compiled, calib, indices), indices)
        return float(np.mean(values)) if values else 0.0, values

    return metric, validate, per_item


def _cosine(r: np.ndarray, g: np.ndarray) -> float:
    r, g = r.ravel().astype(np.float64), g.ravel().astype(np.float64)
    nr, ng = np.linalg.norm(r), np.linalg.norm(g)
    if nr == 0 and ng == 0:
        return 1.0
    if nr == 0 or ng == 0:
        return 0.0
    return float(np.clip(r @ g / (nr * ng), -1.0, 1.0))


@contextlib.contextmanager
def _quiet():
    """NNCF logs at INFO and draws rich progress bars on stdout: keep stdout for the report (--json)."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _save(model, dst: Path, *, compress_to_fp16: bool) -> None:
    import openvino as ov

    if dst.parent.exists():
        shutil.rmtree(dst.parent)
    dst.parent.mkdir(parents=True)
    ov.save_model(model, str(dst), compress_to_fp16=compress_to_fp16)


def _conversion_failure(e: BaseException) -> str:
    """The ops OpenVINO's frontend could not convert and the first reason it gives (its first line is only
    the check that failed), else the first line."""
    text = str(e)
    ops = re.findall(r"^-- (\S+) with a message", text, re.M)
    if not ops:
        return _first_line(e)
    block = text.split(f"-- {ops[0]} with a message", 1)[1]
    lines = [ln.strip() for ln in block.split("\n\n", 1)[0].splitlines() if ln.strip()]
    return f"{len(ops)} op(s) failed ({', '.join(ops[:4])}{', ...' if len(ops) > 4 else ''}): {lines[-1]}"


def _first_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0]
