"""The converter's intel target (OpenVINO IR + NNCF int8) and the agent's openvino plugin, on the real
PP-OCR text-direction classifier and real text crops.

Real OpenVINO, real NNCF, real bundles read back the way a device reads them. No timing thresholds.
"""

from __future__ import annotations

import contextlib
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import msgspec
import numpy as np
import pytest

from agent import runtimes
from agent.bundle import TensorSpec, read_manifest, safe_unpack
from agent.errors import EdgefleetError

ov = pytest.importorskip("openvino")

N_SAMPLES = 200  # 160 calibrate, 40 held out
SHAPE = [1, 3, 48, 192]


@pytest.fixture(scope="module")
def model() -> Path:
    from edgefleet.models import model_path

    return model_path("ocr-cls")


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A calibration npz of real text crops (half turned 180°), and the crops."""
    from edgefleet.data import text_direction

    x, _ = text_direction(N_SAMPLES)
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=x)
    return path, x


@pytest.fixture(scope="module")
def converted(model, real, tmp_path_factory) -> tuple[Path, dict, str]:
    """One real `convert(target="intel")`: (out dir, report, what it wrote to stdout)."""
    from converter.convert import convert

    out = tmp_path_factory.mktemp("convert") / "dist"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        report = convert(model, target="intel", calib=real[0], out=out, name="ocr-cls", version="3",
                         input_shapes={"x": SHAPE})
    return out, report, stdout.getvalue()


@pytest.fixture(scope="module")
def bf16_cpu() -> bool:
    from converter import intel, measure

    return bool(measure.cpu_flags() & intel.BF16_FLAGS)


def _unpacked(out: Path, variant: str, tmp_path: Path):
    dest = tmp_path / variant
    return dest, safe_unpack(out / f"ocr-cls-3-intel-{variant}.tar", dest)


def test_missing_is_none_here():
    from converter import intel

    assert intel.missing() is None
    assert "openvino" in runtimes.available()


def test_bundles_report_and_quiet_stdout(converted, bf16_cpu):
    out, report, stdout = converted
    assert stdout == ""  # NNCF's progress bars must not reach stdout (the CLI's --json report goes there)
    names = [v["variant"] for v in report["variants"]]
    expected = ["ov-fp16", "ov-fp16-bf16", "ov-int8"] if bf16_cpu else ["ov-fp16", "ov-int8"]
    assert names == expected
    for name in expected:
        assert (out / f"ocr-cls-3-intel-{name}.tar").is_file()
    by = {v["variant"]: v for v in report["variants"]}
    assert by["ov-fp16"]["rung"] == "fp16" and by["ov-int8"]["rung"] == "int8"
    for v in report["variants"]:
        assert v["runtime"] == "openvino"
        assert v["agreement"]["top1"] >= 0.9, (v["variant"], v["agreement"])
        assert v["recipe"]["toolchain"]["openvino"] and v["recipe"]["toolchain"]["nncf"]
        assert v["recipe"]["inference_precision"] == v["latency_ms"]["settings"]["inference_precision"]
        assert v["latency_ms"]["p50"] > 0
    int8 = by["ov-int8"]["recipe"]
    assert int8["preset"] and int8["subset_size"] == 160 and int8["calibration_samples"] == 160
    if bf16_cpu:
        assert by["ov-fp16-bf16"]["rung"] is None
        assert by["ov-fp16-bf16"]["latency_ms"]["settings"]["inference_precision"] == "bf16"


def test_manifests_describe_an_ir_with_a_dynamic_batch(converted, tmp_path):
    out, report, _ = converted
    for v in report["variants"]:
        m = read_manifest(out / v["bundle"])
        assert (m.target, m.runtime, m.model) == ("intel", "openvino", "model.xml")
        assert sorted(f.path for f in m.files) == ["golden.npz", "model.bin", "model.xml", "profile.json", "sample.npz"]
        assert m.settings["inference_precision"] == v["recipe"]["inference_precision"]
    dest, m = _unpacked(out, "ov-fp16", tmp_path)
    shape = ov.Core().read_model(str(dest / m.model)).inputs[0].get_partial_shape()
    assert shape[0].is_dynamic and [d.get_length() for d in list(shape)[1:]] == SHAPE[1:]


def test_int8_ir_is_really_quantized(converted, tmp_path):
    out, _, _ = converted
    dest, m = _unpacked(out, "ov-int8", tmp_path)
    layers = ET.parse(dest / m.model).getroot().iter("layer")
    kinds, int8_consts = [], 0
    for layer in layers:
        kinds.append(layer.get("type"))
        data = layer.find("data")
        if layer.get("type") == "Const" and data is not None and data.get("element_type") in ("i8", "u8"):
            int8_consts += 1
    assert kinds.count("FakeQuantize") + kinds.count("FakeConvert") > 0
    assert int8_consts > 0
    fp16_dest, fp16 = _unpacked(out, "ov-fp16", tmp_path)
    assert "FakeQuantize" not in (fp16_dest / fp16.model).read_text()
    assert (dest / "model.bin").stat().st_size < (fp16_dest / "model.bin").stat().st_size


def test_every_bundle_runs_at_batch_1_and_16(converted, real, tmp_path):
    out, report, _ = converted
    x = real[1]
    for v in report["variants"]:
        dest, m = _unpacked(out, v["variant"], tmp_path)
        session = runtimes.load(dest, m)
        try:
            one = session.run({"x": x[:1]})
            sixteen = session.run({"x": x[:16]})
            again = session.run({"x": x[:1]})
        finally:
            session.close()
        names = [o.name for o in m.outputs]
        assert list(one) == names and list(sixteen) == names
        out_name = names[0]
        assert one[out_name].shape == (1, 2) and sixteen[out_name].shape == (16, 2)
        assert np.isfinite(sixteen[out_name]).all()
        np.testing.assert_allclose(sixteen[out_name][:1], one[out_name], atol=1e-3)
        np.testing.assert_array_equal(again[out_name], one[out_name])


def test_the_plugin_sets_precision_threads_and_streams(converted, tmp_path, bf16_cpu):
    out, _, _ = converted
    dest, m = _unpacked(out, "ov-fp16", tmp_path)
    assert m.settings["inference_precision"] == "f32"
    # one run at a time (the converter may recommend concurrency 2, from its throughput measure on this machine)
    m = msgspec.structs.replace(m, settings={**m.settings, "concurrency": 1})
    session = runtimes.load(dest, m)
    try:
        compiled = session.compiled
        assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
        assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
        assert compiled.get_property("NUM_STREAMS") == 1
        assert str(compiled.get_property("PERFORMANCE_HINT")) in ("LATENCY", "PerformanceMode.LATENCY")
    finally:
        session.close()
    two = msgspec.structs.replace(m, settings={**m.settings, "threads": 2})
    session = runtimes.load(dest, two)
    try:
        assert session.compiled.get_property("INFERENCE_NUM_THREADS") == 2
    finally:
        session.close()
    parallel = msgspec.structs.replace(m, settings={**m.settings, "concurrency": 2})
    session = runtimes.load(dest, parallel)  # issue 14: two streams of one thread each, the throughput hint
    try:
        assert session.compiled.get_property("NUM_STREAMS") == 2
        assert session.compiled.get_property("INFERENCE_NUM_THREADS") == 2
        hint = str(session.compiled.get_property("PERFORMANCE_HINT"))
        assert hint in ("THROUGHPUT", "PerformanceMode.THROUGHPUT")
    finally:
        session.close()
    if bf16_cpu:
        bf16 = msgspec.structs.replace(m, settings={**m.settings, "inference_precision": "bf16"})
        session = runtimes.load(dest, bf16)
        try:
            assert session.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
        finally:
            session.close()
    bad = msgspec.structs.replace(m, settings={"inference_precision": "int4"})
    with pytest.raises(EdgefleetError, match="inference_precision"):
        runtimes.load(dest, bad)


def test_accuracy_controlled_rung(real, tmp_path):
    """The fallback step (the gate runs it only when int8 is refused): NNCF with accuracy control, validated in
    top-1 agreement for a classifier when no gate rule is given, saved with fp16 float weights."""
    from converter import intel, measure
    from converter.cpu import fix_shapes
    from edgefleet.models import model_path

    x = real[1][:120]
    specs = [TensorSpec("x", [-1, *SHAPE[1:]], "float32")]
    fixed = tmp_path / "fixed.onnx"
    fix_shapes(model_path("ocr-cls"), fixed, specs)
    steps = intel.plan(fixed, specs, {"x": x}, tmp_path / "intel", max_accuracy_drop=0.05)
    fallback = [s for s in steps if s.fallback]
    assert [(s.produces, s.rung) for s in fallback] == [("ov-int8-mixed", "int8-mixed"), ("ov-fp32", "fp32")]
    v = fallback[0].run()
    assert (v.name, v.precision, v.rung, v.runtime) == ("ov-int8-mixed", "mixed", "int8-mixed", "openvino")
    assert sorted(p.name for p in v.path.parent.iterdir()) == ["model.bin", "model.xml"]
    control = v.recipe["accuracy_control"]
    assert control["metric"].startswith("top-1 agreement") and control["max_drop"] == pytest.approx(0.05 * intel.MARGIN)
    assert control["validation_value"] >= 0.95
    assert v.recipe["fake_quantize_nodes"] > 0
    assert isinstance(v.recipe["reverted_to_float"], list)
    assert [p["name"] for p in v.recipe["passes"]] == ["ov_convert", "nncf_accuracy"]
    assert v.recipe["passes"][1]["config"]["metric"] == "top1" and v.recipe["passes"][1]["config"]["compress_to_fp16"]
    session = measure.open_session(v.path.parent, v.path.name, "openvino", v.settings)
    try:
        assert [value.shape for value in session.run({"x": x[:16]}).values()] == [(16, 2)]
    finally:
        session.close()

    fp32 = fallback[1].run()
    assert (fp32.name, fp32.precision, fp32.rung, fp32.settings) == ("ov-fp32", "fp32", "fp32",
                                                                      {"inference_precision": "f32"})
    assert [p["name"] for p in fp32.recipe["passes"]] == ["ov_convert", "ov_compress"]
    assert fp32.recipe["passes"][1]["config"] == {"compress_to_fp16": False}


# ---- passes, the recipe record and the search ------------------------------------------------------------


def _passes_are_recorded(recipe: dict, names: list[str]) -> None:
    """A converted variant's passes: the converter's fix_shapes (the fixed input shapes), then the target's."""
    first, *passes = recipe["passes"]
    assert first["name"] == "fix_shapes" and first["config"]["input_shapes"]
    assert [p["name"] for p in passes] == names
    for p in passes:
        assert set(p) >= {"name", "config", "toolchain", "notes", "out_path"}
        assert p["toolchain"]["openvino"] not in ("", "not installed")
        if p["name"].startswith("nncf"):
            assert p["toolchain"]["nncf"] not in ("", "not installed")


def test_every_manifest_and_report_json_carries_the_passes(converted):
    out, report, _ = converted
    on_disk = json.loads((out / "report.json").read_text())
    expected = {"ov-fp16": ["ov_convert", "ov_compress"], "ov-fp16-bf16": ["ov_convert", "ov_compress"],
                "ov-int8": ["ov_convert", "nncf_quantize"]}
    for v, saved in zip(report["variants"], on_disk["variants"]):
        names = expected[v["variant"]]
        _passes_are_recorded(v["recipe"], names)
        _passes_are_recorded(saved["recipe"], names)
        manifest = read_manifest(out / v["bundle"])
        _passes_are_recorded(manifest.report["recipe"], names)
        assert manifest.report["recipe"]["passes"] == saved["recipe"]["passes"]
    by = {v["variant"]: v for v in report["variants"]}
    assert by["ov-fp16"]["recipe"]["passes"][2]["config"] == {"compress_to_fp16": True}
    quantize = by["ov-int8"]["recipe"]["passes"][2]
    # no gate, no --search: NNCF's defaults only, and nothing searched
    assert quantize["config"]["preset"] == "default" and quantize["config"]["ignored"] == "none"
    assert quantize["notes"]["changed_from_nncf_defaults"] == {}
    assert "search" not in by["ov-int8"] and "candidate" not in by["ov-int8"]["recipe"]


def test_plan_offers_the_candidates_only_when_searching(tmp_path, model):
    from converter import intel

    specs = [TensorSpec("x", SHAPE, "float32")]
    calib = {"x": np.zeros((4, *SHAPE[1:]), np.float32)}

    def candidates(**kw):
        steps = intel.plan(model, specs, calib, tmp_path, **kw)
        return [(s.candidate, s.fallback) for s in steps if s.produces == "ov-int8"]

    assert candidates(search=False) == [(None, False)]
    assert candidates() == [(None, False)]  # the default: off
    on = candidates(search=True)
    assert [c for c, _ in on] == list(intel.CANDIDATES) and on[0][0] == "nncf-defaults"
    assert 3 <= len(on) <= 5
    # an explicit --calib-method is the recipe; searching adds NNCF's defaults
    assert candidates(search=False, calib_method="minmax") == [(None, False)]
    assert [c for c, _ in candidates(search=True, calib_method="minmax")] == ["minmax-ranges", "nncf-defaults"]
    assert not any(tmp_path.iterdir())  # planning builds nothing


@pytest.fixture(scope="module")
def searched(model, real, tmp_path_factory):
    """`convert(target="intel", search="on")` with a 5 % top-1 gate on the PP-OCR classifier."""
    from converter.convert import convert

    out = tmp_path_factory.mktemp("search") / "dist"
    report = convert(model, target="intel", calib=real[0], out=out, name="ocr-cls", version="3",
                     input_shapes={"x": SHAPE}, search="on", max_accuracy_drop="5%", gate_metric="top1")
    return out, report


def test_the_search_keeps_the_fastest_passing_candidate_and_records_all(searched):
    from converter import intel
    from converter.plan import SPEED_TIE

    out, report = searched
    v = next(v for v in report["variants"] if v["variant"] == "ov-int8")
    search = v["search"]
    rows = search["candidates"]
    assert [r["candidate"] for r in rows] == list(intel.CANDIDATES)
    assert sum(r["kept"] for r in rows) == 1
    kept = next(r for r in rows if r["kept"])
    assert search["kept"] == kept["candidate"] == v["recipe"]["candidate"]
    passing = [r for r in rows if r["gate"]["passed"]]
    assert passing
    for r in rows:
        assert r["recipe"]["changes"] == intel.CANDIDATES[r["candidate"]][1]
        assert r["size_bytes"] > 0
        # only the candidates the gate passes are raced (which of them pass differs by CPU: on one without
        # VNNI, int8 kernels saturate and some recipes lose more than 5 % top-1)
        if r in passing:
            assert r["raced_p50_ms"] > 0
        else:
            assert r["raced_p50_ms"] is None and r["relative_latency"] is None
    assert kept in passing
    fastest = min(r["raced_p50_ms"] for r in passing)
    near = [r for r in passing if r["raced_p50_ms"] <= fastest * (1 + SPEED_TIE)]
    assert kept in near
    key = lambda r: (r["agreement"]["top1"], -r["agreement"]["kl"], r["agreement"]["sqnr_db"])  # noqa: E731
    assert key(kept) == max(key(r) for r in near)
    # each candidate's own recipe: what it changed vs NNCF's defaults, in the pass's config
    quantize = v["recipe"]["passes"][2]
    assert quantize["name"] == "nncf_quantize"
    options = intel.CANDIDATES[kept["candidate"]][0]
    assert {k: quantize["config"][k] for k in options} == options
    manifest = read_manifest(out / v["bundle"])
    assert manifest.report["search"]["kept"] == kept["candidate"]
    assert [r["candidate"] for r in manifest.report["search"]["candidates"]] == list(intel.CANDIDATES)


def test_the_candidates_really_differ(searched):
    """ends-in-float leaves the first and last layers unquantized; the mixed preset changes the activations."""
    _, report = searched
    rows = {r["candidate"]: r for r in next(v for v in report["variants"] if v["variant"] == "ov-int8")
            ["search"]["candidates"]}
    kept_float = rows["ends-in-float"]["recipe"]["changed_from_nncf_defaults"]["kept_in_float"]
    assert len(kept_float) == 2
    assert rows["ends-in-float"]["recipe"]["fake_quantize_nodes"] < rows["nncf-defaults"]["recipe"]["fake_quantize_nodes"]
    assert rows["mixed-preset"]["recipe"]["changed_from_nncf_defaults"] == {"preset": "mixed"}
    assert rows["nncf-defaults"]["recipe"]["changed_from_nncf_defaults"] == {}
    assert len({r["agreement"]["kl"] for r in rows.values()}) == len(rows)


@pytest.mark.slow
def test_a_strict_gate_gets_a_mixed_rung_smaller_than_fp16_and_more_faithful_than_int8(model, real, tmp_path):
    """PP-OCR classifier, gate on KL at 0.004: NNCF's int8 (KL ~0.05 on the held-out crops) is refused; the
    accuracy-controlled rung, validated on the same KL, puts the layers that disturb the output most back in
    float, saves them in fp16 (no larger than ov-fp16) and still runs its other convolutions in int8."""
    from converter import intel
    from converter.convert import convert
    from converter.measure import cpu_flags

    if not {"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags():
        pytest.skip("this CPU has no VNNI (AVX-512 VNNI, AVX-VNNI or AMX): OpenVINO's int8 convolutions saturate "
                    "their 16-bit sums here, and NNCF's accuracy control cannot bring the classifier's KL under "
                    "0.004 (it stops at ~0.05 with 9 of 80 operations back in float); the rung needs a VNNI CPU")
    out = tmp_path / "dist"
    report = convert(model, target="intel", calib=real[0], out=out, name="ocr-cls", version="3",
                     input_shapes={"x": SHAPE}, search="off", max_kl=0.004)
    chain = {c["rung"]: c for c in report["gate"]["chains"]["intel"]}
    assert chain["int8"]["passed"] is False
    assert chain["int8-mixed"]["passed"] is True, chain
    by = {v["variant"]: v for v in report["variants"] + report["refused"]}
    mixed, int8, fp16 = by["ov-int8-mixed"], by["ov-int8"], by["ov-fp16"]
    # the weights (model.bin) are no larger than fp16's; on this tiny model (0.5 MB) the IR's XML, which grows with
    # every FakeQuantize, makes the whole directory ~10 % larger than fp16's (on MobileNetV2 it is 4.9 vs 7.2 MB)
    weights = {}
    for name, v in (("mixed", mixed), ("fp16", fp16)):
        safe_unpack(out / v["bundle"], tmp_path / name)
        weights[name] = (tmp_path / name / "model.bin").stat().st_size
    assert weights["mixed"] <= weights["fp16"], weights
    assert mixed["agreement"]["kl"] < int8["agreement"]["kl"]
    recipe = mixed["recipe"]
    assert recipe["accuracy_control"]["metric"].startswith("1 - the mean KL")
    assert recipe["accuracy_control"]["max_drop"] == pytest.approx(0.004 * intel.MARGIN)
    assert recipe["reverted_to_float"], recipe["accuracy_control"]
    executed = recipe["accuracy_control"]["executed_precisions"]
    assert executed.get("u8", 0) + executed.get("i8", 0) > 0 and executed.get("f32", 0) > 0, executed
    _passes_are_recorded(recipe, ["ov_convert", "nncf_accuracy"])
    assert read_manifest(out / mixed["bundle"]).report["recipe"]["reverted_to_float"] == recipe["reverted_to_float"]
