"""The cpu target's passes, its int8 recipe search, measured mixed precision and the "int8 computes in float"
warning, on real models (the PP-OCR text-direction classifier on real text crops, the Silero VAD on real speech)
in real ONNX Runtime. No timing thresholds: which candidate is fastest is read from the report's own race."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import read_manifest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

N_SAMPLES = 60  # 48 calibrate, 12 held out
SHAPE = {"x": [1, 3, 48, 192]}


@pytest.fixture(scope="module")
def model() -> Path:
    from edgefleet.models import model_path

    return model_path("ocr-cls")


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> tuple[Path, np.ndarray]:
    from edgefleet.data import text_direction

    x, _ = text_direction(N_SAMPLES)
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=x)
    return path, x


@pytest.fixture(scope="module")
def searched(model, crops, tmp_path_factory) -> tuple[Path, dict]:
    """`convert(..., search="on")` with a gate every candidate passes (so the speed decides)."""
    from converter.convert import convert

    out = tmp_path_factory.mktemp("search") / "dist"
    report = convert(model, target="cpu", calib=crops[0], out=out, name="ocr", input_shapes=SHAPE, search="on",
                     gate_metric="top5", max_accuracy_drop="50%")
    return out, report


def test_search_keeps_the_fastest_passing_candidate_and_records_all(searched):
    from converter import cpu
    from converter.plan import SPEED_TIE

    out, report = searched
    int8 = next(v for v in report["variants"] if v["variant"] == "int8")
    search = int8["search"]
    rows = {r["candidate"]: r for r in search["candidates"]}
    expected = cpu.int8_candidates(cpu.int8_recipe(frozenset(), "minmax", 48))
    assert list(rows) == list(expected) and "ort-defaults" in rows  # the library's defaults are always tried
    assert rows["ort-defaults"]["recipe"]["per_channel"] is False  # ... as ONNX Runtime ships them
    assert rows["ort-defaults"]["recipe"]["activation_type"] == "QInt8"
    passing = [r for r in rows.values() if r["gate"]["passed"]]
    assert passing and all(r["gate"]["passed"] is not None for r in rows.values())
    fastest = min(r["raced_p50_ms"] for r in passing)
    kept = [r for r in rows.values() if r["kept"]]
    assert len(kept) == 1 and kept[0]["candidate"] == search["kept"]
    assert kept[0]["gate"]["passed"] and kept[0]["raced_p50_ms"] <= fastest * (1 + SPEED_TIE)
    # the emitted bundle is the kept candidate's model, and says how it was made, pass by pass
    recipe = read_manifest(out / "ocr-1-cpu-int8.tar").report["recipe"]
    assert recipe["candidate"] == search["kept"]
    assert [p["name"] for p in recipe["passes"]] == ["fix_shapes", "onnx_opset", "ort_preprocess", "ort_quantize"]
    quantize = recipe["passes"][-1]
    assert quantize["config"]["per_channel"] == expected[search["kept"]]["per_channel"]
    assert quantize["toolchain"]["onnxruntime"] == ort.__version__ and quantize["notes"]["quantized_ops"] > 0


def test_passes_are_in_every_manifest_and_in_report_json(searched):
    out, report = searched
    on_disk = json.loads((out / "report.json").read_text())
    names = {"fp32": ["ort_optimize"], "int8": ["onnx_opset", "ort_preprocess", "ort_quantize"],
             "int8-dynamic": ["onnx_opset", "ort_preprocess", "ort_dynamic"]}
    names = {k: ["fix_shapes", *v] for k, v in names.items()}  # every recipe starts from the fixed input shapes
    for entry in on_disk["variants"]:
        want = names[entry["variant"]]
        assert [p["name"] for p in entry["recipe"]["passes"]] == want
        manifest = read_manifest(out / entry["bundle"])
        assert [p["name"] for p in manifest.report["recipe"]["passes"]] == want
        assert all(p["toolchain"] and "config" in p for p in manifest.report["recipe"]["passes"])


def test_without_search_one_recipe(model, crops, tmp_path):
    """search off: today's recipe for the host only (per-channel U8S8, minmax), no race."""
    from converter import cpu
    from converter.calib import Feeds

    feeds = Feeds.from_arrays({"x": crops[1][:8]})
    from agent.bundle import TensorSpec

    specs = [TensorSpec("x", SHAPE["x"], "float32")]
    steps = cpu.plan(model, specs, feeds, tmp_path, search=False)
    int8 = [s for s in steps if s.produces == "int8"]
    assert len(int8) == 1 and int8[0].candidate is None
    searching = [s for s in cpu.plan(model, specs, feeds, tmp_path, search=True) if s.produces == "int8"]
    assert [s.candidate for s in searching] == list(cpu.int8_candidates(cpu.int8_recipe(frozenset(), "minmax", 8)))


def test_int8_mixed_starts_from_the_candidate_the_search_kept(model, crops, tmp_path):
    """The int8-mixed rung measures its layers on the int8 model of the recipe the search kept (the most faithful
    one when the gate refused all): here the first and last layers already in float, then the measured ones."""
    from agent.bundle import TensorSpec
    from converter import cpu
    from converter.calib import Feeds

    feeds = Feeds.from_arrays({"x": crops[1][:16]})
    steps = cpu.plan(model, [TensorSpec("x", SHAPE["x"], "float32")], feeds, tmp_path, search=True)
    made = {s.candidate: s.run() for s in steps if s.produces == "int8" and s.candidate in ("per-channel",
                                                                                           "ends-in-float")}
    made["ends-in-float"].kept = True  # as the converter marks the variant its search kept
    mixed = next(s for s in steps if s.produces == "int8-mixed").run()
    assert mixed.recipe["started_from"] == "ends-in-float"
    ends = cpu.end_layers(Path(mixed.recipe["passes"][1]["out_path"]))
    assert ends and set(ends) <= set(mixed.recipe["nodes_to_exclude"])  # the kept recipe's float ends stay float
    assert not set(ends) & set(made["per-channel"].recipe.get("nodes_to_exclude") or [])


def test_arm_has_an_int8_mixed_rung_from_the_kept_ort_recipe(model, crops, tmp_path):
    """When the gate refuses tflite-int8, the arm target's int8-mixed rung is ONNX Runtime on ARM64 (S8S8) with
    the measured layers in float, started from the ort-int8-arm recipe the search kept."""
    from agent.bundle import TensorSpec
    from converter import arm

    feeds = _feeds_of(crops[1][:16])
    steps = arm.plan(model, [TensorSpec("x", SHAPE["x"], "float32")], feeds, tmp_path, search=True)
    rung = [s for s in steps if s.fallback]
    assert [(s.produces, s.rung) for s in rung] == [("ort-int8-mixed-arm", "int8-mixed")]
    kept = next(s for s in steps if s.produces == "ort-int8-arm" and s.candidate == "ends-in-float").run()
    kept.kept = True  # as the converter marks the variant its search kept
    mixed = rung[0].run()
    assert (mixed.name, mixed.precision, mixed.runtime, mixed.rung) == ("ort-int8-mixed-arm", "mixed", "onnxruntime",
                                                                       "int8-mixed")
    assert mixed.recipe["started_from"] == "ends-in-float" and mixed.recipe["activation_type"] == "QInt8"
    assert [p["name"] for p in mixed.recipe["passes"]][-2:] == ["ort_quantize", "ort_mixed"]


def _feeds_of(x: np.ndarray):
    from converter.calib import Feeds

    return Feeds.from_arrays({"x": x})


def _mixed(model: Path, shape: dict, x: np.ndarray, n_calib: int, tmp_path: Path, samples: int):
    from agent.bundle import TensorSpec
    from converter import cpu
    from converter.calib import Feeds

    name = next(iter(shape))
    fixed = tmp_path / "fixed.onnx"
    cpu.fix_shapes(model, fixed, [TensorSpec(name, shape[name], "float32")])
    prep = cpu.Prepared(fixed, tmp_path)
    calib = Feeds.from_arrays({name: x[:n_calib]})
    made = prep.quantized(cpu.int8_recipe(frozenset(), "minmax", n_calib), tmp_path / "int8" / "model.onnx", calib,
                          1, "int8")
    prepared, _ = prep.prepared()
    result = cpu.run_pass("ort_mixed", tmp_path / "int8" / "model.onnx", tmp_path / "mixed" / "model.onnx",
                          float_model=prepared, calib=calib, batch=1, samples=samples)
    return fixed, made, result.notes


def _kl(fixed: Path, path: Path, name: str, held: np.ndarray) -> float:
    from converter import measure

    def run(p: Path) -> np.ndarray:
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {name: held[i : i + 1]})[0] for i in range(len(held))])

    return measure.agreement({"y": run(fixed)}, {"y": run(path)})["outputs"]["y"]["kl"]


def test_int8_mixed_keeps_the_measured_worst_layers_in_float(model, crops, tmp_path):
    """ort_mixed on the text classifier: every quantized layer measured alone in float on calibration feeds, the
    kept ones are the top of that ranking, the written model is the int8 one with exactly those in float, and its
    error on the measured feeds is the lower."""
    from converter.passes._ort import quantized_census

    _, made, notes = _mixed(model, SHAPE, crops[1], 48, tmp_path, samples=16)
    kept = notes["kept_in_float"]
    ranked = [r["node"] for r in notes["ranked"]]
    assert 1 <= len(kept) <= notes["cap"] and kept == ranked[: len(kept)]
    assert notes["mixed_error"] < notes["int8_error"] and notes["metric"] == "kl"
    assert notes["measured_on"] == "16 calibration feeds (not the held-out ones)"
    assert [c["kept"] for c in notes["cumulative"]] == list(range(1, len(notes["cumulative"]) + 1))
    assert quantized_census(tmp_path / "mixed" / "model.onnx")["quantized_ops"] == made["quantized_ops"] - len(kept)


@pytest.mark.slow
def test_int8_mixed_is_more_faithful_than_int8_on_mobilenetv2(tmp_path):
    """On the trained MobileNetV2 (the model where int8 hurts): the layers chosen on 16 calibration crops bring the
    output closer to fp32 on 40 held-out crops the measurement never saw."""
    from edgefleet.data import photo_crops
    from edgefleet.models import model_path

    x = photo_crops(200, seed=0)
    fixed, _, notes = _mixed(model_path("mobilenetv2"), {"input": [1, 3, 224, 224]}, x, 160, tmp_path, samples=16)
    held = x[160:]
    mixed = _kl(fixed, tmp_path / "mixed" / "model.onnx", "input", held)
    int8 = _kl(fixed, tmp_path / "int8" / "model.onnx", "input", held)
    assert mixed < 0.8 * int8, (mixed, int8, notes["kept_in_float"])


@pytest.fixture(scope="module")
def vad_dir(tmp_path_factory) -> tuple[Path, Path]:
    from edgefleet.data import vad_feeds
    from edgefleet.models import model_path

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (scripts/setup.sh installs it): no real speech")
    vad = model_path("silero-vad")
    feeds = vad_feeds(vad)
    d = tmp_path_factory.mktemp("vad") / "feeds"
    d.mkdir()
    for i, feed in enumerate(feeds[:: max(1, len(feeds) // 30)][:30]):
        np.savez(d / f"{i:04d}.npz", **feed)
    return vad, d


def test_int8_that_quantized_nothing_is_flagged(vad_dir, searched, tmp_path):
    """The Silero VAD keeps its LSTM and Convs inside `If` branches, which ONNX Runtime's quantizer does not enter:
    its "int8" computes in float. The recipe says so (``warning``) and the run says it; a model that did quantize
    (the text classifier) carries no such warning."""
    from converter.convert import convert

    from converter.report import table

    vad, feeds = vad_dir
    said = []
    report = convert(vad, target="cpu", calib=feeds, out=tmp_path / "out", name="vad", search="off",
                     progress=said.append)
    int8 = next(v for v in report["variants"] if v["variant"] == "int8")
    assert f"[cpu] warning: int8: {int8['recipe']['warning']}" in said  # the run says it as it goes
    assert f"warning cpu/int8: {int8['recipe']['warning']}" in table(report).splitlines()  # and the summary
    assert int8["recipe"]["quantized_ops"] == 0
    assert "int8 holds no quantized op" in int8["recipe"]["warning"]
    assert "If/Loop subgraphs" in int8["recipe"]["warning"]
    assert read_manifest(tmp_path / "out" / "vad-1-cpu-int8.tar").report["recipe"]["warning"] == \
        int8["recipe"]["warning"]
    _, ocr = searched
    ocr_int8 = next(v for v in ocr["variants"] if v["variant"] == "int8")
    assert "warning" not in ocr_int8["recipe"] and ocr_int8["recipe"]["quantized_ops"] > 0
