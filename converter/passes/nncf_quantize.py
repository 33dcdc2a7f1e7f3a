"""Pass ``nncf_quantize``: NNCF post-training int8 quantization of an OpenVINO IR (``nncf.quantize``).

The config names only what differs from NNCF's own defaults ("default" everywhere is exactly
``nncf.quantize(model, nncf.Dataset(...), subset_size=N)``): the preset (performance: symmetric activations;
mixed: asymmetric), the target device, full BiasCorrection instead of the fast one, the first and last
weighted layers kept in float (``ignored: "ends"``), the activation/weight range estimators. The calibration
feeds are an extra of ``run`` (``calib=``), one batch-1 feed per NNCF sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

from converter import ConvertError
from converter.passes import Pass, PassResult
from converter.passes import _openvino as ovh

Preset = Literal["default", "performance", "mixed"]
Device = Literal["default", "ANY", "CPU", "CPU_SPR"]
Ignored = Literal["none", "ends"]
# nncf.quantization.range_estimator.RangeEstimatorParametersSet members
Range = Literal["default", "MINMAX", "MEAN_MINMAX", "MEAN_QUANTILE", "HISTOGRAM"]


class QuantizeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    subset_size: Annotated[int, msgspec.Meta(ge=1)] = 300  # calibration samples at most (NNCF's default)
    preset: Preset = "default"
    target_device: Device = "default"
    fast_bias_correction: bool = True  # False: NNCF's full BiasCorrection
    ignored: Ignored = "none"  # "ends": the first and last Convolution/MatMul stay in float
    activations_range: Range = "default"
    weights_range: Range = "default"
    compress_to_fp16: bool = False  # how the float constants left in the IR are saved


class NncfQuantize(Pass):
    name = "nncf_quantize"
    Config = QuantizeConfig
    toolchain = ovh.NNCF_TOOLCHAIN

    def run(self, model_path: Path, config: QuantizeConfig, out_path: Path, *, calib=None) -> PassResult:
        import nncf

        from converter.calib import as_feeds

        if calib is None:
            raise ConvertError("nncf_quantize needs calibration feeds (calib=...)")
        feeds = as_feeds(calib)
        n = len(feeds)
        model = ovh.read(model_path)
        kw, changed = ovh.quantize_options(config, model, "advanced_parameters")
        subset = min(config.subset_size, n)
        with ovh.quiet():
            try:
                quantized = nncf.quantize(model, ovh.dataset(feeds, range(n)), subset_size=subset, **kw)
            except Exception as e:
                raise ConvertError(f"int8 quantization (NNCF) failed: {type(e).__name__}: {ovh.first_line(e)}") \
                    from None
        ovh.save(quantized, Path(out_path), compress_to_fp16=config.compress_to_fp16)
        return self.result(config, out_path, {
            "call": "nncf.quantize", "changed_from_nncf_defaults": changed, "subset_size": subset,
            "calibration_samples": n, **ovh.ir_stats(Path(out_path))})


PASS = NncfQuantize()
