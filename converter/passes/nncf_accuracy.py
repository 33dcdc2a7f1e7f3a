"""Pass ``nncf_accuracy``: NNCF int8 quantization with accuracy control (``nncf.quantize_with_accuracy_control``).

NNCF quantizes, measures the validation metric against the fp32 IR, and while the drop exceeds ``max_drop``
puts back in float the group of layers whose quantization costs the most: it ranks every group by the error
its quantizers add to the model's outputs (normalized MSE against the fp32 outputs on ``ranking_subset_size``
samples: the layer-wise sensitivity, measured on the output rather than guessed from the graph), reverts the
worst group, re-validates, re-ranks. The validation metric is the converter's gate metric wherever it can be
computed without labels:

- ``top1`` / ``top5``: agreement with the fp32 IR's top-1 (within the quantized top-5 for top5), drop in points;
- ``kl``: 1 - the mean KL(fp32 || quantized) (softmax of the scores unless they are probabilities, as the gate
  does), so the drop IS the mean KL;
- ``sqnr``: 1 - how many dB the SQNR over all validation elements falls short of ``min_sqnr``, with ``max_drop``
  0: the rung passes when SQNR >= min_sqnr. (Cosine similarity misjudges near-empty maps.)
The fp32 IR scores 1 on each (NNCF divides by the fp32 metric, so it must not be 0).

The result is saved with fp16-compressed float weights by default: the layers put back in float cost half of
what fp32 weights would, so the rung is no larger than the fp16 IR, while the int8 layers still run in int8
(the CPU plugin decompresses fp16 weights and runs float layers at the inference precision). The notes name
the layers reverted to float.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import numpy as np

from converter import ConvertError
from converter.passes import Pass, PassResult
from converter.passes import _openvino as ovh
from converter.passes.nncf_quantize import QuantizeConfig

Metric = Literal["auto", "top1", "top5", "kl", "sqnr"]
SQNR_CAP_DB = 200.0  # identical outputs (the fp32 IR against itself)


class AccuracyConfig(QuantizeConfig, forbid_unknown_fields=True, kw_only=True):
    """nncf_quantize's options (the quantization it starts from) and the accuracy control's own."""

    metric: Metric = "auto"  # auto: top1 for a classifier output ([N, C], C > 1), else sqnr
    max_drop: Annotated[float, msgspec.Meta(ge=0.0)] = 0.01  # absolute; for sqnr it is forced to 0
    min_sqnr: float = 30.0  # dB, for metric sqnr
    output: str | None = None  # the output judged (a tensor name), default the first
    validation_samples: Annotated[int, msgspec.Meta(ge=1)] = 200
    ranking_subset_size: Annotated[int, msgspec.Meta(ge=1)] = 100
    max_num_iterations: Annotated[int, msgspec.Meta(ge=1)] = 10
    compress_to_fp16: bool = True  # float weights of the reverted layers in fp16: no larger than the fp16 IR


class NncfAccuracy(Pass):
    name = "nncf_accuracy"
    Config = AccuracyConfig
    toolchain = ovh.NNCF_TOOLCHAIN

    def run(self, model_path: Path, config: AccuracyConfig, out_path: Path, *, calib=None) -> PassResult:
        import nncf
        import openvino as ov
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

        from converter.calib import as_feeds

        if calib is None:
            raise ConvertError("nncf_accuracy needs calibration feeds (calib=...)")
        feeds = as_feeds(calib)
        n = len(feeds)
        subset = min(config.subset_size, n)
        val = list(range(min(config.validation_samples, n)))
        ranking = min(config.ranking_subset_size, len(val))
        core = ov.Core()
        fp32 = core.compile_model(ovh.read(model_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        index = _output_index(fp32, config.output)
        reference = ovh.infer(fp32, feeds, val)
        if config.metric == "auto":
            first = reference[0][index] if reference else np.zeros(0)
            config = msgspec.structs.replace(config, metric="top1" if first.ndim == 2 and first.shape[1] > 1
                                             else "sqnr")
        metric = Validation(config, feeds, reference, index)
        max_drop = 0.0 if config.metric == "sqnr" else config.max_drop
        model = ovh.read(model_path)
        kw, changed = ovh.quantize_options(config, model, "advanced_quantization_parameters")
        log: list[str] = []
        with ovh.quiet(capture=log):
            try:
                quantized = nncf.quantize_with_accuracy_control(
                    model, ovh.dataset(feeds, range(n)), ovh.dataset(feeds, val), metric.validate,
                    max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=subset, **kw,
                    advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                        max_num_iterations=config.max_num_iterations, ranking_subset_size=ranking,
                        num_ranking_workers=1),
                )
            except Exception as e:
                raise ConvertError(f"int8 quantization with accuracy control (NNCF) failed: {type(e).__name__}: "
                                   f"{ovh.first_line(e)}") from None
        out_path = Path(out_path)
        ovh.save(quantized, out_path, compress_to_fp16=config.compress_to_fp16)
        got = ovh.infer(core.compile_model(ovh.read(out_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), feeds, val)
        reverted, total, outcome = _restorer_log(log)
        return self.result(config, out_path, {
            "call": "nncf.quantize_with_accuracy_control", "changed_from_nncf_defaults": changed,
            "metric": metric.name, "drop_type": "absolute", "max_drop": max_drop,
            "validation_samples": len(val), "ranking_subset_size": ranking, "ranking": "normalized MSE of the "
            "outputs against the fp32 IR (per group of quantizers)", "subset_size": subset, "calibration_samples": n,
            "validation_value": round(metric.value(got), 6),
            "reverted_to_float": reverted, "quantized_operations": total, "outcome": outcome,
            "executed_precisions": ovh.executed_precisions(out_path), **ovh.ir_stats(out_path)})


PASS = NncfAccuracy()


class Validation:
    """NNCF's ``validation_fn(compiled model, items)`` for the gate's metric against the fp32 IR's outputs.

    It returns (metric, every item's outputs): NNCF then ranks the groups of quantizers by the normalized MSE of
    the outputs (fine-grained, where a top-1 count over the ranking subset would call most groups equal) and
    stops on the metric."""

    def __init__(self, config: AccuracyConfig, feeds, reference: list[list[np.ndarray]], output: int):
        from converter.measure import is_probability

        self.config, self.feeds, self.reference, self.output = config, feeds, reference, output
        first = np.concatenate([np.asarray(r[output]).reshape(len(r[output]), -1) for r in reference]) \
            if reference else np.zeros((0, 0))
        self.probabilities = first.ndim == 2 and is_probability(first)  # softmax outputs: KL of them, not re-softmaxed
        self.name = {"top1": "top-1 agreement with the fp32 IR", "top5": "top-5 agreement with the fp32 IR",
                     "kl": "1 - the mean KL(fp32 || int8) (the drop is the KL)",
                     "sqnr": f"1 - the dB by which the SQNR over all elements falls short of {config.min_sqnr:g}"
                     }[config.metric]

    def validate(self, compiled, items) -> tuple[float, list[list[np.ndarray]]]:
        indices = list(items)
        outs = ovh.infer(compiled, self.feeds, indices)
        return self.value(outs, indices), outs

    def value(self, outs: list[list[np.ndarray]], indices=None) -> float:
        indices = range(len(outs)) if indices is None else indices
        ref = [self.reference[i][self.output] for i in indices]
        got = [o[self.output] for o in outs]
        if not ref:
            return 0.0
        m = self.config.metric
        if m == "sqnr":
            r = np.concatenate([np.asarray(a, np.float64).ravel() for a in ref])
            g = np.concatenate([np.asarray(a, np.float64).ravel() for a in got])
            signal, noise = float(r @ r), float((r - g) @ (r - g))
            sqnr = SQNR_CAP_DB if noise == 0 else (-SQNR_CAP_DB if signal == 0 else 10 * np.log10(signal / noise))
            return 1.0 - max(0.0, self.config.min_sqnr - float(sqnr))  # fp32: 1 (NNCF divides by it)
        r = np.concatenate([np.asarray(a, np.float64).reshape(len(a), -1) for a in ref])
        g = np.concatenate([np.asarray(a, np.float64).reshape(len(a), -1) for a in got])
        top1 = r.argmax(1)
        if m == "top1":
            return float(np.mean(top1 == g.argmax(1)))
        if m == "top5":
            k = min(5, r.shape[1])
            return float(np.mean((np.argsort(-g, axis=1, kind="stable")[:, :k] == top1[:, None]).any(1)))
        log_p, log_q = _log_distribution(r, self.probabilities), _log_distribution(g, self.probabilities)
        return 1.0 - float(np.mean((np.exp(log_p) * (log_p - log_q)).sum(1)))  # fp32: 1 (NNCF divides by it)


def _output_index(compiled, name: str | None) -> int:
    if name is None:
        return 0
    for i, port in enumerate(compiled.outputs):
        if name in port.get_names():
            return i
    raise ConvertError(f"nncf_accuracy: the model has no output {name!r}")


def _log_distribution(s: np.ndarray, probabilities: bool) -> np.ndarray:
    """As converter/measure.py: rows that already are probabilities are only clipped and renormalised."""
    if probabilities:
        p = np.clip(s, 1e-12, None)
        return np.log(p / p.sum(1, keepdims=True))
    shifted = s - s.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def _restorer_log(log: list[str]) -> tuple[list[str], int | None, str]:
    """(the operations NNCF reverted to float, how many it had quantized, how it ended) from its INFO log."""
    reverted: list[str] = []
    total = None
    outcome = "quantized model met the metric: nothing reverted"
    for message in log:
        if m := re.match(r"Total number of quantized operations in the model: (\d+)", message):
            total = int(m.group(1))
        elif m := re.match(r"(\d+) out of (\d+) were reverted back to the floating-point precision:", message):
            reverted = [line.strip() for line in message.splitlines()[1:] if line.strip()]
        elif message.startswith("Algorithm completed:"):
            outcome = message
        elif message.startswith("The algorithm could not achieve the required accuracy drop"):
            outcome = message
    return reverted, total, outcome
