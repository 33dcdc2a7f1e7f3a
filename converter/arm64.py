"""An emulated aarch64 device on an x86 host: a Debian arm64 root filesystem holding an aarch64 Python venv with the
agent's runtime wheels, run under qemu-user through proot (issue 13).

The converter judges the ``arm`` target's variants on ARM kernels here (the numbers an ARM device will compute,
not the x86 kernels' numbers), and the tests run the real agent here as on a device. Everything lives in
``$EDGEFLEET_ARM64`` or ``cache_dir()/toolchains/arm64``, made once by ``ensure()`` (``edgefleet toolchain arm64``,
and the set-up for ``make test``):

- ``qemu-aarch64``: Debian's qemu-user 10.0 (from bookworm-backports, pinned by sha256, unpacked from its .deb
  with ``dpkg-deb -x``; nothing is installed on the host). Debian 12's own qemu 7.2 crashes (SIGSEGV) when
  onnxruntime 1.32's aarch64 build is imported, under every CPU model tried; 10.0 runs it.
- ``rootfs/``: ``debootstrap --foreign --arch=arm64 --variant=minbase`` of Debian 12 with python3 and
  python3-venv, its second stage run under the emulator (proot's fake root): about 7 minutes, 230 MB.
- ``rootfs/opt/edgefleet``: a venv holding ``WHEELS``, downloaded on the host for aarch64 / CPython 3.11
  (``pip download --platform``, binary wheels only) and installed inside, offline: about 210 MB.
- ``stamp``: what was verified (the emulated python imports every runtime and says aarch64); without a matching
  stamp the tree is half made and is made again.

``run(argv, binds=...)`` runs a command in it, CPU ``CPU`` (cortex-a76: a Raspberry Pi 5's core), with the
edgefleet checkout bound at ``SRC`` and on PYTHONPATH, so the device code under test is this checkout's. The
guest shares the host's network (proot is not a container): an agent inside reaches a broker on 127.0.0.1.

``unavailable()`` says why it cannot be made here (no proot/debootstrap/dpkg-deb, not root for debootstrap, not an
x86_64 host), or None. On an aarch64 host none of this is needed: the host's own kernels are ARM kernels.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from converter import ConvertError

ENV = "EDGEFLEET_ARM64"
CPU = "cortex-a76"
SUITE = "bookworm"  # Debian 12: python3 is 3.11, the wheels' CPython
MIRROR = "http://deb.debian.org/debian"
PYTHON = "3.11"
QEMU_DEB = ("http://deb.debian.org/debian/pool/main/q/qemu/qemu-user_10.0.2+ds-2+deb13u1~bpo12+1_amd64.deb",
            "10a2dec99f2b2d0b1097ff0375aea35b89322d6631fc96700511b02e05bf6fef")
# the agent's runtime dependencies (pyproject's `agent` extra, LiteRT for the tflite plugin), as the host's venv
# has them, so that the host and the emulated device run the same runtime versions
WHEELS = ("onnxruntime==1.32.0", "ai-edge-litert==2.3.0", "numpy==2.4.6", "msgspec==0.23.0", "paho-mqtt==2.2.0",
          "psutil==7.2.2", "cryptography==50.0.2")
# manylinux tags a Debian 12 (glibc 2.36) aarch64 takes
PLATFORMS = ("manylinux2014_aarch64", *(f"manylinux_2_{n}_aarch64" for n in range(17, 37)))
VENV = "/opt/edgefleet"
SRC = "/opt/edgefleet-src"  # where run() binds the checkout
STAMP = "stamp"
SETUP_HINT = "edgefleet toolchain arm64"


class EmulationError(ConvertError):
    """The emulated aarch64 cannot be made or a command in it failed; the message says why."""


def root() -> Path:
    from edgefleet.models import cache_dir

    return Path(os.environ.get(ENV) or cache_dir() / "toolchains" / "arm64")


def stamp_text() -> str:
    return f"{SUITE}\n{QEMU_DEB[1]}\n{' '.join(WHEELS)}\n"


def ready() -> bool:
    """Whether the emulated aarch64 exists and was verified for the current pins (no side effects)."""
    try:
        return (root() / STAMP).read_text() == stamp_text()
    except OSError:
        return False


def native() -> bool:
    """This host's kernels are ARM kernels already."""
    return platform.machine().lower() in ("aarch64", "arm64")


def unavailable() -> str | None:
    """Why the emulated aarch64 cannot be made (or run) on this host; None when it can."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"emulating aarch64 needs an x86_64 host (this is {platform.machine()})"
    if ready():
        return None if shutil.which("proot") else "proot is not installed (apt-get install proot)"
    missing = [t for t in ("proot", "debootstrap", "dpkg-deb") if not _which(t)]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install proot debootstrap)"
    if os.geteuid() != 0:
        return "making the arm64 root filesystem (debootstrap) needs root; run `edgefleet toolchain arm64` as root once"
    return None


def ensure(say=None) -> Path:
    """The emulated aarch64's directory, made first if needed; EmulationError says why it cannot be."""
    say = say or _say
    if ready():
        return root()
    why = unavailable()
    if why:
        raise EmulationError(f"no emulated aarch64: {why}")
    from converter.toolchain import _lock

    base = root()
    base.parent.mkdir(parents=True, exist_ok=True)
    with _lock(base.parent / f".{base.name}.lock"):
        if not ready():
            _build(base, say)
    return base


def run(argv: list[str], *, binds: dict[str | Path, str] | None = None, env: dict[str, str] | None = None,
        cwd: str = "/", timeout: float | None = 3600.0, fake_root: bool = False, cpu: str = CPU,
        **popen) -> subprocess.CompletedProcess:
    """Run ``argv`` in the emulated aarch64 (made beforehand: ``ensure``), the checkout at ``SRC`` on PYTHONPATH,
    the venv's bin first on PATH; ``binds``: host path -> guest path. Extra keywords go to subprocess.run."""
    return subprocess.run(command(argv, binds=binds, env=env, cwd=cwd, fake_root=fake_root, cpu=cpu),
                          env=_host_env(), stdin=popen.pop("stdin", subprocess.DEVNULL), timeout=timeout, **popen)


def command(argv: list[str], *, binds: dict[str | Path, str] | None = None, env: dict[str, str] | None = None,
            cwd: str = "/", fake_root: bool = False, cpu: str = CPU) -> list[str]:
    """The host command line that runs ``argv`` in the emulated aarch64 (for a long-running process: Popen)."""
    base = root()
    src = Path(__file__).resolve().parents[1]
    guest_env = {"PATH": f"{VENV}/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
                 "PYTHONPATH": SRC, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", **(env or {})}
    cmd = [_which("proot"), *(["-0"] if fake_root else []), "-r", str(base / "rootfs"),
           "-q", f"{base / 'qemu-aarch64'} -cpu {cpu}", "-b", "/proc", "-b", "/dev", "-b", "/sys",
           "-b", f"{src}:{SRC}", "-w", cwd]
    for host, guest in (binds or {}).items():
        cmd += ["-b", f"{host}:{guest}"]
    return [*cmd, "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in guest_env.items()), *argv]


# ---- making it ---------------------------------------------------------------------------------------------------


def _build(base: Path, say) -> None:
    t0 = time.monotonic()
    if base.exists():
        say(f"removing the half-made emulated aarch64 at {base}")
        _rmtree(base)
    base.mkdir(parents=True)
    try:
        say(f"making an emulated aarch64 at {base} (Debian 12 arm64 + qemu {CPU} + the agent's runtime wheels: "
            f"about 600 MB and 10 minutes, once)")
        _qemu(base, say)
        rootfs = base / "rootfs"
        say(f"[1/4] debootstrap: downloading Debian 12 arm64 (minbase, python3) from {MIRROR}")
        _check([_which("debootstrap"), "--foreign", "--arch=arm64", "--variant=minbase",
                "--include=python3,python3-venv", SUITE, str(rootfs), MIRROR], "debootstrap", timeout=1800)
        say("[2/4] debootstrap's second stage, under the emulator (the longest step: about 7 minutes)")
        _check(command(["/debootstrap/debootstrap", "--second-stage"], env={"DEBOOTSTRAP_DIR": "/debootstrap"},
                       fake_root=True), "debootstrap --second-stage", timeout=3600)
        wheels = base / "wheels"
        say(f"[3/4] downloading the agent's runtime wheels for aarch64: {' '.join(WHEELS)}")
        _check([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--dest",
                str(wheels), "--python-version", PYTHON, "--only-binary=:all:",
                *(a for p in PLATFORMS for a in ("--platform", p)), *WHEELS], "pip download", timeout=1800)
        say("[4/4] the venv inside, installed offline from those wheels, and checked")
        _check(command(["sh", "-c", f"python3 -m venv {VENV} && {VENV}/bin/pip install --quiet --no-index "
                                    f"--disable-pip-version-check --find-links /wheels {' '.join(WHEELS)}"],
                       binds={wheels: "/wheels"}), "installing the wheels", timeout=3600)
        probe = run(["python", "-c", "import platform, numpy, onnxruntime, ai_edge_litert.interpreter, msgspec, "
                                     "paho.mqtt.client, psutil, cryptography; print(platform.machine())"],
                    capture_output=True, text=True, timeout=600)
        if probe.returncode != 0 or probe.stdout.strip() != "aarch64":
            raise EmulationError(f"the emulated aarch64 cannot import the runtimes: "
                                 f"{_last_line(probe.stderr or probe.stdout)}")
    except BaseException:
        _rmtree(base)
        raise
    (base / STAMP).write_text(stamp_text())
    size = sum(f.lstat().st_size for f in base.rglob("*") if not f.is_symlink() and f.is_file())
    say(f"emulated aarch64 ready ({size / 1e6:.0f} MB, {time.monotonic() - t0:.0f} s)")


def _qemu(base: Path, say) -> None:
    url, sha = QEMU_DEB
    say(f"fetching qemu-user 10.0 from Debian ({url.rsplit('/', 1)[1]})")
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        deb = Path(tmp) / "qemu-user.deb"
        try:
            with urllib.request.urlopen(url, timeout=120) as r, open(deb, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            raise EmulationError(f"cannot download {url}: {e}") from None
        got = hashlib.sha256(deb.read_bytes()).hexdigest()
        if got != sha:
            raise EmulationError(f"{url}: sha256 {got} is not the pinned {sha}")
        _check([_which("dpkg-deb"), "-x", str(deb), str(Path(tmp) / "x")], "dpkg-deb -x")
        shutil.move(str(Path(tmp) / "x" / "usr" / "bin" / "qemu-aarch64"), base / "qemu-aarch64")


def _check(cmd: list[str], what: str, timeout: float = 600) -> None:
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              timeout=timeout, env=_host_env())
    except subprocess.TimeoutExpired:
        raise EmulationError(f"emulated aarch64: {what} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise EmulationError(f"emulated aarch64: {what} failed: {_last_line(proc.stderr or proc.stdout)}")


def _host_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin", "LANG": "C.UTF-8",
            "PROOT_NO_SECCOMP": os.environ.get("PROOT_NO_SECCOMP", ""), "HOME": os.environ.get("HOME", "/root")}


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip() and "proot warning" not in ln]
    return lines[-1] if lines else "no output"


def _rmtree(path: Path) -> None:
    """Remove a tree the fake root made (directories it left without write permission included)."""
    if not path.exists():
        return
    subprocess.run(["chmod", "-R", "u+rwX", str(path)], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def _say(line: str) -> None:
    print(f"edgefleet: {line}", file=sys.stderr, flush=True)
