"""The channel-pruning pass on real models (the PP-OCR MobileNetV3 classifier, the bench's ResNet-18) and on
small graphs built to hold one hard case each (Concat, depthwise, residual Add, unsafe consumers).

The central check: a model whose chosen channels are only *zeroed* (``mask_only``: same graph, same shapes)
computes what the pruned model computes. That holds only if every consumer was cut at the right indices.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from converter import ConvertError  # noqa: E402
from converter import passes  # noqa: E402
from converter.passes.prune import parse_ratio, prune  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OCR_SHAPE = {"x": [1, 3, 48, 192]}


def run(path: Path, x: np.ndarray, name: str) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {name: x[i : i + 16]})[0] for i in range(0, len(x), 16)])


def convs(path: Path) -> dict[str, tuple[int, ...]]:
    model = onnx.load(str(path))
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node if n.op_type == "Conv"}


@pytest.fixture(scope="module")
def ocr(tmp_path_factory):
    from edgefleet.data import text_direction
    from edgefleet.models import model_path

    src = model_path("ocr-cls")
    out = tmp_path_factory.mktemp("ocr")
    crops, _ = text_direction(64)
    report = prune(src, out / "p30.onnx", "30%", input_shapes=OCR_SHAPE, latency_runs=0)
    prune(src, out / "m30.onnx", "30%", input_shapes=OCR_SHAPE, latency_runs=0, mask_only=True)
    return src, out, crops, report


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    sys.path.insert(0, str(ROOT))
    from bench import resnet

    out = tmp_path_factory.mktemp("resnet")
    photos = resnet.photos(16)
    src = resnet.build(out / "resnet18.onnx", photos)
    report = prune(src, out / "p30.onnx", 0.3, round_to=1, latency_runs=0)  # exactly 30 % of every group
    prune(src, out / "m30.onnx", 0.3, round_to=1, latency_runs=0, mask_only=True)
    return src, out, photos, report


def test_ocr_cls_pruned_runs_with_fewer_channels_params_and_macs(ocr):
    src, out, crops, report = ocr
    n = report["notes"]
    assert run(out / "p30.onnx", crops, "x").shape == run(src, crops, "x").shape == (64, 2)
    assert n["batchnorm_folded"] == 35  # the Paddle export keeps its BatchNorms: all folded
    pruned, skipped = n["groups"]["pruned"], n["groups"]["skipped"]
    # every group but the head (its channel count is read by Shape for the classifier's reshape) is pruned:
    # the residual Adds, the depthwise convs and the squeeze-excitation Muls are all handled
    assert len(pruned) == 25 and len(skipped) == 1 and "Shape 'Shape@0'" in skipped[0]["reason"]
    shapes = convs(out / "p30.onnx")
    for g in pruned:  # 30 % removed, the count kept rounded up to a multiple of 8 (at most all)
        assert g["kept"] == min(g["channels"], -(-(g["channels"] - int(0.3 * g["channels"])) // 8) * 8)
        assert all(shapes[c][0] == g["kept"] for c in g["convs"])
    assert all(shapes[c][0] == g["channels"] for g in skipped for c in g["convs"])
    # each weight loses at most 30 % on each of its two channel axes; rounding to 8 keeps a few more
    for key in ("params", "macs"):
        assert (1 - 0.3) ** 2 <= n[key]["after"] / n[key]["before"] <= 0.75, (key, n[key])
    assert n["size"]["after"] < n["size"]["before"]


def test_resnet18_every_residual_group_is_pruned_and_params_fall_as_the_ratio_says(resnet18):
    src, out, photos, report = resnet18
    n = report["notes"]
    assert run(out / "p30.onnx", photos, "input").shape == (16, 1000)
    assert n["batchnorm_folded"] == 0  # built without BatchNorm (folded already, like many exports)
    assert n["groups"]["skipped"] == []
    residual = [g for g in n["groups"]["pruned"] if len(g["convs"]) > 1]
    assert sorted(len(g["convs"]) for g in residual) == [3, 3, 3, 3]  # per stage: block convs (+ stem or skip)
    # every conv is cut on both channel axes (the stem keeps its 3 input channels, the Gemm its 1000 outputs)
    for key in ("params", "macs"):
        assert abs(n[key]["after"] / n[key]["before"] - 0.7 ** 2) < 0.03, (key, n[key])


@pytest.mark.parametrize("which", ["ocr", "resnet18"])
def test_pruned_model_computes_what_the_model_with_those_channels_zeroed_computes(which, request):
    src, out, x, _ = request.getfixturevalue(which)
    name = "x" if which == "ocr" else "input"
    pruned, masked, original = run(out / "p30.onnx", x, name), run(out / "m30.onnx", x, name), run(src, x, name)
    assert np.abs(masked - original).max() > 1e-2  # the channels zeroed mattered
    np.testing.assert_allclose(pruned, masked, rtol=1e-4, atol=1e-4 * np.abs(masked).max())


def test_ratio_zero_writes_a_model_with_identical_outputs(ocr, tmp_path):
    src, _, crops, _ = ocr
    report = prune(src, tmp_path / "p0.onnx", "0%", input_shapes=OCR_SHAPE, latency_runs=0)
    assert np.array_equal(run(tmp_path / "p0.onnx", crops, "x"), run(src, crops, "x"))
    assert report["notes"]["batchnorm_folded"] == 0 and report["notes"]["channels"]["removed"] == 0


def test_batchnorm_folding_alone_keeps_outputs(ocr, tmp_path):
    from converter.passes import _onnxgraph as og

    src, _, crops, _ = ocr
    model = og.load(src)
    og.constants_to_initializers(model)
    assert len(og.fold_batchnorm(model)) == 35
    og.cleanup(model)
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    onnx.save(model, str(tmp_path / "folded.onnx"))
    np.testing.assert_allclose(run(tmp_path / "folded.onnx", crops, "x"), run(src, crops, "x"), atol=1e-5)


# -- small graphs, one hard case each --

def conv(nodes, inits, rng, x, cin, cout, name, group=1, relu=True):
    w = rng.normal(0, 0.5, (cout, cin // group, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, cout).astype(np.float32)
    inits += [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]
    nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [name], name=name, pads=[1] * 4, group=group))
    if relu:
        nodes.append(helper.make_node("Relu", [name], [name + "_r"], name=name + "_relu"))
        return name + "_r"
    return name


def save(path, nodes, inits, outputs, inputs=(("x", [1, 3, 8, 8]),)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_concat_depthwise_and_residual_groups(tmp_path):
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    p = conv(nodes, inits, rng, "x", 3, 8, "p")
    q = conv(nodes, inits, rng, "x", 3, 6, "q")
    nodes.append(helper.make_node("Concat", [p, q], ["cat"], name="cat", axis=1))
    dw = conv(nodes, inits, rng, "cat", 14, 14, "dw", group=14)
    r = conv(nodes, inits, rng, dw, 14, 10, "r", relu=False)
    t = conv(nodes, inits, rng, "cat", 14, 10, "t", relu=False)
    nodes += [helper.make_node("Add", [r, t], ["sum"], name="residual"),
              helper.make_node("GlobalAveragePool", ["sum"], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flat", axis=1),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
    inits += [numpy_helper.from_array(rng.normal(0, 1, (5, 10)).astype(np.float32), "fc_w"),
              numpy_helper.from_array(np.zeros(5, np.float32), "fc_b")]
    # a dynamic batch: 1 for MACs and the check run
    src = save(tmp_path / "m.onnx", nodes, inits, [("y", ["N", 5])], inputs=[("x", ["N", 3, 8, 8])])
    report = prune(src, tmp_path / "p.onnx", "30%", round_to=1, latency_runs=0)
    prune(src, tmp_path / "m30.onnx", "30%", round_to=1, latency_runs=0, mask_only=True)
    groups = {tuple(g["convs"]): g["kept"] for g in report["notes"]["groups"]["pruned"]}
    assert groups == {("p",): 6, ("q",): 5, ("r", "t"): 7}
    shapes = convs(tmp_path / "p.onnx")
    assert shapes["dw"] == (11, 1, 3, 3) and shapes["r"] == (7, 11, 3, 3) and shapes["t"] == (7, 11, 3, 3)
    x = np.random.default_rng(1).normal(size=(4, 3, 8, 8)).astype(np.float32)
    pruned, masked = run(tmp_path / "p.onnx", x, "x"), run(tmp_path / "m30.onnx", x, "x")
    np.testing.assert_allclose(pruned, masked, rtol=1e-5, atol=1e-5)


def unsafe_graph(path):
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    a = conv(nodes, inits, rng, "x", 3, 8, "a")
    b = conv(nodes, inits, rng, a, 8, 4, "b")
    inits += [numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
              numpy_helper.from_array(rng.normal(0, 1, (4 * 8 * 8, 2)).astype(np.float32), "mm_w")]
    nodes += [helper.make_node("Reshape", [b, "shape"], ["flat"], name="fixed_reshape"),
              helper.make_node("MatMul", ["flat", "mm_w"], ["y"], name="mm")]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("s0", [0]), ("s1", [4]), ("s_ax", [1]))]
    nodes.append(helper.make_node("Slice", [a, "s0", "s1", "s_ax"], ["half"], name="channel_slice"))
    c = conv(nodes, inits, rng, "half", 4, 6, "c")
    conv(nodes, inits, rng, c, 6, 4, "d", relu=False)
    return save(path, nodes, inits, [("y", [1, 2]), ("d", [1, 4, 8, 8])])


def test_unsafe_consumers_skip_their_group_and_name_the_reason(tmp_path):
    src = unsafe_graph(tmp_path / "m.onnx")
    report = prune(src, tmp_path / "p.onnx", "30%", round_to=1, latency_runs=0)
    skipped = {tuple(g["convs"]): g["reason"] for g in report["notes"]["groups"]["skipped"]}
    assert "Slice 'channel_slice'" in skipped[("a",)]
    assert "Reshape 'fixed_reshape'" in skipped[("b",)]
    assert "'d' is a graph output" in skipped[("d",)]
    assert [(g["convs"], g["kept"]) for g in report["notes"]["groups"]["pruned"]] == [(["c"], 5)]
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    s = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    assert [o.shape for o in s.run(None, {"x": x})] == [(1, 2), (1, 4, 8, 8)]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "converter.passes.prune", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


@pytest.mark.parametrize("ratio, message", [("150%", "pruning ratio '150%' is out of range"),
                                            ("abc", "pruning ratio 'abc' is not a percentage"),
                                            ("100%", "out of range")])
def test_a_bad_ratio_is_one_line(tmp_path, ratio, message):
    src = unsafe_graph(tmp_path / "m.onnx")
    r = cli(src, "--ratio", ratio, "--out", tmp_path / "p.onnx")
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "p.onnx").exists()
    with pytest.raises(ConvertError, match="out of range"):
        parse_ratio(1.5)


def test_a_model_with_nothing_safe_to_prune_is_refused_in_one_line(tmp_path):
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    conv(nodes, inits, rng, "x", 3, 8, "only", relu=False)
    src = save(tmp_path / "m.onnx", nodes, inits, [("only", [1, 8, 8, 8])])
    r = cli(src, "--ratio", "30%", "--out", tmp_path / "p.onnx")
    assert r.returncode == 2 and "no channel group can be pruned safely" in r.stderr and "graph output" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not list(tmp_path.glob("p.onnx*"))
    r = cli(tmp_path / "missing.onnx", "--ratio", "30%", "--out", tmp_path / "p.onnx")
    assert r.returncode == 2 and "no such model file" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_prints_the_report_with_latency_measured_in_the_same_run(tmp_path):
    src = unsafe_graph(tmp_path / "m.onnx")
    r = cli(src, "--ratio", "30%", "--out", tmp_path / "p.onnx", "--runs", "10", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    lat = report["notes"]["latency_ms"]
    assert lat["threads"] == 1 and lat["runs"] == 10
    assert lat["speedup"] == pytest.approx(lat["before"] / lat["after"], rel=1e-2)
    assert report["toolchain"]["onnx"] == onnx.__version__ and report["config"]["ratio"] == 0.3
    r = cli(src, "--ratio", "30%", "--out", tmp_path / "p2.onnx", "--runs", "0", "--round-to", "4")
    assert r.returncode == 0 and "groups skipped (3)" in r.stdout and "channel_slice" in r.stdout
    assert "c: 6 -> 6" in r.stdout  # 30 % of 6 is 1 channel: 5 kept, rounded up to 8 (a multiple of 4), capped at all 6


def test_the_pass_is_found_by_its_file_and_its_config_is_typed():
    step = passes.load("prune")
    assert "prune" in passes.available() and step.name == "prune"
    assert step.config(ratio=0.3).norm == "l1"
    with pytest.raises(ConvertError, match="bogus"):
        step.config(ratio=0.3, bogus=1)
    with pytest.raises(ConvertError, match="norm"):
        step.config(ratio=0.3, norm="l3")
    with pytest.raises(ConvertError, match="unknown pass 'nope'"):
        passes.load("nope")
