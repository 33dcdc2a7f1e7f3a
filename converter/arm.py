"""Target ``arm``: ARM64 boards (Raspberry Pi 4/5, Jetson CPUs, i.MX 8, ...). Four variants:

- ``tflite-fp32``, ``tflite-fp16``, ``tflite-int8`` (runtime ``tflite``: LiteRT with XNNPACK): ONE onnx2tf
  run, in its own venv (``converter.toolchain``), writes all three. onnx2tf gets a batch-1 copy of the model
  (it overwrites its input, and a symbolic batch misleads its layout inference) whose node names are
  valid TensorFlow scope names (exporters such as Paddle2ONNX name nodes ``Softmax@0``, which TensorFlow
  rejects). The int8 model is onnx2tf's ``*_full_integer_quant.tflite``, made with ``-iqd/-oqd float32`` so
  it takes and returns float32 with every Conv/FC in int8 inside (checked here, op by op: the
  ``*_dynamic_range_quant.tflite`` onnx2tf also writes is weight-only int8). It is calibrated on the
  user's calibration split, transposed to NHWC, with mean 0 / std 1 (the data is already normalised).
  The models take NHWC; each variant's settings carry the transposes and tensor names the ``tflite``
  runtime plugin needs to take the manifest's (source model's) NCHW inputs and names. Those are found
  by running the source (ONNX Runtime) and the model (LiteRT) on one calibration sample.
- ``ort-int8-arm`` (runtime ``onnxruntime``): static QDQ, per-channel, S8S8 (int8 activations and
  weights), the cpu target's passes with an ARM64 recipe. ONNX Runtime's guidance: S8S8 QDQ is the
  default and first choice; U8S8 exists for x86's u8*s8 instructions (whose saturation needs
  reduce_range without VNNI), and ARM64 has no such issue: MLAS runs S8S8 with sdot/smmla kernels
  (ARMv8.2 dot product, ARMv8.6 i8mm) and a symmetric S8S8 conv kernel. On an x86 host S8S8 gains
  little (FINDINGS), so the host's latency for this variant understates an ARM board's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from agent.bundle import TensorSpec
from converter import ConvertError, cpu, toolchain
from converter.calib import Feeds, as_feeds
from converter.plan import Step, Variant

TARGET = "arm"
TFLITE = "tflite"
ORT = "onnxruntime"
STEM = "model"  # onnx2tf names its outputs after the input file: model_float32.tflite, ...
INT8_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D", "BATCH_MATMUL")
THREADS = 1


def missing() -> str | None:
    import importlib.util

    from agent.runtimes import tflite

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return "onnxruntime is not installed: pip install 'edgefleet[converter]'"
    if not tflite.available():
        return "ai-edge-litert is not installed: pip install 'edgefleet[arm]'"
    if not toolchain.ready():
        return f"the onnx2tf toolchain is not set up: run `{toolchain.SETUP_HINT}` (about 2.6 GB, once)"
    return None


def plan(source: Path, specs: list[TensorSpec], calib: Feeds, work: Path, *,
         calib_method: str = "auto", cpu_flags: frozenset[str] = frozenset(), search: bool = False) -> list[Step]:
    """The passes for this target, in order; the steps that produce a variant return it.

    ``search``: offer several recipes for ``ort-int8-arm`` (``int8_candidates``, ONNX Runtime's own defaults
    among them). ``tflite-int8`` stays one recipe (see ``TFLITE_SINGLE``)."""
    if calib_method not in cpu.CALIB_METHODS:
        raise ConvertError(f"unknown calibration method {calib_method!r} "
                           f"(choose from {', '.join(cpu.CALIB_METHODS)})")
    calib = as_feeds(calib)
    samples = len(calib)
    # onnx2tf calibrates float32 inputs only, and takes sample i of every input as [i:i+1] along axis 0
    no_int8 = next((f"onnx2tf calibrates float32 inputs only (input {s.name!r} is {s.dtype})"
                    for s in specs if s.dtype != "float32"), None)
    if no_int8 is None and (name := calib.axis0_stackable()) is not None:
        no_int8 = (f"onnx2tf takes calibration samples along axis 0 of every input; input {name!r} holds its "
                   f"batch on another axis")
    quantizable = no_int8 is None
    batch = specs[0].shape[0] if specs[0].shape and specs[0].shape[0] > 0 else None
    shapes = " ".join(f"{s.name}={'x'.join('N' if d < 0 else str(d) for d in s.shape)}" for s in specs)
    sample = calib[0]
    made: list = []
    base_ort = int8_recipe("minmax" if calib_method == "auto" else calib_method, samples)
    candidates = cpu.int8_candidates(base_ort, calib_method) if search else {None: base_ort}
    prep = cpu.Prepared(source, work)

    def onnx2tf_outputs() -> tuple[dict[str, Path], dict]:
        if not made:
            result = cpu.run_pass("onnx2tf", source, work / "onnx2tf", quantize=quantizable, specs=specs, calib=calib)
            made.append(({k: Path(v) for k, v in result.notes["files"].items()}, result.report()))
        return made[0]

    base = {"converter": toolchain.ONNX2TF, "tensorflow": "2.19.0", "layout": "NHWC (onnx2tf)",
            "built_batch": 1, "input_shapes": shapes}

    def tflite(name: str, precision: str, rung: str, recipe: dict) -> Variant:
        files, report = onnx2tf_outputs()
        out = work / name / f"{STEM}.tflite"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[name], out)
        return Variant(name, precision, out, TFLITE, {**base, **recipe, "passes": [report]},
                       io_settings(out, source, specs, sample), rung=rung)

    def fp32() -> Variant:
        return tflite("tflite-fp32", "fp32", "fp32", {})

    def fp16() -> Variant:
        return tflite("tflite-fp16", "fp16", "fp16", {"weights": "float16"})

    def int8() -> Variant:
        v = tflite("tflite-int8", "int8", "int8", {
            "quantization": "full integer (TFLite converter, representative dataset)", "per_channel": True,
            "activations": "int8", "weights": "int8", "io": "float32 (quantize/dequantize inside the model)",
            "calibration_samples": samples, "calibration_layout": "NHWC", "calibration_mean_std": [0.0, 1.0],
            "search": TFLITE_SINGLE})
        v.recipe["int8_check"] = check_full_int8(v.path)
        return v

    made_ort: dict[str | None, Variant] = {}  # candidate -> its variant (the converter marks the one it kept)

    def ort_int8(candidate: str | None):
        def run() -> Variant:
            out = work / ("ort-int8-arm" if candidate is None else f"ort-int8-arm@{candidate}") / "model.onnx"
            recipe = prep.quantized(dict(candidates[candidate]), out, calib, batch, "ort-int8-arm")
            if candidate is not None:
                recipe["candidate"] = candidate
            made_ort[candidate] = Variant("ort-int8-arm", "int8", out, ORT, {**recipe, "input_shapes": shapes},
                                          rung=None)
            return made_ort[candidate]
        return run

    def ort_mixed() -> Variant:
        return cpu.mixed_variant("ort-int8-mixed-arm", prep, candidates, base_ort, made_ort, work, calib, batch, shapes)

    steps = [Step(f"converting to TFLite with {toolchain.ONNX2TF} in its own venv (fp32, fp16"
                  + (f" and full-integer int8, per-channel, calibrated on {samples} samples in NHWC)"
                     if quantizable else f"; no int8: {no_int8})"),
                  fp32, "tflite-fp32"),
             Step("taking the fp16 TFLite model", fp16, "tflite-fp16")]
    if quantizable:
        steps.append(Step("checking the int8 TFLite model is full-integer (int8 weights and activations)",
                          int8, "tflite-int8"))
    for name, recipe in candidates.items():
        steps.append(Step(f"quantizing int8 for ONNX Runtime on ARM64 ({cpu.describe(recipe)})", ort_int8(name),
                          "ort-int8-arm", candidate=name))
    # the int8-mixed rung, when the gate refuses tflite-int8: ONNX Runtime on ARM64 with the layers whose int8
    # costs the output most kept in float, from the ort-int8-arm recipe the search kept
    steps.append(Step("quantizing ort-int8-mixed-arm (ONNX Runtime on ARM64; the layers whose int8 costs the most "
                      "output accuracy, measured on calibration feeds, kept in float)", ort_mixed,
                      "ort-int8-mixed-arm", fallback=True, rung="int8-mixed"))
    return steps


# Why tflite-int8 is not searched: one onnx2tf run (minutes: TensorFlow's converter and its calibration, in the
# toolchain venv) writes the fp32, fp16 and int8 models together; each other int8 recipe (per-tensor, other
# calibration) would repeat the whole run, and onnx2tf's calibration knobs are few (mean/std, per-channel or
# per-tensor). The search happens where it is cheap: ort-int8-arm.
TFLITE_SINGLE = ("one recipe: each other TFLite int8 recipe needs another full onnx2tf run (minutes), which also "
                 "rewrites fp32 and fp16; the ARM search is on ort-int8-arm")


def int8_recipe(calib_method: str, samples: int) -> dict:
    """S8S8 for ARM64: ORT's default and first choice; ARM has no u8*s8 saturation (no reduce_range)."""
    return {
        "method": "static",
        "format": "QDQ",
        "per_channel": True,
        "activation_type": "QInt8",
        "weight_type": "QInt8",
        "reduce_range": False,
        "calibrate_method": calib_method,
        "calibration_samples": samples,
        "chosen_for": "ARM64",
        "why": "ONNX Runtime recommends S8S8 QDQ first; U8S8 is for x86 (VPMADDUBSW); ARM64's MLAS runs "
               "S8S8 with sdot/smmla kernels and has no saturation issue, so no reduce_range. An x86 host "
               "measures this variant slower than an ARM board runs it.",
    }


# ---- kept for callers (and tests) that use them directly ----------------------------------------------


def run_onnx2tf(source: Path, specs: list[TensorSpec], calib: Feeds, work: Path, *,
                quantize: bool = True, io_dtype: str = "float32") -> dict[str, Path]:
    """One onnx2tf run in ``work`` (the ``onnx2tf`` pass); returns {variant name: the .tflite it wrote}."""
    result = cpu.run_pass("onnx2tf", source, work, quantize=quantize, io_dtype=io_dtype, specs=specs, calib=calib)
    return {k: Path(v) for k, v in result.notes["files"].items()}


def channels_last(rank: int) -> list[int]:
    """NCHW -> NHWC (and NCW -> NWC, NCDHW -> NDHWC): onnx2tf's layout for inputs of rank >= 3."""
    return [0, *range(2, rank), 1]


def channels_first(rank: int) -> list[int]:
    """The inverse of ``channels_last``."""
    return [0, rank - 1, *range(1, rank - 1)]


def io_settings(model: Path, source: Path, specs: list[TensorSpec], sample: dict[str, np.ndarray]) -> dict:
    """The tflite plugin's settings for ``model``: which tensor and layout each manifest input and output is.

    Inputs are matched by name (onnx2tf keeps it, or makes it ``serving_default_NAME:0``), else by position;
    outputs by running the source and the model on ``sample`` and taking, for each source output, the
    model output and layout that reproduce it best (onnx2tf may reorder and rename outputs).
    """
    import onnxruntime as ort

    from agent.runtimes.tflite import TfliteSession, _interpreter_class

    it = _interpreter_class()(model_path=str(model), num_threads=THREADS)
    it.allocate_tensors()
    ins, outs = it.get_input_details(), it.get_output_details()
    del it
    if len(ins) != len(specs):
        raise ConvertError(f"{model.name} has {len(ins)} inputs; the source model has {len(specs)}")
    input_map, input_transpose, taken = {}, {}, set()
    for position, spec in enumerate(specs):
        j = next((j for j, d in enumerate(ins) if d["name"] in (spec.name, f"serving_default_{spec.name}:0")
                  and j not in taken), None)
        if j is None:
            j = position
        taken.add(j)
        want = tuple(int(d) for d in ins[j]["shape"])
        shape = tuple(1 if d < 0 else d for d in spec.shape)  # the built batch is 1
        perm = channels_last(len(shape)) if len(shape) >= 3 else None
        if perm and tuple(shape[p] for p in perm) == want and tuple(shape) != want:
            input_transpose[spec.name] = perm
        elif tuple(shape) != want:
            raise ConvertError(f"{model.name}: input {ins[j]['name']!r} has shape {list(want)}; cannot map the "
                               f"source input {spec.name!r} {list(shape)} onto it")
        input_map[spec.name] = ins[j]["name"]

    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    reference = dict(zip(names, session.run(names, sample)))
    # the plugin itself feeds the sample (quantizing it if the model takes integers) and returns every
    # model output, dequantized, keyed by the model's own names
    probe = TfliteSession(model, {"threads": THREADS, "input_map": input_map, "input_transpose": input_transpose},
                          [s.name for s in specs], [])
    try:
        got = [np.asarray(v, np.float32) for v in probe.run(sample).values()]
    finally:
        probe.close()

    output_map, output_transpose, used = {}, {}, set()
    for name, ref in reference.items():
        best = None
        for j, value in enumerate(got):
            if j in used:
                continue
            perms = [None] + ([channels_first(value.ndim)] if value.ndim >= 3 else [])
            for perm in perms:
                v = value if perm is None else np.transpose(value, perm)
                if v.shape != ref.shape:
                    continue
                err = float(np.abs(v - ref).max(initial=0.0)) / max(1e-6, float(np.abs(ref).max(initial=0.0)))
                if best is None or err < best[0]:
                    best = (err, j, perm)
        if best is None:
            raise ConvertError(f"{model.name}: no output has the shape of the source output {name!r} "
                               f"{list(ref.shape)} (outputs: {[list(d['shape']) for d in outs]})")
        _, j, perm = best
        used.add(j)
        output_map[name] = outs[j]["name"]
        if perm is not None:
            output_transpose[name] = perm
    settings = {"threads": THREADS, "input_map": input_map, "output_map": output_map}
    if input_transpose:
        settings["input_transpose"] = input_transpose
    if output_transpose:
        settings["output_transpose"] = output_transpose
    return settings


def check_full_int8(model: Path) -> dict:
    """Raise unless every Conv/FC-like op of ``model`` has int8 weights, int8 input and int8 output.

    Returns what was checked, for the report. (``*_dynamic_range_quant`` fails this: its activations
    are float32.)
    """
    from agent.runtimes.tflite import _interpreter_class

    it = _interpreter_class()(model_path=str(model), num_threads=THREADS)
    it.allocate_tensors()
    tensors = {d["index"]: d for d in it.get_tensor_details()}
    dtypes = sorted({np.dtype(d["dtype"]).name for d in tensors.values()})
    ops_details = getattr(it, "_get_ops_details", None)
    if ops_details is None:  # an interpreter without the op listing: judge by the tensors alone
        floats = [d["name"] for d in tensors.values() if np.dtype(d["dtype"]).kind == "f"]
        io = {d["name"] for d in [*it.get_input_details(), *it.get_output_details()]}
        if "int8" not in dtypes or set(floats) - io:
            raise ConvertError(f"{model.name} is not a full-integer int8 model (float tensors: "
                               f"{sorted(set(floats) - io)[:5]})")
        return {"checked": "tensors", "tensor_dtypes": dtypes}
    checked, bad = 0, []
    for op in ops_details():
        if op["op_name"] not in INT8_OPS:
            continue
        args = [tensors[i] for i in op["inputs"] if i >= 0 and i in tensors]
        outs = [tensors[i] for i in op["outputs"] if i in tensors]
        # inputs: activation, weights[, bias (int32)]; TRANSPOSE_CONV: output shape, weights, activation
        args = args[1:3] if op["op_name"] == "TRANSPOSE_CONV" else args[:2]
        kinds = [np.dtype(d["dtype"]).name for d in args + outs]
        checked += 1
        if any(k != "int8" for k in kinds):
            bad.append(f"{op['op_name']} {kinds}")
    if checked == 0:
        raise ConvertError(f"{model.name} has no Conv/FC ops to check for int8")
    if bad:
        raise ConvertError(f"{model.name} is not full-integer int8: {len(bad)} of {checked} Conv/FC ops are not "
                           f"int8 in and out (e.g. {bad[0]}); its weights or activations stayed float")
    return {"checked": "ops", "int8_conv_fc_ops": checked, "tensor_dtypes": dtypes}
