"""Converter passes, after Olive's ``Pass`` (olive/passes/olive_pass.py), kept small.

A pass is one file in this package holding its typed config (a ``msgspec.Struct``) and a ``Pass``
subclass; the module-level ``PASS`` names the instance. A pass reads a model file and writes a NEW
model to ``out_path`` (never in place), and returns a ``PassResult`` saying what it did: its name, the
config it ran with, the toolchain versions, and notes for the report. Heavy toolchains (onnx,
onnxruntime) are imported inside ``run``, never when this package is imported.

    from converter import passes
    step = passes.load("prune")                     # converter/passes/prune.py, found by its file name
    config = step.config(ratio=0.3, norm="l2")      # typed, validated: a bad field is a ConvertError
    result = step.run(Path("m.onnx"), config, Path("out/m.onnx"))
    result.report()                                 # a plain dict for report.json and the manifest

A target's recipe is then an ordered list of (pass, config); the recipe (each ``report()``) is what
the manifest and the report record.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from converter import ConvertError


class PassResult(msgspec.Struct, kw_only=True):
    name: str  # the pass, e.g. "prune"
    config: dict[str, Any]  # the config it ran with, as plain values
    out_path: str  # the model it wrote
    toolchain: dict[str, str] = {}  # distribution -> version, e.g. {"onnx": "1.23.2"}
    notes: dict[str, Any] = {}  # what it did, for the report (pass-specific)

    def report(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


class Pass:
    """One converter step. Subclasses set ``name``, ``Config`` and ``toolchain`` and implement ``run``."""

    name: ClassVar[str]
    Config: ClassVar[type[msgspec.Struct]]
    toolchain: ClassVar[tuple[str, ...]] = ()  # distributions whose versions the result records

    def config(self, **values: Any) -> msgspec.Struct:
        """A validated config; a missing, unknown or ill-typed field is one ConvertError naming it."""
        try:
            return msgspec.convert(values, self.Config, strict=False)
        except msgspec.ValidationError as e:
            raise ConvertError(f"{self.name}: {e}") from None

    def run(self, model_path: Path, config: msgspec.Struct, out_path: Path) -> PassResult:
        raise NotImplementedError

    def result(self, config: msgspec.Struct, out_path: Path, notes: dict[str, Any]) -> PassResult:
        return PassResult(name=self.name, config=msgspec.to_builtins(config), out_path=str(out_path),
                          toolchain=versions(self.toolchain), notes=notes)


def versions(distributions: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for dist in distributions:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def load(name: str) -> Pass:
    """The pass defined by ``converter/passes/<name>.py`` (its module-level ``PASS``)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ConvertError(f"unknown pass {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise ConvertError(f"unknown pass {name!r} (known: {', '.join(available())})") from None
    step = getattr(module, "PASS", None)
    if not isinstance(step, Pass):
        raise ConvertError(f"unknown pass {name!r} (known: {', '.join(available())})")
    return step


def available() -> list[str]:
    """The passes in this package, by file name (modules starting with ``_`` are helpers)."""
    here = Path(__file__).parent
    return sorted(p.stem for p in here.glob("*.py") if not p.stem.startswith("_") and _defines_pass(p))


def _defines_pass(path: Path) -> bool:
    return re.search(r"^PASS\s*=", path.read_text(), re.M) is not None
