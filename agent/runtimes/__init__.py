"""Runtime plugins: one file each, found by the name a manifest gives in ``runtime``.

A plugin module defines ``NAME``, ``available() -> bool``, ``devices() -> list[str]`` (what it can run on here)
and ``load(model_dir, manifest, accelerators) -> Session``. It imports its runtime inside those, never at import
time, so the agent pays only for what it uses.

Accelerators (issue 14): the bundle's setting ``accelerators`` names, in the runtime's own words and in order of
preference, what the model may run on: ``"CUDAExecutionProvider,CPUExecutionProvider"`` (ONNX Runtime),
``"GPU,NPU,CPU"`` or ``"AUTO"`` (OpenVINO; the comma separates choices, so AUTO's own list is not given here: AUTO
picks among every device it finds), ``"GPU,CPU"`` (LiteRT: its GPU delegate). The plugin tries each in
turn and the CPU last whatever the list says; a choice that is not on this machine, or fails to load, is passed
over with its reason. The session's ``placement`` says what really runs it (as the runtime reports it after
loading), and why the earlier choices do not (``Placement.fallback``). Default: the CPU alone.

Concurrency: a session's ``run`` may be called from ``concurrency`` threads at once (the bundle's setting, default
1): ONNX Runtime sessions are thread-safe; OpenVINO keeps that many infer requests (THROUGHPUT hint); LiteRT
interpreters are not thread-safe, so it keeps that many interpreters (``Pool``).
"""

from __future__ import annotations

import importlib
import logging
import queue
import re
from collections.abc import Callable
from dataclasses import dataclass
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


log = logging.getLogger("edgefleet.agent")

CPU = "CPU"
_CHOICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


@dataclass(frozen=True)
class Placement:
    """Where a loaded model really runs: ``device`` and ``provider`` as the runtime reports them (protocol.Serving)."""

    device: str
    provider: str
    fallback: str = ""  # why the bundle's earlier choices are not the ones running ("" when its first one is)

    @property
    def on_cpu(self) -> bool:
        """The CPU runs it (OpenVINO's "CPU", anyone's "cpu"): nothing to fall back from."""
        return self.device.split(".")[0].upper() == CPU


class Session(Protocol):
    placement: Placement

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def accelerators(settings: dict) -> list[str]:
    """The bundle's ``accelerators`` setting as a list (a comma-separated string, or a list of names), in order.
    Default: the CPU alone. Raises EdgefleetError naming the setting when it is not a list of names."""
    value = settings.get("accelerators", CPU)
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        raise EdgefleetError(f"setting accelerators {value!r} is not a comma-separated list of devices")
    out = []
    for name in names:
        name = name.strip() if isinstance(name, str) else name
        if not isinstance(name, str) or not _CHOICE.fullmatch(name):
            raise EdgefleetError(f"setting accelerators: {name!r} is not a device name (letters, digits, ._:-)")
        if name not in out:
            out.append(name)
    return out


def concurrency(settings: dict) -> int:
    """The bundle's ``concurrency`` setting: runs of the model at once (agent/serving.py checks it and its kin)."""
    from agent.serving import serving_settings

    return serving_settings(settings).concurrency


def choose(wanted: list[str], here: Callable[[], list[str]], attempt: Callable[[str], Session], *, cpu: str = CPU,
           runtime: str = "", usable: Callable[[str, list[str]], bool] | None = None) -> Session:
    """Try each of ``wanted`` that is in ``here()`` (or that ``usable(name, here())`` accepts) in order, then ``cpu``
    (always last): the first that loads. Each one passed over adds its reason to the session's
    ``placement.fallback``. Errors loading ``cpu`` raise. ``here`` is called once, and only when a choice before the
    CPU is looked at: a bundle for the CPU alone (the default) lists no devices."""
    reasons = []
    listed: list[str] | None = None
    for name in wanted:
        if name == cpu:
            break
        if listed is None:
            listed = here()
        if not (usable(name, listed) if usable else name in listed):
            reasons.append(f"{name} is not available here ({runtime} has {', '.join(listed) or 'nothing'})")
            continue
        try:
            session = attempt(name)
        except Exception as e:  # the runtime's own error types vary; the CPU is tried next
            reasons.append(f"{name} failed to load: {first_line(e)}")
            continue
        return _with_fallback(session, reasons)
    return _with_fallback(attempt(cpu), reasons)


def _with_fallback(session: Session, reasons: list[str]) -> Session:
    if reasons:
        p = session.placement
        session.placement = Placement(p.device, p.provider, "; ".join(reasons + ([p.fallback] if p.fallback else [])))
    return session


def first_line(e: BaseException) -> str:
    """The line of a runtime's error that says what is wrong (OpenVINO's first lines only name its sources)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith("Exception from ")] or lines
    return f"{type(e).__name__}: {said[0][:300] if said else ''}"


class Pool:
    """``n`` sessions of a runtime whose sessions are not thread-safe, each run taking one that is free."""

    def __init__(self, make: Callable[[], Session], n: int) -> None:
        self._all = [make() for _ in range(n)]
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for s in self._all:
            self._free.put(s)
        self.placement = self._all[0].placement

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = self._free.get()
        try:
            return s.run(feeds)
        finally:
            self._free.put(s)

    def close(self) -> None:
        for s in self._all:
            s.close()


def plugin(name: str):
    try:
        module, extra = PLUGINS[name]
    except KeyError:
        raise RuntimeMissing(f"unknown runtime {name!r} (known: {', '.join(PLUGINS)})") from None
    mod = importlib.import_module(module)
    if not mod.available():
        raise RuntimeMissing(f"runtime {name!r} is not installed: pip install '{extra}'")
    return mod


def load(model_dir: str | Path, manifest: Manifest, accelerators_: list[str] | None = None) -> Session:
    """Load a verified, unpacked bundle with the runtime its manifest names, on the first of ``accelerators_``
    (default: the bundle's ``accelerators`` setting) that loads here, else the CPU."""
    wanted = accelerators(manifest.settings) if accelerators_ is None else accelerators_
    concurrency(manifest.settings)  # checked before anything loads
    return plugin(manifest.runtime).load(Path(model_dir), manifest, wanted)


def devices_in_child(timeout: float = 120.0) -> dict[str, list[str]]:
    """``devices()`` from a child process (``python -m agent.runtimes``), so the caller does not import every runtime
    it has (their memory stays with the child). {} when the child fails (logged)."""
    import json
    import subprocess
    import sys

    try:
        out = subprocess.run([sys.executable, "-m", "agent.runtimes"], capture_output=True, timeout=timeout,
                             check=True).stdout
        found = json.loads(out)
        if isinstance(found, dict) and all(isinstance(v, list) for v in found.values()):
            return {str(k): [str(d) for d in v] for k, v in found.items()}
        raise ValueError(f"not a map of lists: {out[:200]!r}")
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        err = getattr(e, "stderr", None)
        log.warning("cannot list the runtimes' devices: %s%s", first_line(e),
                    f" ({err.decode(errors='replace').strip().splitlines()[-1][:300]})" if err else "")
        return {}


def devices() -> dict[str, list[str]]:
    """Runtime -> the devices / providers it can use on this machine, for the runtimes installed here."""
    out = {}
    for name, (module, _) in PLUGINS.items():
        mod = importlib.import_module(module)
        if mod.available():
            try:
                out[name] = list(mod.devices())
            except Exception as e:  # a broken runtime install: the state says it has nothing
                out[name] = []
                log.warning("runtime %s cannot list its devices: %s", name, first_line(e))
    return out


def available() -> list[str]:
    """The runtimes installed here (without importing them)."""
    found = []
    for name, (module, _) in PLUGINS.items():
        if importlib.import_module(module).available():
            found.append(name)
    return found
