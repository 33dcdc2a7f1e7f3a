"""`edgefleet agent bundle-wheels` and `agent install --wheels/--root` on real things: wheelhouses downloaded from
PyPI for x86_64 and aarch64, a real Debian 12 amd64 root filesystem (debootstrap, cached) and the emulated aarch64's
Debian 12 arm64 root filesystem (converter/arm64.py, copied), the installed agent run from inside each image (chroot;
proot + qemu-user for aarch64), as it would run at boot."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import wheels

EDGEFLEET = [sys.executable, "-m", "edgefleet.cli"]
IS_ROOT = os.geteuid() == 0
CONFIG = ["--device-id", "d1", "--broker", "mqtts://127.0.0.1:8883", "--controller", "https://127.0.0.1:8443"]
AMD64_STAMP = "bookworm minbase python3,python3-venv\n"


def _edgefleet(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEFLEET, *map(str, args)], capture_output=True, text=True, **kw)


def _one_line(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert len(r.stderr.splitlines()) == 1 and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="session")
def wheelhouses(tmp_path_factory):
    """{platform: wheelhouse} made by the real command (onnxruntime only), once a session."""
    made = {}

    def get(platform: str) -> Path:
        if platform not in made:
            out = tmp_path_factory.mktemp("wheels") / platform
            r = _edgefleet("agent", "bundle-wheels", "--platform", platform, "--out", out, timeout=900)
            assert r.returncode == 0, r.stdout + r.stderr
            made[platform] = out
        return made[platform]

    return get


# --- bundle-wheels --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("platform, needle", [
    ("armv7", "PyPI has no onnxruntime, ai-edge-litert, tflite-runtime or openvino wheels"),
    ("armhf", "runs the 64-bit OS image"),
    ("sparc64", "unknown platform (choose from aarch64, x86_64)"),
])
def test_bundle_wheels_refuses_a_platform_it_has_no_runtimes_for_in_one_line(tmp_path, platform, needle):
    r = _edgefleet("agent", "bundle-wheels", "--platform", platform, "--out", tmp_path / "wh")
    _one_line(r, needle)
    assert not any(tmp_path.iterdir())


def test_bundle_wheels_refuses_an_out_dir_it_cannot_write_before_downloading(tmp_path):
    (tmp_path / "a-file").write_text("x")
    _one_line(_edgefleet("agent", "bundle-wheels", "--platform", "aarch64", "--out", tmp_path / "a-file" / "wh"),
              "is not a directory")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    _one_line(_edgefleet("agent", "bundle-wheels", "--platform", "aarch64", "--out", tmp_path / "busy"),
              "not empty and not a wheelhouse")
    _one_line(_edgefleet("agent", "bundle-wheels", "--platform", "x86_64", "--out", tmp_path / "wh", "--runtimes",
                         "onnxruntime,tensorrt"), "unknown runtime 'tensorrt'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "busy"]
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    if not IS_ROOT:  # root writes anywhere: a read-only directory refuses only others
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        _one_line(_edgefleet("agent", "bundle-wheels", "--platform", "aarch64", "--out", ro / "wh"), "cannot write")


def test_a_wheelhouse_holds_the_platforms_wheels_and_says_what_it_is(wheelhouses):
    for platform in ("aarch64", "x86_64"):
        d = wheelhouses(platform)
        doc = wheels.read(d)  # every file checked against its sha256
        assert (doc.platform, doc.python, doc.runtimes, doc.extras) == (platform, "3.11", ["onnxruntime"], ["agent"])
        files = {w.file for w in doc.wheels}
        assert files == {p.name for p in d.glob("*.whl")} and doc.edgefleet in files
        names = {f.split("-")[0].lower() for f in files}
        assert {"edgefleet", "onnxruntime", "numpy", "msgspec", "paho_mqtt", "psutil", "cryptography"} <= names
        compiled = [f for f in files if not f.endswith("-none-any.whl")]
        assert compiled and all(f.endswith(f"_{platform}.whl") for f in compiled), compiled


def test_install_refuses_a_wheelhouse_for_another_platform_or_a_damaged_one_before_changing_anything(
        tmp_path, wheelhouses):
    if not IS_ROOT:
        pytest.skip("install checks as root: run as root (as CI does)")
    other = "aarch64" if wheels.host_machine() == "x86_64" else "x86_64"
    root = tmp_path / "root"  # no python3 in it: the host's machine
    r = _edgefleet("agent", "install", "--root", root, "--wheels", wheelhouses(other), *CONFIG)
    _one_line(r, f"is for {other}, this machine is {wheels.host_machine()}")
    assert "bundle-wheels --platform" in r.stderr
    damaged = tmp_path / "damaged"
    shutil.copytree(wheelhouses(wheels.host_machine()), damaged)
    victim = next(damaged.glob("numpy-*.whl"))
    victim.write_bytes(victim.read_bytes()[:1000])
    _one_line(_edgefleet("agent", "install", "--root", root, "--wheels", damaged, *CONFIG),
              f"{victim.name} does not match its sha256")
    _one_line(_edgefleet("agent", "install", "--root", root, "--wheels", tmp_path, *CONFIG),
              "no edgefleet-wheels.json")
    assert not root.exists()


# --- images that boot ------------------------------------------------------------------------------------------
def _amd64_rootfs() -> Path:
    """A Debian 12 amd64 minbase with python3 and python3-venv, made once into the cache (debootstrap, as root)."""
    from edgefleet.models import cache_dir

    if wheels.host_machine() != "x86_64":
        pytest.skip(f"the amd64 image test runs its python with chroot: needs an x86_64 host (this is "
                    f"{wheels.host_machine()})")
    base = cache_dir() / "toolchains" / "rootfs-amd64"
    try:
        if (base / "stamp").read_text() == AMD64_STAMP:
            return base / "rootfs"
    except OSError:
        pass
    if not IS_ROOT:
        pytest.skip("making a Debian root filesystem (debootstrap) and chroot need root: run as root (as CI does)")
    debootstrap = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    if debootstrap is None:
        pytest.skip("debootstrap is not installed (apt-get install debootstrap)")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    r = subprocess.run([debootstrap, "--variant=minbase", "--include=python3,python3-venv", "bookworm",
                        str(base / "rootfs"), "http://deb.debian.org/debian"], capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for deb in (base / "rootfs/var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    (base / "stamp").write_text(AMD64_STAMP)
    return base / "rootfs"


def _copy(rootfs: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-a", str(rootfs), str(dest)], check=True)
    return dest


def _checks_the_image(root: Path, inside, install: subprocess.CompletedProcess) -> None:
    """What boot needs: the unit's ExecStart exists in the image, starts with the image's venv python, runs there
    (help, version, a client command failing cleanly), and the unit's user exists in the image."""
    assert install.returncode == 0, install.stdout + install.stderr
    unit = (root / "etc/systemd/system/edgefleet-agent.service").read_text()
    exec_start = next(ln for ln in unit.splitlines() if ln.startswith("ExecStart=")).split("=", 1)[1].split()[0]
    assert exec_start == "/opt/edgefleet/bin/edgefleet"
    script = root / exec_start.lstrip("/")
    assert script.is_file() and os.access(script, os.X_OK)
    assert script.read_text().splitlines()[0] == "#!/opt/edgefleet/bin/python"
    assert str(root) not in (root / "opt/edgefleet/pyvenv.cfg").read_text()
    assert any(ln.startswith("edgefleet:") for ln in (root / "etc/passwd").read_text().splitlines())
    assert any(ln.startswith("edgefleet-api:") for ln in (root / "etc/group").read_text().splitlines())

    version = subprocess.run(inside([exec_start, "--version"]), capture_output=True, text=True, timeout=600)
    assert version.returncode == 0 and version.stdout.strip() == "edgefleet 0.1.0", version.stderr
    help_ = subprocess.run(inside([exec_start, "agent", "--help"]), capture_output=True, text=True, timeout=600)
    assert help_.returncode == 0 and "bundle-wheels" in help_.stdout, help_.stderr
    where = subprocess.run(inside(["/opt/edgefleet/bin/python", "-c",
                                   "import agent, onnxruntime, platform; print(agent.__file__, platform.machine())"]),
                           capture_output=True, text=True, timeout=600)
    assert where.returncode == 0, where.stderr
    assert where.stdout.split()[0].startswith("/opt/edgefleet/lib/python3.11/site-packages/agent/"), where.stdout
    status = subprocess.run(inside([exec_start, "agent", "status", "--api", "unix:/run/edgefleet/agent.sock"]),
                            capture_output=True, text=True, timeout=600)
    lines = [ln for ln in status.stderr.splitlines() if "proot warning" not in ln]
    assert status.returncode == 2 and len(lines) == 1 and "cannot reach the agent" in lines[0], status.stderr


@pytest.mark.slow
def test_an_amd64_image_installed_from_a_wheelhouse_runs_the_agent_from_inside(tmp_path, wheelhouses):
    base = _amd64_rootfs()
    if not IS_ROOT:
        pytest.skip("install and chroot need root: run as root (as CI does)")
    root = _copy(base, tmp_path / "root")
    args = ["agent", "install", "--root", root, "--wheels", wheelhouses("x86_64"), *CONFIG]
    r = _edgefleet(*args, timeout=900)
    assert "(chroot: /usr/bin/python3 -m venv /opt/edgefleet)" in r.stdout, r.stdout + r.stderr

    def inside(argv):
        return ["chroot", str(root), "/usr/bin/env", "-i", "PATH=/usr/bin:/bin", *argv]

    _checks_the_image(root, inside, r)
    again = _edgefleet(*args, timeout=900)
    assert again.returncode == 0 and "already has edgefleet[agent] from the wheelhouse" in again.stdout, again.stdout


@pytest.mark.slow
def test_an_aarch64_image_installed_under_emulation_runs_the_agent_from_inside(tmp_path, wheelhouses):
    from converter import arm64

    why = arm64.unavailable() if not arm64.native() else "the host is aarch64: the amd64 test's chroot covers it"
    if why:
        pytest.skip(f"no emulated aarch64: {why}")
    if not arm64.ready():
        pytest.skip(f"the emulated aarch64 is not made yet ({arm64.SETUP_HINT})")
    if not IS_ROOT:
        pytest.skip("install needs root: run as root (as CI does)")
    root = _copy(arm64.root() / "rootfs", tmp_path / "root")  # a copy: the cached rootfs is not touched
    shutil.rmtree(root / "opt/edgefleet")  # the emulator's own venv: the image gets the one install makes
    t0 = time.monotonic()
    # the emulator install finds is the one arm64.root() holds (agent/wheels.py's qemu_path spells the same path)
    assert wheels.qemu_path("aarch64") == arm64.root() / "qemu-aarch64"
    r = _edgefleet("agent", "install", "--root", root, "--wheels", wheelhouses("aarch64"), *CONFIG, timeout=3600)
    print(f"aarch64 install under emulation: {time.monotonic() - t0:.0f} s")
    assert "(emulated aarch64: /usr/bin/python3 -m venv /opt/edgefleet)" in r.stdout, r.stdout + r.stderr
    run_in = wheels.in_root(root, "aarch64")
    _checks_the_image(root, run_in, r)
    machine = subprocess.run(run_in(["/opt/edgefleet/bin/python", "-c", "import platform; print(platform.machine())"]),
                             capture_output=True, text=True, timeout=600)
    assert machine.stdout.strip() == "aarch64", machine.stderr
    assert wheels.elf_machine(root / "usr/bin/python3.11") == "aarch64"


@pytest.mark.slow
def test_a_device_without_internet_installs_the_agent_from_a_wheelhouse(tmp_path, wheelhouses):
    """On the device (a Debian 12 amd64 in a chroot, its network unused: pip --no-index), as the README says: a
    throwaway venv from the wheelhouse gives `edgefleet`, whose `agent install --wheels` makes the service's venv."""
    base = _amd64_rootfs()
    if not IS_ROOT:
        pytest.skip("install and chroot need root: run as root (as CI does)")
    root = _copy(base, tmp_path / "device")
    shutil.copytree(wheelhouses("x86_64"), root / "root/wheels")
    script = ("python3 -m venv /tmp/ef && /tmp/ef/bin/pip install --quiet --no-index --find-links /root/wheels "
              "'edgefleet[agent]' && /tmp/ef/bin/edgefleet agent install --wheels /root/wheels " + " ".join(CONFIG))
    r = subprocess.run(["chroot", str(root), "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
                        "sh", "-c", script], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pip install edgefleet[agent] offline from /root/wheels" in r.stdout, r.stdout
    assert "useradd --system edgefleet" in r.stdout and "systemd is not running here" in r.stdout, r.stdout

    def inside(argv):
        return ["chroot", str(root), "/usr/bin/env", "-i", "PATH=/usr/bin:/bin", *argv]

    _checks_the_image(root, inside, r)
