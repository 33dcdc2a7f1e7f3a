"""Pass ``onnx2tf``: ONNX -> TFLite with onnx2tf, in its own venv (``converter.toolchain``). ONE run writes the
fp32, fp16 and (with ``quantize``) full-integer int8 models together into ``out_path`` (a directory).

onnx2tf gets a batch-1 copy of the model (it overwrites its input, and a symbolic batch misleads its layout
inference) whose node names are valid TensorFlow scope names (exporters such as Paddle2ONNX name nodes
``Softmax@0``, which TensorFlow rejects). The int8 model is made with ``-oiqt -qt per-channel`` and ``-iqd/-oqd
io_dtype`` (float32 by default: it takes and returns float32, every Conv/FC int8 inside), calibrated on the
calibration feeds transposed to NHWC with mean 0 / std 1 (the data is already normalised).

The run takes minutes (TensorFlow's converter, calibration in TF): a recipe search over its knobs would repeat
all of it per candidate, so the arm target offers one int8 recipe here (its README section says why)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np

from converter import ConvertError
from converter.calib import as_feeds
from converter.passes import Pass, PassResult

STEM = "model"  # onnx2tf names its outputs after the input file: model_float32.tflite, ...
FILES = {"tflite-fp32": "float32", "tflite-fp16": "float16", "tflite-int8": "full_integer_quant"}
SCOPE_NAME = re.compile(r"[^A-Za-z0-9_.\\/>-]")  # what TensorFlow allows in a scope name


class Onnx2tfConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    quantize: bool = True  # also write the full-integer int8 model (needs float32 inputs, batch on axis 0)
    quant_type: Literal["per-channel", "per-tensor"] = "per-channel"
    io_dtype: Literal["float32", "int8", "uint8"] = "float32"  # the int8 model's input/output type
    batch: int = 1


class Onnx2tf(Pass):
    name = "onnx2tf"
    Config = Onnx2tfConfig
    toolchain = ("onnx",)

    def run(self, model_path: Path, config: Onnx2tfConfig, out_path: Path, *, specs=None,
            calib=None) -> PassResult:
        from converter import toolchain

        work = Path(out_path)
        work.mkdir(parents=True, exist_ok=True)
        prepare(Path(model_path), work / f"{STEM}.onnx")
        args = ["-i", f"{STEM}.onnx", "-o", "out", "-b", str(config.batch)]
        if config.quantize:
            if specs is None or calib is None:
                raise ConvertError(f"{self.name}: int8 needs the input specs and calibration feeds")
            args += ["-oiqt", "-qt", config.quant_type, "-iqd", config.io_dtype, "-oqd", config.io_dtype]
            arrays = as_feeds(calib).arrays()  # one sample per feed along axis 0
            for i, spec in enumerate(specs):
                data = np.asarray(arrays[spec.name], np.float32)
                if data.ndim >= 3:
                    data = np.transpose(data, channels_last(data.ndim))
                np.save(work / f"calib_{i}.npy", np.ascontiguousarray(data))
                zero, one = ("[" * data.ndim + v + "]" * data.ndim for v in ("0.0", "1.0"))
                args += ["-cind", spec.name, f"calib_{i}.npy", zero, one]
        toolchain.run_onnx2tf(args, work)
        found = {}
        for name, suffix in FILES.items():
            if name == "tflite-int8" and not config.quantize:
                continue
            path = work / "out" / f"{STEM}_{suffix}.tflite"
            if not path.is_file():
                raise ConvertError(f"onnx2tf finished but wrote no {path.name} (log: {work / 'onnx2tf.log'})")
            found[name] = str(path)
        result = self.result(config, out_path, {"files": found, "layout": "NHWC",
                                                "calibration_samples": len(as_feeds(calib)) if config.quantize
                                                else 0})
        result.toolchain = {**result.toolchain, "onnx2tf": toolchain.ONNX2TF, "tensorflow": "2.19.0 (its venv)"}
        return result


def prepare(src: Path, dst: Path) -> None:
    """A copy of ``src`` with the batch fixed to 1 and node names TensorFlow accepts as scope names."""
    import onnx

    model = onnx.load(str(src))
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            dims[0].Clear()
            dims[0].dim_value = 1
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = SCOPE_NAME.sub("_", node.name) or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        node.name = name
    del model.graph.value_info[:]
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))


def channels_last(rank: int) -> list[int]:
    """NCHW -> NHWC (and NCW -> NWC, NCDHW -> NDHWC): onnx2tf's layout for inputs of rank >= 3."""
    return [0, *range(2, rank), 1]


PASS = Onnx2tf()
