"""Pass ``ort_dynamic``: ONNX Runtime's dynamic quantization (``quantize_dynamic``): weights to int8 ahead of
time, activations quantized at run time; it helps MatMul/Gemm/LSTM-heavy models (Conv gets slower: not listed)."""

from __future__ import annotations

from pathlib import Path

import msgspec

from converter import ConvertError
from converter.passes import Pass, PassResult
from converter.passes._ort import first_line, no_int8_warning, quantized_census, quiet

DYNAMIC_OPS = ("MatMul", "Gemm", "Attention", "LSTM", "GRU")


class OrtDynamicConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    op_types: list[str] = msgspec.field(default_factory=lambda: list(DYNAMIC_OPS))
    weight_type: str = "QInt8"


class OrtDynamic(Pass):
    name = "ort_dynamic"
    Config = OrtDynamicConfig
    toolchain = ("onnxruntime", "onnx")

    def run(self, model_path: Path, config: OrtDynamicConfig, out_path: Path, *,
            variant: str = "int8-dynamic") -> PassResult:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        try:
            with quiet():
                quantize_dynamic(str(model_path), str(out_path), weight_type=getattr(QuantType, config.weight_type),
                                 op_types_to_quantize=list(config.op_types))
        except Exception as e:
            raise ConvertError(f"{variant} quantization failed: {type(e).__name__}: {first_line(e)}") from None
        census = quantized_census(Path(out_path))
        notes = dict(census)
        if (warning := no_int8_warning(census, variant)) is not None:
            notes["warning"] = warning
        return self.result(config, out_path, notes)


def present_ops(model_path: Path) -> list[str]:
    """The op types dynamic quantization helps with that this model has (top-level graph)."""
    import onnx

    present = {n.op_type for n in onnx.load(str(model_path)).graph.node}
    return [op for op in DYNAMIC_OPS if op in present]


PASS = OrtDynamic()
