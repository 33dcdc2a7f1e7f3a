"""OpenVINO plugin (target ``intel``): an IR (``model.xml`` + ``model.bin``) on the CPU, or an accelerator.

Every property that changes numbers or latency is set explicitly from the manifest's settings, never
left to the device's defaults: OpenVINO runs bf16 on CPUs with AMX/AVX512-BF16 unless told otherwise.

- ``inference_precision``: ``f32`` (default) | ``bf16`` | ``f16`` -> INFERENCE_PRECISION_HINT
- ``threads`` (else ``intra_op_threads``, else 1) -> INFERENCE_NUM_THREADS
- ``concurrency`` 1 (default): NUM_STREAMS=1 and PERFORMANCE_HINT=LATENCY, one infer request;
  ``concurrency`` N > 1: PERFORMANCE_HINT=THROUGHPUT with N streams of ``threads`` threads each and N infer
  requests, each run taking a free one (what ``AsyncInferQueue`` does for callbacks, here for threads).
- ``accelerators``: OpenVINO device names in order ("GPU", "GPU.1", "NPU", "AUTO", "CPU"); the CPU-only
  properties (threads, streams) go to the CPU alone. What runs is read back from the compiled model
  (EXECUTION_DEVICES: AUTO reports the device it picked).

Where only the batch dim is dynamic, the model is compiled with static shapes for each batch size it
is fed (a few kept): on this kind of CPU a static compile is markedly faster at batch 1 than a dynamic one.
"""

from __future__ import annotations

import importlib.util
import queue
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from agent.bundle import Manifest
from agent.errors import EdgefleetError
from agent.runtimes import Placement, choose, concurrency

NAME = "openvino"
DEVICE = "CPU"
PRECISIONS = ("f32", "bf16", "f16")
MAX_SHAPES = 4  # compiled models kept, one per input shape set
META = ("AUTO", "MULTI", "HETERO")  # devices that pick among the real ones (AUTO:GPU,CPU is one of them)


def available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def devices() -> list[str]:
    """The devices OpenVINO can use here ("CPU", "GPU.0", "NPU", ...), and AUTO, which picks among them."""
    import openvino as ov

    return [*ov.Core().available_devices, "AUTO"]


def compile_config(settings: dict, device: str = DEVICE) -> dict:
    """The properties for ``settings`` on ``device`` (keys are OpenVINO's property names); the thread and stream
    counts are the CPU's alone."""
    precision = str(settings.get("inference_precision", "f32"))
    if precision not in PRECISIONS:
        raise EdgefleetError(f"openvino setting inference_precision {precision!r} is not one of "
                             f"{', '.join(PRECISIONS)}")
    threads = settings.get("threads", settings.get("intra_op_threads", 1))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise EdgefleetError(f"openvino setting threads {threads!r} is not a positive integer")
    n = concurrency(settings)
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY" if n == 1 else "THROUGHPUT"}
    if device == DEVICE:
        config.update({"INFERENCE_NUM_THREADS": threads * n, "NUM_STREAMS": n})
    elif n > 1:
        config["PERFORMANCE_HINT_NUM_REQUESTS"] = n
    return config


class OpenVinoSession:
    def __init__(self, path: Path, manifest: Manifest, device: str = DEVICE):
        import openvino as ov

        self._core = ov.Core()
        self._path = path
        self._device = device
        self._requests = concurrency(manifest.settings)
        self._config = compile_config(manifest.settings, device.split(".")[0])
        self._lock = threading.Lock()  # compiles (a new input shape) one at a time
        model = self._core.read_model(str(path))
        self._inputs = {}  # feed name -> input index
        for i, port in enumerate(model.inputs):
            for name in port.get_names():
                self._inputs[name] = i
        self._input_count = len(model.inputs)
        # Static per shape where only axis 0 can vary; otherwise one dynamic compile serves every shape.
        self._static = all(port.get_partial_shape().rank.is_static and
                           all(d.is_static for d in list(port.get_partial_shape())[1:]) for port in model.inputs)
        self._outputs = _output_names(model, [s.name for s in manifest.outputs])
        self._compiled: OrderedDict[tuple, tuple] = OrderedDict()  # shapes -> (compiled model, free infer requests)
        if not self._static or not any(port.get_partial_shape().is_dynamic for port in model.inputs):
            self._compiled[()] = self._compile(model)
        else:
            first = tuple(tuple(1 if d.is_dynamic else d.get_length() for d in port.get_partial_shape())
                          for port in model.inputs)
            self._compiled[first] = self._compile(model, first)
        ran = list(self.compiled.get_property("EXECUTION_DEVICES"))
        self.placement = Placement(ran[0] if ran else device, f"openvino-{(ran[0] if ran else device).split('.')[0]}")

    @property
    def compiled(self):
        """The most recently used compiled model (for reading back its properties)."""
        return next(reversed(self._compiled.values()))[0]

    def _compile(self, model, shapes: tuple | None = None) -> tuple:
        if shapes is not None:
            model.reshape({i: list(s) for i, s in enumerate(shapes)})
        compiled = self._core.compile_model(model, self._device, self._config)
        free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self._requests):
            free.put(compiled.create_infer_request())
        return compiled, free

    def _pool(self, arrays: list[np.ndarray]) -> queue.SimpleQueue:
        key = tuple(a.shape for a in arrays) if self._static and () not in self._compiled else ()
        with self._lock:
            if key not in self._compiled:
                self._compiled[key] = self._compile(self._core.read_model(str(self._path)), key)
                while len(self._compiled) > MAX_SHAPES:
                    self._compiled.popitem(last=False)  # requests in use finish; their pool is dropped after
            self._compiled.move_to_end(key)
            return self._compiled[key][1]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays: list[np.ndarray | None] = [None] * self._input_count
        for name, value in feeds.items():
            if name not in self._inputs:
                raise KeyError(f"the model has no input {name!r} (inputs: {', '.join(sorted(self._inputs))})")
            arrays[self._inputs[name]] = np.asarray(value, order="C")  # keeps a scalar 0-d (ascontiguousarray makes it [1])
        if any(a is None for a in arrays):
            raise KeyError(f"missing inputs: need {', '.join(sorted(self._inputs))}")
        free = self._pool(arrays)
        request = free.get()  # waits while every request of this shape is running
        try:
            result = request.infer(dict(enumerate(arrays)))  # outputs are copies (share_outputs=False)
            return {name: np.asarray(result[i]) for i, name in enumerate(self._outputs)}
        finally:
            free.put(request)

    def close(self) -> None:
        self._compiled.clear()
        self._core = None


def _output_names(model, wanted: list[str]) -> list[str]:
    """The manifest's name for each model output: by tensor name, else by position, else its own name."""
    names = []
    for i, port in enumerate(model.outputs):
        own = port.get_names()
        match = next((w for w in wanted if w in own), None)
        if match is None and len(wanted) == len(model.outputs):
            match = wanted[i]
        names.append(match or port.get_any_name())
    return names


def load(model_dir: Path, manifest: Manifest, accelerators: list[str] | None = None) -> OpenVinoSession:
    path = model_dir / manifest.model

    def usable(name: str, here: list[str]) -> bool:  # "GPU" names the first of GPU.0, GPU.1; AUTO is always there
        return name in here or name in {d.split(".")[0] for d in here} or name.split(":")[0] in META

    return choose(accelerators or [DEVICE], devices, lambda d: OpenVinoSession(path, manifest, d), cpu=DEVICE,
                  runtime=NAME, usable=usable)
