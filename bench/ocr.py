"""The bundle the agent and fleet benches ship: the PP-OCR text-direction classifier (fp32, ONNX Runtime, batch
axis dynamic) with one sample, signed by a release key made for the run."""

from __future__ import annotations

from pathlib import Path


def ocr_cls_bundle(work: Path):
    """Write ``work/ocr.tar``, signed by a new release key in ``work/keys``: returns (the bundle, its manifest,
    the release key's public file, which the fleet and the agents are to trust)."""
    import numpy as np

    from agent import bundle, signing
    from edgefleet.data import text_direction
    from edgefleet.models import model_path

    x, _ = text_direction(4)
    np.savez(work / "sample.npz", x=x[:1])
    manifest = bundle.Manifest(name="ocr-cls", version="1", target="cpu", runtime="onnxruntime", precision="fp32",
                               model="model.onnx", files=[], latency_budget_ms=10_000.0,
                               inputs=[bundle.TensorSpec(name="x", shape=[-1, 3, 48, 192], dtype="float32")],
                               outputs=[bundle.TensorSpec(name="save_infer_model/scale_0.tmp_1", shape=[-1, 2],
                                                          dtype="float32")])
    key_file, pub = signing.generate(work / "keys", "bench")
    tar = work / "ocr.tar"
    bundle.write_bundle(tar, manifest, {"model.onnx": model_path("ocr-cls"), "sample.npz": work / "sample.npz"},
                        sign_key=signing.load_private(key_file))
    return tar, manifest, pub
