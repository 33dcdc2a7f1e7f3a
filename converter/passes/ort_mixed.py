"""Pass ``ort_mixed``: int8 with the layers that cost the most kept in float, chosen by their MEASURED effect on
the model's output (layer-wise sensitivity on calibration data).

Input: a static QDQ model (``ort_quantize``'s output) and, as ``float_model``, the float model it was quantized
from. On a subset of the calibration feeds (never the held-out ones: the plan only sees the calibration split):

1. the output error of the int8 model against the float model is measured: mean KL of the output distributions
   for a classifier output ([N, classes]), noise-to-signal (SQNR) for a dense one (``converter.measure``);
2. for each quantized Conv/Gemm/MatMul, the same error with ONLY that layer in float: its inputs' Q/DQ pairs
   are bypassed (the activation is taken before its QuantizeLinear, the weight and bias from the float model;
   graph surgery on the QDQ model, the rest of it unchanged, so no re-calibration);
3. the layers are ranked by how much the error falls, and kept in float in that order, one more at a time, up
   to ``fraction`` of the layers (measured again, cumulatively: effects do not simply add up);
4. the fewest that reach ``capture`` of the best reduction seen are kept: the model written is the QDQ model
   with exactly those layers in float (what was measured is what is shipped), dead Q/DQ nodes removed.

The notes record the ranking (each layer's error alone in float), the cumulative curve and what was kept.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import msgspec
import numpy as np

from converter import ConvertError
from converter.calib import Feeds, as_feeds, run_feeds
from converter.passes import Pass, PassResult
from converter.passes._ort import save

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
RANKED_IN_NOTES = 20  # the top of the ranking the notes carry (all layers are measured)


class OrtMixedConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    fraction: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.15  # at most this share of the layers in float
    samples: Annotated[int, msgspec.Meta(ge=1)] = 32  # calibration feeds the error is measured on (evenly spread)
    capture: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.9  # of the best error reduction within the cap
    output: str | None = None  # the output judged; default the first


class OrtMixed(Pass):
    name = "ort_mixed"
    Config = OrtMixedConfig
    toolchain = ("onnxruntime", "onnx")

    def run(self, model_path: Path, config: OrtMixedConfig, out_path: Path, *, float_model: Path | None = None,
            calib=None, batch: int | None = None) -> PassResult:
        import onnx

        from converter import measure

        if float_model is None or calib is None:
            raise ConvertError(f"{self.name}: needs the float model and calibration feeds")
        started = time.monotonic()
        qdq, flt = onnx.load(str(model_path)), onnx.load(str(float_model))
        feeds = as_feeds(calib)
        pick = np.unique(np.linspace(0, len(feeds) - 1, min(config.samples, len(feeds))).round().astype(int))
        subset = Feeds([feeds[int(i)] for i in pick], feeds.stacked)
        if batch and len(subset) < batch:
            subset = feeds[:batch]

        def outputs(model) -> np.ndarray:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.log_severity_level = 3
            session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            name = config.output or session.get_outputs()[0].name
            parts = run_feeds(lambda f: dict(zip([name], session.run([name], f))), subset, batch, 8)
            return subset.join(parts)[name]

        reference = outputs(flt)
        kind = measure.output_kind(reference)

        def error(model) -> float:
            got = outputs(model)
            entry = measure.agreement({"y": reference}, {"y": got})["outputs"]["y"]
            if kind == measure.CLASSIFIER and entry.get("kl") is not None:
                return float(entry["kl"])
            return float(10 ** (-entry["sqnr_db"] / 10))  # noise / signal

        layers = quantized_layers(qdq, flt)
        if not layers:
            raise ConvertError(f"{self.name}: the int8 model has no quantized Conv/Gemm/MatMul to keep in float")
        base = error(qdq)
        alone = {name: error(keep_in_float(qdq, flt, [name])) for name in layers}
        ranked = sorted(layers, key=lambda n: alone[n])
        helpful = [n for n in ranked if alone[n] < base]
        cap = max(1, int(len(layers) * config.fraction))
        curve = []  # (k, error with the top k in float)
        for k in range(1, min(cap, len(helpful)) + 1):
            curve.append((k, error(keep_in_float(qdq, flt, helpful[:k]))))
        if curve:
            best = min(e for _, e in curve)
            goal = best + (1 - config.capture) * (base - best)
            k = next(k for k, e in curve if e <= goal)
            final = dict(curve)[k]
        else:
            k, final = 0, base
        kept = helpful[:k]
        mixed = keep_in_float(qdq, flt, kept)
        save(mixed, Path(out_path))
        metric = "kl" if kind == measure.CLASSIFIER else "noise_to_signal"
        notes = {
            "metric": metric, "measured_on": f"{len(subset)} calibration feeds (not the held-out ones)",
            "layers": len(layers), "cap": cap, "int8_error": base, "mixed_error": final,
            "kept_in_float": kept,
            "ranked": [{"node": n, "op": layers[n], "error_alone_in_float": alone[n],
                        "reduction": round(1 - alone[n] / base, 4) if base > 0 else 0.0}
                       for n in ranked[:RANKED_IN_NOTES]],
            "cumulative": [{"kept": k_, "error": e} for k_, e in curve],
            "seconds": round(time.monotonic() - started, 1),
        }
        return self.result(config, out_path, notes)


def quantized_layers(qdq, flt) -> dict[str, str]:
    """{node name: op type} of the Conv/Gemm/MatMul of the QDQ model that take a dequantized input and exist, by
    name, in the float model."""
    dq = {o for n in qdq.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    named = {n.name for n in flt.graph.node if n.name}
    return {n.name: n.op_type for n in qdq.graph.node
            if n.op_type in LAYER_OPS and n.name in named and any(i in dq for i in n.input)}


def keep_in_float(qdq, flt, names: list[str]):
    """A copy of the QDQ model where the nodes ``names`` compute in float: each input that comes through a
    DequantizeLinear is taken before its QuantizeLinear (activations) or from the float model (weights, bias);
    Q/DQ nodes and initializers nothing uses any more are removed."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    taken = inits | set(producer) | {i.name for i in graph.input}
    float_inits = {t.name: t for t in flt.graph.initializer}
    float_nodes = {n.name: n for n in flt.graph.node if n.name}
    wanted = set(names)
    for node in graph.node:
        if node.name not in wanted:
            continue
        original = float_nodes[node.name]
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            source = dq.input[0]
            q = producer.get(source)
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]  # the activation before it was quantized
            elif (source in inits or q is not None) and i < len(original.input) \
                    and original.input[i] in float_inits:
                tensor = float_inits[original.input[i]]
                new = f"{tensor.name}_float"
                if new not in taken:
                    copy = graph.initializer.add()
                    copy.CopyFrom(tensor)
                    copy.name = new
                    taken.add(new)
                node.input[i] = new
    _remove_dead(graph)
    onnx.checker.check_model(model)
    return model


def _remove_dead(graph) -> None:
    """Drop nodes whose outputs nothing uses (repeatedly), then initializers nothing uses."""
    from converter.passes._ort import all_nodes

    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {i for n in all_nodes(graph) for i in n.input}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = outputs | {i for n in all_nodes(graph) for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


PASS = OrtMixed()
