"""ARM numerics for the ``arm`` target (issue 13): a variant's outputs computed on ARM kernels.

On an x86 host the converter measures every variant with x86 kernels, but an int8 model's numbers depend on the
kernels that run it (MLAS's and XNNPACK's aarch64 int8 paths round differently from their x86 ones: on the trained
MobileNetV2 the int8 bundles' top-1 changed on some held-out crops between x86 and aarch64). So the ``arm`` target's
variants are judged on ARM kernels: natively on an aarch64 host, else inside the emulated aarch64
(``converter/arm64.py``: qemu-user ``cortex-a76`` under proot), through the same ``agent.runtimes`` loader a device
uses. Latency stays measured on the host: emulated timing means nothing.

``where()`` says which kernels can judge here (and why not ARM's); ``run(...)`` runs a variant's model directory
on a list of feeds inside the emulation and returns the outputs, one dict a feed. The guest side is this module's
``main`` (``python -m converter.arm_check MODEL_DIR IO_DIR``): it imports only numpy and the agent, which the
emulated venv holds.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from converter import arm64

TIMEOUT = 1200.0  # seconds for one variant's emulated run (a few dozen inferences at ~10-30x native)
GUEST_MODEL, GUEST_IO = "/opt/edgefleet-variant", "/opt/edgefleet-io"
FEEDS, OUTPUTS, MANIFEST = "feeds.npz", "outputs.npz", "manifest.json"
NOT_CHECKED = "ARM numerics not checked"


def emulated_label(cpu: str | None = None) -> str:
    return f"aarch64 (emulated {cpu or arm64.CPU})"


def host_label() -> str:
    return f"{platform.machine().lower() or 'unknown'} host"


def where() -> tuple[str, str | None, bool]:
    """(the kernels that judge the ``arm`` target here, why they are not ARM kernels or None, emulated?).

    An aarch64 host judges natively; an x86 host in the emulated aarch64 when it is made (never made from here: it
    takes root and about 10 minutes, ``edgefleet toolchain arm64``); otherwise the host's own kernels, and the
    reason says why."""
    if arm64.native():
        return host_label(), None, False
    if (why := arm64.unavailable()) is not None:
        return host_label(), f"{NOT_CHECKED}: {why}", False
    if not arm64.ready():
        return host_label(), (f"{NOT_CHECKED}: the emulated aarch64 is not set up at {arm64.root()} (run "
                              f"`{arm64.SETUP_HINT}` once, as root: about 10 minutes and 600 MB)"), False
    return emulated_label(), None, True


def run(model_dir: Path, runtime: str, model: str, settings: dict, feeds: list[dict[str, np.ndarray]], *,
        precision: str = "unknown", work: Path | None = None, timeout: float | None = None) -> list[dict[str, np.ndarray]]:
    """Run ``model_dir/model`` with ``runtime`` (and its ``settings``) on each of ``feeds`` inside the emulated
    aarch64, loaded with ``agent.runtimes.load`` as a device loads a bundle; each feed's outputs, in order.

    EmulationError says why when the emulator or the guest fails, or it does not finish within ``timeout``
    (default ``TIMEOUT``)."""
    timeout = TIMEOUT if timeout is None else timeout
    with tempfile.TemporaryDirectory(dir=work, prefix="arm-check.") as tmp:
        io = Path(tmp)
        (io / MANIFEST).write_text(json.dumps({"runtime": runtime, "model": model, "precision": precision,
                                               "settings": settings}))
        np.savez(io / FEEDS, **{f"{i}/{k}": np.asarray(v) for i, feed in enumerate(feeds) for k, v in feed.items()})
        cpu = arm64.CPU  # read at call time
        argv = arm64.command(["python", "-m", "converter.arm_check", GUEST_MODEL, GUEST_IO], cpu=cpu,
                             binds={Path(model_dir).resolve(): GUEST_MODEL, io.resolve(): GUEST_IO})
        try:  # its own process group: a timeout ends proot and the emulated processes under it, all of them
            proc = subprocess.Popen(argv, env=arm64._host_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
        except OSError as e:
            raise arm64.EmulationError(f"the emulator cannot start: {e.strerror or e}") from None
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise arm64.EmulationError(f"the emulated run ({emulated_label(cpu)}) did not finish within "
                                       f"{timeout:g} s") from None
        except BaseException:
            _kill(proc)
            raise
        if proc.returncode != 0:
            code = proc.returncode
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            raise arm64.EmulationError(f"the emulated run ({emulated_label(cpu)}) failed ({how}): "
                                       f"{arm64._last_line(stderr or stdout)}")
        try:
            with np.load(io / OUTPUTS, allow_pickle=False) as npz:
                got: list[dict[str, np.ndarray]] = [{} for _ in feeds]
                for key in npz.files:
                    i, name = key.split("/", 1)
                    got[int(i)][name] = npz[key]
        except (OSError, ValueError, IndexError) as e:
            raise arm64.EmulationError(f"the emulated run wrote no usable outputs: {e}") from None
    if any(not g for g in got):
        raise arm64.EmulationError(f"the emulated run returned outputs for {sum(map(bool, got))} of {len(feeds)} "
                                   f"feeds")
    return got


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def main(argv: list[str]) -> int:
    """The guest: load MODEL_DIR with the manifest in IO_DIR, run every feed of IO_DIR/feeds.npz, write
    IO_DIR/outputs.npz (keys INDEX/OUTPUT) and IO_DIR/guest.json (where it ran, in how long)."""
    from agent import runtimes
    from agent.bundle import Manifest

    model_dir, io = Path(argv[0]), Path(argv[1])
    t0 = time.monotonic()
    m = json.loads((io / MANIFEST).read_text())
    # the manifest the converter measures a variant with on the host (converter/measure.open_session)
    manifest = Manifest(name="arm-check", version="0", target="arm", runtime=m["runtime"], precision=m["precision"],
                        model=m["model"], files=[], inputs=[], outputs=[], settings=m["settings"])
    with np.load(io / FEEDS, allow_pickle=False) as npz:
        feeds: dict[int, dict[str, np.ndarray]] = {}
        for key in npz.files:
            i, name = key.split("/", 1)
            feeds.setdefault(int(i), {})[name] = npz[key]
    session = runtimes.load(model_dir, manifest)
    try:
        out = {f"{i}/{k}": np.asarray(v) for i in sorted(feeds) for k, v in session.run(feeds[i]).items()}
    finally:
        session.close()
    np.savez(io / OUTPUTS, **out)
    (io / "guest.json").write_text(json.dumps({"machine": platform.machine(), "seconds": time.monotonic() - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
