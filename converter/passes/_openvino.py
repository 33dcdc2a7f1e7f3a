"""Helpers the OpenVINO/NNCF passes share (ov_convert, ov_compress, nncf_quantize, nncf_accuracy).
openvino and nncf are imported inside each function, never when this module is imported."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from converter import ConvertError

OV_TOOLCHAIN = ("openvino",)
NNCF_TOOLCHAIN = ("openvino", "nncf")


def read(path: Path):
    import openvino as ov

    try:
        return ov.Core().read_model(str(path))
    except Exception as e:
        raise ConvertError(f"openvino cannot read {Path(path).name}: {first_line(e)}") from None


def save(model, dst: Path, *, compress_to_fp16: bool) -> None:
    """Write ``model`` as ``dst`` (model.xml + model.bin) into a fresh directory of its own."""
    import openvino as ov

    dst = Path(dst)
    if dst.parent.exists():
        shutil.rmtree(dst.parent)
    dst.parent.mkdir(parents=True)
    ov.save_model(model, str(dst), compress_to_fp16=compress_to_fp16)


def ir_stats(xml: Path) -> dict:
    """How much of the IR is int8, and how its float weights are stored."""
    ops = list(read(xml).get_ops())
    kinds = [op.get_type_name() for op in ops]

    def consts(*types: str) -> int:
        return sum(1 for op in ops if op.get_type_name() == "Constant"
                   and op.get_output_element_type(0).get_type_name() in types)

    return {"fake_quantize_nodes": kinds.count("FakeQuantize") + kinds.count("FakeConvert"),
            "int8_weight_constants": consts("i8", "u8"), "fp16_constants": consts("f16"),
            "size_bytes": sum(f.stat().st_size for f in Path(xml).parent.iterdir() if f.is_file())}


def executed_precisions(xml: Path, inference_precision: str = "f32") -> dict[str, int]:
    """Per runtime precision, how many convolutions/matmuls the CPU plugin runs compiled at
    ``inference_precision``: shows whether int8 layers still run in int8 next to float ones."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(read(xml), "CPU", {"INFERENCE_PRECISION_HINT": inference_precision,
                                                      "INFERENCE_NUM_THREADS": 1})
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else ""
        if layer in ("Convolution", "FullyConnected", "MatMul", "Deconvolution"):
            precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
            counts[precision] = counts.get(precision, 0) + 1
    return counts


def dataset(feeds, indices):
    """Items are feed indices; each becomes its feed (NNCF calibrates one feed, a batch-1 sample, at a time)."""
    import nncf

    return nncf.Dataset(list(indices), lambda i: feeds[i])


def weighted_ops(model) -> list[str]:
    """The friendly names of the model's convolutions and matmuls, in topological order."""
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData")]


def quantize_options(config, model, advanced: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keywords for nncf.quantize / quantize_with_accuracy_control from a QuantizeConfig-like config (``advanced``
    names the keyword each takes its AdvancedQuantizationParameters by), and what they mean for the report:
    only what differs from NNCF's defaults is passed."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    kw: dict[str, Any] = {}
    changed: dict[str, Any] = {}
    if config.preset != "default":
        kw["preset"] = nncf.QuantizationPreset(config.preset)
        changed["preset"] = config.preset
    if config.target_device != "default":
        kw["target_device"] = nncf.TargetDevice[config.target_device]
        changed["target_device"] = config.target_device
    if not config.fast_bias_correction:
        kw["fast_bias_correction"] = False
        changed["fast_bias_correction"] = False
    if config.ignored == "ends":
        ops = weighted_ops(model)
        names = sorted({ops[0], ops[-1]}) if ops else []
        if names:
            kw["ignored_scope"] = nncf.IgnoredScope(names=names)
        changed["kept_in_float"] = names
    advanced_kw = {}
    if config.activations_range != "default":
        advanced_kw["activations_range_estimator_params"] = getattr(RangeEstimatorParametersSet,
                                                                    config.activations_range)
        changed["activations_range_estimator"] = config.activations_range
    if config.weights_range != "default":
        advanced_kw["weights_range_estimator_params"] = getattr(RangeEstimatorParametersSet, config.weights_range)
        changed["weights_range_estimator"] = config.weights_range
    if advanced_kw:
        kw[advanced] = AdvancedQuantizationParameters(**advanced_kw)
    return kw, changed


@contextlib.contextmanager
def quiet(capture: list[str] | None = None) -> Iterator[None]:
    """NNCF logs at INFO to the process's real stdout and draws rich progress bars: keep stdout for the report
    (--json). With ``capture``, NNCF's INFO messages are appended to it instead (e.g. which layers its accuracy
    restorer reverted to float)."""
    import nncf
    from nncf.common.logging.logger import nncf_logger, stdout_handler

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            capture.append(record.getMessage())

    handler = Collect(logging.INFO) if capture is not None else None
    old_handler_level, old_propagate = stdout_handler.level, nncf_logger.propagate
    stdout_handler.setLevel(logging.ERROR)
    nncf_logger.propagate = False  # a root handler (logging.basicConfig anywhere) would print the INFO lines
    nncf.set_log_level(logging.INFO if handler else logging.ERROR)
    if handler:
        nncf_logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        if handler:
            nncf_logger.removeHandler(handler)
        nncf.set_log_level(logging.ERROR)
        stdout_handler.setLevel(old_handler_level)
        nncf_logger.propagate = old_propagate


def infer(compiled, feeds, indices) -> list[list[np.ndarray]]:
    """Per feed, every output of ``compiled`` (a compiled model), in output order."""
    outs = []
    for i in indices:
        result = compiled(feeds[i])
        outs.append([np.asarray(result[j]).copy() for j in range(len(compiled.outputs))])
    return outs


def missing() -> str | None:
    if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None:
        return "openvino/nncf is not installed: pip install 'edgefleet[intel]'"
    return None


def first_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0]
