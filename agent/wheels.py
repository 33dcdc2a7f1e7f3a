"""Wheelhouses for devices without internet, and running commands inside a device's root filesystem.

``edgefleet agent bundle-wheels --platform aarch64 --out DIR`` (on a host with internet, from a source checkout)
writes into DIR every wheel ``agent install --wheels DIR`` needs on a device of that platform: edgefleet's own
wheel, built from the checkout (``pip wheel --no-deps``), and the binary wheels of the agent extra and of the
chosen runtimes for that platform and CPython version (``pip download --only-binary=:all: --platform ...``),
with ``edgefleet-wheels.json``: the platform, the Python version, the extras, and each file's sha256 and size.
A device installs from it with ``pip install --no-index --find-links DIR``: nothing is fetched.

Platforms: ``aarch64`` and ``x86_64`` Linux with glibc 2.17 or newer (the manylinux tags below, up to Debian 12's
glibc 2.36). 32-bit ARM (armv7/armhf) is refused: PyPI has no onnxruntime, ai-edge-litert, tflite-runtime or
openvino wheels for it.

``in_root(root)`` gives the host command line that runs a command inside a root filesystem (an image being built):
``chroot`` when the root's machine is this host's (or the kernel runs the root's binaries through a registered
binfmt emulator), else ``proot`` with qemu-user (the emulator ``edgefleet toolchain arm64`` keeps in the cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform as host_platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from agent.errors import EdgefleetError

MANIFEST = "edgefleet-wheels.json"
FORMAT = 1
PYTHONS = ("3.11", "3.12", "3.13")  # edgefleet's requires-python >= 3.11; the versions the runtimes have wheels for
DEFAULT_PYTHON = "3.11"  # Debian 12 / Raspberry Pi OS 12 (bookworm)
# glibc 2.17 (manylinux2014) .. 2.36 (Debian 12); x86_64 also takes the older manylinux1/2010 tags
PLATFORMS = {
    "aarch64": ("manylinux2014_aarch64", *(f"manylinux_2_{n}_aarch64" for n in range(17, 37))),
    "x86_64": ("manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
               *(f"manylinux_2_{n}_x86_64" for n in range(5, 37))),
}
ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x86-64": "x86_64"}
ARM32 = ("armv7", "armv7l", "armhf", "armv6", "armv6l", "armel", "arm", "armv8l")
ARM32_WHY = ("32-bit ARM (armv7/armhf) is not supported: PyPI has no onnxruntime, ai-edge-litert, tflite-runtime "
             "or openvino wheels for it, so no runtime could be installed; a Raspberry Pi 3/4/5, Zero 2 W or any "
             "other ARMv8 board runs the 64-bit OS image (Raspberry Pi OS 64-bit, Debian/Ubuntu arm64): use "
             "--platform aarch64 there")
CPU = "cortex-a76"  # the emulated CPU (a Raspberry Pi 5's core); qemu's `max` makes the runtimes fault
ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64", 0x28: "armv7", 0x03: "i386"}

Say = Callable[[str], None]


class WheelsError(EdgefleetError):
    pass


class Wheel(msgspec.Struct, forbid_unknown_fields=True):
    file: str
    sha256: str
    size: int


class Wheelhouse(msgspec.Struct, forbid_unknown_fields=True):
    format: int
    platform: str
    python: str
    manylinux: list[str]
    runtimes: list[str]
    extras: list[str]
    edgefleet: str  # edgefleet's own wheel
    glibc: str  # the oldest glibc every wheel takes (the device's must be this or newer)
    created: float
    wheels: list[Wheel]

    @property
    def size(self) -> int:
        return sum(w.size for w in self.wheels)


def platform_name(text: str) -> str:
    """``aarch64`` or ``x86_64`` from what a user typed; WheelsError (one line) otherwise."""
    name = ALIASES.get(text.strip().lower(), text.strip().lower())
    if name in PLATFORMS:
        return name
    if name in ARM32:
        raise WheelsError(f"--platform {text}: {ARM32_WHY}")
    raise WheelsError(f"--platform {text}: unknown platform (choose from {', '.join(PLATFORMS)})")


def runtime_extras(runtimes: list[str]) -> list[str]:
    """The extras that install ``runtimes`` (named as bundles name them: onnxruntime, tflite, openvino)."""
    from agent.runtimes import PLUGINS

    extras = ["agent"]  # onnxruntime is in the agent extra: every install has it
    for name in runtimes:
        if name not in PLUGINS:
            raise WheelsError(f"--runtimes: unknown runtime {name!r} (choose from {', '.join(PLUGINS)})")
        extras += re.findall(r"\[([A-Za-z0-9_-]+)\]", PLUGINS[name][1])
    return list(dict.fromkeys(extras))


def host_machine() -> str:
    m = host_platform.machine().lower()
    return ALIASES.get(m, m)


def elf_machine(path: Path) -> str | None:
    """The machine an ELF executable is built for (x86_64, aarch64, armv7, ...), None if ``path`` is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    code = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return ELF_MACHINES.get(code, f"elf-machine-{code:#x}")


def glibc_floor(files: list[str]) -> str:
    """The oldest glibc on which every one of these wheels installs (from their manylinux tags)."""
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    need = (2, 17)
    for name in files:
        floors = []
        for tag in name.removesuffix(".whl").split("-")[-1].split("."):
            m = re.fullmatch(r"manylinux_(\d+)_(\d+)_\w+", tag)
            if m:
                floors.append((int(m[1]), int(m[2])))
            elif tag.split("_")[0] in legacy:
                floors.append(legacy[tag.split("_")[0]])
        if floors:
            need = max(need, min(floors))
    return "%d.%d" % need


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- making one ----------------------------------------------------------------------------------------------
def _prepare_out(out: Path) -> None:
    """Refuse, before any download, an OUT that cannot become a wheelhouse."""
    if out.exists() and not out.is_dir():
        raise WheelsError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise WheelsError(f"--out {out}: not empty and not a wheelhouse (no {MANIFEST}); name a new directory")
    parent = out.parent
    blocker = next((a for a in [parent, *parent.parents] if a.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise WheelsError(f"--out {out}: {blocker} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent)
    except OSError as e:
        raise WheelsError(f"--out {out}: cannot write in {parent} ({e.strerror or e})") from None
    os.rmdir(probe)


def _pip(args: list[str], what: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True)
    if r.returncode:
        lines = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        err = next((ln for ln in lines if ln.startswith("ERROR")), lines[-1] if lines else f"exit {r.returncode}")
        raise WheelsError(f"{what} failed: {err}")


def bundle(*, platform: str, out: str | Path, runtimes: list[str] | tuple[str, ...] = ("onnxruntime",),
           python: str = DEFAULT_PYTHON, say: Say = print) -> Wheelhouse:
    """Write a wheelhouse for ``platform`` into ``out`` (replacing an earlier wheelhouse there, atomically)."""
    from agent import install

    platform = platform_name(platform)
    runtimes = list(dict.fromkeys(["onnxruntime", *runtimes]))
    extras = runtime_extras(runtimes)
    if python not in PYTHONS:
        raise WheelsError(f"--python-version {python}: choose from {', '.join(PYTHONS)}")
    out = Path(out).absolute()
    _prepare_out(out)
    tree = install.checkout()
    if tree is None:
        raise WheelsError("bundle-wheels builds edgefleet's own wheel from its source checkout: run it from one")
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="edgefleet-wheel-") as build:
            src = Path(build) / "edgefleet"
            install._copy_source(tree, src)  # nothing is written into the checkout
            say(f"building edgefleet's wheel from {tree}")
            _pip(["wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp), str(src)],
                 "pip wheel (edgefleet)")
        own = next(tmp.glob("edgefleet-*.whl"))
        tags = PLATFORMS[platform]
        say(f"downloading edgefleet[{','.join(extras)}]'s dependencies for {platform} / CPython {python} "
            f"(binary wheels for glibc 2.17..2.36)")
        _pip(["download", "--quiet", "--dest", str(tmp), "--only-binary=:all:", "--python-version", python,
              "--implementation", "cp", *(a for t in tags for a in ("--platform", t)),
              f"edgefleet[{','.join(extras)}] @ {own.as_uri()}"], f"pip download for {platform}")
        wheels = [Wheel(p.name, _sha256(p), p.stat().st_size) for p in sorted(tmp.glob("*.whl"))]
        doc = Wheelhouse(FORMAT, platform, python, list(tags), runtimes, extras, own.name,
                         glibc_floor([w.file for w in wheels]), time.time(), wheels)
        (tmp / MANIFEST).write_bytes(msgspec.json.format(msgspec.json.encode(doc), indent=2) + b"\n")
        os.chmod(tmp, 0o755)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wheelhouse {out}: {len(wheels)} wheels, {doc.size / 1e6:.1f} MB, for {platform} Linux (glibc >= {doc.glibc}), "
        f"CPython {python}, runtimes {', '.join(runtimes)} ({time.monotonic() - t0:.0f} s); on the device: "
        f"edgefleet agent install --wheels DIR ...")
    return doc


# --- reading one ---------------------------------------------------------------------------------------------
def read(directory: str | Path) -> Wheelhouse:
    """The wheelhouse in ``directory``, every file checked against its manifest; WheelsError says what is wrong."""
    d = Path(directory)
    try:
        raw = (d / MANIFEST).read_bytes()
    except OSError:
        raise WheelsError(f"--wheels {d}: no {MANIFEST} (make the wheelhouse with `edgefleet agent bundle-wheels`)"
                          ) from None
    try:
        doc = msgspec.json.decode(raw, type=Wheelhouse)
    except msgspec.ValidationError as e:
        raise WheelsError(f"--wheels {d}: {MANIFEST}: {e}") from None
    except msgspec.DecodeError:
        raise WheelsError(f"--wheels {d}: {MANIFEST} is not JSON") from None
    if doc.format != FORMAT:
        raise WheelsError(f"--wheels {d}: format {doc.format} (this edgefleet reads {FORMAT})")
    for w in doc.wheels:
        p = d / w.file
        if Path(w.file).name != w.file or not p.is_file():
            raise WheelsError(f"--wheels {d}: {w.file} is missing")
        if p.stat().st_size != w.size or _sha256(p) != w.sha256:
            raise WheelsError(f"--wheels {d}: {w.file} does not match its sha256 in {MANIFEST} (copied partly?)")
    return doc


def describe(doc: Wheelhouse) -> str:
    return f"{doc.platform}, CPython {doc.python}, runtimes {', '.join(doc.runtimes)}"


# --- running inside a root filesystem ------------------------------------------------------------------------
def root_machine(root: Path) -> str | None:
    """The machine of the root's python3 (None: the root has no python3)."""
    exe = root / "usr/bin/python3"
    for _ in range(10):  # resolve symlinks inside the root (python3 -> python3.11)
        if not exe.is_symlink():
            break
        target = Path(os.readlink(exe))
        exe = root / target.relative_to("/") if target.is_absolute() else exe.parent / target
    return elf_machine(exe)


def qemu_path(machine: str) -> Path:
    """The qemu-user binary for ``machine``: $EDGEFLEET_QEMU, else the one `edgefleet toolchain arm64` keeps
    (converter/arm64.py's root(); the agent imports nothing of ours, so the path is spelled here too)."""
    if os.environ.get("EDGEFLEET_QEMU"):
        return Path(os.environ["EDGEFLEET_QEMU"])
    cache = Path(os.environ.get("EDGEFLEET_CACHE") or Path.home() / ".cache" / "edgefleet")
    base = Path(os.environ.get("EDGEFLEET_ARM64") or cache / "toolchains" / "arm64")
    return base / f"qemu-{machine}"


def _binfmt(machine: str) -> bool:
    """The kernel runs ``machine`` binaries through a registered emulator that it keeps open (flag F), so they run
    in a chroot too."""
    try:
        text = Path(f"/proc/sys/fs/binfmt_misc/qemu-{machine}").read_text()
    except OSError:
        return False
    flags = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("flags:")), "")
    return text.startswith("enabled") and "F" in flags


def in_root(root: Path, machine: str) -> Callable[..., list[str]]:
    """``cmd(argv, binds={host: guest}, env={...})``: the host command line that runs ``argv`` inside ``root``.
    chroot where the root's binaries run here; proot with qemu-user where they do not. chroot has no binds:
    ``binds`` then must be directories already inside ``root`` (``host`` under it), which is how install uses it."""
    env0 = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
            "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1", "PIP_NO_CACHE_DIR": "1"}

    def envs(env: dict[str, str] | None) -> list[str]:
        return ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in {**env0, **(env or {})}.items())]

    if machine == host_machine() or _binfmt(machine):
        chroot = shutil.which("chroot") or shutil.which("chroot", path="/usr/sbin:/sbin")
        if chroot is None:
            raise WheelsError("chroot is not installed (coreutils)")

        def cmd(argv: list[str], binds: dict | None = None, env: dict[str, str] | None = None) -> list[str]:
            return [chroot, str(root), *envs(env), *argv]

        return cmd
    qemu, proot = qemu_path(machine), shutil.which("proot")
    if proot is None or not os.access(qemu, os.X_OK):
        raise WheelsError(f"{root} is a {machine} root: its python runs here only under emulation, and "
                          f"{'proot is not installed (apt-get install proot)' if proot is None else f'no {qemu}'}"
                          f" (make the emulator once with `edgefleet toolchain arm64`, or set EDGEFLEET_QEMU, or "
                          f"register qemu-user-static's binfmt)")

    def emulated(argv: list[str], binds: dict | None = None, env: dict[str, str] | None = None) -> list[str]:
        cmd = [proot, "-r", str(root), "-q", f"{qemu} -cpu {CPU}", "-b", "/proc", "-b", "/dev", "-b", "/sys",
               "-w", "/"]
        for host, guest in (binds or {}).items():
            cmd += ["-b", f"{host}:{guest}"]
        return [*cmd, *envs(env), *argv]

    return emulated


def manifest_json(doc: Wheelhouse) -> str:
    return json.dumps(msgspec.to_builtins(doc), sort_keys=True)
