"""Calibration data that fits real models: the three formats, bad calibration data, the shapes of the fp32 run.

Real models (Silero VAD: audio + recurrent state [2, N, 128] + an int64 scalar sample rate; the PP-OCRv4 text
recognizer), real speech (Debian's espeak-ng) and real text crops (scikit-image's page()), real ONNX Runtime,
bundles read back with the device's loader. No timing thresholds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent import runtimes
from agent.bundle import TensorSpec, read_manifest, safe_unpack

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

EDGEFLEET = Path(sys.executable).parent / "edgefleet"
N_FEEDS = 60  # 48 calibrate, 12 held out


def _convert(model: Path, calib: Path, out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(EDGEFLEET), "convert", str(model), "--calib", str(calib), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout, cwd=out.parent)


@pytest.fixture(scope="module")
def vad() -> Path:
    from edgefleet.models import model_path

    return model_path("silero-vad")


@pytest.fixture(scope="module")
def vad_feeds(vad) -> list[dict[str, np.ndarray]]:
    """Every 512-sample window of real speech (espeak-ng), each a complete feed with the state the fp32 model
    carries into it; every 8th window, so the feeds span speech and silence."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (scripts/setup.sh installs it): no real speech")
    from edgefleet.data import vad_feeds

    feeds = vad_feeds(vad)
    return feeds[:: max(1, len(feeds) // N_FEEDS)][:N_FEEDS]


@pytest.fixture(scope="module")
def vad_dir(vad_feeds, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("calib") / "feeds"
    d.mkdir()
    for i, feed in enumerate(vad_feeds):
        np.savez(d / f"{i:04d}.npz", **feed)
    return d


@pytest.fixture(scope="module")
def vad_converted(vad, vad_dir, tmp_path_factory) -> tuple[Path, dict]:
    """`edgefleet convert` of the VAD on a directory of feeds, target cpu: (DIR, report)."""
    out = tmp_path_factory.mktemp("vad") / "dist"
    proc = _convert(vad, vad_dir, out, "--target", "cpu", "--name", "vad", "--json")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


def test_directory_of_feeds_converts_the_vad(vad_converted, vad_feeds):
    out, report = vad_converted
    cal = report["calibration"]
    assert (cal["format"], cal["samples"], cal["held_out_samples"]) == ("directory", N_FEEDS, N_FEEDS // 5)
    assert [v["variant"] for v in report["variants"]][:2] == ["fp32", "int8"]
    inputs = {s["name"]: s for s in report["source"]["inputs"]}
    # batch 1 (on axis 0 of the audio, axis 1 of the state) and the scalar come from the data
    assert inputs["state"]["shape"] == [2, 1, 128] and inputs["sr"] == {"name": "sr", "shape": [], "dtype": "int64"}
    assert inputs["input"]["shape"][0] == 1
    m = read_manifest(out / "vad-1-cpu-int8.tar")
    assert [(s.name, s.shape) for s in m.outputs] == [("output", [1, 1]), ("stateN", [2, 1, 128])]
    # held out by the same rule: the bundle's sample is the first held-out feed, whole
    dest = out.parent / "unpacked-int8"
    safe_unpack(out / "vad-1-cpu-int8.tar", dest)
    with np.load(dest / m.sample, allow_pickle=False) as npz:
        sample = {k: npz[k] for k in npz.files}
    assert sorted(sample) == ["input", "sr", "state"]
    for k, v in vad_feeds[N_FEEDS - N_FEEDS // 5].items():
        assert np.array_equal(sample[k], v), k


def test_vad_bundle_runs_on_the_device_loader_carrying_its_state(vad_converted, vad, vad_feeds, tmp_path):
    """Run the bundles as a device does, over consecutive windows of speech, feeding each call's stateN back
    as the next state: the speech probabilities follow the fp32 model's."""
    from edgefleet.data import speech, VAD_CONTEXT, VAD_WINDOW

    out, report = vad_converted
    audio = speech()
    reference = ort.InferenceSession(str(vad), providers=["CPUExecutionProvider"])
    for variant in ("fp32", "int8"):
        dest = tmp_path / variant
        manifest = safe_unpack(out / f"vad-1-cpu-{variant}.tar", dest)
        session = runtimes.load(dest, manifest)
        state = ref_state = np.zeros((2, 1, 128), np.float32)
        sr = np.array(16000, np.int64)
        got, want = [], []
        try:
            for i in range(1, 120):
                start = i * VAD_WINDOW
                chunk = audio[start - VAD_CONTEXT : start + VAD_WINDOW][None, :]
                result = session.run({"input": chunk, "state": state, "sr": sr})
                assert result["stateN"].shape == (2, 1, 128)
                state = result["stateN"]
                p, ref_state = reference.run(["output", "stateN"], {"input": chunk, "state": ref_state, "sr": sr})
                got.append(float(result["output"][0, 0]))
                want.append(float(p[0, 0]))
        finally:
            session.close()
        got, want = np.array(got), np.array(want)
        assert ((want > 0.5) == (got > 0.5)).mean() >= 0.95, variant
        assert (want > 0.5).any() and (want < 0.5).any()  # the audio holds speech and silence


def test_indexed_entries_convert_the_vad(vad, vad_feeds, tmp_path):
    calib = tmp_path / "feeds.npz"
    np.savez(calib, **{f"{k}/{i}": v for i, feed in enumerate(vad_feeds[:20]) for k, v in feed.items()})
    out = tmp_path / "dist"
    proc = _convert(vad, calib, out, "--target", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["calibration"]["format"], report["calibration"]["samples"]) == ("indexed", 20)
    assert report["calibration"]["held_out_samples"] == 4
    assert "INPUT/INDEX" in proc.stderr  # the progress names the format


def _bad_feeds(feeds: list[dict], case: str) -> list[dict]:
    feeds = [dict(f) for f in feeds[:12]]
    if case == "unknown":
        feeds[3]["h"] = feeds[3]["state"]
    elif case == "missing":
        del feeds[5]["sr"]
    elif case == "dtype":
        feeds[2]["sr"] = np.array(16000, np.int32)
    elif case == "rank":
        feeds[4]["state"] = feeds[4]["state"][0]
    elif case == "fixed-dim":
        feeds[1]["state"] = np.zeros((3, 1, 128), np.float32)
    return feeds


BAD = {  # case -> what the one line must say
    "unknown": ["'h'", "not a model input"],
    "missing": ["feed 5", "no array for model input 'sr'"],
    "dtype": ["feed 2", "'sr'", "int32", "int64"],
    "rank": ["feed 4", "'state'", "rank 2", "rank 3"],
    "fixed-dim": ["feed 1", "'state'", "[3, 1, 128]", "dimension 0 differs"],
}


@pytest.mark.parametrize("layout", ["directory", "indexed"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_calibration_is_one_line_and_exit_2(vad, vad_feeds, tmp_path, case, layout):
    feeds = _bad_feeds(vad_feeds, case)
    if layout == "directory":
        calib = tmp_path / "feeds"
        calib.mkdir()
        for i, feed in enumerate(feeds):
            np.savez(calib / f"{i:04d}.npz", **feed)
    else:
        calib = tmp_path / "feeds.npz"
        np.savez(calib, **{f"{k}/{i}": v for i, feed in enumerate(feeds) for k, v in feed.items()})
    out = tmp_path / "dist"
    proc = _convert(vad, calib, out, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for part in BAD[case]:
        assert part in lines[0], lines[0]
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_scalar_input_cannot_be_stacked(vad, vad_feeds, tmp_path):
    calib = tmp_path / "stacked.npz"
    np.savez(calib, input=np.concatenate([f["input"] for f in vad_feeds[:12]]),
             state=np.concatenate([f["state"] for f in vad_feeds[:12]], axis=1), sr=np.full(12, 16000))
    proc = _convert(vad, calib, tmp_path / "dist", timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "'sr' is a scalar" in proc.stderr and "directory of .npz" in proc.stderr


@pytest.fixture(scope="module")
def rec() -> Path:
    from edgefleet.models import model_path

    return model_path("ocr-rec")


def test_stacked_data_fixes_the_dims_and_the_reference_fixes_the_outputs(rec, tmp_path):
    """The recognizer's width is dynamic: stacked crops of width 320 fix it (no --input-shape needed); its
    output, declared with dynamic dims, is [N, 40, 6625]: the manifest says so."""
    from edgefleet.data import text_lines

    x = text_lines(N_FEEDS)
    calib = tmp_path / "crops.npz"
    np.savez(calib, x=x)
    out = tmp_path / "dist"
    proc = _convert(rec, calib, out, "--target", "cpu", "--name", "rec", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["calibration"]["format"] == "stacked"
    assert report["calibration"]["dims_from_data"] == {"x": [2, 3]}
    assert report["source"]["inputs"] == [{"name": "x", "shape": [-1, 3, 48, 320], "dtype": "float32"}]
    name = report["source"]["outputs"][0]["name"]
    assert report["source"]["outputs"][0]["shape"] == [-1, 40, 6625]
    m = read_manifest(out / "rec-1-cpu-fp32.tar")
    assert [(s.name, s.shape) for s in m.outputs] == [(name, [-1, 40, 6625])]
    # the fp32 bundle reads the crops as the source does
    dest = tmp_path / "fp32"
    safe_unpack(out / "rec-1-cpu-fp32.tar", dest)
    session = runtimes.load(dest, m)
    try:
        got = session.run({"x": x[:3]})[name]
    finally:
        session.close()
    want = ort.InferenceSession(str(rec), providers=["CPUExecutionProvider"]).run(None, {"x": x[:3]})[0]
    assert got.shape == (3, 40, 6625) and (got.argmax(-1) == want.argmax(-1)).mean() > 0.99


def test_a_declared_output_shape_that_disagrees_is_a_warning_and_corrected(rec, tmp_path):
    """A recognizer whose file declares its output as [1, seqlen] (as some exporters write it) while it returns
    [N, 40, 6625]: the conversion goes on, warns, and the manifest carries the real shape."""
    import onnx

    from edgefleet.data import text_lines

    model = onnx.load(str(rec))
    out_value = model.graph.output[0]
    dims = out_value.type.tensor_type.shape.dim
    del dims[:]
    dims.add().dim_value = 1
    dims.add().dim_param = "seqlen"
    declared = tmp_path / "rec-declared.onnx"
    onnx.save(model, str(declared))
    calib = tmp_path / "crops.npz"
    np.savez(calib, x=text_lines(20))
    out = tmp_path / "dist"
    proc = _convert(declared, calib, out, "--target", "cpu", "--name", "rec")
    assert proc.returncode == 0, proc.stderr
    assert f"warning: output {out_value.name!r}: the model declares shape [1, ?] but returns [?, 40, 6625]" \
        in proc.stderr + proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert len(report["warnings"]) == 1 and "[?, 40, 6625]" in report["warnings"][0]
    for tar in out.glob("*.tar"):
        assert [s.shape for s in read_manifest(tar).outputs] == [[-1, 40, 6625]]


@pytest.mark.slow
def test_tflite_recognizer_takes_a_batch_its_graph_cannot_be_resized_to(rec, tmp_path):
    """onnx2tf bakes the recognizer's batch of 1 into its Reshapes, so LiteRT cannot resize it to 4. The
    plugin used to leave the interpreter at the failed batch ("Cannot set tensor: Dimension mismatch. Got 1
    but expected 4 for dimension 0 of input 0"); now it puts it back and runs the batch one feed at a time."""
    pytest.importorskip("ai_edge_litert")
    from agent.runtimes.tflite import TfliteSession
    from converter.arm import io_settings, run_onnx2tf
    from converter.calib import Feeds
    from converter.cpu import fix_shapes
    from converter.toolchain import onnx2tf_venv
    from edgefleet.data import text_lines

    onnx2tf_venv()
    x = text_lines(4)
    specs = [TensorSpec("x", [-1, 3, 48, 320], "float32")]
    fixed = tmp_path / "fixed.onnx"
    fix_shapes(rec, fixed, specs)
    feeds = Feeds.from_arrays({"x": x})
    model = run_onnx2tf(fixed, specs, feeds, tmp_path / "onnx2tf", quantize=False)["tflite-fp32"]
    session = TfliteSession(model, io_settings(model, fixed, specs, feeds[0]), ["x"], [])
    try:
        got = next(iter(session.run({"x": x}).values()))
        one = next(iter(session.run({"x": x[:1]}).values()))
    finally:
        session.close()
    want = ort.InferenceSession(str(rec), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == want.shape == (4, 40, 6625)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99
    assert np.array_equal(one, got[:1])
