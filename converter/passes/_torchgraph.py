"""An ONNX graph run by torch, so that its weights can be trained (the distillation pass's student).

``GraphModule(model)`` holds every floating initializer with more than one element as an ``nn.Parameter``
(Conv/Gemm/MatMul weights and biases, per-channel constants) and the rest (scalars such as a Clip's bounds,
shape and index tensors) as fixed tensors, and runs the nodes in the graph's (topological) order with torch
ops. Training changes only those parameters, never the graph: ``write_weights`` puts them back into a copy of
the same ``ModelProto``, so the trained model keeps its structure, names, opset and dynamic dims.

Why not onnx2torch: it imports torchvision at import time, and torchvision's PyPI wheels link against
torch's CUDA libraries, so with the CPU build of torch (the ``distill`` extra) ``import onnx2torch`` fails.
The ops below cover the CNN classifiers and dense models the converter meets (the PP-OCR MobileNetV3
classifier, MobileNetV2, ResNets); an op outside them is one ``ConvertError`` naming it (``unsupported``).
Imported only from inside the pass's ``run`` (it imports torch at the top).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from converter import ConvertError

_OPS: dict = {}


def op(*names):
    def register(fn):
        for n in names:
            _OPS[n] = fn
        return fn
    return register


def unsupported(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(op type, node name) of every node this module cannot run, in graph order."""
    return [(n.op_type, n.name or n.output[0]) for n in model.graph.node
            if n.domain not in ("", "ai.onnx") or n.op_type not in _OPS]


class GraphModule(torch.nn.Module):
    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        bad = unsupported(model)
        if bad:
            kind, name = bad[0]
            more = sorted({k for k, _ in bad[1:]} - {kind})
            raise ConvertError(f"the student uses op {kind!r} (node {name!r}), which the distillation pass cannot "
                               f"run in torch" + (f" (nor {', '.join(map(repr, more))})" if more else ""))
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.trainable: list[str] = []
        self.params = torch.nn.ParameterList()
        self.constants: dict[str, torch.Tensor] = {}
        self._index: dict[str, int] = {}
        for init in model.graph.initializer:
            array = numpy_helper.to_array(init)
            if array.dtype.kind == "f" and array.size > 1:
                self._index[init.name] = len(self.params)
                self.params.append(torch.nn.Parameter(torch.from_numpy(array.astype(np.float32).copy())))
                self.trainable.append(init.name)
            else:
                self.constants[init.name] = torch.from_numpy(np.array(array))
        initializers = {i.name for i in model.graph.initializer}
        self.inputs = [i.name for i in model.graph.input if i.name not in initializers]
        self.outputs = [o.name for o in model.graph.output]

    def forward(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = dict(self.constants)
        values.update({name: self.params[i] for name, i in self._index.items()})
        values.update(feeds)
        for node in self.model.graph.node:
            args = [values[name] if name else None for name in node.input]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            try:
                out = _OPS[node.op_type](args, attrs, self.opset)
            except ConvertError:
                raise
            except Exception as e:
                raise ConvertError(f"the distillation pass cannot run node {node.name or node.output[0]!r} "
                                   f"({node.op_type}) in torch: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                   ) from None
            for name, value in zip(node.output, out if isinstance(out, tuple) else (out,)):
                if name:
                    values[name] = value
        return {name: values[name] for name in self.outputs}

    def write_weights(self) -> onnx.ModelProto:
        """A copy of the model whose trainable initializers hold this module's current values."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        for init in model.graph.initializer:
            if init.name in self._index:
                dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
                value = self.params[self._index[init.name]].detach().cpu().numpy().astype(dtype)
                init.CopyFrom(numpy_helper.from_array(value, init.name))
        return model


# ---- ops: each takes (inputs, attributes, opset) and returns a tensor or a tuple of tensors ----

def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _pads(pads, rank: int):
    """ONNX pads [b1, b2, ..., e1, e2, ...] -> (symmetric padding for torch, or None) and F.pad's order."""
    pads = list(pads or [0] * (2 * rank))
    begin, end = pads[:rank], pads[rank:]
    flat = []
    for b, e in reversed(list(zip(begin, end))):
        flat += [b, e]
    return (begin if begin == end else None), flat


def _no_auto_pad(attrs):
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise ConvertError(f"auto_pad {attrs['auto_pad']!r} is not supported")


@op("Conv")
def _conv(a, at, _):
    x, w, b = a[0], a[1], a[2] if len(a) > 2 else None
    _no_auto_pad(at)
    rank = w.dim() - 2
    sym, flat = _pads(at.get("pads"), rank)
    if sym is None:
        x, sym = F.pad(x, flat), [0] * rank
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    return conv(x, w, b, stride=at.get("strides", [1] * rank), padding=sym,
                dilation=at.get("dilations", [1] * rank), groups=at.get("group", 1))


def _pool(a, at, kind):
    x = a[0]
    _no_auto_pad(at)
    k = at["kernel_shape"]
    rank = len(k)
    sym, flat = _pads(at.get("pads"), rank)
    strides, ceil = at.get("strides", [1] * rank), bool(at.get("ceil_mode", 0))
    if kind == "max":
        if sym is None or any(2 * p > kk for p, kk in zip(sym, k)):
            x, sym = F.pad(x, flat, value=float("-inf")), [0] * rank
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[rank]
        return pool(x, k, strides, sym, dilation=at.get("dilations", [1] * rank), ceil_mode=ceil)
    include = bool(at.get("count_include_pad", 0))
    if sym is None:
        if any(flat) and not include:
            raise ConvertError("AveragePool with asymmetric pads and count_include_pad=0 is not supported")
        x, sym = F.pad(x, flat), [0] * rank
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[rank]
    return pool(x, k, strides, sym, ceil_mode=ceil, count_include_pad=include)


op("MaxPool")(lambda a, at, _: _pool(a, at, "max"))
op("AveragePool")(lambda a, at, _: _pool(a, at, "avg"))
op("GlobalAveragePool")(lambda a, at, _: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True))
op("GlobalMaxPool")(lambda a, at, _: a[0].amax(dim=tuple(range(2, a[0].dim())), keepdim=True))


@op("Gemm")
def _gemm(a, at, _):
    x, w = a[0], a[1]
    if at.get("transA", 0):
        x = x.t()
    if at.get("transB", 0):
        w = w.t()
    y = at.get("alpha", 1.0) * (x @ w)
    if len(a) > 2 and a[2] is not None:
        y = y + at.get("beta", 1.0) * a[2]
    return y


op("MatMul")(lambda a, at, _: torch.matmul(a[0], a[1]))
op("Add")(lambda a, at, _: a[0] + a[1])
op("Sub")(lambda a, at, _: a[0] - a[1])
op("Mul")(lambda a, at, _: a[0] * a[1])
op("Neg")(lambda a, at, _: -a[0])
op("Sqrt")(lambda a, at, _: torch.sqrt(a[0]))
op("Exp")(lambda a, at, _: torch.exp(a[0]))
op("Relu")(lambda a, at, _: F.relu(a[0]))
op("LeakyRelu")(lambda a, at, _: F.leaky_relu(a[0], at.get("alpha", 0.01)))
op("Sigmoid")(lambda a, at, _: torch.sigmoid(a[0]))
op("Tanh")(lambda a, at, _: torch.tanh(a[0]))
op("HardSwish")(lambda a, at, _: F.hardswish(a[0]))
op("HardSigmoid")(lambda a, at, _: torch.clamp(at.get("alpha", 0.2) * a[0] + at.get("beta", 0.5), 0.0, 1.0))
op("Identity", "Dropout")(lambda a, at, _: a[0])


@op("Div")
def _div(a, at, _):
    x, y = a
    if not x.is_floating_point() and not y.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


@op("Clip")
def _clip(a, at, opset):
    if opset < 11:
        lo, hi = at.get("min"), at.get("max")
    else:
        lo = a[1].item() if len(a) > 1 and a[1] is not None else None
        hi = a[2].item() if len(a) > 2 and a[2] is not None else None
    if lo == 0.0 and hi == 6.0:
        return F.relu6(a[0])
    return torch.clamp(a[0], lo, hi)


@op("Softmax")
def _softmax(a, at, opset):
    x = a[0]
    axis = at.get("axis", -1 if opset >= 13 else 1) % x.dim()
    if opset < 13 and axis != x.dim() - 1:  # opset < 13: over the input flattened to 2-D at axis
        return F.softmax(x.reshape(int(np.prod(x.shape[:axis])), -1), dim=1).reshape(x.shape)
    return F.softmax(x, dim=axis)


op("LogSoftmax")(lambda a, at, opset: torch.log(_softmax(a, at, opset)))


@op("BatchNormalization")
def _batchnorm(a, at, _):
    x, scale, bias, mean, var = a[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=at.get("epsilon", 1e-5))


@op("Flatten")
def _flatten(a, at, _):
    x = a[0]
    axis = at.get("axis", 1) % max(1, x.dim())
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


@op("Reshape")
def _reshape(a, at, _):
    x, shape = a[0], _ints(a[1])
    if not at.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


op("Transpose")(lambda a, at, _: a[0].permute(at.get("perm", list(range(a[0].dim()))[::-1])))
op("Shape")(lambda a, at, _: torch.tensor(a[0].shape, dtype=torch.int64)[at.get("start", 0):at.get("end", None)])


@op("Concat")
def _concat(a, at, _):
    return torch.cat([t for t in a if t is not None], dim=at["axis"])


@op("Squeeze")
def _squeeze(a, at, opset):
    axes = at.get("axes") if opset < 13 else (_ints(a[1]) if len(a) > 1 and a[1] is not None else None)
    if axes is None:
        return a[0].squeeze()
    return a[0].squeeze(tuple(ax % a[0].dim() for ax in axes))


@op("Unsqueeze")
def _unsqueeze(a, at, opset):
    x = a[0]
    axes = at["axes"] if opset < 13 else _ints(a[1])
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return x


@op("Slice")
def _slice(a, at, opset):
    x = a[0]
    if opset < 10:
        starts, ends = at["starts"], at["ends"]
        axes, steps = at.get("axes", list(range(len(starts)))), [1] * len(starts)
    else:
        starts, ends = _ints(a[1]), _ints(a[2])
        axes = _ints(a[3]) if len(a) > 3 and a[3] is not None else list(range(len(starts)))
        steps = _ints(a[4]) if len(a) > 4 and a[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st <= 0:
            raise ConvertError("Slice with a negative step is not supported")
        size = x.shape[ax]
        index[ax] = slice(max(-size, min(s, size)), max(-size, min(e, size)), st)
    return x[tuple(index)]


@op("Gather")
def _gather(a, at, _):
    x, idx = a
    axis = at.get("axis", 0) % x.dim()
    out = torch.index_select(x, axis, idx.reshape(-1).long() % x.shape[axis])
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])


@op("Cast")
def _cast(a, at, _):
    dtype = torch.from_numpy(np.zeros(0, helper.tensor_dtype_to_np_dtype(at["to"]))).dtype
    return a[0].to(dtype)


@op("Constant")
def _constant(a, at, _):
    if "value" not in at:
        raise ConvertError(f"Constant with {', '.join(at)} is not supported")
    return torch.from_numpy(np.array(numpy_helper.to_array(at["value"])))


@op("ReduceMean")
def _reduce_mean(a, at, opset):
    axes = at.get("axes") if opset < 18 else (_ints(a[1]) if len(a) > 1 and a[1] is not None else None)
    dims = tuple(axes) if axes else tuple(range(a[0].dim()))
    return a[0].mean(dim=dims, keepdim=bool(at.get("keepdims", 1)))


@op("Pad")
def _pad(a, at, opset):
    mode = at.get("mode", b"constant")
    if mode not in (b"constant", "constant"):
        raise ConvertError(f"Pad mode {mode!r} is not supported")
    pads = at["pads"] if opset < 11 else _ints(a[1])
    value = at.get("value", 0.0) if opset < 11 else (a[2].item() if len(a) > 2 and a[2] is not None else 0.0)
    if len(a) > 3 and a[3] is not None:
        raise ConvertError("Pad with axes is not supported")
    _, flat = _pads(pads, a[0].dim())
    return F.pad(a[0], flat, value=value)
