"""Which Conv output channels can be removed together, and removing them (onnx + numpy).

Every tensor with channels (axis 1) gets a *layout*: the channel spaces it is made of, in order, as
``((space, count), ...)``. A Conv with group 1 starts a new space; ops that keep channels pass the
layout on; a depthwise Conv keeps its input's spaces (its channels follow its producer's); an
elementwise op (residual ``Add``, the ``Mul`` of a squeeze-excitation gate, hard-swish's ``Mul``)
*unites* the spaces of its inputs (union-find), so every producer feeding it keeps the same channels;
a ``Concat`` on the channel axis joins layouts (offsets). Where a channel-carrying tensor meets a node
the pruner cannot adjust (a Reshape that mixes channels, a Slice, Shape, a graph output, an unknown
op), its spaces are marked unsafe with the reason, and a whole united group is skipped if any of its
members is.

Each space records its *uses*: the constant inputs to cut along an axis when its channels go (Conv
weights on axis 0 for the producers and on axis 1 for the consumers, biases, depthwise weights,
per-channel constants of elementwise ops and BatchNorm, the weights of a Gemm/MatMul after a
global pool and Flatten). A group's channels are ranked by the sum over its producer Convs of the L1
(or L2) norm of each channel's filter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from converter.passes._onnxgraph import add_initializer, attr, initializers, label, subgraph_inputs

Layout = tuple[tuple[int, int], ...]

KEEP_CHANNELS = {  # one data input (input 0); output 0 has the same channels
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
    "Softsign", "Mish", "Gelu", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round",
    "Sign", "Clip", "Cast", "Identity", "Dropout", "ThresholdedRelu", "Shrink",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"}
ZERO_WHEN_MASKED = {"Add", "Sub", "Sum"}  # per-channel constants that would make a masked channel nonzero


@dataclass
class Use:
    node: int  # node index
    input: int  # which input of it (a constant)
    axis: int  # its axis that holds the channels
    tensor: str  # whose layout says which channels
    produces: bool  # True: zeroed too by a mask (producer weights, biases, additive constants)


@dataclass
class Group:
    root: int
    channels: int
    producers: list[str]  # Conv nodes (group 1) whose output channels these are
    members: list[str]  # every Conv in the group (depthwise ones too)
    reasons: list[str]
    keep: np.ndarray | None = None  # sorted indices kept, when pruned

    def report(self) -> dict:
        out = {"convs": self.producers, "channels": self.channels}
        if self.reasons:
            return {**out, "reason": "; ".join(self.reasons)}
        return {**out, "kept": int(len(self.keep)), "removed": self.channels - int(len(self.keep))}


@dataclass
class Analysis:
    model: onnx.ModelProto
    shapes: dict[str, list[int | None]]
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    parent: list[int] = field(default_factory=list)
    count: list[int] = field(default_factory=list)
    reasons: dict[int, list[str]] = field(default_factory=dict)
    layout: dict[str, Layout] = field(default_factory=dict)
    uses: list[Use] = field(default_factory=list)
    producers: list[tuple[int, str, bool]] = field(default_factory=list)  # (node, output, depthwise)
    depthwise: list[tuple[int, str]] = field(default_factory=list)

    # -- union-find over channel spaces --
    def space(self, count: int, reason: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.count.append(count)
        if reason:
            self.reasons[len(self.parent) - 1] = [reason]
        return len(self.parent) - 1

    def root(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def unite(self, a: int, b: int) -> None:
        a, b = self.root(a), self.root(b)
        if a != b:
            self.parent[b] = a
            mine = self.reasons.setdefault(a, [])
            mine.extend(r for r in self.reasons.pop(b, []) if r not in mine)

    def mark(self, tensor: str, reason: str) -> None:
        for s, _ in self.layout.get(tensor, ()):
            found = self.reasons.setdefault(self.root(s), [])
            if reason not in found:
                found.append(reason)

    def merge(self, layouts: list[Layout], where: str) -> Layout:
        first = layouts[0]
        for other in layouts[1:]:
            if [c for _, c in other] != [c for _, c in first]:
                for lay in layouts:
                    for s, _ in lay:
                        self.reasons.setdefault(self.root(s), []).append(f"{where} joins tensors whose channels are "
                                                                          "concatenated differently")
                return first
            for (a, _), (b, _) in zip(first, other):
                self.unite(a, b)
        return first


def analyse(model: onnx.ModelProto, shapes: dict[str, list[int | None]]) -> Analysis:
    an = Analysis(model, shapes, initializers(model))
    inits = set(an.consts)
    for inp in model.graph.input:
        dims = shapes.get(inp.name)
        if inp.name not in inits and dims and len(dims) >= 2 and dims[1]:
            reason = f"its channels come from the graph input {inp.name!r}"
            an.layout[inp.name] = ((an.space(dims[1], reason), dims[1]),)
    for index, node in enumerate(model.graph.node):
        _visit(an, index, node)
        for name in subgraph_inputs(node):
            an.mark(name, f"read inside a subgraph of {node.op_type} '{label(node, index)}'")
    for out in model.graph.output:
        an.mark(out.name, f"{out.name!r} is a graph output")
    return an


def _visit(an: Analysis, i: int, n: onnx.NodeProto) -> None:
    where = f"{n.op_type} '{label(n, i)}'"
    tracked = [t for t in n.input if t in an.layout]

    def unknown(reason: str | None = None) -> None:
        for t in tracked:
            an.mark(t, reason or f"consumed by {where}, which the pruner cannot adjust")

    def extra_outputs_used() -> bool:
        return any(o for o in n.output[1:])

    if n.domain not in ("", "ai.onnx"):
        return unknown()
    op, out = n.op_type, (n.output[0] if n.output else "")
    shape = lambda t: an.shapes.get(t)  # noqa: E731

    if op == "Conv":
        x, w = n.input[0], n.input[1]
        b = n.input[2] if len(n.input) > 2 and n.input[2] else None
        W = an.consts.get(w)
        if W is None or W.ndim < 3 or (b and b not in an.consts):
            return unknown(f"consumed by {where}, whose weights are not constant")  # its output: untracked
        g, cout, lx = attr(n, "group", 1), W.shape[0], an.layout.get(x)
        if g == 1:
            if lx:
                an.uses.append(Use(i, 1, 1, x, False))
            an.layout[out] = ((an.space(cout), cout),)
        elif W.shape[1] == 1 and cout == g and lx and sum(c for _, c in lx) == g:
            an.layout[out] = lx  # depthwise: its channels are its input's
            an.depthwise.append((i, out))
        else:
            unknown(f"consumed by grouped {where} (group={g})")
            an.layout[out] = ((an.space(cout, f"made by grouped {where} (group={g})"), cout),)
            return
        an.producers.append((i, out, g != 1))
        an.uses.append(Use(i, 1, 0, out, True))
        if b:
            an.uses.append(Use(i, 2, 0, out, True))
        return

    if op in KEEP_CHANNELS:
        if n.input[0] in an.layout:
            if extra_outputs_used():
                return unknown(f"{where} has a second output (indices or mask) the pruner cannot adjust")
            an.layout[out] = an.layout[n.input[0]]
        return

    if op in ("Pad", "Resize", "Upsample"):
        if n.input[0] not in an.layout:
            return
        if op == "Pad":
            pads = an.consts.get(n.input[1]) if len(n.input) > 1 and n.input[1] else np.array(attr(n, "pads", []) or [])
            rank = len(shape(n.input[0]) or [])
            ok = (pads is not None and len(pads) == 2 * rank and pads[1] == 0 and pads[rank + 1] == 0
                  and not (len(n.input) > 3 and n.input[3]))
        else:
            sizes = n.input[3] if op == "Resize" and len(n.input) > 3 else ""
            scales = n.input[2] if op == "Resize" and len(n.input) > 2 else (n.input[1] if len(n.input) > 1 else "")
            s = an.consts.get(scales) if scales else None
            ok = not sizes and s is not None and s.size >= 2 and s[1] == 1
        if not ok:
            return unknown(f"{where} may change the channel count")
        an.layout[out] = an.layout[n.input[0]]
        return

    if op in ELEMENTWISE or op == "PRelu":
        so = shape(out)
        if not so or len(so) < 2 or not so[1]:
            return unknown(f"consumed by {where}, whose output shape is unknown")
        rank, channels = len(so), so[1]
        layouts, uses, untracked = [], [], None
        for k, t in enumerate(n.input):
            if not t:
                continue
            st = list(an.consts[t].shape) if t in an.consts else shape(t)
            if st is None:
                return unknown(f"consumed by {where}, whose input shapes are unknown")
            axis = 1 - (rank - len(st))
            c = st[axis] if axis >= 0 else 1
            if c == 1:
                continue
            if c != channels:
                return unknown(f"consumed by {where}, which broadcasts it unexpectedly")
            if t in an.consts:
                uses.append(Use(i, k, axis, out, op in ZERO_WHEN_MASKED))
            elif t in an.layout and axis == 1:
                layouts.append(an.layout[t])
            elif t in an.layout:
                return unknown(f"consumed by {where} on another axis")
            else:
                untracked = f"{where} combines it with {t!r}, which the pruner does not track"
        if layouts:
            an.layout[out] = an.merge(layouts, where)
            an.uses.extend(uses)
            if untracked:
                an.mark(out, untracked)
        return

    if op == "BatchNormalization":
        if n.input[0] not in an.layout:
            return
        if extra_outputs_used() or not all(t in an.consts for t in n.input[1:5]):
            return unknown()
        an.layout[out] = an.layout[n.input[0]]
        an.uses.extend(Use(i, k, 0, out, k in (1, 2)) for k in range(1, 5))
        return

    if op == "Concat":
        if not tracked:
            return
        so = shape(out)
        axis = attr(n, "axis", 0)
        axis = axis + len(so) if so and axis < 0 else axis
        if any(t not in an.layout for t in n.input if t):
            return unknown(f"{where} joins it with tensors the pruner does not track")
        layouts = [an.layout[t] for t in n.input if t]
        an.layout[out] = (tuple(seg for lay in layouts for seg in lay) if axis == 1 else an.merge(layouts, where))
        return

    if op in ("Flatten", "Reshape", "Squeeze"):
        x = n.input[0]
        if x not in an.layout:
            return
        sx, so = shape(x), shape(out)
        flat = (sx and so and len(sx) > 2 and all(d == 1 for d in sx[2:]) and len(so) == 2 and so[1] == sx[1]
                and (op != "Flatten" or attr(n, "axis", 1) == 1))
        if not flat:
            return unknown(f"{where} mixes its channels with other axes (a fixed reshape)")
        an.layout[out] = an.layout[x]
        return

    if op in ("Gemm", "MatMul"):
        a, b = n.input[0], n.input[1]
        if b in an.layout or (a in an.layout and (b not in an.consts or an.consts[b].ndim != 2
                                                  or (op == "Gemm" and attr(n, "transA", 0))
                                                  or len(shape(a) or []) != 2)):
            return unknown()
        if a in an.layout:
            an.uses.append(Use(i, 1, 1 if op == "Gemm" and attr(n, "transB", 0) else 0, a, False))
        return

    return unknown()


def groups(an: Analysis) -> dict[int, Group]:
    """One group per united space that at least one group-1 Conv produces."""
    out: dict[int, Group] = {}
    for node, tensor, depthwise in an.producers:
        name = label(an.model.graph.node[node], node)
        for s, _ in an.layout[tensor]:
            r = an.root(s)
            g = out.get(r) or out.setdefault(r, Group(r, an.count[r], [], [], list(an.reasons.get(r, []))))
            if name not in g.members:
                g.members.append(name)
            if not depthwise and name not in g.producers:
                g.producers.append(name)
    return {r: g for r, g in out.items() if g.producers}


def choose(an: Analysis, found: dict[int, Group], ratio: float, norm: str, round_to: int = 1) -> None:
    """Rank each safe group's channels by the summed filter norms of its Convs; keep the top (1 - ratio),
    rounded up to a multiple of ``round_to`` (SIMD-friendly channel counts)."""
    importance = {r: np.zeros(g.channels) for r, g in found.items()}
    for node, tensor, _ in an.producers:
        w = an.consts[an.model.graph.node[node].input[1]].astype(np.float64)
        w = w.reshape(w.shape[0], -1)
        norms = np.abs(w).sum(1) if norm == "l1" else np.sqrt((w * w).sum(1))
        offset = 0
        for s, c in an.layout[tensor]:
            r = an.root(s)
            if r in importance:
                importance[r] += norms[offset:offset + c]
            offset += c
    for r, g in found.items():
        if g.reasons:
            continue
        keep = max(g.channels - math.floor(ratio * g.channels + 1e-9), 1)
        keep = min(g.channels, -(-keep // round_to) * round_to)
        order = np.argsort(-importance[r], kind="stable")  # highest first; ties keep the lower index
        g.keep = np.sort(order[:keep])


def apply(an: Analysis, found: dict[int, Group], mask: bool = False) -> None:
    """Cut (or, with ``mask``, zero) the chosen channels in every use; fix depthwise groups."""
    model = an.model

    def keep_of(tensor: str) -> np.ndarray | None:
        parts, offset, cut = [], 0, False
        for s, c in an.layout.get(tensor, ()):
            g = found.get(an.root(s))
            if g is not None and g.keep is not None and len(g.keep) < c:
                parts.append(g.keep + offset)
                cut = True
            else:
                parts.append(np.arange(c) + offset)
            offset += c
        return np.concatenate(parts) if cut else None

    edits: dict[tuple[int, int], list[tuple[int, np.ndarray, bool]]] = {}
    seen = set()
    for u in an.uses:
        if (u.node, u.input, u.axis, u.tensor) in seen:
            continue
        seen.add((u.node, u.input, u.axis, u.tensor))
        keep = keep_of(u.tensor)
        if keep is not None:
            edits.setdefault((u.node, u.input), []).append((u.axis, keep, u.produces))
    for (ni, k), cuts in edits.items():
        node = model.graph.node[ni]
        value = an.consts[node.input[k]]
        for axis, keep, produces in cuts:
            if not mask:
                value = np.take(value, keep, axis=axis)
            elif produces:
                drop = np.setdiff1d(np.arange(value.shape[axis]), keep)
                value = value.copy()
                value[(slice(None),) * axis + (drop,)] = 0
        node.input[k] = add_initializer(model, node.input[k] + ("_masked" if mask else "_pruned"), value)
    if not mask:
        for ni, tensor in an.depthwise:
            keep = keep_of(tensor)
            if keep is not None:
                node = model.graph.node[ni]
                for a in node.attribute:
                    if a.name == "group":
                        a.i = len(keep)
