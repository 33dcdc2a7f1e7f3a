"""edgefleet converter (host side): turn a trained ONNX model into validated bundles for a target.

``converter.convert.convert(...)`` is the one composition root; ``edgefleet convert`` is a thin
wrapper over it. Each target's passes live in their own module (``converter.cpu``); each pass takes
a model and writes a *new* model to a new path. Heavy toolchains (onnx, onnxruntime.quantization)
are imported inside the passes, never here.
"""

from __future__ import annotations

from agent.errors import EdgefleetError


class ConvertError(EdgefleetError, ValueError):
    """Bad input to the converter (model, calibration data, options); the message names the problem."""
