"""Helpers the ONNX Runtime passes share (not a pass): quiet quantizer calls, saving, error lines."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Attention", "LSTM", "GRU", "RNN", "Einsum")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """ORT's quantizer logs advice at WARNING on the root logger and its histogram calibrators print()
    progress: keep both out of the converter's stdout (--json) and stderr."""
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.getLogger().setLevel(level)


def save(model, dst: Path) -> None:
    import onnx

    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))


def first_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def all_nodes(graph) -> Iterator:
    """Every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies), depth first."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from all_nodes(attr.g)
            for g in attr.graphs:
                yield from all_nodes(g)


def quantized_census(path: Path) -> dict:
    """What a quantized model holds: its compute ops (Conv/Gemm/MatMul/... anywhere, subgraphs included), how many
    of them take a dequantized input (static QDQ) or are integer ops (dynamic quantization: MatMulInteger,
    DynamicQuantizeLinear, ...), and how many of the compute ops sit in If/Loop/Scan subgraphs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    top = list(model.graph.node)
    nodes = list(all_nodes(model.graph))
    dq_out = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    compute = [n for n in nodes if n.op_type in COMPUTE_OPS]
    quantized = [n for n in compute if any(i in dq_out for i in n.input)]
    integer = [n for n in nodes if n.op_type in ("MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul",
                                                  "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention")]
    in_subgraphs = len(compute) - sum(n.op_type in COMPUTE_OPS for n in top)
    return {"compute_ops": len(compute), "quantized_ops": len(quantized) + len(integer),
            "compute_ops_in_subgraphs": in_subgraphs,
            "qdq_nodes": sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in nodes)}


def no_int8_warning(census: dict, variant: str) -> str | None:
    """The warning when a quantized variant holds no quantized op (it then computes exactly as fp32 does)."""
    if census["quantized_ops"] > 0:
        return None
    where = (f"; {census['compute_ops_in_subgraphs']} of its {census['compute_ops']} Conv/Gemm/MatMul/LSTM ops are "
             f"inside If/Loop subgraphs, which ONNX Runtime's quantizer does not enter"
             if census["compute_ops_in_subgraphs"] else "")
    return (f"{variant} holds no quantized op: it computes in float, as fp32 does, and gains nothing from int8"
            f"{where}")
