"""agent/accel.py: the accelerators a machine has and their load. This machine has no GPU or NPU, so beyond the
test on its own /sys (which asserts exactly what it finds), the cards are directories laid out like sysfs (the
hardware a user has and this machine lacks); the clock between two samples is a test clock."""

from __future__ import annotations

import os
import re
from pathlib import Path

import msgspec

from agent import protocol
from agent.accel import DISPLAY_ONLY, MAX_ACCELERATORS, Sampler


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def card(root: Path, name: str, driver: str, cls: str = "drm", **files) -> Path:
    """``<root>/class/<cls>/<name>/device`` with its ``driver`` symlink and ``files`` (name -> content)."""
    drv = root / "bus" / "pci" / "drivers" / driver
    drv.mkdir(parents=True, exist_ok=True)
    dev = root / "devices" / name
    dev.mkdir(parents=True)
    (dev / "driver").symlink_to(drv)
    entry = root / "class" / cls / name
    entry.mkdir(parents=True)
    (entry / "device").symlink_to(dev)
    for k, v in files.items():
        (dev / k).write_text(f"{v}\n")
    return dev


def by_name(usages) -> dict:
    return {a.name: a for a in usages}


def test_this_machine_reports_exactly_the_accelerators_its_sys_has():
    """No GPU or NPU here: whatever /sys/class/drm and /sys/class/accel hold (none of either on this machine) is
    what is reported, and no nvidia entry without pynvml."""
    expected = []
    for cls, pattern in (("drm", r"card[0-9]+"), ("accel", r"accel[0-9]+")):
        base = Path("/sys/class") / cls
        for name in sorted(os.listdir(base)) if base.is_dir() else []:
            link = base / name / "device" / "driver"
            driver = os.path.basename(os.readlink(link)) if link.is_symlink() else None
            if re.fullmatch(pattern, name) and driver is not None and driver not in DISPLAY_ONLY:
                expected.append(name)
    got = Sampler().sample()
    assert sorted(a.name for a in got) == sorted(expected)
    if not Path("/sys/class/drm").exists() and not Path("/sys/class/accel").exists():
        assert got == []  # this machine: no DRM class, no accel class


def test_intel_and_amd_gpus_from_sysfs(tmp_path):
    card(tmp_path, "card0", "i915")  # integrated Intel: sysfs says nothing of its load or memory
    card(tmp_path, "card1", "amdgpu", gpu_busy_percent=37, mem_info_vram_used=1 << 30, mem_info_vram_total=8 << 30)
    card(tmp_path, "card2", "xe", mem_info_vram_used=512, mem_info_vram_total=4096)  # a discrete Intel card
    card(tmp_path, "card3", "simpledrm")  # the firmware framebuffer: no accelerator
    (tmp_path / "class" / "drm" / "card0-HDMI-A-1").mkdir()  # a connector, not a card
    (tmp_path / "class" / "drm" / "renderD128").mkdir()
    got = by_name(Sampler(tmp_path, nvml=False).sample())
    assert set(got) == {"card0", "card1", "card2"}
    assert got["card0"] == protocol.AcceleratorUsage(name="card0", kind="gpu", driver="i915")  # all unknown: None
    assert got["card0"].utilization_percent is None and got["card0"].memory_used_bytes is None
    assert (got["card1"].driver, got["card1"].utilization_percent, got["card1"].memory_used_bytes,
            got["card1"].memory_total_bytes) == ("amdgpu", 37.0, 1 << 30, 8 << 30)
    assert (got["card2"].utilization_percent, got["card2"].memory_used_bytes, got["card2"].memory_total_bytes) == \
        (None, 512, 4096)


def test_npu_utilisation_is_the_busy_counter_over_the_window(tmp_path):
    dev = card(tmp_path, "accel0", "intel_vpu", cls="accel", npu_busy_time_us=10_000_000,
               npu_memory_utilization=3 << 20)
    clock = Clock()
    s = Sampler(tmp_path, nvml=False, clock=clock)
    [first] = s.sample()
    assert (first.name, first.kind, first.driver) == ("accel0", "npu", "intel_vpu")
    assert first.utilization_percent is None and first.memory_used_bytes == 3 << 20  # no window yet: unknown
    clock.now += 2.0
    (dev / "npu_busy_time_us").write_text("10500000\n")  # 0.5 s busy in 2 s
    assert s.sample()[0].utilization_percent == 25.0
    clock.now += 1.0
    (dev / "npu_busy_time_us").write_text("100\n")  # went backwards: the driver reloaded
    assert s.sample()[0].utilization_percent is None
    clock.now += 1.0
    (dev / "npu_busy_time_us").write_text("1000100\n")  # busy the whole second, counted from the new start
    assert s.sample()[0].utilization_percent == 100.0


def test_files_that_vanish_or_lie_give_unknown_never_an_exception(tmp_path):
    dev = card(tmp_path, "card0", "amdgpu", gpu_busy_percent=12, mem_info_vram_used=1, mem_info_vram_total=2)
    npu = card(tmp_path, "accel0", "intel_vpu", cls="accel", npu_busy_time_us=5, npu_memory_utilization=7)
    clock = Clock()
    s = Sampler(tmp_path, nvml=False, clock=clock)
    assert len(s.sample()) == 2
    (dev / "gpu_busy_percent").write_text("250\n")  # outside 0..100: a broken figure, not sent
    (dev / "mem_info_vram_used").unlink()
    (dev / "mem_info_vram_total").write_text("lots\n")
    (npu / "npu_busy_time_us").unlink()
    (npu / "npu_memory_utilization").write_text("")
    clock.now += 1.0
    got = by_name(s.sample())
    assert got["card0"] == protocol.AcceleratorUsage(name="card0", kind="gpu", driver="amdgpu")
    assert got["accel0"] == protocol.AcceleratorUsage(name="accel0", kind="npu", driver="intel_vpu")
    (npu / "driver").unlink()  # unbound (the driver unloaded): no longer an accelerator here
    os.rename(tmp_path / "class" / "drm" / "card0", tmp_path / "card0-gone")  # hot-unplugged
    assert s.sample() == []


def test_at_most_sixteen_and_the_message_stays_valid(tmp_path):
    for i in range(12):
        card(tmp_path, f"card{i}", "amdgpu", gpu_busy_percent=i)
    for i in range(8):
        card(tmp_path, f"accel{i}", "intel_vpu", cls="accel", npu_busy_time_us=0)
    got = Sampler(tmp_path, nvml=False).sample()
    assert len(got) == MAX_ACCELERATORS == 16
    assert [a.name for a in got] == [f"card{i}" for i in range(12)] + [f"accel{i}" for i in range(4)]  # card10 > card9
    t = protocol.Telemetry(device_id="cam-1", boot_id="b", seq=1, time=1.0, interval_s=10.0, inferences=0,
                           accelerators=got)
    back = protocol.decode(protocol.TELEMETRY, protocol.encode(t))  # the controller's decode takes it
    assert back.accelerators == got
    doc = msgspec.json.decode(protocol.encode(t))
    assert doc["accelerators"][0] == {"name": "card0", "kind": "gpu", "driver": "amdgpu", "utilization_percent": 0.0,
                                      "memory_used_bytes": None, "memory_total_bytes": None}
