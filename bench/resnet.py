"""A ResNet-18 (the torchvision architecture, 11.7 M parameters) built as ONNX with onnx.helper, and real
photo inputs for it.

No trained ResNet-18 can be had offline from PyPI, so its weights are random (seeded), scaled so that
activations keep their size through the 8 residual blocks (He initialisation, residual branches
halved, a per-channel bias like a folded BatchNorm). That is enough to measure what the converter
does to speed and to agreement with the fp32 reference: both depend on the architecture and the
inputs, not on what the weights learnt. Inputs are crops of scikit-image's bundled photos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def build(path: Path, inputs: np.ndarray, seed: int = 0, classes: int = 1000) -> Path:
    """Write the model; its classifier head is standardised on ``inputs`` (like a trained network's
    head, it then separates the photos instead of favouring one class for all of them)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    counter = iter(range(10_000))

    def conv(x: str, cin: int, cout: int, k: int, stride: int, relu: bool, gain: float = 1.0) -> str:
        i = next(counter)
        w = rng.normal(0, gain * np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k)).astype(np.float32)
        b = rng.normal(0, 0.05, cout).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")])
        out = f"c{i}"
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [out], name=f"conv{i}", kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        if relu:
            nodes.append(helper.make_node("Relu", [out], [out + "r"], name=f"relu{i}"))
            out += "r"
        return out

    def block(x: str, cin: int, cout: int, stride: int) -> str:
        y = conv(x, cin, cout, 3, stride, True)
        y = conv(y, cout, cout, 3, 1, False, gain=0.5)
        skip = conv(x, cin, cout, 1, stride, False) if (stride != 1 or cin != cout) else x
        i = next(counter)
        nodes.append(helper.make_node("Add", [y, skip], [f"a{i}"], name=f"add{i}"))
        nodes.append(helper.make_node("Relu", [f"a{i}"], [f"a{i}r"], name=f"relu_add{i}"))
        return f"a{i}r"

    x = conv("input", 3, 64, 7, 2, True)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="maxpool", kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1, 1, 1, 1]))
    x, cin = "pool", 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        x = block(x, cin, cout, stride)
        x = block(x, cout, cout, 1)
        cin = cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    fc_w = rng.normal(0, np.sqrt(1.0 / 512), (classes, 512)).astype(np.float32)
    inits.extend([numpy_helper.from_array(fc_w, "fc_w"), numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b")])
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "resnet18", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 ["batch", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgefleet-bench")
    onnx.checker.check_model(model)
    _standardise_head(model, inputs, fc_w)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _standardise_head(model, inputs: np.ndarray, fc_w: np.ndarray) -> None:
    """Fold the features' mean and spread on ``inputs`` into the final Gemm's weights and bias."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("flat", onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feats = np.concatenate([session.run(["flat"], {"input": inputs[i : i + 16]})[0] for i in range(0, len(inputs), 16)])
    mean, std = feats.mean(0), feats.std(0)
    std = np.maximum(std, np.median(std))  # a feature that never fires must not get a huge weight
    w = (fc_w / std).astype(np.float32)
    b = (-w @ mean).astype(np.float32)
    for init in model.graph.initializer:
        if init.name == "fc_w":
            init.CopyFrom(numpy_helper.from_array(w, "fc_w"))
        elif init.name == "fc_b":
            init.CopyFrom(numpy_helper.from_array(b, "fc_b"))


def photos(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """``n`` normalised [3, size, size] crops of scikit-image's bundled colour photos."""
    import skimage.data
    from skimage.transform import resize

    images = [getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = images[i % len(images)]
        h, w = img.shape[:2]
        side = int(rng.uniform(0.35, 1.0) * min(h, w))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = resize(img[y : y + side, x : x + side], (size, size), anti_aliasing=True).astype(np.float32)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = (crop.transpose(2, 0, 1) - MEAN) / STD
    return out
