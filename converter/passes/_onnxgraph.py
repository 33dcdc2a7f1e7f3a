"""ONNX graph helpers for the passes (onnx + numpy): load, constants, BatchNorm folding, shapes, counts.

Everything here edits a ``ModelProto`` in memory; writing it is the pass's job. Imported only from
inside a pass's ``run`` (it imports onnx at the top).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from converter import ConvertError

RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_names = itertools.count()


def load(path: Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        raise ConvertError(f"{path}: not an ONNX model ({type(e).__name__})") from None
    if not model.graph.node:
        raise ConvertError(f"{path}: not an ONNX model (its graph has no nodes)")
    return model


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def fresh_name(model: onnx.ModelProto, base: str) -> str:
    taken = {i.name for i in model.graph.initializer}
    while True:
        name = f"{base}__{next(_names)}"
        if name not in taken:
            return name


def add_initializer(model: onnx.ModelProto, base: str, value: np.ndarray) -> str:
    name = fresh_name(model, base)
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    return name


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """``Constant`` nodes become initializers (same values), so weights are found in one place."""
    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            a = node.attribute[0]
            value = {"value": lambda: numpy_helper.to_array(a.t),
                     "value_float": lambda: np.array(a.f, np.float32),
                     "value_floats": lambda: np.array(list(a.floats), np.float32),
                     "value_int": lambda: np.array(a.i, np.int64),
                     "value_ints": lambda: np.array(list(a.ints), np.int64)}.get(a.name)
            if value is not None:
                model.graph.initializer.append(numpy_helper.from_array(value(), node.output[0]))
                continue
        keep.append(node)
    _replace_nodes(model, keep)


def fold_constants(model: onnx.ModelProto) -> int:
    """Nodes whose inputs are all initializers (e.g. a bias ``Reshape``d to [1, C, 1, 1]) are evaluated
    with onnx's reference evaluator and replaced by their values. Returns how many were folded."""
    from onnx.reference import ReferenceEvaluator

    consts = initializers(model)
    outputs = {o.name for o in model.graph.output}
    opsets = {o.domain or "": o.version for o in model.opset_import}
    keep, folded = [], 0
    for node in model.graph.node:
        names = [i for i in node.input if i]
        if (node.domain in ("", "ai.onnx") and names and all(i in consts for i in names)
                and node.op_type not in RANDOM_OPS and not set(node.output) & outputs
                and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)):
            try:
                values = ReferenceEvaluator(node, opsets=opsets).run(None, {i: consts[i] for i in names})
            except Exception:  # an op the reference evaluator lacks: leave the node as it is
                keep.append(node)
                continue
            for name, value in zip(node.output, values):
                if name:
                    value = np.asarray(value)
                    model.graph.initializer.append(numpy_helper.from_array(value, name))
                    consts[name] = value
            folded += 1
            continue
        keep.append(node)
    _replace_nodes(model, keep)
    return folded


def fold_batchnorm(model: onnx.ModelProto) -> list[str]:
    """Fold each inference-mode ``BatchNormalization`` that directly follows a ``Conv`` (whose output only
    it reads) into that Conv's weights and bias. Returns the folded BatchNorm nodes' names."""
    consts = initializers(model)
    consumers = consumer_map(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    drop, folded = set(), []
    for index, bn in enumerate(model.graph.node):
        if bn.op_type != "BatchNormalization" or attr(bn, "training_mode", 0):
            continue
        if len([o for o in bn.output if o]) != 1 or not all(i in consts for i in bn.input[1:5]):
            continue
        conv = producers.get(bn.input[0])
        bias = conv.input[2] if conv is not None and len(conv.input) > 2 else ""
        if (conv is None or conv.op_type != "Conv" or bn.input[0] in outputs or len(consumers[bn.input[0]]) != 1
                or conv.input[1] not in consts or (bias and bias not in consts)):
            continue
        w = consts[conv.input[1]].astype(np.float64)
        b = consts[bias].astype(np.float64) if bias else np.zeros(w.shape[0])
        gamma, beta, mean, var = (consts[i].astype(np.float64) for i in bn.input[1:5])
        scale = gamma / np.sqrt(var + attr(bn, "epsilon", 1e-5))
        dtype = consts[conv.input[1]].dtype
        new_w = add_initializer(model, conv.input[1] + "_bnfold",
                                (w * scale.reshape(-1, *[1] * (w.ndim - 1))).astype(dtype))
        new_b = add_initializer(model, (conv.name or conv.output[0]) + "_bias_bnfold",
                                ((b - mean) * scale + beta).astype(dtype))
        data = conv.input[0]
        del conv.input[:]
        conv.input.extend([data, new_w, new_b])
        conv.output[0] = bn.output[0]
        drop.add(id(bn))
        folded.append(label(bn, index))
    _replace_nodes(model, [n for n in model.graph.node if id(n) not in drop])
    return folded


def consumer_map(model: onnx.ModelProto) -> dict[str, list[tuple[int, onnx.NodeProto]]]:
    out: dict[str, list] = {}
    for index, node in enumerate(model.graph.node):
        for name in set(node.input):
            if name:
                out.setdefault(name, []).append((index, node))
        for name in subgraph_inputs(node):
            out.setdefault(name, []).append((index, node))
    return out


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing graph (approximately: every
    name they read)."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = ([a.g] if a.type == onnx.AttributeProto.GRAPH
                  else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else [])
        for g in graphs:
            for n in g.node:
                names.update(i for i in n.input if i)
                names |= subgraph_inputs(n)
    return names


def cleanup(model: onnx.ModelProto) -> None:
    """Drop initializers nothing reads, initializers listed as graph inputs, and stale value_info."""
    used = {o.name for o in model.graph.output}
    for node in model.graph.node:
        used.update(node.input)
        used |= subgraph_inputs(node)
    inits = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    names = {i.name for i in inits}
    inputs = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    del model.graph.value_info[:]


def input_shapes(model: onnx.ModelProto, given: dict[str, list[int]] | None) -> dict[str, list[int]]:
    """A concrete shape for every graph input: ``given``, else the declared one with a dynamic batch as 1."""
    given = dict(given or {})
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in inp.type.tensor_type.shape.dim]
        if inp.name in given:
            shape = given.pop(inp.name)
            fits = len(shape) == len(dims) and all(d is None or d == s for d, s in zip(dims, shape))
            if not fits or min(shape, default=1) < 1:
                raise ConvertError(f"input shape {shape} does not fit input {inp.name!r} "
                                   f"[{', '.join('?' if d is None else str(d) for d in dims)}]")
        else:
            if dims and dims[0] is None:
                dims[0] = 1
            if None in dims:
                shown = ", ".join("?" if d is None else str(d) for d in dims)
                raise ConvertError(f"input {inp.name!r} has dynamic dimensions [{shown}]: give its shape "
                                   f"(--input-shape {inp.name}=1x...)")
            shape = dims
        out[inp.name] = list(shape)
    if given:
        raise ConvertError(f"the model has no input named {next(iter(given))!r}")
    return out


def infer_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> dict[str, list[int | None]]:
    """Every tensor's shape (None for an unknown dim) with the inputs fixed to ``shapes``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    for inp in probe.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[inp.name]):
                d.Clear()
                d.dim_value = v
    try:
        probe = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception as e:
        raise ConvertError(f"onnx shape inference failed on the model: {str(e).splitlines()[0]}") from None
    out = {}
    for vi in itertools.chain(probe.graph.input, probe.graph.value_info, probe.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for name, value in initializers(probe).items():
        out[name] = list(value.shape)
    return out


def count_params(model: onnx.ModelProto) -> int:
    """Elements of the float weights the nodes read (initializers; shape constants excluded)."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    used = {i for n in model.graph.node for i in n.input}
    tensors = [i for i in model.graph.initializer if i.name in used]
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" and n.output[0] in used
                for a in n.attribute if a.name == "value"]
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in tensors if t.data_type in floats))


def count_macs(model: onnx.ModelProto, shapes: dict[str, list[int | None]]) -> int:
    """Multiply-accumulates of Conv, Gemm and MatMul at the given shapes (from shape inference)."""
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            w, y = shapes.get(node.input[1]), shapes.get(node.output[0])
            if w and y and None not in y:
                total += int(np.prod(y, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
        elif node.op_type in ("Gemm", "MatMul"):
            a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
            k = (a[0] if node.op_type == "Gemm" and attr(node, "transA", 0) else a[-1]) if a else None
            if k and y and None not in y:
                total += int(np.prod(y, dtype=np.int64)) * int(k)
    return total


def _replace_nodes(model: onnx.ModelProto, nodes: list) -> None:
    kept = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]
    del model.graph.node[:]
    model.graph.node.extend(kept)
