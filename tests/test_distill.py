"""The distillation pass on a real model: the PP-OCR text-direction classifier (MobileNetV3), pruned 30 %, fine-tuned
against the original's outputs on real text crops, and judged on crops it never saw.

What distillation is for is checked directly: the pruned + distilled model agrees with the original better than the
pruned one does, on held-out crops. Then early stop (keeping the best epoch's weights), the converter's --distill
path with its report section, and each bad input as one line with exit 2 and nothing written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from converter import ConvertError  # noqa: E402
from converter import passes  # noqa: E402
from converter.passes.prune import prune  # noqa: E402
from util import snapshot

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = "save_infer_model/scale_0.tmp_1"
TRAIN, HELD = 160, 120  # crops to distill on (the pass holds 20 % of them out for early stop); crops to judge on


def run(path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"x": x[i : i + 32]})[0] for i in range(0, len(x), 32)])


def agreement(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and mean KL(ref || got) of two [N, 2] probability outputs."""
    p, q = np.clip(ref, 1e-12, None), np.clip(got, 1e-12, None)
    return float((ref.argmax(1) == got.argmax(1)).mean()), float((p * np.log(p / q)).sum(1).mean())


@pytest.fixture(scope="module")
def ocr(tmp_path_factory):
    from edgefleet.data import text_direction
    from edgefleet.models import model_path

    src = model_path("ocr-cls")
    d = tmp_path_factory.mktemp("distill")
    crops, _ = text_direction(TRAIN + HELD)
    prune(src, d / "pruned.onnx", "30%", input_shapes={"x": [1, 3, 48, 192]}, latency_runs=0)
    step = passes.load("distill")
    lines: list[str] = []
    report = step.run(d / "pruned.onnx", step.config(epochs=8, patience=2), d / "distilled.onnx", teacher=src,
                      data={"x": crops[:TRAIN]}, progress=lines.append).report()
    return src, d, crops, report, lines


def test_distilled_agrees_with_the_original_better_than_pruned_alone_on_held_out_crops(ocr):
    src, d, crops, report, _ = ocr
    held = crops[TRAIN:]
    ref = run(src, held)
    top1_pruned, kl_pruned = agreement(ref, run(d / "pruned.onnx", held))
    top1_distilled, kl_distilled = agreement(ref, run(d / "distilled.onnx", held))
    assert top1_pruned < 0.8  # pruning alone loses much of the agreement (about 60 % here)
    assert top1_distilled > top1_pruned + 0.1 and kl_distilled < kl_pruned / 1.5
    # the figures the pass reports are its own validation crops (a share of the training data), improved too
    v = report["notes"]["validation"]
    assert v["after"] < v["before"] and v["top1_after"] > v["top1_before"]


def test_the_distilled_model_keeps_the_students_graph_names_and_dynamic_batch(ocr):
    _, d, crops, report, _ = ocr
    student, distilled = onnx.load(str(d / "pruned.onnx")), onnx.load(str(d / "distilled.onnx"))
    assert [n.op_type for n in distilled.graph.node] == [n.op_type for n in student.graph.node]
    assert [i.name for i in distilled.graph.input] == ["x"] and [o.name for o in distilled.graph.output] == [OUTPUT]
    assert distilled.graph.input[0].type == student.graph.input[0].type
    changed = [a.name for a, b in zip(student.graph.initializer, distilled.graph.initializer)
               if not np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))]
    assert len(changed) == report["notes"]["parameter_tensors"] > 50
    for n in (1, 5):  # any batch runs in ONNX Runtime
        assert run(d / "distilled.onnx", crops[:n]).shape == (n, 2)
    assert report["notes"]["export_check"]["relative_max_abs_diff"] < 1e-3


def test_progress_says_feeds_and_epochs_first_then_one_line_an_epoch(ocr):
    _, _, _, report, lines = ocr
    n = report["notes"]
    assert lines[0].startswith(f"distilling: {n['train_feeds']} training feeds and {n['validation_feeds']} held out "
                               f"for early stop, up to 8 epochs")
    assert n["train_feeds"] + n["validation_feeds"] == TRAIN and n["validation_feeds"] == TRAIN // 5
    epochs = [line for line in lines if line.startswith("distill epoch ")]
    assert len(epochs) == 1 + n["epochs_run"] and "validation KL" in epochs[1] and "train loss" in epochs[1]
    assert [e["epoch"] for e in n["epochs"]] == list(range(1, n["epochs_run"] + 1))
    best = min(n["epochs"], key=lambda e: e["validation"])
    assert n["best_epoch"] == best["epoch"] and n["validation"]["after"] == best["validation"]
    assert "best" in epochs[n["best_epoch"]]
    if n["stopped_early"]:
        assert "stopping early" in epochs[-1] and n["epochs_run"] < 8


def test_early_stop_keeps_the_best_epochs_weights(ocr, tmp_path):
    """An improvement no epoch can reach (99 %): training stops after `patience` epochs, and the best epoch is
    epoch 0, the student as given, so the model written computes exactly what the student computes."""
    src, d, crops, _, _ = ocr
    step = passes.load("distill")
    lines: list[str] = []
    report = step.run(d / "pruned.onnx", step.config(epochs=5, patience=1, min_improvement=0.99, learning_rate=1e-3),
                      tmp_path / "same.onnx", teacher=src, data={"x": crops[:40]}, progress=lines.append).report()
    n = report["notes"]
    assert n["stopped_early"] and n["epochs_run"] == 1 and n["best_epoch"] == 0
    assert "stopping early" in lines[-1] and "keeping epoch 0" in lines[-1]
    x = crops[TRAIN:TRAIN + 16]
    np.testing.assert_array_equal(run(tmp_path / "same.onnx", x), run(d / "pruned.onnx", x))


def test_same_seed_same_model(ocr, tmp_path):
    src, d, crops, _, _ = ocr
    step = passes.load("distill")
    for name in ("a.onnx", "b.onnx"):
        step.run(d / "pruned.onnx", step.config(epochs=1, seed=3), tmp_path / name, teacher=src,
                 data={"x": crops[:40]})
    x = crops[TRAIN:TRAIN + 16]
    np.testing.assert_array_equal(run(tmp_path / "a.onnx", x), run(tmp_path / "b.onnx", x))
    assert not np.array_equal(run(tmp_path / "a.onnx", x), run(d / "pruned.onnx", x))


def test_the_config_is_typed():
    step = passes.load("distill")
    assert "distill" in passes.available()
    assert step.config().epochs >= 1
    with pytest.raises(ConvertError, match="temperature"):
        step.config(temperature=0)
    with pytest.raises(ConvertError, match="epochs"):
        step.config(epochs="many")


# ---- through the converter's CLI ----

@pytest.fixture(scope="module")
def calib(ocr, tmp_path_factory):
    _, _, crops, _, _ = ocr
    d = tmp_path_factory.mktemp("calib")
    np.savez(d / "calib.npz", x=crops[:50])  # 40 calibrate (and distill), 10 held out
    np.savez(d / "train.npz", x=crops[50:TRAIN])
    return d


def test_convert_prune_and_distill_reports_the_distillation(ocr, calib, tmp_path, capsys):
    from edgefleet.cli import main

    src = ocr[0]
    out = tmp_path / "dist"
    code = main(["convert", str(src), "--calib", str(calib / "calib.npz"), "--target", "cpu", "--out", str(out),
                 "--prune", "30%", "--distill", "--train-data", str(calib / "train.npz"), "--distill-epochs", "2",
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    d = report["distillation"]
    assert d["name"] == "distill" and d["train_data"] == str(calib / "train.npz")
    assert d["notes"]["train_feeds"] + d["notes"]["validation_feeds"] == TRAIN - 50
    assert d["notes"]["epochs_run"] == len(d["notes"]["epochs"]) <= 2 and d["config"]["epochs"] == 2
    assert d["toolchain"]["torch"].startswith("2.")
    assert "distilling: 88 training feeds and 22 held out" in captured.err
    assert "pruning" in report and report["variants"]
    for v in report["variants"]:  # judged against the original, unpruned model
        assert v["agreement"]["samples"] == 10 and v["distillation"] == d


def test_default_training_data_is_the_calibration_split(ocr, calib, tmp_path, capsys):
    from converter.convert import convert

    lines: list[str] = []
    report = convert(ocr[0], calib=calib / "calib.npz", out=tmp_path / "dist", prune="30%", distill=True,
                     distill_epochs=1, progress=lines.append)
    n = report["distillation"]["notes"]
    assert report["distillation"]["train_data"] == "the calibration split"
    assert n["train_feeds"] + n["validation_feeds"] == 40  # the 40 calibration crops, never the 10 held out


@pytest.mark.parametrize("case", ["no prune", "train data without distill", "epochs without distill",
                                  "wrong dtype", "wrong shape", "wrong name", "bad epochs"])
def test_bad_input_is_one_line_exit_2_nothing_written(case, ocr, calib, tmp_path, capsys):
    from edgefleet.cli import main

    src, _, crops, _, _ = ocr
    bad = tmp_path / "bad.npz"
    argv, needle = {
        "no prune": (["--distill"], "--distill fine-tunes the pruned model: give --prune too"),
        "train data without distill": (["--prune", "30%", "--train-data", str(calib / "train.npz")],
                                       "--train-data needs --distill"),
        "epochs without distill": (["--distill-epochs", "3"], "--distill-epochs needs --distill"),
        "wrong dtype": (["--prune", "30%", "--distill", "--train-data", str(bad)], "array 'x' is float64 but the model input is float32"),
        "wrong shape": (["--prune", "30%", "--distill", "--train-data", str(bad)], "array 'x' has shape [20, 3, 48, 96] but the model input is [?, 3, 48, 192] (dimension 3 differs)"),
        "wrong name": (["--prune", "30%", "--distill", "--train-data", str(bad)], "file bad.npz has no array for model input 'x' (it holds: 'image')"),
        "bad epochs": (["--prune", "30%", "--distill", "--distill-epochs", "0"], "epochs"),
    }[case]
    data = {"wrong dtype": {"x": crops[:20].astype(np.float64)}, "wrong shape": {"x": crops[:20, :, :, :96]},
            "wrong name": {"image": crops[:20]}}.get(case)
    if data is not None:
        np.savez(bad, **data)
        needle = f"--train-data bad.npz: {needle}"
    before = snapshot(tmp_path)
    code = main(["convert", str(src), "--calib", str(calib / "calib.npz"), "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("edgefleet convert: error: ") and needle in err, err
    assert snapshot(tmp_path) == before


def test_missing_torch_is_one_line_in_a_real_process(ocr, calib, tmp_path):
    stub = tmp_path / "stub"
    (stub / "torch").mkdir(parents=True)
    (stub / "torch" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub), str(ROOT)])}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", "import sys; from edgefleet.cli import main; sys.exit(main())",
                           "convert", str(ocr[0]), "--calib", str(calib / "calib.npz"), "--out", str(out),
                           "--prune", "30%", "--distill"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "edgefleet convert: error: --distill needs torch: pip install 'edgefleet[distill]'"
    assert not out.exists()


def test_a_student_with_an_op_torch_cannot_run_is_one_line(tmp_path, capsys):
    """Conv -> Relu -> Conv -> GlobalAveragePool -> Flatten -> LpNormalization: the Convs prune, the last op the
    distillation pass has no torch for."""
    from onnx import TensorProto, helper, numpy_helper

    from edgefleet.cli import main

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             (("w1", (16, 3, 3, 3)), ("w2", (16, 16, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w2"], ["c"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c"], ["d"]),
             helper.make_node("Flatten", ["d"], ["e"]),
             helper.make_node("LpNormalization", ["e"], ["y"], axis=1, p=2, name="norm")]
    graph = helper.make_graph(nodes, "lp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "lp.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((12, 3, 16, 16)).astype(np.float32))
    before = snapshot(tmp_path)
    code = main(["convert", str(tmp_path / "lp.onnx"), "--calib", str(tmp_path / "calib.npz"),
                 "--out", str(tmp_path / "out"), "--prune", "30%", "--distill"])
    lines = capsys.readouterr().err.strip().splitlines()  # progress lines up to the pruning, then the error
    assert code == 2 and lines[-1] == ("edgefleet convert: error: the student uses op 'LpNormalization' (node "
                                       "'norm'), which the distillation pass cannot run in torch"), lines
    assert lines[-2].startswith("pruning 30%") and not any("Traceback" in line for line in lines)
    assert snapshot(tmp_path) == before


def test_help_names_the_distill_flags(capsys):
    from converter.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--distill " in out and "--train-data" in out and "--distill-epochs" in out
    assert "with --prune: fine-tune the pruned model against the" in " ".join(out.split())
