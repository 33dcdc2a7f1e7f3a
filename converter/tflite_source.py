"""``.tflite`` in: measure, gate and bundle a TFLite model AS GIVEN, for target ``arm``.

Nothing is converted or quantized: the model file goes into the bundle byte for byte. What the converter
adds is what it adds to its own variants: the model is run through the agent's ``tflite`` plugin (LiteRT) on
the held-out calibration feeds, timed, compared with a reference, gated, bundled with a manifest, and the
bundle is unpacked and run as a device does.

- **Interface.** The model's inputs and outputs become the manifest's specs: named by its (single) signature
  when it has one (``x``, ``output_0``), else by its tensor names; shapes as the model declares them (NHWC
  for images), axis 0 dynamic where its shape signature says so; a quantized (int8/uint8) input or output is
  float32 in the manifest, since the plugin quantizes and dequantizes it with the tensor's scale and zero
  point (as for the arm target's full-integer models). A dim other than the batch that the model leaves
  dynamic is refused: the plugin resizes the batch only.
- **Calibration data** (any of the three formats of ``converter/calib.py``) must match THOSE inputs.
- **Reference.** By default the model itself in LiteRT on the host: judged on ARM kernels (issue 13) that checks
  only that ARM computes what the host does, else agreement is 100 % by construction; the report says so
  ("reference: the model itself"). ``--reference REF.onnx|REF.tflite`` names an fp32 model the
  variant is judged against: inputs and outputs are matched by name (``serving_default_NAME:0`` counts as
  ``NAME``) when every name of the model is found in the reference, else by position (the counts must agree);
  each matched pair must have the same shape, or, for 4-D tensors, the same shape once transposed between
  NHWC and NCHW (the feed is transposed on its way to the reference, the reference's output on its way back).
  Anything else is one line naming the pair. Output shapes are compared as the two models really return
  them on one sample.
- **One variant**, ``tflite``, runtime ``tflite``, its precision told from the tensors: ``int8`` when every
  Conv/FC-like op takes and returns int8 (or uint8) with integer weights, ``mixed`` when only some do (or
  only the weights are integer), ``fp16`` with float16 weights, else ``fp32``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.bundle import Manifest, TensorSpec, sha256_file, write_bundle
from converter import ConvertError, calib as calibration, gate, measure
from converter.arm import INT8_OPS
from converter.plan import Variant

TARGET = "arm"
VARIANT = "tflite"
RUNTIME = "tflite"
THREADS = 1
SELF = "the model itself"
NCHW_FROM_NHWC, NHWC_FROM_NCHW = (0, 3, 1, 2), (0, 2, 3, 1)


def is_tflite(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".tflite"


@dataclass
class Interface:
    """A TFLite model's inputs and outputs as a manifest states them, and the plugin settings that map them."""

    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    settings: dict
    precision: str
    detail: dict = field(default_factory=dict)  # what the precision was told from, for the report


def litert_version() -> str:
    for dist in ("ai-edge-litert", "tflite-runtime"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def describe(path: Path, what: str = "model") -> Interface:
    """Load ``path`` with LiteRT and read its interface; one line when it is not a TFLite model."""
    from agent.runtimes import tflite

    if not path.exists():
        raise ConvertError(f"{what} file not found: {path}")
    if not path.is_file():
        raise ConvertError(f"{what} {path} is not a file")
    if not tflite.available():
        raise ConvertError("reading a .tflite model needs LiteRT: pip install 'edgefleet[arm]'")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise ConvertError(f"{path} is not a TFLite model (no TFL3 flatbuffer identifier)")
    try:
        with _native_stderr_quiet():  # LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate" (once a process)
            it = tflite._interpreter_class()(model_path=str(path), num_threads=THREADS)
            it.allocate_tensors()
    except Exception as e:
        raise ConvertError(f"{path} is not a valid TFLite model: LiteRT cannot load it: {_first_line(e)}") from None
    ins, outs = it.get_input_details(), it.get_output_details()
    if not ins or not outs:
        raise ConvertError(f"{path} has no {'inputs' if not ins else 'outputs'}")
    in_names, out_names = _signature_names(it)
    inputs, outputs, input_map, output_map = [], [], {}, {}
    for details, names, specs, mapping, kind in ((ins, in_names, inputs, input_map, "input"),
                                                (outs, out_names, outputs, output_map, "output")):
        for d in details:
            name = names.get(d["index"], d["name"])
            shape = [int(n) for n in d["shape"]]
            signature = [int(n) for n in d.get("shape_signature", d["shape"])]
            if shape and signature and signature[0] < 0:
                shape[0] = -1
            if kind == "input" and (axis := next((a for a, n in enumerate(signature) if a and n < 0), None)):
                raise ConvertError(f"{path.name}: input {name!r} has a dynamic dimension {axis} "
                                   f"(shape signature {signature}); only the batch (axis 0) may be dynamic when a "
                                   f".tflite model is bundled as given")
            dtype = np.dtype(d["dtype"])
            scale = float(d.get("quantization", (0.0, 0))[0])
            specs.append(TensorSpec(name, shape, "float32" if dtype.kind in "iu" and scale else dtype.name))
            mapping[name] = d["name"]
    if len({s.name for s in inputs}) < len(inputs) or len({s.name for s in outputs}) < len(outputs):
        raise ConvertError(f"{path.name}: two inputs or two outputs share a name")
    precision, detail = _precision(it)
    settings = {"threads": THREADS, "input_map": input_map, "output_map": output_map}
    return Interface(path, inputs, outputs, settings, precision, detail)


@contextlib.contextmanager
def _native_stderr_quiet():
    """File descriptor 2 pointed at /dev/null for the block: LiteRT's C++ logging writes there, not to sys.stderr;
    its errors still arrive as Python exceptions."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _signature_names(it) -> tuple[dict[int, str], dict[int, str]]:
    """{tensor index: signature name} for inputs and outputs, from the model's one signature (none: {})."""
    try:
        signatures = it.get_signature_list() or {}
    except Exception:
        return {}, {}
    if len(signatures) != 1:
        return {}, {}
    try:
        runner = it.get_signature_runner(next(iter(signatures)))
        ins = {d["index"]: n for n, d in runner.get_input_details().items()}
        outs = {d["index"]: n for n, d in runner.get_output_details().items()}
    except Exception:
        return {}, {}
    return ins, outs


def _precision(it) -> tuple[str, dict]:
    """int8 | mixed | fp16 | fp32, from the Conv/FC-like ops' tensors (or, without an op listing, all tensors)."""
    tensors = {d["index"]: d for d in it.get_tensor_details()}
    dtypes = sorted({np.dtype(d["dtype"]).name for d in tensors.values()})
    ops = getattr(it, "_get_ops_details", None)
    detail = {"tensor_dtypes": dtypes}
    integer = ("int8", "uint8")
    if ops is not None:
        full = weights_only = total = 0
        for op in ops():
            if op["op_name"] not in INT8_OPS:
                continue
            args = [tensors[i] for i in op["inputs"] if i >= 0 and i in tensors]
            args = args[1:3] if op["op_name"] == "TRANSPOSE_CONV" else args[:2]
            outs = [tensors[i] for i in op["outputs"] if i in tensors]
            kinds = [np.dtype(d["dtype"]).name for d in args + outs]
            total += 1
            if kinds and all(k in integer for k in kinds):
                full += 1
            elif len(args) > 1 and np.dtype(args[1]["dtype"]).name in integer:
                weights_only += 1
        detail.update({"conv_fc_ops": total, "integer_conv_fc_ops": full, "weight_only_integer_ops": weights_only})
        if total and full == total:
            return "int8", detail
        if full or weights_only:
            return "mixed", detail
    elif any(k in dtypes for k in integer):
        return ("int8" if not any(k in dtypes for k in ("float16",)) else "mixed"), detail
    return ("fp16" if "float16" in dtypes else "fp32"), detail


RUNGS = {"int8": "int8", "mixed": "int8-mixed", "fp16": "fp16", "fp32": "fp32"}


# ---- the reference ----------------------------------------------------------------------------------


class Mapped:
    """A session on the reference model, fed and read in the variant's names and layout."""

    def __init__(self, session, inputs: dict[str, tuple[str, tuple | None]],
                 outputs: dict[str, tuple[str, tuple | None]] | None = None):
        self._session, self.inputs, self.outputs = session, inputs, outputs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        theirs = {}
        for name, value in feeds.items():
            ref, perm = self.inputs[name]
            theirs[ref] = np.ascontiguousarray(np.transpose(value, perm)) if perm else value
        got = self._session.run(theirs)
        if self.outputs is None:
            return got
        return {name: np.transpose(got[ref], perm) if perm else got[ref] for name, (ref, perm) in self.outputs.items()}

    def close(self) -> None:
        self._session.close()


@dataclass
class Reference:
    session: object  # run(feeds in the variant's names and layout) -> outputs in the variant's names and layout
    info: dict  # for the report


def self_reference(interface: Interface) -> Reference:
    session = _open(interface.path, RUNTIME, interface.settings, "model")
    return Reference(session, {
        "kind": "self", "path": str(interface.path), "runtime": RUNTIME, "precision": interface.precision,
        "size_bytes": os.path.getsize(interface.path), "short": SELF, "text": f"{SELF} (LiteRT)"})


def open_reference(path: Path, model: Interface, one: dict[str, np.ndarray], probe_out: dict[str, np.ndarray]
                   ) -> Reference:
    """The fp32 model at ``path`` (ONNX or TFLite), mapped onto ``model``'s inputs and outputs.

    ``one`` is one feed of the model and ``probe_out`` the model's outputs on it: the two models' real output
    shapes are matched, not the declared ones."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".onnx", ".tflite"):
        raise ConvertError(f"--reference {path} must be an .onnx or .tflite model")
    if suffix == ".onnx":
        from converter.convert import _load_source

        onnx_model, theirs = _load_source(path)
        quantized = sorted({n.op_type for n in onnx_model.graph.node if n.op_type in QUANTIZED_ONNX_OPS})
        if quantized:
            raise ConvertError(f"--reference {path.name} is quantized ({', '.join(quantized)}): give the fp32 model")
        runtime, settings, precision = "onnxruntime", dict(measure.SETTINGS), "fp32"
    else:
        other = describe(path, "--reference")
        if other.precision != "fp32":
            raise ConvertError(f"--reference {path.name} is not an fp32 model (its precision: {other.precision}): give the "
                               f"fp32 model")
        theirs, runtime, settings, precision = other.inputs, RUNTIME, other.settings, other.precision
    inputs, by = match("input", model.inputs, theirs, path)
    session = _open(path, runtime, settings, "--reference model")
    mapped = Mapped(session, inputs)
    try:
        got = mapped.run(one)
    except Exception as e:
        session.close()
        raise ConvertError(f"--reference {path.name} fails on the calibration data: {_first_line(e)}") from None
    ours = [TensorSpec(n, list(np.shape(v)), np.asarray(v).dtype.name) for n, v in probe_out.items()]
    real = [TensorSpec(n, list(np.shape(v)), np.asarray(v).dtype.name) for n, v in got.items()]
    try:
        mapped.outputs, by_out = match("output", ours, real, path, strict_dtype=False)
    except ConvertError:
        session.close()
        raise
    short = "ORT fp32" if runtime == "onnxruntime" else "LiteRT fp32"
    return Reference(mapped, {
        "kind": suffix[1:], "path": str(path), "sha256": sha256_file(path), "runtime": runtime,
        "precision": precision, "size_bytes": os.path.getsize(path), "short": short,
        "text": f"{path.name} ({'ONNX Runtime' if runtime == 'onnxruntime' else 'LiteRT'} fp32)",
        "inputs_matched_by": by, "outputs_matched_by": by_out,
        "inputs": {k: {"name": r, "transpose": list(p) if p else None} for k, (r, p) in inputs.items()},
        "outputs": {k: {"name": r, "transpose": list(p) if p else None} for k, (r, p) in mapped.outputs.items()}})


QUANTIZED_ONNX_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                      "MatMulInteger", "DynamicQuantizeLinear")


def _norm(name: str) -> str:
    if name.startswith("serving_default_"):
        name = name[len("serving_default_"):]
    return name[:-2] if name.endswith(":0") else name


def match(kind: str, ours: list[TensorSpec], theirs: list[TensorSpec], path: Path, *, strict_dtype: bool = True
          ) -> tuple[dict[str, tuple[str, tuple | None]], str]:
    """Pair each of ``ours`` with one of ``theirs``: by name when every one of ours is named in theirs, else by
    position. Returns ({our name: (their name, perm from our layout to theirs, or None)}, "name" | "position").
    For outputs the perm goes from theirs to ours."""
    if len(ours) != len(theirs):
        raise ConvertError(f"--reference {path.name} has {len(theirs)} {kind}s; the model has {len(ours)}")
    index = {_norm(t.name): t for t in theirs}
    by = "name" if all(_norm(o.name) in index for o in ours) else "position"
    pairs = [(o, index[_norm(o.name)]) for o in ours] if by == "name" else list(zip(ours, theirs))
    mapping = {}
    for o, t in pairs:
        if strict_dtype and o.dtype != t.dtype:
            raise ConvertError(f"--reference {path.name}: {kind} {t.name!r} is {t.dtype} but the model's {kind} "
                               f"{o.name!r} (matched by {by}) is {o.dtype}")
        if _fits(o.shape, t.shape):
            perm = None
        elif len(o.shape) == 4 and _fits([o.shape[p] for p in NCHW_FROM_NHWC], t.shape):
            perm = NCHW_FROM_NHWC  # NHWC -> NCHW (for an output: the reference's NCHW... see below)
        elif len(o.shape) == 4 and _fits([o.shape[p] for p in NHWC_FROM_NCHW], t.shape):
            perm = NHWC_FROM_NCHW
        else:
            raise ConvertError(f"--reference {path.name}: {kind} {t.name!r} {calibration._fmt(t.shape)} does not fit "
                               f"the model's {kind} {o.name!r} {calibration._fmt(o.shape)} (matched by {by}; only "
                               f"equal shapes, or 4-D NHWC/NCHW transposes of each other, are mapped)")
        if perm is not None and kind == "output":
            perm = NHWC_FROM_NCHW if perm == NCHW_FROM_NHWC else NCHW_FROM_NHWC  # theirs -> ours
        mapping[o.name] = (t.name, perm)
    return mapping, by


def _fits(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or x < 0 or y < 0 for x, y in zip(a, b))


def _open(path: Path, runtime: str, settings: dict, what: str):
    from converter.convert import _session

    return _session(path.parent, path.name, what, runtime, settings)


# ---- the composition --------------------------------------------------------------------------------


def convert_tflite(model: Path, *, target: str, calib: Path, out: Path, name: str, version: str,
                   input_shapes: dict | None, calib_method: str, labels: str | Path | None, gating: gate.Options,
                   reference: str | Path | None, sign_key, signature: dict | None, say,
                   onnx_only: dict[str, object] | None = None, arm: dict | None = None,
                   serving: dict | None = None) -> dict:
    """``converter.convert.convert`` for a ``.tflite`` model: one variant, the model as given (see above)."""
    from converter import convert as c

    if target != TARGET:
        raise ConvertError(f"a .tflite model converts for --target {TARGET} only (it is bundled as given); "
                           f"got --target {target}")
    for flag, value in (onnx_only or {}).items():
        if value is not None and value is not False:
            raise ConvertError(f"{flag} needs an ONNX model; a .tflite model is bundled as given")
    if input_shapes:
        raise ConvertError("--input-shape does not apply to a .tflite model: its input shapes are fixed in the file")
    if calib_method != "auto":
        raise ConvertError("--calib-method does not apply to a .tflite model: nothing is quantized, it is bundled "
                           "as given")
    interface = describe(model)
    specs = interface.inputs
    try:
        data = calibration.load(calib, specs)
    except ConvertError as e:
        raise ConvertError(f"{e} (a .tflite model is fed as it declares its inputs: "
                           f"{', '.join(f'{s.name}{calibration._fmt(s.shape)} {s.dtype}' for s in specs)})") from None
    calibration.require_static(data.specs, data.feeds)
    label_array = calibration.load_labels(labels, data) if labels is not None else None
    batch = specs[0].shape[0] if data.feeds.stacked and specs[0].shape and specs[0].shape[0] > 0 else None
    if batch and (data.n_eval < batch or data.samples - data.n_eval < batch):
        raise ConvertError(f"the model has a fixed batch of {batch}: the calibration file needs at least {batch} "
                           f"samples to calibrate and {batch} to hold out (it has {data.samples})")
    held = data.held_out()
    held_labels = None if label_array is None else label_array[data.samples - data.n_eval:]
    one = next(held.batches(batch or 1))
    source_sha = sha256_file(model)
    litert = litert_version()

    probe = _open(model, RUNTIME, interface.settings, "model")
    try:
        probe_out = probe.run(one)
    except Exception as e:
        raise ConvertError(f"{model.name} fails on the calibration data in LiteRT: {_first_line(e)}") from None
    finally:
        probe.close()
    # the reference is matched before any progress line: a reference that does not fit is the only line
    ref = open_reference(Path(reference), interface, one, probe_out) if reference is not None else \
        self_reference(interface)
    staging = None
    try:
        staging = c._staging_dir(out)
        say(f"checking {model.name} ({interface.precision} TFLite, bundled as given) and {calib.name} "
            f"({data.describe()}: {data.samples} feeds, {data.n_eval} held out); inputs "
            f"{', '.join(f'{s.name}{calibration._fmt(s.shape)}' for s in specs)} ...")
        vdir = staging / "work" / VARIANT
        vdir.mkdir(parents=True)
        path = vdir / "model.tflite"
        shutil.copyfile(model, path)
        say(f"running the reference, {ref.info['text']}, on the held-out feeds ...")
        try:
            parts = calibration.run_feeds(ref.session.run, held, batch, measure.EVAL_BATCH)
        except Exception as e:
            raise ConvertError(f"the reference ({ref.info['text']}) fails on the calibration data: "
                               f"{_first_line(e)}") from None
        expected = held.join(parts)
        rule = gate.resolve(gating, expected, labels=held_labels is not None)
        ref_accuracy = gate.task_accuracy(expected, held_labels, rule.labels_output)
        # the reference profile and golden feeds, as every bundle from ONNX carries (agent/quality.py)
        golden = c._golden(held, ref.session.run) if not batch or batch == 1 else [(one, ref.session.run(one))]
        quality = c._quality_files(expected, rule.kinds, golden)
        common = {
            "calibration": {"sha256": data.sha256, "format": data.format, "samples": data.samples,
                            "calibration_samples": data.samples - data.n_eval, "held_out_samples": data.n_eval,
                            "method": None, "labels": held_labels is not None, "dims_from_data": {}},
            "toolchain": {**measure.toolchain(), "litert": litert}, "host": measure.host(),
            "reference_latency_ms": measure.latency(ref.session, one),
            "reference": {**ref.info, "note": ref_note(ref.info)},
        }
        ref.session.close()
        ref = None
        recipe = {"as_given": True, "converter": "none: the .tflite file is bundled as given",
                  "source_sha256": source_sha, "litert": litert, "precision_from": interface.detail,
                  "reference": common["reference"]["text"],
                  # the one pass, recorded like the others (converter/passes PassResult.report())
                  "passes": [{"name": "as_given", "config": {"source_sha256": source_sha}, "out_path": path.name,
                              "toolchain": {"litert": litert}, "notes": {"copied": "byte for byte, unchanged"}}]}
        v = Variant(VARIANT, interface.precision, path, RUNTIME, recipe, dict(interface.settings),
                    rung=RUNGS[interface.precision])
        common["quality_profile"] = {"id": quality["profile_id"], "golden_inputs": len(golden),
                                     "files": [c.PROFILE, c.GOLDEN]}
        ctx = c._Context(held, one, batch, expected, held_labels, rule, ref_accuracy, common, say)
        ctx.quality, ctx.arm = quality, arm  # arm: where the variant is judged (convert._arm_judge)
        say(f"[{TARGET}] measuring {VARIANT} in {RUNTIME} (batch {batch or 1}, 1 thread; {data.n_eval} held-out "
            f"samples) against {common['reference']['text']} ...")
        rep, sample_out = c._measure(v, TARGET, ctx)
        g = rep["gate"]
        chain = [{"rung": v.rung, "variant": v.name, "passed": g["passed"], "metric": g["metric"],
                  "value": g["value"], "drop": g["drop"], "text": g["text"], "reason": g["reason"]}]
        if g["passed"] is False:
            raise ConvertError(f"the gate refused {model.name} (arm/{VARIANT}, {interface.precision}, against "
                               f"{common['reference']['text']}): {g['reason']}; nothing written")

        say("writing the bundle and checking it unpacks and runs as on a device ...")
        manifest = Manifest(
            name=name, version=version, target=TARGET, runtime=RUNTIME, precision=v.precision, model=path.name,
            files=[], inputs=specs, outputs=interface.outputs, sample="sample.npz",
            latency_budget_ms=round(max(250.0, 20 * rep["latency_ms"]["p95"]), 1),
            settings={**c._settings(v), **(serving or {})},
            report={**rep, "gate": {**g, "chain": chain}}, source_sha256=source_sha)
        file = f"{name}-{version}-{TARGET}-{VARIANT}.tar"
        files = {f.name: f for f in sorted(vdir.iterdir()) if f.is_file()}
        digest = write_bundle(staging / file, manifest, files, sign_key=sign_key,
                              serial=signature["serial"] if signature else None)
        diff = c._round_trip(staging / file, staging / f"unpacked-{VARIANT}", sample_out)
        entry = {**rep, "bundle": file, "bundle_sha256": digest, "bundle_bytes": os.path.getsize(staging / file),
                 "round_trip": {"ok": True, "max_abs_diff": diff}}
        report = {
            "name": name, "version": version, "target": TARGET,
            "source": {"path": str(model), "format": "tflite", "sha256": source_sha,
                       "size_bytes": os.path.getsize(model), "opset": None, "precision": interface.precision,
                       "litert": litert, "inputs": [c._spec_dict(s) for s in specs],
                       "outputs": [c._spec_dict(s) for s in interface.outputs]},
            "reference_accuracy": ref_accuracy,
            **common,
            "warnings": [],
            "gate": {"max_accuracy_drop": gating.max_drop, **rule.describe(),
                     "chosen": {TARGET: c._chosen_text(chain)}, "chains": {TARGET: chain}},
            "variants": [entry], "refused": [], "skipped": [], "signed": signature,
        }
        if arm is not None:
            report["arm_check"] = c.arm_summary(arm, [entry])
            report["warnings"] = report["arm_check"]["warnings"]
        return c._publish(staging, out, report)
    finally:
        if ref is not None:
            ref.session.close()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def ref_note(info: dict) -> str | None:
    if info["kind"] == "self":
        return ("reference: the model itself (LiteRT) on the host's kernels: judged on ARM kernels this only checks "
                "that ARM computes what the host does (else agreement is 100 % by construction); give --reference "
                "REF.onnx|REF.tflite (an fp32 model) to judge the model against it")
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0]
