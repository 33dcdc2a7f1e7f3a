"""What a target module hands the converter: the steps it will run and the variants they write.

A target is one module (``converter/cpu.py``, ``intel.py``, ``arm.py``) with

    TARGET: str                                  # "cpu" | "intel" | "arm"
    def missing() -> str | None                  # None when its toolchain is installed, else what to install
    def plan(source, specs, calib, work, *, calib_method, cpu_flags[, search, max_accuracy_drop]) -> list[Step]

Each step that writes a variant returns it. Several steps may write the same variant by different recipes
(``candidate`` names each): the converter measures every candidate, gates each, and keeps the fastest that
passes (within ``SPEED_TIE`` of the fastest, the most faithful); the others are shown as the variant's search.
A plan that takes ``search`` is told whether to offer more than one candidate (it is off when nothing gates
the choice, to keep a plain conversion quick). A variant's directory (``path.parent``) is laid out like
an unpacked bundle: every file in it goes into the bundle (the converter adds ``sample.npz``), and
``path.name`` is the manifest's ``model``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The accuracy gate's fallback chain, best first: a target names which rung each variant stands on.
RUNGS = ("int8", "int8-mixed", "fp16", "fp32")
# candidates of a search whose latencies are within this fraction of the fastest count as equally fast
SPEED_TIE = 0.05


@dataclass
class Variant:
    name: str  # unique within the target, names the bundle file: fp32, int8, int8-dynamic, tflite-int8, ...
    precision: str  # fp32 | fp16 | int8 | mixed
    path: Path  # the main model file; its directory holds all of the variant's files
    runtime: str  # the agent's runtime plugin: onnxruntime | openvino | tflite
    recipe: dict = field(default_factory=dict)  # how it was made, for the report
    settings: dict = field(default_factory=dict)  # runtime settings, go into the manifest
    rung: str | None = None  # its place on RUNGS, or None when it is not on the fallback chain
    # set by the converter on the variant a search kept (or the only one): a fallback rung may start from its recipe
    kept: bool = False


@dataclass
class Step:
    text: str  # progress line, e.g. "quantizing int8 (static QDQ, per-channel)"
    run: Callable[[], Variant | None]
    produces: str | None = None  # the name of the variant this step writes, if any
    fallback: bool = False  # built only when the accuracy gate needs it (e.g. int8 with sensitive nodes in float)
    rung: str | None = None  # for a fallback step: the rung its variant stands on
    candidate: str | None = None  # one of several recipes for the same variant (``produces``): its short name
