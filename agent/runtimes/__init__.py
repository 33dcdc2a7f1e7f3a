"""Runtime plugins: one file each, found by the name a manifest gives in ``runtime``.

A plugin module defines ``NAME``, ``available() -> bool`` and ``load(model_dir, manifest) -> Session``.
It imports its runtime inside ``load``, never at import time, so the agent pays only for what it uses.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import numpy as np

from agent.bundle import Manifest
from agent.errors import EdgefleetError

# manifest runtime name -> (plugin module, what to install when it is missing)
PLUGINS = {
    "onnxruntime": ("agent.runtimes.onnxruntime", "edgefleet[agent]"),
    "openvino": ("agent.runtimes.openvino", "edgefleet[openvino]"),
    "tflite": ("agent.runtimes.tflite", "edgefleet[litert]"),
}


class RuntimeMissing(EdgefleetError):
    """The runtime a bundle needs is not installed on this device."""


class Session(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def plugin(name: str):
    try:
        module, extra = PLUGINS[name]
    except KeyError:
        raise RuntimeMissing(f"unknown runtime {name!r} (known: {', '.join(PLUGINS)})") from None
    mod = importlib.import_module(module)
    if not mod.available():
        raise RuntimeMissing(f"runtime {name!r} is not installed: pip install '{extra}'")
    return mod


def load(model_dir: str | Path, manifest: Manifest) -> Session:
    """Load a verified, unpacked bundle with the runtime its manifest names."""
    return plugin(manifest.runtime).load(Path(model_dir), manifest)


def available() -> list[str]:
    """The runtimes installed here (without importing them)."""
    found = []
    for name, (module, _) in PLUGINS.items():
        if importlib.import_module(module).available():
            found.append(name)
    return found
