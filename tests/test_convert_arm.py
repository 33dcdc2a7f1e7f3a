"""The converter's arm target on the real PP-OCR text-direction classifier and real text crops.

Real onnx2tf (in its own venv, built here if set-up has not built it yet), real LiteRT, real ONNX Runtime,
real bundles read back the way a device reads them. No timing thresholds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent import runtimes
from agent.bundle import Manifest, TensorSpec, read_manifest, safe_unpack

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

N_SAMPLES = 200  # 160 calibrate, 40 held out
VARIANTS = {  # name -> (runtime, precision, rung, model file)
    "tflite-fp32": ("tflite", "fp32", "fp32", "model.tflite"),
    "tflite-fp16": ("tflite", "fp16", "fp16", "model.tflite"),
    "tflite-int8": ("tflite", "int8", "int8", "model.tflite"),
    "ort-int8-arm": ("onnxruntime", "int8", None, "model.onnx"),
}
OUTPUT = "save_infer_model/scale_0.tmp_1"


@pytest.fixture(scope="module")
def toolchain() -> Path:
    """The onnx2tf venv, as set-up makes it (built now if it is not there: minutes, once)."""
    from converter.toolchain import onnx2tf_venv

    return onnx2tf_venv()


@pytest.fixture(scope="module")
def model() -> Path:
    from edgefleet.models import model_path

    return model_path("ocr-cls")


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    from edgefleet.data import text_direction

    x, labels = text_direction(N_SAMPLES)
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=x)
    return path, x, labels


@pytest.fixture(scope="module")
def reference(model, real) -> np.ndarray:
    """The source model's outputs on every crop, in ONNX Runtime."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {"x": real[1]})[0]


@pytest.fixture(scope="module")
def converted(toolchain, model, real, tmp_path_factory) -> tuple[Path, dict]:
    from converter.convert import convert

    out = tmp_path_factory.mktemp("arm") / "dist"
    lines: list[str] = []
    report = convert(model, target="arm", calib=real[0], out=out, name="ocr-cls", version="3",
                     input_shapes={"x": [1, 3, 48, 192]}, progress=lines.append)
    assert any("onnx2tf" in line for line in lines)
    return out, report


def _unpack(out: Path, variant: str, dest: Path) -> Manifest:
    return safe_unpack(out / f"ocr-cls-3-arm-{variant}.tar", dest)


@pytest.mark.slow
def test_bundles_for_every_variant(converted):
    out, report = converted
    assert {p.name for p in out.glob("*.tar")} == {f"ocr-cls-3-arm-{v}.tar" for v in VARIANTS}
    by = {v["variant"]: v for v in report["variants"]}
    assert set(by) == set(VARIANTS)
    for name, (runtime, precision, rung, file) in VARIANTS.items():
        v = by[name]
        assert (v["runtime"], v["precision"], v["rung"]) == (runtime, precision, rung)
        assert v["round_trip"]["ok"] is True and v["latency_ms"]["p50"] > 0
        m = read_manifest(out / v["bundle"])
        assert (m.target, m.runtime, m.precision, m.model) == ("arm", runtime, precision, file)
        assert sorted(f.path for f in m.files) == sorted([file, "sample.npz", "profile.json", "golden.npz"])
        assert [(i.name, i.shape[1:]) for i in m.inputs] == [("x", [3, 48, 192])]  # NCHW, as the source
        assert [o.name for o in m.outputs] == [OUTPUT]
        # the recipe names the passes that made the variant, in order, with their configs and toolchains
        passes = [p["name"] for p in m.report["recipe"]["passes"]]
        assert passes == ["fix_shapes", *(["onnx2tf"] if runtime == "tflite" else
                                          ["onnx_opset", "ort_preprocess", "ort_quantize"])]
        assert passes == [p["name"] for p in v["recipe"]["passes"]]
    assert by["tflite-int8"]["recipe"]["passes"][1]["config"]["quant_type"] == "per-channel"
    assert "onnx2tf" in by["tflite-int8"]["recipe"]["passes"][1]["toolchain"]
    assert "search" not in by["ort-int8-arm"]  # no gate, no --search: one recipe
    assert by["tflite-int8"]["recipe"]["search"].startswith("one recipe")
    fp16, fp32 = by["tflite-fp16"]["size_bytes"], by["tflite-fp32"]["size_bytes"]
    assert by["tflite-int8"]["size_bytes"] < fp16 < fp32
    recipe = by["ort-int8-arm"]["recipe"]
    assert (recipe["format"], recipe["per_channel"], recipe["activation_type"], recipe["weight_type"],
            recipe["reduce_range"]) == ("QDQ", True, "QInt8", "QInt8", False)


@pytest.mark.slow
def test_tflite_settings_map_nchw_inputs(converted):
    out, _ = converted
    for name in ("tflite-fp32", "tflite-fp16", "tflite-int8"):
        s = read_manifest(out / f"ocr-cls-3-arm-{name}.tar").settings
        assert s["threads"] == 1
        assert s["input_transpose"] == {"x": [0, 2, 3, 1]}
        assert set(s["output_map"]) == {OUTPUT} and set(s["input_map"]) == {"x"}


@pytest.mark.slow
def test_int8_tflite_has_int8_weights_and_activations(converted, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from converter.arm import check_full_int8

    out, report = converted
    _unpack(out, "tflite-int8", tmp_path / "int8")
    path = tmp_path / "int8" / "model.tflite"
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    tensors = {d["index"]: d for d in it.get_tensor_details()}
    convs = [op for op in it._get_ops_details() if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    assert len(convs) >= 10
    for op in convs:
        activation, weights = (tensors[i] for i in op["inputs"][:2])
        assert activation["dtype"] == np.int8 and weights["dtype"] == np.int8, op
        assert tensors[op["outputs"][0]]["dtype"] == np.int8, op
        channels = weights["shape"][0] if op["op_name"] == "CONV_2D" else weights["shape"][-1]
        assert len(weights["quantization_parameters"]["scales"]) == channels  # per-channel
    assert report["variants"][[v["variant"] for v in report["variants"]].index("tflite-int8")]["recipe"][
        "int8_check"]["int8_conv_fc_ops"] >= len(convs)
    # ... and the check refuses a model whose activations are float
    _unpack(out, "tflite-fp32", tmp_path / "fp32")
    from converter import ConvertError

    with pytest.raises(ConvertError, match="not full-integer int8"):
        check_full_int8(tmp_path / "fp32" / "model.tflite")


@pytest.mark.slow
def test_agreement_with_the_source(converted):
    _, report = converted
    for v in report["variants"]:
        a = v["agreement"]
        assert a["samples"] == N_SAMPLES // 5
        assert a["top1"] >= 0.9, (v["variant"], a)
    by = {v["variant"]: v["agreement"] for v in report["variants"]}
    assert by["tflite-fp32"]["top1"] == 1.0 and by["tflite-fp32"]["sqnr_db"] > 60


@pytest.mark.slow
def test_each_bundle_runs_at_batch_1_and_16(converted, real, reference, tmp_path):
    out, _ = converted
    _, x, labels = real
    for name in VARIANTS:
        manifest = _unpack(out, name, tmp_path / name)
        session = runtimes.load(tmp_path / name, manifest)
        try:
            with np.load(tmp_path / name / manifest.sample) as npz:
                sample = {k: npz[k] for k in npz.files}
            assert sample["x"].shape == (1, 3, 48, 192)  # NCHW, as the source model takes it
            one = session.run(sample)[OUTPUT]
            assert one.shape == (1, 2) and one.dtype == np.float32 and np.isfinite(one).all()
            sixteen = session.run({"x": x[:16]})[OUTPUT]
            assert sixteen.shape == (16, 2)
            singles = np.concatenate([session.run({"x": x[i : i + 1]})[OUTPUT] for i in range(16)])
            np.testing.assert_allclose(sixteen, singles, rtol=1e-3, atol=1e-4)  # batching changes nothing
            got = np.concatenate([session.run({"x": x[i : i + 16]})[OUTPUT] for i in range(0, len(x), 16)])
        finally:
            session.close()
        assert got.shape == (N_SAMPLES, 2)  # 12 batches of 16, then one of 8
        assert (got.argmax(1) == reference.argmax(1)).mean() >= 0.9, name
        assert (got.argmax(1) == labels).mean() >= 0.8, name  # the real classifier still reads real text


@pytest.mark.slow
def test_plugin_quantizes_int8_inputs_and_outputs(toolchain, model, real, reference, tmp_path):
    """onnx2tf's own default full-integer model takes and returns int8: the plugin (de)quantizes."""
    from ai_edge_litert.interpreter import Interpreter

    from converter import arm
    from converter.cpu import fix_shapes

    _, x, _ = real
    specs = [TensorSpec("x", [-1, 3, 48, 192], "float32")]
    source = tmp_path / "fixed.onnx"
    fix_shapes(model, source, specs)
    made = arm.run_onnx2tf(source, specs, {"x": x[:40]}, tmp_path / "work", io_dtype="int8")
    path = made["tflite-int8"]
    it = Interpreter(model_path=str(path))
    assert it.get_input_details()[0]["dtype"] == np.int8 and it.get_output_details()[0]["dtype"] == np.int8
    settings = arm.io_settings(path, source, specs, {"x": x[:1]})
    manifest = Manifest(name="m", version="1", target="arm", runtime="tflite", precision="int8", model=path.name,
                        files=[], inputs=specs, outputs=[TensorSpec(OUTPUT, [-1, 2], "float32")], settings=settings)
    session = runtimes.load(path.parent, manifest)
    try:
        one = session.run({"x": x[:1]})[OUTPUT]
        got = np.concatenate([session.run({"x": x[i : i + 16]})[OUTPUT] for i in range(0, len(x), 16)])
    finally:
        session.close()
    assert one.dtype == np.float32 and one.shape == (1, 2) and 0.0 <= one.min() and one.max() <= 1.0
    assert (got.argmax(1) == reference.argmax(1)).mean() >= 0.9


def test_target_is_ready_and_plugin_registered(toolchain):
    from agent.runtimes import tflite
    from converter import arm, toolchain as tc

    assert tc.ready() and (toolchain / "bin" / "onnx2tf").exists()
    assert arm.missing() is None
    assert tflite.NAME == "tflite" and tflite.available()
    assert "tflite" in runtimes.available()
    assert runtimes.plugin("tflite") is tflite


def test_onnx2tf_failure_is_one_meaningful_line(toolchain, tmp_path):
    from converter import ConvertError
    from converter.toolchain import run_onnx2tf

    (tmp_path / "broken.onnx").write_text("this is not a model\n")
    with pytest.raises(ConvertError) as exc:
        run_onnx2tf(["-i", "broken.onnx", "-o", "out"], tmp_path, timeout=600)
    message = str(exc.value)
    assert message.startswith("onnx2tf failed: ") and "\n" not in message
    assert "Error" in message  # onnx2tf's own exception, not a generic line
    assert (tmp_path / "onnx2tf.log").stat().st_size > 0
    assert (tmp_path / "calibration_image_sample_data_20x128x128x3_float32.npy").exists()
