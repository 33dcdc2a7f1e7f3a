"""The arm target judged on ARM kernels (issue 13, items 1 and 4): the real PP-OCR text-direction classifier on real
text crops, converted with real onnx2tf, each variant run in the real emulated aarch64 (qemu-user cortex-a76 under
proot, converter/arm64.py) through agent.runtimes; checked against runs of the written bundles made here,
independently, in the same emulator. No fakes; the failure cases use a real emulator refusing a real bad CPU model.

Emulated inference is ~10-30x slower than native: the held-out set is 12 crops (60 samples, 48 calibrate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_convert_arm import model, toolchain  # noqa: F401 (module fixtures: the onnx2tf venv, the PP-OCR classifier)

from agent.bundle import encode_manifest, read_manifest, safe_unpack

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
N_SAMPLES, HELD = 60, 12
OUTPUT = "save_infer_model/scale_0.tmp_1"
VARIANTS = ("tflite-fp32", "tflite-fp16", "tflite-int8", "ort-int8-arm")
EMULATED = "aarch64 (emulated cortex-a76)"
HOST = "x86_64 host"
# run every unpacked bundle under /b/NAME (its own manifest) on the held-out crops at once (as the converter's
# batch of 16 holds all 12) and on each golden input alone, as a device would, inside the emulated aarch64
GUEST = """
import json, platform, sys
import numpy as np
from agent import runtimes
from agent.bundle import decode_manifest
out = {}
for name in json.load(open('/io/names.json')):
    m = decode_manifest(open(f'/io/{name}.manifest', 'rb').read())
    s = runtimes.load(f'/b/{name}', m)
    out[f'{name}/held'] = s.run({'x': np.load('/io/held.npy')})[OUTPUT]
    with np.load(f'/b/{name}/golden.npz') as g:
        i = 0
        while f'x/{i}' in g.files:
            out[f'{name}/golden/{i}'] = s.run({'x': g[f'x/{i}']})[OUTPUT]
            i += 1
    s.close()
np.savez('/io/out.npz', **out)
print(platform.machine())
""".replace("OUTPUT", repr(OUTPUT))


@pytest.fixture(scope="module")
def emulator() -> Path:
    """The emulated aarch64, as set-up makes it (made now if it is not there: about 10 minutes, once, as root)."""
    from converter import arm64

    return arm64.ensure()


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    from edgefleet.data import text_direction

    x, labels = text_direction(N_SAMPLES)
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=x)
    return path, x, labels


@pytest.fixture(scope="module")
def converted(emulator, toolchain, model, crops, tmp_path_factory) -> tuple[Path, dict, list[str]]:
    from converter.convert import convert

    out = tmp_path_factory.mktemp("arm") / "dist"
    lines: list[str] = []
    report = convert(model, target="arm", calib=crops[0], out=out, name="ocr-cls", version="1",
                     input_shapes={"x": [1, 3, 48, 192]}, progress=lines.append)
    return out, report, lines


@pytest.fixture(scope="module")
def on_arm(converted, crops, tmp_path_factory) -> dict[str, np.ndarray]:
    """Every written bundle, unpacked and run in the emulated aarch64 here, apart from the converter."""
    from converter import arm64

    out, report, _ = converted
    work = tmp_path_factory.mktemp("independent")
    (work / "b").mkdir()
    (work / "io").mkdir()
    for name in VARIANTS:
        manifest = safe_unpack(out / f"ocr-cls-1-arm-{name}.tar", work / "b" / name)
        (work / "io" / f"{name}.manifest").write_bytes(encode_manifest(manifest))
    (work / "io" / "names.json").write_text(json.dumps(VARIANTS))
    np.save(work / "io" / "held.npy", crops[1][N_SAMPLES - HELD :])
    proc = arm64.run(["python", "-c", GUEST], binds={work / "b": "/b", work / "io": "/io"}, capture_output=True,
                     text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "aarch64"
    with np.load(work / "io" / "out.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def reference(model, crops) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {"x": crops[1][N_SAMPLES - HELD :]})[0]


def _by(report: dict) -> dict[str, dict]:
    return {v["variant"]: v for v in report["variants"] + report["refused"]}


@pytest.mark.slow
def test_every_variant_is_judged_on_emulated_arm_kernels(converted):
    out, report, lines = converted
    by = _by(report)
    assert set(by) == set(VARIANTS)
    assert report["arm_check"]["judged_on"] == EMULATED and report["arm_check"]["reason"] is None
    assert report["arm_check"]["variants"] == {name: EMULATED for name in VARIANTS}
    assert report["warnings"] == []
    for name, v in by.items():
        assert v["judged_on"] == EMULATED, name
        assert v["latency_ms"]["measured_on"] == HOST  # speed stays the host's
        c = v["arm_check"]
        assert (c["status"], c["cpu"], c["samples"]) == ("emulated", "cortex-a76", HELD)
        assert c["runs"] == 1 + 1 + report["quality_profile"]["golden_inputs"]  # one batch, the sample, golden
        assert v["host_agreement"]["samples"] == v["agreement"]["samples"] == HELD
        assert read_manifest(out / v["bundle"]).report["judged_on"] == EMULATED  # the manifest carries it too
    assert any("judging tflite-int8 on ARM kernels" in line for line in lines)
    assert [line for line in lines if "judged on ARM kernels" in line] == [
        f"[arm] the variants are judged on ARM kernels: {EMULATED}; latency is measured on this host: emulated timing "
        f"means nothing"]
    from converter.report import table

    text = table(report)
    assert "judged on" in text.splitlines()[0]
    assert f"arm: fidelity judged on {EMULATED}; latency is measured on this host: emulated timing means nothing" \
        in text
    assert f"arm/tflite-int8 on {EMULATED}: top1" in text and "top-1 differs from the host's on" in text


@pytest.mark.slow
def test_agreement_is_computed_from_the_arm_outputs(converted, on_arm, crops, reference, tmp_path):
    """The report's agreement is measure.agreement of the fp32 reference against what the bundle computes on ARM
    kernels (run again here, independently): equal, figure for figure; the host's (the bundle run here on x86) is
    kept beside it, and the count of top-1s that differ between the two is theirs."""
    from agent import runtimes
    from converter import measure

    out, report, _ = converted
    by = _by(report)
    differs = 0
    for name in VARIANTS:
        arm = on_arm[f"{name}/held"]
        assert arm.shape == (HELD, 2) and np.isfinite(arm).all()
        manifest = safe_unpack(out / by[name]["bundle"], tmp_path / name)
        session = runtimes.load(tmp_path / name, manifest)
        try:
            host = session.run({"x": crops[1][N_SAMPLES - HELD :]})[OUTPUT]
        finally:
            session.close()
        for figures, outputs in ((by[name]["agreement"], arm), (by[name]["host_agreement"], host)):
            expected = measure.agreement({OUTPUT: reference}, {OUTPUT: outputs})
            for key in ("top1", "top5", "kl", "sqnr_db", "rel_l2", "max_abs_err"):
                assert figures[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), (name, key)
        assert by[name]["arm_check"]["top1_differs_from_host"] == int((host.argmax(1) != arm.argmax(1)).sum())
        differs += not np.array_equal(host, arm)
    # ARM and x86 kernels do not compute the same numbers for every variant: the report is the ARM ones
    assert differs >= 1


@pytest.mark.slow
def test_golden_outputs_are_the_variants_own_on_arm_kernels(converted, on_arm, model):
    """golden.npz's expected outputs are what ARM kernels computed (so a device's canary checks it computes what
    they computed at conversion); profile.json stays the fp32 reference's."""
    import msgspec

    from agent import quality

    out, report, _ = converted
    n = report["quality_profile"]["golden_inputs"]
    assert n == 9 and report["quality_profile"]["golden_from"] == "fp32 reference"  # the report's default
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    not_fp32 = 0
    for name, v in _by(report).items():
        assert v["quality_profile"]["golden_from"] == EMULATED
        assert v["quality_profile"]["id"] == report["quality_profile"]["id"]
        dest = out.parent / f"unpacked-{name}"
        safe_unpack(out / v["bundle"], dest)
        profile = msgspec.json.decode((dest / "profile.json").read_bytes(), type=quality.Profile)
        assert profile.id == report["quality_profile"]["id"]  # the fp32 reference's histograms
        with np.load(dest / "golden.npz") as g:
            assert sorted(g.files) == sorted([f"x/{i}" for i in range(n)] + [f"output/{OUTPUT}/{i}" for i in range(n)])
            for i in range(n):
                golden = g[f"output/{OUTPUT}/{i}"]
                np.testing.assert_array_equal(golden, on_arm[f"{name}/golden/{i}"])
                fp32 = session.run([OUTPUT], {"x": g[f"x/{i}"]})[0]
                not_fp32 += not np.array_equal(golden, fp32)
    assert not_fp32 > 0  # they are not the fp32 reference's outputs


# ---- where ARM kernels cannot judge: a .tflite converted as given (one variant, no onnx2tf run) ------------------


@pytest.fixture(scope="module")
def fp32_tflite(converted, tmp_path_factory) -> Path:
    out, _, _ = converted
    dest = tmp_path_factory.mktemp("given") / "fp32"
    safe_unpack(out / "ocr-cls-1-arm-tflite-fp32.tar", dest)
    return dest / "model.tflite"


@pytest.fixture(scope="module")
def nhwc(crops, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nhwc") / "nhwc.npz"
    np.savez(path, x=np.ascontiguousarray(crops[1].transpose(0, 2, 3, 1)))
    return path


def _convert_given(tflite: Path, calib: Path, out: Path, **kw) -> tuple[dict, list[str]]:
    from converter.convert import convert

    lines: list[str] = []
    report = convert(tflite, target="arm", calib=calib, out=out, name="given", version="1", progress=lines.append,
                     **kw)
    return report, lines


@pytest.mark.slow
def test_a_tflite_given_is_judged_on_arm_kernels_too(fp32_tflite, nhwc, tmp_path):
    report, _ = _convert_given(fp32_tflite, nhwc, tmp_path / "out")
    (v,) = report["variants"]
    assert v["judged_on"] == EMULATED and v["arm_check"]["status"] == "emulated"
    assert v["quality_profile"]["golden_from"] == EMULATED and report["arm_check"]["judged_on"] == EMULATED


def test_not_set_up_says_not_checked_and_the_host_judges(fp32_tflite, nhwc, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFLEET_ARM64", str(tmp_path / "empty"))  # no emulated aarch64 there: ready() is false
    report, lines = _convert_given(fp32_tflite, nhwc, tmp_path / "out")
    (v,) = report["variants"]
    assert v["judged_on"] == HOST and v["arm_check"]["status"] == "not checked"
    assert "host_agreement" not in v and v["quality_profile"]["golden_from"] == "fp32 reference"
    why = report["arm_check"]["reason"]
    assert why.startswith("ARM numerics not checked: the emulated aarch64 is not set up at ")
    assert "edgefleet toolchain arm64" in why
    assert report["warnings"] == [f"{why}; the host's kernels judged the arm variants"]
    assert any(line.startswith(f"[arm] warning: {why}") for line in lines)
    from converter.report import table

    assert f"warning: {why}; the host's kernels judged the arm variants" in table(report)
    assert f"arm: fidelity judged on the {HOST}'s kernels" in table(report)


def test_require_arm_check_without_emulation_is_one_line_and_writes_nothing(fp32_tflite, nhwc, model, crops,
                                                                             tmp_path):
    env = {**os.environ, "EDGEFLEET_ARM64": str(tmp_path / "empty"), "PYTHONPATH": str(ROOT)}
    for source, calib, extra in ((model, crops[0], ["--input-shape", "x=1x3x48x192"]), (fp32_tflite, nhwc, [])):
        r = subprocess.run([sys.executable, "-m", "edgefleet.cli", "convert", str(source), "--target", "arm",
                            "--calib", str(calib), "--out", str(tmp_path / "out"), "--require-arm-check", *extra],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert r.returncode == 2, r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert "--require-arm-check: ARM numerics not checked: the emulated aarch64 is not set up" in line
        assert "Traceback" not in r.stderr and r.stdout == ""
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    r = subprocess.run([sys.executable, "-m", "edgefleet.cli", "convert", str(model), "--target", "cpu",
                        "--calib", str(crops[0]), "--out", str(tmp_path / "out"), "--require-arm-check"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.endswith("--require-arm-check is for --target arm (or all)")


@pytest.mark.slow
def test_an_emulated_run_that_fails_falls_back_to_the_host_with_a_warning(emulator, fp32_tflite, nhwc, tmp_path,
                                                                          monkeypatch):
    """A CPU model the emulator refuses makes the guest fail for real: reported with qemu's reason, the host's
    kernels judge instead, a warning in the report; with require_arm_check, an error and nothing written."""
    from converter import ConvertError, arm64

    monkeypatch.setattr(arm64, "CPU", "no-such-cpu")
    report, lines = _convert_given(fp32_tflite, nhwc, tmp_path / "out")
    (v,) = report["variants"]
    c = v["arm_check"]
    assert v["judged_on"] == HOST and c["status"] == "failed"
    assert c["reason"].startswith("the emulated run (aarch64 (emulated no-such-cpu)) failed (exit status ")
    assert "no-such-cpu" in c["reason"].split("): ", 1)[1]  # qemu's own words
    assert v["quality_profile"]["golden_from"] == "fp32 reference"
    (warning,) = report["warnings"]
    assert warning == f"ARM numerics not checked for arm/tflite: {c['reason']}; judged on the {HOST}'s kernels"
    assert any("warning: ARM numerics not checked for arm/tflite" in line for line in lines)
    with pytest.raises(ConvertError, match=r"^--require-arm-check: ARM numerics not checked for arm/tflite: the "
                                           r"emulated run .* failed"):
        _convert_given(fp32_tflite, nhwc, tmp_path / "strict", require_arm_check=True)
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob(".strict.*"))


@pytest.mark.slow
def test_an_emulated_run_past_its_timeout_is_ended_and_reported(emulator, fp32_tflite, tmp_path, monkeypatch):
    from converter import arm64, arm_check

    monkeypatch.setattr(arm_check, "TIMEOUT", 0.5)
    with pytest.raises(arm64.EmulationError, match=r"did not finish within 0.5 s"):
        arm_check.run(fp32_tflite.parent, "tflite", fp32_tflite.name, {}, [{"x": np.zeros((1, 48, 192, 3),
                                                                                          np.float32)}])
    assert not list(Path(arm_check.tempfile.gettempdir()).glob("arm-check.*"))
