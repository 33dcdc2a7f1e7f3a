"""TFLite plugin (target ``arm``): LiteRT (``ai-edge-litert``), or ``tflite-runtime`` where a device has
nothing newer (its last release, 2.14, breaks with numpy 2 and rejects models of current TensorFlow).

Bundles hold models made by onnx2tf, which take NHWC where the source model took NCHW; the manifest keeps
the source's names and layout, so apps feed the same arrays whatever the variant. The manifest's
``settings`` say how to map them:

- ``threads``: the interpreter's threads (falls back to ``intra_op_threads``, then 1);
- ``input_transpose`` / ``output_transpose``: ``{manifest name: perm}``, applied as ``np.transpose(a, perm)``
  on the way in (manifest layout -> model layout) and on the way out (model layout -> manifest layout);
- ``input_map`` / ``output_map``: ``{manifest name: the model's tensor name, or its index among the
  model's inputs/outputs}``; unmapped names are matched by tensor name, else by position.

Inputs and outputs of integer type with a quantization scale are quantized / dequantized here, so a
full-integer model takes and returns float32 like the others. A batch other than the model's own is
run by resizing the input tensors; if the model cannot be resized (or gives other answers when it is),
the batch is run one sample at a time.

Accelerators: "CPU" is the interpreter's built-in kernels (XNNPACK); "GPU" its GPU delegate, where its library
(``GPU_DELEGATES``) loads here; ``settings["delegate_library"]`` names another delegate's library (NPU vendors
ship theirs), asked for as "delegate". An interpreter is not thread-safe: ``concurrency`` N keeps N of them.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np

from agent.bundle import Manifest
from agent.runtimes import CPU, Placement, Pool, choose, concurrency

NAME = "tflite"
MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")  # preferred first
GPU_DELEGATES = ("libtensorflowlite_gpu_delegate.so", "libLiteRtGpuAccelerator.so")


def available() -> bool:
    return _module() is not None


def _module() -> str | None:
    for name in MODULES:
        try:
            if importlib.util.find_spec(name.split(".")[0]) is not None:
                return name
        except (ImportError, ValueError):
            continue
    return None


def _interpreter_module():
    import importlib

    return importlib.import_module(_module())


def _interpreter_class():
    return _interpreter_module().Interpreter


def _delegate(name: str, settings: dict):
    """The loaded delegate for ``name`` ("GPU", or "delegate": ``settings["delegate_library"]``); raises when its
    library does not load here."""
    mod = _interpreter_module()
    errors = []
    for lib in _libraries(name, settings):
        try:
            ctypes.CDLL(lib)  # first: LiteRT's load_delegate leaves a broken object behind when the library is absent
            return mod.load_delegate(lib)
        except (OSError, ValueError, RuntimeError) as e:
            errors.append(f"{lib}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}")
    raise RuntimeError("; ".join(errors) or f"no delegate library for {name} (settings delegate_library)")


def _libraries(name: str, settings: dict) -> list[str]:
    return [lib for lib in (GPU_DELEGATES if name == "GPU" else (str(settings.get("delegate_library", "")),)) if lib]


def devices() -> list[str]:
    """The CPU, and GPU where a GPU delegate's library loads here (loaded, not made into a delegate: listing
    starts nothing on the GPU)."""
    for lib in _libraries("GPU", {}):
        try:
            ctypes.CDLL(lib)
        except OSError:
            continue
        return [CPU, "GPU"]
    return [CPU]


class TfliteSession:
    def __init__(self, path: Path, settings: dict, inputs: list[str], outputs: list[str], device: str = CPU):
        threads = int(settings.get("threads", settings.get("intra_op_threads", 1)))
        delegates = [] if device == CPU else [_delegate(device, settings)]
        self._it = _interpreter_class()(model_path=str(path), num_threads=threads,
                                        experimental_delegates=delegates or None)
        self._it.allocate_tensors()
        self.placement = Placement(device, "builtin" if device == CPU else f"delegate-{device}")
        self._in = self._it.get_input_details()
        self._out = self._it.get_output_details()
        self._in_t = {k: tuple(v) for k, v in (settings.get("input_transpose") or {}).items()}
        self._out_t = {k: tuple(v) for k, v in (settings.get("output_transpose") or {}).items()}
        self._in_map = {k: self._find(self._in, v) for k, v in (settings.get("input_map") or {}).items()}
        out_map = settings.get("output_map") or {}
        names = list(out_map) or outputs or [d["name"] for d in self._out]
        self._out_map = {n: self._find(self._out, out_map[n]) if n in out_map else self._by_name(self._out, n, i)
                         for i, n in enumerate(names)}
        self._input_names = inputs
        self._batch = int(self._in[0]["shape"][0]) if len(self._in[0]["shape"]) else 1
        self._built_batch = self._batch
        self._resizable: bool | None = None  # unknown until a batch other than the model's is asked for

    # ---- the Session interface ----

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = self._inputs(feeds)
        n = next(iter(arrays.values())).shape[0] if arrays else 1
        if n == self._batch:
            return self._invoke(arrays)
        if self._resizable is not False:
            try:
                self._resize(n)
                got = self._invoke(arrays)
                if all(v.shape[:1] == (n,) for v in got.values()):
                    if self._resizable:
                        return got
                    # the first time: check against the model at its own batch, one sample at a time
                    expected = self._one_by_one(arrays)
                    self._resizable = self._same(got, expected)
                    return got if self._resizable else expected
                self._resizable = False
            except (RuntimeError, ValueError):
                self._resizable = False
        return self._one_by_one(arrays)

    def close(self) -> None:
        self._it = None

    # ---- helpers ----

    def _inputs(self, feeds: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
        """Manifest-layout float feeds -> {model input index: array in the model's layout and dtype}."""
        out = {}
        for i, (name, value) in enumerate(feeds.items()):
            position = self._input_names.index(name) if name in self._input_names else i
            j = self._in_map[name] if name in self._in_map else self._by_name(self._in, name, position)
            value = np.asarray(value)
            if name in self._in_t:
                value = np.transpose(value, self._in_t[name])
            detail = self._in[j]
            dtype = np.dtype(detail["dtype"])
            scale, zero = _quant(detail)
            if dtype.kind in "iu" and scale and value.dtype.kind == "f":
                info = np.iinfo(dtype)
                value = np.clip(np.round(value / scale) + zero, info.min, info.max)
            out[j] = np.asarray(value, dtype=dtype, order="C")  # a scalar stays 0-d
        return out

    def _invoke(self, arrays: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
        for j, value in arrays.items():
            self._it.set_tensor(self._in[j]["index"], value)
        self._it.invoke()
        result = {}
        for name, j in self._out_map.items():
            detail = self._out[j]
            value = self._it.get_tensor(detail["index"])
            scale, zero = _quant(detail)
            if value.dtype.kind in "iu" and scale:
                value = (value.astype(np.float32) - np.float32(zero)) * np.float32(scale)
            if name in self._out_t:
                value = np.transpose(value, self._out_t[name])
            result[name] = np.array(value, order="C")  # a copy: get_tensor's buffer is reused by the next invoke
        return result

    def _resize(self, n: int) -> None:
        if n == self._batch:
            return
        try:
            for detail in self._in:
                shape = list(detail["shape"])
                if shape:
                    shape[0] = n
                self._it.resize_tensor_input(detail["index"], shape)
            self._it.allocate_tensors()
        except Exception:
            # a model with its batch baked into a Reshape cannot take another: put every input back at the
            # shape it last ran with, or the next set_tensor would meet the failed batch ("Got 1 but expected 4")
            for detail in self._in:
                self._it.resize_tensor_input(detail["index"], list(detail["shape"]))
            self._it.allocate_tensors()
            raise
        self._in, self._out = self._it.get_input_details(), self._it.get_output_details()
        self._batch = n

    def _one_by_one(self, arrays: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
        self._resize(self._built_batch)
        n = next(iter(arrays.values())).shape[0]
        step = self._built_batch or 1
        parts: dict[str, list[np.ndarray]] = {}
        for i in range(0, n, step):
            chunk = {j: v[i : i + step] for j, v in arrays.items()}
            if len(next(iter(chunk.values()))) < step:
                raise ValueError(f"the model takes batches of {step}; got {n} samples")
            for name, value in self._invoke(chunk).items():
                parts.setdefault(name, []).append(value)
        return {k: np.concatenate(v) for k, v in parts.items()}

    @staticmethod
    def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
        for k, x in a.items():
            y = b[k]
            if x.shape != y.shape:
                return False
            if x.dtype.kind == "f":
                if not np.allclose(x, y, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(y).max(initial=0)))):
                    return False
            elif not np.array_equal(x, y):
                return False
        return True

    @staticmethod
    def _find(details: list[dict], key: str | int) -> int:
        if isinstance(key, int):
            if not 0 <= key < len(details):
                raise ValueError(f"tensor index {key} is out of range (the model has {len(details)})")
            return key
        for j, d in enumerate(details):
            if d["name"] == key:
                return j
        raise ValueError(f"the model has no tensor {key!r} (it has {[d['name'] for d in details]})")

    @staticmethod
    def _by_name(details: list[dict], name: str, position: int) -> int:
        for j, d in enumerate(details):
            if d["name"] in (name, f"serving_default_{name}:0"):
                return j
        if position < len(details):
            return position
        raise ValueError(f"the model has no tensor for {name!r}")


def _quant(detail: dict) -> tuple[float, int]:
    scale, zero = detail.get("quantization", (0.0, 0))
    return float(scale), int(zero)


def load(model_dir: Path, manifest: Manifest, accelerators: list[str] | None = None):
    path, settings = model_dir / manifest.model, manifest.settings
    names = [s.name for s in manifest.inputs], [s.name for s in manifest.outputs]
    n = concurrency(settings)

    def attempt(device: str):
        if n == 1:
            return TfliteSession(path, settings, *names, device)
        return Pool(lambda: TfliteSession(path, settings, *names, device), n)

    return choose(accelerators or [CPU], lambda: devices() + (["delegate"] if settings.get("delegate_library") else []),
                  attempt, cpu=CPU, runtime=NAME)
