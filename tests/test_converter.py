"""The converter's cpu target on the real PP-OCR text-direction classifier and real text crops.

Real ONNX Runtime, real quantization, real bundles read back the way a device reads them.
No timing thresholds: latencies are only checked to be reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent import runtimes
from agent.bundle import read_manifest, safe_unpack, sha256_file
from util import assert_refused_in_one_line, snapshot

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

EDGEFLEET = Path(sys.executable).parent / "edgefleet"
N_SAMPLES = 100  # 80 calibrate, 20 held out


@pytest.fixture(scope="module")
def model() -> Path:
    from edgefleet.models import model_path

    return model_path("ocr-cls")


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A calibration npz of real text crops (half turned 180°), plus the crops and labels."""
    from edgefleet.data import text_direction

    x, labels = text_direction(N_SAMPLES)
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=x)
    return path, x, labels


@pytest.fixture(scope="module")
def converted(model, real, tmp_path_factory) -> tuple[Path, dict, str]:
    """One real `edgefleet convert --json` run, as a user runs it: (DIR, report from stdout, stderr)."""
    out = tmp_path_factory.mktemp("convert") / "dist"
    cwd = tmp_path_factory.mktemp("cwd")
    proc = subprocess.run(
        [str(EDGEFLEET), "convert", str(model), "--target", "cpu", "--calib", str(real[0]), "--out", str(out),
         "--name", "ocr-cls", "--version", "7", "--input-shape", "x=1x3x48x192", "--json",
         "--setting", "accelerators=CUDA,CPU", "--setting", "max_wait_us=800"],
        capture_output=True, text=True, timeout=300, cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr
    assert list(cwd.iterdir()) == []  # no toolchain litter in the user's working directory
    return out, json.loads(proc.stdout), proc.stderr


def _bundle(out: Path, precision: str) -> Path:
    return out / f"ocr-cls-7-cpu-{precision}.tar"


def test_json_report_progress_and_files(converted, model, real):
    out, report, stderr = converted
    assert sorted(p.name for p in out.iterdir()) == ["ocr-cls-7-cpu-fp32.tar", "ocr-cls-7-cpu-int8-dynamic.tar",
                                                     "ocr-cls-7-cpu-int8.tar", "report.html", "report.json"]
    assert [v["variant"] for v in report["variants"]] == ["fp32", "int8", "int8-dynamic"]
    assert report["refused"] == [] and report["skipped"] == []
    html = (out / "report.html").read_text()
    assert "<svg" in html and "cpu/int8" in html and "http" not in html.split("<svg", 1)[1].split("</svg>")[0].replace(
        "http://www.w3.org/2000/svg", "")
    assert report["source"]["sha256"] == sha256_file(model)
    assert report["calibration"]["sha256"] == sha256_file(real[0])
    assert report["calibration"]["held_out_samples"] == N_SAMPLES // 5
    assert report["toolchain"]["onnx"] and report["toolchain"]["onnxruntime"]
    assert isinstance(report["host"]["flags"], list)
    on_disk = json.loads((out / "report.json").read_text())
    assert [v["bundle_sha256"] for v in on_disk["variants"]] == [v["bundle_sha256"] for v in report["variants"]]
    for v in report["variants"]:
        assert sha256_file(v["path"]) == v["bundle_sha256"]
        assert v["round_trip"]["ok"] is True
    lines = stderr.strip().splitlines()
    steps = [line.split("]")[0] for line in lines if line.startswith("[cpu ")]
    assert steps == ["[cpu 1/5", "[cpu 1/5", "[cpu 2/5", "[cpu 2/5", "[cpu 3/5", "[cpu 3/5"]
    assert lines[0].startswith("checking") and lines[-2].startswith("writing 3 bundles")
    assert lines[-1].startswith("not signed: devices and the controller refuse these bundles")  # no --sign-key
    assert report["signed"] is None and all(read_manifest(v["path"]).serial == 0 for v in report["variants"])
    assert any("quantizing int8" in line and "per-channel" in line for line in lines)
    assert "Traceback" not in stderr


def test_every_bundle_carries_the_reference_profile_and_golden_feeds(converted, model, tmp_path):
    """profile.json: the fp32 reference's histograms on the held-out samples (agent/quality.py); golden.npz: the
    first held-out feeds with the fp32 outputs, which a device re-runs to check its runtime (issue 12)."""
    import msgspec
    import onnxruntime as ort

    from agent import quality
    from agent.bundle import safe_unpack

    out, report, _ = converted
    held = report["calibration"]["held_out_samples"]
    for precision in ("fp32", "int8"):
        dest = tmp_path / precision
        safe_unpack(_bundle(out, precision), dest)
        profile = msgspec.json.decode((dest / "profile.json").read_bytes(), type=quality.Profile)
        assert profile.id == report["quality_profile"]["id"] and profile.samples == held
        (o,) = profile.outputs
        assert o.kind == "classifier" and all(sum(c) == held for c in o.counts.values())
        with np.load(dest / "golden.npz") as g:
            n = report["quality_profile"]["golden_inputs"]
            feed_bytes = 3 * 48 * 192 * 4  # one float32 crop: as many as fit in 1 MiB, at most 16
            assert n == min(16, held, (1 << 20) // feed_bytes) == 9 and sorted(g.files) == sorted(
                [f"x/{i}" for i in range(n)] + [f"output/{o.name}/{i}" for i in range(n)])
            session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
            for i in range(n):
                np.testing.assert_array_equal(session.run([o.name], {"x": g[f"x/{i}"]})[0], g[f"output/{o.name}/{i}"])


def test_manifests_validate(converted, model, real):
    out, report, _ = converted
    for precision in ("fp32", "int8"):
        m = read_manifest(_bundle(out, precision))
        assert (m.name, m.version, m.target, m.runtime, m.precision) == ("ocr-cls", "7", "cpu", "onnxruntime",
                                                                         precision)
        assert m.model == "model.onnx" and m.sample == "sample.npz"
        assert sorted(f.path for f in m.files) == ["golden.npz", "model.onnx", "profile.json", "sample.npz"]
        assert [(i.name, i.shape, i.dtype) for i in m.inputs] == [("x", [-1, 3, 48, 192], "float32")]
        assert [(o.shape, o.dtype) for o in m.outputs] == [([-1, 2], "float32")]
        assert m.settings == {"intra_op_threads": 1, **m.report["throughput"]["recommended"],
                              "accelerators": "CUDA,CPU", "max_wait_us": 800} and [
            (t["concurrency"], t["max_batch"], sorted(t["inferences_per_s"])) for t in m.report["throughput"]["setups"]
        ] == [(1, 1, ["1", "2", "4"]), (2, 1, ["1", "2", "4"]), (1, 8, ["1", "2", "4"]), (2, 8, ["1", "2", "4"])]
        assert m.report["gate"]["passed"] is None and m.report["gate"]["metric"] == "top1"
        assert m.report["gate"]["output"] == "save_infer_model/scale_0.tmp_1"
        assert m.source_sha256 == sha256_file(model)
        assert m.latency_budget_ms >= 250.0
        assert m.latency_budget_ms >= 20 * m.report["latency_ms"]["p95"] - 0.1
        assert m.report["calibration"]["sha256"] == sha256_file(real[0])
        assert set(m.report["toolchain"]) >= {"onnx", "onnxruntime"}
        assert m.report["latency_ms"]["p50"] > 0 and m.report["latency_ms"]["runs"] >= 5
    recipe = read_manifest(_bundle(out, "int8")).report["recipe"]
    assert (recipe["format"], recipe["per_channel"], recipe["activation_type"], recipe["weight_type"]) == (
        "QDQ", True, "QUInt8", "QInt8")
    assert recipe["opset_upgraded_from"] == 11


def test_int8_has_per_channel_qdq(converted, tmp_path):
    out, _, _ = converted
    safe_unpack(_bundle(out, "int8"), tmp_path / "int8")
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    per_channel = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                   and inits[n.input[0]].dtype == np.int8 and inits[n.input[1]].size > 1]
    assert len(per_channel) >= 10  # the Conv weights: one scale per output channel
    for n in per_channel:
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        assert inits[n.input[1]].size == inits[n.input[0]].shape[axis]
    activations = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert activations and all(inits[n.input[2]].dtype == np.uint8 for n in activations)


def test_agreement_on_real_data(converted):
    _, report, _ = converted
    by = {v["variant"]: v["agreement"] for v in report["variants"]}
    for a in by.values():
        assert a["samples"] == N_SAMPLES // 5 and a["kind"] == "classifier"
        assert 0.0 <= a["top1"] <= 1.0 and a["top1"] >= 0.9
        assert a["top5"] == 1.0  # two classes: the fp32 top-1 is always within the top 2
        assert a["kl"] >= 0.0 and a["max_abs_err"] >= 0.0
    assert by["fp32"]["top1"] == 1.0 and by["fp32"]["sqnr_db"] > 60 and by["fp32"]["kl"] < 1e-9


def test_bundles_run_via_agent_runtimes(converted, real, tmp_path):
    out, _, _ = converted
    _, x, labels = real
    results = {}
    for precision in ("fp32", "int8"):
        dest = tmp_path / precision
        manifest = safe_unpack(_bundle(out, precision), dest)
        session = runtimes.load(dest, manifest)
        with np.load(dest / manifest.sample) as npz:
            sample = {k: npz[k] for k in npz.files}
        assert sample["x"].shape == (1, 3, 48, 192)
        (y,) = session.run(sample).values()
        assert y.shape == (1, 2) and np.isfinite(y).all()
        results[precision] = session.run({"x": x})["save_infer_model/scale_0.tmp_1"]
        session.close()
    assert (results["int8"].argmax(1) == results["fp32"].argmax(1)).mean() >= 0.9
    assert (results["fp32"].argmax(1) == labels).mean() >= 0.8  # the real classifier reads real text


def test_table_output_and_entropy(model, real, tmp_path, capsys):
    from edgefleet.cli import main

    small = tmp_path / "small.npz"
    np.savez(small, x=real[1][:12])
    code = main(["convert", str(model), "--calib", str(small), "--out", str(tmp_path / "out"),
                 "--calib-method", "entropy", "--input-shape", "x=1x3x48x192"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    header, rule, source, fp32, int8 = captured.out.splitlines()[:5]
    assert header.split()[:4] == ["target", "variant", "runtime", "precision"]
    assert " top-1 " in header and " top-5 " in header and " KL " in header and header.endswith("gated by  gate")
    assert fp32.split()[:4] == ["cpu", "fp32", "onnxruntime", "fp32"]
    assert int8.split()[:4] == ["cpu", "int8", "onnxruntime", "int8"]
    assert int8.split()[-3] == "top1" and int8.split()[-2].endswith("%")  # gated by top-1 agreement: its value
    assert captured.out.splitlines()[-1].startswith("not signed: devices and the controller refuse these bundles")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["name"] == "ch_ppocr_mobile_v2.0_cls_infer" and report["version"] == "1"
    assert report["variants"][1]["recipe"]["calibrate_method"] == "entropy"
    assert report["calibration"]["held_out_samples"] == 2
    assert (tmp_path / "out" / "report.html").exists()


def test_help_lists_every_option(capsys):
    from converter.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--target", "--calib", "--out", "--json", "--name", "--version", "--input-shape", "--calib-method",
                 "--sign-key", "--serial", "--passphrase-file", "--labels", "--max-accuracy-drop", "--gate",
                 "--gate-output", "--min-sqnr", "--max-kl", "--output-kind", "--prune"):
        assert flag in text


# ---- bad input: one line on stderr, exit 2, nothing new on disk -----------------------------------


def _bad_inputs(tmp: Path, model: Path, x: np.ndarray) -> dict[str, tuple[list[str], str]]:
    """case -> (argv after `edgefleet convert`, a word the error must name)."""
    calib = tmp / "good.npz"
    np.savez(calib, x=x[:12])
    text = tmp / "notes.onnx"
    text.write_text("this is not a model\n")
    truncated = tmp / "truncated.onnx"
    truncated.write_bytes(model.read_bytes()[:200_000])
    files = {
        "missing-key.npz": {"image": x[:4]},
        "extra-key.npz": {"x": x[:4], "labels": np.zeros(4, np.int64)},
        "rank.npz": {"x": x[:4, 0]},
        "dim.npz": {"x": np.zeros((4, 4, 48, 192), np.float32)},
        "dtype.npz": {"x": x[:4].astype(np.float64)},
        "one.npz": {"x": x[:9]},
    }
    for name, arrays in files.items():
        np.savez(tmp / name, **arrays)
    # one feed per index (INPUT/INDEX entries), their widths disagree: no shape can be taken from the data
    np.savez(tmp / "widths.npz", **{f"x/{i}": x[i : i + 1, :, :, : 192 - 32 * (i % 2)] for i in range(12)})
    (tmp / "text.npz").write_text("x,y\n1,2\n")
    np.save(tmp / "labels3.npy", np.array([0, 1, 0]))
    np.save(tmp / "labelsf.npy", np.zeros(12, np.float32))
    m, c = str(model), str(calib)
    return {
        "model missing": ([str(tmp / "nope.onnx"), "--calib", c], "not found"),
        "model is text": ([str(text), "--calib", c], "not an ONNX model"),
        "model truncated": ([str(truncated), "--calib", c], "not an ONNX model"),
        "calib missing": ([m, "--calib", str(tmp / "nope.npz")], "calibration file not found"),
        "calib not npz": ([m, "--calib", str(tmp / "text.npz")], "not an .npz"),
        "calib missing input": ([m, "--calib", str(tmp / "missing-key.npz")], "no array for model input 'x'"),
        "calib extra key": ([m, "--calib", str(tmp / "extra-key.npz")], "'labels', which is not a model input"),
        "calib wrong rank": ([m, "--calib", str(tmp / "rank.npz")], "rank 3"),
        "calib wrong dim": ([m, "--calib", str(tmp / "dim.npz")], "dimension 1 differs"),
        "calib wrong dtype": ([m, "--calib", str(tmp / "dtype.npz")], "float64"),
        "too few samples": ([m, "--calib", str(tmp / "one.npz")], "need at least 10"),
        "target unknown": ([m, "--calib", c, "--target", "gpu"], "unknown target 'gpu'"),
        "dynamic dims": ([m, "--calib", str(tmp / "widths.npz"), "--no-shape"],
                         "give model input 'x' [1, 3, 48, ?] different sizes along dimension 3 (160, 192)"),
        "labels missing": ([m, "--calib", c, "--labels", str(tmp / "nope.npy")], "labels file not found"),
        "labels count": ([m, "--calib", c, "--labels", str(tmp / "labels3.npy")], "3 labels for 12"),
        "labels float": ([m, "--calib", c, "--labels", str(tmp / "labelsf.npy")], "one integer class"),
        "drop not a number": ([m, "--calib", c, "--max-accuracy-drop", "lots"], "not a number"),
        "drop out of range": ([m, "--calib", c, "--max-accuracy-drop", "150%"], "below 100 %"),
        "prune out of range": ([m, "--calib", c, "--prune", "150%"], "pruning ratio '150%' is out of range"),
        "prune not a ratio": ([m, "--calib", c, "--prune", "lots"], "not a percentage like 30%"),
        "input-shape name": ([m, "--calib", c, "--input-shape", "y=1x3x48x192"], "not a model input"),
        "input-shape rank": ([m, "--calib", c, "--input-shape", "x=1x3x48"], "rank 3"),
        "input-shape vs data": ([m, "--calib", c, "--input-shape", "x=1x3x48x100"], "dimension 3 differs"),
        "no --calib": ([m], "--calib"),
        "setting unknown": ([m, "--calib", c, "--setting", "threads=4"], "KEY one of accelerators, concurrency"),
        "setting range": ([m, "--calib", c, "--setting", "max_batch=0"], "max_batch: 0 is not an integer from 1"),
        "setting not a number": ([m, "--calib", c, "--setting", "concurrency=two"], "concurrency is a whole number"),
        "setting device": ([m, "--calib", c, "--setting", "accelerators=GPU;CPU"], "'GPU;CPU' is not a device name"),
    }


CASES = ["model missing", "model is text", "model truncated", "calib missing", "calib not npz",
         "calib missing input", "calib extra key", "calib wrong rank", "calib wrong dim", "calib wrong dtype",
         "too few samples", "target unknown", "dynamic dims", "labels missing", "labels count", "labels float",
         "drop not a number", "drop out of range", "prune out of range", "prune not a ratio", "input-shape name", "input-shape rank",
         "input-shape vs data", "no --calib", "setting unknown", "setting range", "setting not a number",
         "setting device"]


@pytest.fixture(scope="module")
def bad(model, real, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    return tmp, _bad_inputs(tmp, model, real[1])


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_writes_nothing(case, bad, tmp_path, capsys):
    from edgefleet.cli import main

    _, cases = bad
    argv, needle = cases[case]
    out = tmp_path / "dist"
    out.mkdir()
    (out / "keep.txt").write_text("already here\n")
    before = snapshot(tmp_path)
    shape = [] if "--no-shape" in argv or "--input-shape" in argv else ["--input-shape", "x=1x3x48x192"]
    code = main(["convert", *[a for a in argv if a != "--no-shape"], *shape, "--out", str(out)])
    assert_refused_in_one_line(code, capsys.readouterr(), needle)
    assert snapshot(tmp_path) == before


def test_bad_input_in_a_real_process(bad, tmp_path):
    _, cases = bad
    argv, needle = cases["model truncated"]
    out = tmp_path / "new" / "dist"
    proc = subprocess.run([str(EDGEFLEET), "convert", *argv, "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr
    assert os.listdir(tmp_path) == []


def test_held_out_split():
    from agent.bundle import TensorSpec
    from converter import calib

    spec = [TensorSpec("x", [-1, 3], "float32")]
    for n, held in [(2, 1), (4, 1), (10, 2), (100, 20), (558, 111)]:
        x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
        c = calib.Calibration(Path("c.npz"), "0", "stacked", calib.Feeds.from_arrays({"x": x}), spec)
        assert c.n_eval == held
        assert len(c.calibration_split()) == n - held
        assert np.array_equal(c.held_out().arrays()["x"], x[n - held :])  # the LAST samples are held out
    assert calib.apply_input_shapes(spec, {"x": [1, 3]}) == spec


# ---- the accuracy gate and its fallback chain ------------------------------------------------------


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory):
    """A small real classifier (MatMul + Softmax) and calibration data with one huge outlier: static
    int8 takes its activation range from the outlier, so int8 cannot tell the normal inputs apart."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"], name="fc"),
         helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1)],
        "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    d = tmp_path_factory.mktemp("outlier")
    onnx.save(model, str(d / "outlier.onnx"))
    x = rng.normal(size=(60, 16)).astype(np.float32)
    x[0] *= 5000.0  # in the calibration split (the first 80 %)
    np.savez(d / "calib.npz", x=x)
    return d / "outlier.onnx", d / "calib.npz"


def test_gate_refuses_int8_and_falls_back_down_the_chain(outlier_model, tmp_path):
    from converter.convert import convert

    model, calib = outlier_model
    lines = []
    report = convert(model, target="cpu", calib=calib, out=tmp_path / "out", max_accuracy_drop="1%",
                     progress=lines.append)
    refused = {v["variant"]: v for v in report["refused"]}
    assert "int8" in refused and refused["int8"]["gate"]["passed"] is False
    assert refused["int8"]["gate"]["metric"] == "top1" and refused["int8"]["gate"]["threshold"] == 0.01
    assert "fails drop <= 1.00%; worst outputs: probs (top-1" in refused["int8"]["gate"]["reason"]
    assert not (tmp_path / "out" / "outlier-1-cpu-int8.tar").exists()  # refused: not emitted
    # int8-mixed measures each layer alone in float: "fc" in float does not lower the error (the outlier's range
    # reaches the Softmax's output too), so nothing is kept in float and the rung is refused like int8
    mixed = refused["int8-mixed"]["recipe"]
    assert mixed["nodes_to_exclude"] == [] and mixed["passes"][-1]["name"] == "ort_mixed"
    ranked = mixed["passes"][-1]["notes"]["ranked"]
    assert [r["node"] for r in ranked] == ["fc"] and ranked[0]["error_alone_in_float"] >= mixed["sensitivity"][
        "int8_error"]
    emitted = {v["variant"]: v for v in report["variants"]}
    assert emitted["fp16"]["gate"]["passed"] is True  # built only because the rungs above it were refused
    manifest = read_manifest(tmp_path / "out" / "outlier-1-cpu-fp16.tar")
    chain = manifest.report["gate"]["chain"]
    assert [(c["rung"], c["passed"]) for c in chain] == [("int8", False), ("int8-mixed", False), ("fp16", True),
                                                         ("fp32", True)]
    assert report["gate"]["chosen"]["cpu"] == (
        "rung fp16 (fp16) passed after int8 (int8) refused: top-1 agreement "
        f"{refused['int8']['gate']['value']:.1%} (drop {refused['int8']['gate']['drop']:.2%}); int8-mixed "
        f"(int8-mixed) refused: top-1 agreement {refused['int8-mixed']['gate']['value']:.1%} "
        f"(drop {refused['int8-mixed']['gate']['drop']:.2%})")
    assert (report["gate"]["metric"], report["gate"]["chosen_by"]) == ("top1", "default for a classifier output")
    assert any("refused int8" in line for line in lines)


def test_without_a_gate_no_fallback_is_built(outlier_model, tmp_path):
    from converter.convert import convert

    model, calib = outlier_model
    report = convert(model, target="cpu", calib=calib, out=tmp_path / "out")
    assert [v["variant"] for v in report["variants"]] == ["fp32", "int8", "int8-dynamic"]
    assert report["refused"] == [] and all(v["gate"]["passed"] is None for v in report["variants"])
    assert report["variants"][1]["gate"]["drop"] > 0.1  # measured and shown, though not gated


def test_gate_with_labels_uses_task_accuracy(model, real, tmp_path):
    from converter.convert import convert

    path, x, labels = real
    np.save(tmp_path / "labels.npy", labels)
    report = convert(model, target="cpu", calib=path, out=tmp_path / "out", labels=tmp_path / "labels.npy",
                     input_shapes={"x": [1, 3, 48, 192]}, max_accuracy_drop=0.5)
    assert 0.8 <= report["reference_accuracy"] <= 1.0
    for v in report["variants"]:
        assert v["gate"]["metric"] == "accuracy" and v["gate"]["passed"] is True
        assert v["accuracy"] == v["gate"]["value"]


def test_an_op_the_runtime_cannot_take_is_one_line(outlier_model, tmp_path, capsys):
    from onnx import TensorProto, helper

    from edgefleet.cli import main

    _, calib = outlier_model
    graph = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")], "custom",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(tmp_path / "custom.onnx"))
    code = main(["convert", str(tmp_path / "custom.onnx"), "--calib", str(calib), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("edgefleet convert: error:")]
    assert code == 2 and len(errors) == 1 and errors == err[-1:] and "Frobnicate" in errors[0], err
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists()


def test_prune_then_convert_is_judged_against_the_unpruned_model(model, real, tmp_path):
    """`--prune 30%`: the targets start from the pruned graph (fewer parameters and MACs), and every variant, the
    pruned fp32 one too, is measured against the original model, so what pruning cost shows."""
    from converter.convert import convert

    path, x, _ = real
    report = convert(model, target="cpu", calib=path, out=tmp_path / "out", prune="30%")
    notes = report["pruning"]["notes"]
    assert notes["params"]["after"] < notes["params"]["before"] and notes["macs"]["ratio"] < 1
    assert report["pruning"]["config"]["ratio"] == 0.3 and "out_path" not in report["pruning"]
    fp32 = next(v for v in report["variants"] if v["variant"] == "fp32")
    assert fp32["agreement"]["top1"] < 1.0  # the reference is the unpruned model
    m = json.loads((tmp_path / "out" / "report.json").read_text())
    assert m["pruning"]["notes"]["params"] == notes["params"]
