"""What accelerators this machine has and how loaded they are, once a telemetry window (``Telemetry.accelerators``).

Read where the machine says it cheaply, with no runtime imported and no process started each window:

- NVIDIA GPUs through NVML, when the ``pynvml`` module (nvidia-ml-py) imports and ``nvmlInit`` succeeds: the
  GPU's utilisation over the driver's last sample period and its memory used / total; named ``nvidia<i>``.
- other GPUs through sysfs, ``<sys>/class/drm/card<N>/device/``: the driver is the ``driver`` symlink's name;
  ``gpu_busy_percent`` (amdgpu) is the utilisation, ``mem_info_vram_used`` / ``mem_info_vram_total`` (discrete
  cards) the memory. i915 and xe put no utilisation in sysfs: it stays unknown (None), never a made-up 0.
- NPUs through ``<sys>/class/accel/accel<N>/device/``: ``npu_busy_time_us`` (intel_vpu) is a counter of busy
  time, so the utilisation is its growth over the wall time since the previous sample (unknown on the first
  sample, and when it went backwards: a driver reload); ``npu_memory_utilization`` is the memory in use, bytes.

A file that vanishes or says nothing readable gives None for its field; nothing here raises out of ``sample``.
At most ``protocol.MAX_ACCELERATORS`` (16) are reported, NVML's first.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from agent.protocol import MAX_ACCELERATORS, AcceleratorUsage

log = logging.getLogger("edgefleet.agent")

_DRIVER = re.compile(r"[A-Za-z0-9._+-]{0,64}")
_CARD = re.compile(r"card[0-9]+")  # not the connectors (card0-HDMI-A-1)
_ACCEL = re.compile(r"accel[0-9]+")
# DRM drivers of display adapters that compute nothing (firmware framebuffers, virtual and BMC displays)
DISPLAY_ONLY = frozenset({"simpledrm", "efidrm", "vesadrm", "ofdrm", "bochs-drm", "bochs", "cirrus", "cirrus-qemu",
                          "vboxvideo", "vmwgfx", "qxl", "ast", "mgag200", "hyperv_drm", "udl", "gm12u320"})


class Sampler:
    """Accelerators and their load, read from ``sys_root`` (a directory laid out like ``/sys``) and NVML.

    Made once per agent: it keeps the NVML handle (initialised on the first sample, not at construction, and
    never retried once it failed) and each NPU's previous busy counter. ``clock``: monotonic seconds (a test's
    own clock stands in for the wall time between samples)."""

    def __init__(self, sys_root: str | os.PathLike = "/sys", *, nvml: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._root = Path(sys_root)
        self._nvml_wanted = nvml
        self._nvml = None  # the pynvml module once nvmlInit succeeded
        self._nvml_tried = False
        self._clock = clock
        self._busy: dict[str, tuple[int, float]] = {}  # NPU name -> (busy µs, clock) at the previous sample

    def sample(self) -> list[AcceleratorUsage]:
        out: list[AcceleratorUsage] = []
        for source in (self._nvidia, self._drm, self._npus):
            if len(out) >= MAX_ACCELERATORS:
                break
            try:
                out += source(MAX_ACCELERATORS - len(out), nvidia_seen=any(a.driver == "nvml" for a in out))
            except Exception as e:  # a source that breaks in a way not foreseen: the others still report
                log.debug("accelerators: %s failed: %s: %s", source.__name__, type(e).__name__, e)
        return out[:MAX_ACCELERATORS]

    # -- NVIDIA ---------------------------------------------------------------------------------------
    def _nvidia(self, room: int, nvidia_seen: bool = False) -> list[AcceleratorUsage]:
        nv = self._nvml_module()
        if nv is None:
            return []
        try:
            count = min(int(nv.nvmlDeviceGetCount()), room)
        except Exception:
            return []
        out = []
        for i in range(count):
            util = used = total = None
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
            except Exception:
                continue
            try:
                util = _percent(nv.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:  # NVML_ERROR_NOT_SUPPORTED on some boards: unknown
                pass
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                used, total = _bytes(mem.used), _bytes(mem.total)
            except Exception:
                pass
            out.append(AcceleratorUsage(name=f"nvidia{i}", kind="gpu", driver="nvml", utilization_percent=util,
                                        memory_used_bytes=used, memory_total_bytes=total))
        return out

    def _nvml_module(self):
        if self._nvml is not None or self._nvml_tried or not self._nvml_wanted:
            return self._nvml
        self._nvml_tried = True
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # not installed, no driver, no GPU: NVML says nothing here
            return None
        self._nvml = pynvml
        return pynvml

    # -- DRM (Intel, AMD and other GPUs) ----------------------------------------------------------------
    def _drm(self, room: int, nvidia_seen: bool = False) -> list[AcceleratorUsage]:
        out = []
        for name in _entries(self._root / "class" / "drm", _CARD):
            dev = self._root / "class" / "drm" / name / "device"
            driver = _driver(dev)
            if driver is None or driver in DISPLAY_ONLY or (driver.startswith("nvidia") and nvidia_seen):
                continue  # no driver bound, a display adapter, or a GPU NVML already reported
            used, total = _read_int(dev / "mem_info_vram_used"), _read_int(dev / "mem_info_vram_total")
            out.append(AcceleratorUsage(name=name, kind="gpu", driver=driver,
                                        utilization_percent=_percent(_read_int(dev / "gpu_busy_percent")),
                                        memory_used_bytes=_bytes(used), memory_total_bytes=_bytes(total)))
            if len(out) >= room:
                break
        return out

    # -- NPUs -----------------------------------------------------------------------------------------
    def _npus(self, room: int, nvidia_seen: bool = False) -> list[AcceleratorUsage]:
        out = []
        for name in _entries(self._root / "class" / "accel", _ACCEL):
            dev = self._root / "class" / "accel" / name / "device"
            driver = _driver(dev)
            if driver is None:
                continue
            out.append(AcceleratorUsage(name=name, kind="npu", driver=driver,
                                        utilization_percent=self._busy_percent(name, dev / "npu_busy_time_us"),
                                        memory_used_bytes=_bytes(_read_int(dev / "npu_memory_utilization"))))
            if len(out) >= room:
                break
        return out

    def _busy_percent(self, name: str, path: Path) -> float | None:
        """The share of the wall time since the previous sample the NPU was busy; None on the first sample, when
        the counter is gone, or when it went backwards (the driver reloaded: the next sample starts again)."""
        busy, now = _read_int(path), self._clock()
        prev = self._busy.pop(name, None)
        if busy is None:
            return None
        self._busy[name] = (busy, now)
        if prev is None or busy < prev[0] or now <= prev[1]:
            return None
        return _percent(min(100.0, (busy - prev[0]) / 1e6 / (now - prev[1]) * 100))


def _entries(directory: Path, pattern: re.Pattern) -> list[str]:
    try:
        names = os.listdir(directory)
    except OSError:  # no such class on this machine
        return []
    return sorted((n for n in names if pattern.fullmatch(n)), key=lambda n: int(re.sub(r"\D", "", n)))


def _driver(dev: Path) -> str | None:
    """The kernel driver bound to the device (the ``driver`` symlink's target's name); None when none is."""
    try:
        name = os.path.basename(os.readlink(dev / "driver"))
    except OSError:
        return None
    return name if _DRIVER.fullmatch(name) else ""


def _read_int(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read(64).split()[0])
    except (OSError, ValueError, IndexError):  # gone, unreadable, empty or not a number
        return None


def _percent(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return round(v, 2) if 0 <= v <= 100 else None  # outside the contract's range: the figure is broken


def _bytes(v) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None
