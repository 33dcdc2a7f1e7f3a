"""Target ``cpu``: ONNX Runtime on any CPU. Two variants, each written by its own passes:

- ``fp32``: the ONNX Runtime graph optimizations saved offline at ORT_ENABLE_EXTENDED (fusions into
  standard and com.microsoft CPU ops). ORT_ENABLE_ALL would also save the NCHWc layout, which ORT
  itself warns is specific to the CPU it was optimized on; the device applies that layer at load.
- ``int8``: static QDQ quantization with per-channel weights (onnxruntime.quantization), calibrated on
  the calibration split, after ``quant_pre_process``. The opset is raised to 13 where needed
  (per-channel QDQ needs axis on Quantize/DequantizeLinear).

Every pass takes a model path and writes a NEW model to a new path (Olive style); onnx and
onnxruntime are imported inside the passes.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from agent.bundle import TensorSpec
from converter import ConvertError
from converter.calib import Feeds, as_feeds
from converter.plan import Step, Variant

TARGET = "cpu"


def missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed: pip install 'edgefleet[converter]'"
    return None
RUNTIME = "onnxruntime"
QDQ_MIN_OPSET = 13
CALIB_BATCH = 8
CALIB_METHODS = ("auto", "minmax", "entropy", "percentile")  # auto: each library's own default (ORT: minmax)
BATCH_PARAM = "batch"


def plan(source: Path, specs: list[TensorSpec], calib: Feeds, work: Path, *,
         calib_method: str = "auto", cpu_flags: frozenset[str] = frozenset()) -> list[Step]:
    """The passes for this target, in order; the steps that produce a variant return it."""
    if calib_method not in CALIB_METHODS:
        raise ConvertError(f"unknown calibration method {calib_method!r} (choose from {', '.join(CALIB_METHODS)})")
    calib_method = "minmax" if calib_method == "auto" else calib_method  # ONNX Runtime's default
    fixed = source  # the converter fixed the input shapes already
    batch = specs[0].shape[0] if specs[0].shape and specs[0].shape[0] > 0 else None  # a fixed batch dim, or None
    calib = as_feeds(calib)
    recipe = int8_recipe(cpu_flags, calib_method, samples=len(calib))
    shapes = " ".join(f"{s.name}={'x'.join('N' if d < 0 else str(d) for d in s.shape)}" for s in specs)

    def fp32() -> Variant:
        out = work / "fp32" / "model.onnx"
        optimize(fixed, out, level="extended")
        return Variant("fp32", "fp32", out, RUNTIME, {"graph_optimization": "ORT_ENABLE_EXTENDED",
                                                      "input_shapes": shapes}, rung="fp32")

    def int8() -> Variant:
        upgraded = work / "int8-opset.onnx"
        prepared = work / "int8-pre.onnx"
        out = work / "int8" / "model.onnx"
        recipe["opset_upgraded_from"] = upgrade_opset(fixed, upgraded, QDQ_MIN_OPSET)
        recipe["symbolic_shape_inference"] = pre_process(upgraded, prepared)
        quantize(prepared, out, calib, recipe, batch=batch)
        return Variant("int8", "int8", out, RUNTIME, {**recipe, "input_shapes": shapes}, rung="int8")

    def int8_dynamic() -> Variant | None:
        prepared = work / "int8-pre.onnx"
        if not prepared.exists():
            pre_process(fixed, prepared)
        ops = dynamic_ops(prepared)
        if not ops:
            return None  # nothing for dynamic quantization to do in this model
        out = work / "int8-dynamic" / "model.onnx"
        quantize_dynamic_weights(prepared, out, ops)
        return Variant("int8-dynamic", "int8", out, RUNTIME,
                       {"method": "dynamic", "weight_type": "QInt8", "op_types": ops, "input_shapes": shapes})

    def int8_mixed() -> Variant:
        prepared = work / "int8-pre.onnx"
        if not prepared.exists():
            int8()
        excluded = sensitive_nodes(prepared)
        out = work / "int8-mixed" / "model.onnx"
        mixed = {**recipe, "nodes_to_exclude": excluded, "kept_in_float": len(excluded)}
        quantize(prepared, out, calib, mixed, batch=batch)
        return Variant("int8-mixed", "mixed", out, RUNTIME, {**mixed, "input_shapes": shapes}, rung="int8-mixed")

    def fp16() -> Variant:
        out = work / "fp16" / "model.onnx"
        to_fp16(fixed, out)
        return Variant("fp16", "fp16", out, RUNTIME, {"conversion": "float16, float32 inputs and outputs",
                                                      "input_shapes": shapes}, rung="fp16")

    act = "uint8" if recipe["activation_type"] == "QUInt8" else "int8"
    return [
        Step("optimizing fp32 graph (ONNX Runtime, extended level)", fp32, "fp32"),
        Step(f"quantizing int8 (static QDQ, per-channel, {act} activations / int8 weights, {calib_method} "
             f"calibration on {recipe['calibration_samples']} samples)", int8, "int8"),
        Step("quantizing int8-dynamic (weights only ahead of time, for MatMul/Gemm-heavy models)", int8_dynamic,
             "int8-dynamic"),
        Step("quantizing int8-mixed (the most sensitive nodes kept in float)", int8_mixed, "int8-mixed",
             fallback=True, rung="int8-mixed"),
        Step("converting to fp16 (float32 inputs and outputs)", fp16, "fp16", fallback=True, rung="fp16"),
    ]


def int8_recipe(flags: frozenset[str], calib_method: str, samples: int) -> dict:
    """U8S8 (uint8 activations, int8 weights): the fast path of ORT's x86 and ARM int8 kernels.

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


def optimize(src: Path, dst: Path, level: str = "extended") -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    dst.parent.mkdir(parents=True, exist_ok=True)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


def upgrade_opset(src: Path, dst: Path, opset: int) -> int | None:
    """Write the model at ``opset`` if it is older; returns the old opset, or None if unchanged."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(src))
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current >= opset:
        _save(model, dst)
        return None
    try:
        model = version_converter.convert_version(model, opset)
        onnx.checker.check_model(model)
    except Exception as e:
        raise ConvertError(f"cannot upgrade the model from opset {current} to {opset} for per-channel "
                           f"int8: {_first_line(e)}") from None
    _save(model, dst)
    return current


def pre_process(src: Path, dst: Path) -> bool:
    """``quant_pre_process``; returns whether symbolic shape inference could be used.

    ORT's symbolic shape inference asserts on some graphs (the PP-OCR classifier's shape-computing
    Concat); ONNX shape inference alone is enough once the input shapes are fixed.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # when symbolic inference gives up, ORT saves sym_shape_infer_temp.onnx in the working directory:
    # let that be the staging directory, never the user's
    dst.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(dst.parent):
        try:
            quant_pre_process(str(src.resolve()), str(dst.resolve()))
            return True
        except Exception:
            dst.unlink(missing_ok=True)
        quant_pre_process(str(src.resolve()), str(dst.resolve()), skip_symbolic_shape=True)
    return False


def quantize(src: Path, dst: Path, calib: Feeds, recipe: dict, batch: int | None = None) -> None:
    """Static QDQ quantization per ``recipe``, calibrated on the feeds, stacked ones in batches (of the model's
    fixed batch, if any)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            feeds = as_feeds(calib)
            # equal batches: the histogram calibrators stack them
            self._batches = feeds.batches(batch or min(CALIB_BATCH, len(feeds)), whole=True)

        def get_next(self):
            return next(self._batches, None)

    dst.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs advice at WARNING on the root logger
    try:
        # ... and its histogram calibrators print() progress: keep stdout for the report (--json).
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(src), str(dst), Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=recipe["per_channel"],
                reduce_range=recipe["reduce_range"],
                activation_type=getattr(QuantType, recipe["activation_type"]),
                weight_type=getattr(QuantType, recipe["weight_type"]),
                calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                  "percentile": CalibrationMethod.Percentile}[recipe["calibrate_method"]],
                nodes_to_exclude=recipe.get("nodes_to_exclude") or [],
            )
    except Exception as e:
        raise ConvertError(f"int8 quantization failed: {type(e).__name__}: {_first_line(e)}") from None
    finally:
        logging.getLogger().setLevel(quiet)


DYNAMIC_OPS = ("MatMul", "Gemm", "Attention", "LSTM", "GRU")


def dynamic_ops(src: Path) -> list[str]:
    """The op types dynamic quantization helps with that this model has (Conv gets slower: not listed)."""
    import onnx

    present = {n.op_type for n in onnx.load(str(src)).graph.node}
    return [op for op in DYNAMIC_OPS if op in present]


def quantize_dynamic_weights(src: Path, dst: Path, ops: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=ops)
    except Exception as e:
        raise ConvertError(f"int8-dynamic quantization failed: {type(e).__name__}: {_first_line(e)}") from None


def sensitive_nodes(float_model: Path, *, fraction: float = 0.15) -> list[str]:
    """The Conv/MatMul/Gemm nodes whose weights lose the most to per-channel int8 (lowest signal-to-
    quantization-noise ratio of the weights' int8 round trip; depthwise convolutions usually lead):
    int8-mixed keeps these in float and quantizes the rest as before."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(float_model)).graph
    weights = {t.name: t for t in graph.initializer}
    ranked = []
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or not node.name or len(node.input) < 2:
            continue
        if node.input[1] not in weights:
            continue
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float64)
        axis = 0 if node.op_type == "Conv" else w.ndim - 1  # the output channel
        ranked.append((_int8_sqnr(w, axis), node.name))
    ranked.sort()
    return [name for _, name in ranked[: max(1, int(len(ranked) * fraction))]]


def _int8_sqnr(w: np.ndarray, axis: int) -> float:
    """SQNR in dB of symmetric per-channel int8 quantization of ``w`` along ``axis``."""
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    scale = np.abs(rows).max(1, keepdims=True) / 127
    scale[scale == 0] = 1.0
    noise = ((rows - np.clip(np.round(rows / scale), -127, 127) * scale) ** 2).sum()
    signal = (rows ** 2).sum()
    return float("inf") if noise == 0 else float(10 * np.log10(max(signal, 1e-30) / noise))


def to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    except Exception as e:
        raise ConvertError(f"fp16 conversion failed: {type(e).__name__}: {_first_line(e)}") from None
    _save(model, dst)


def _save(model, dst: Path) -> None:
    import onnx

    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))


def _first_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0]
