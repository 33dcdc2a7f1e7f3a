"""`edgefleet agent install` / `uninstall`: the agent as a systemd service on this machine.

What install puts where (each path under ``--root DIR`` when given):

  /opt/edgefleet                            a venv with edgefleet[agent] (+ ``--extra``s), from the source
                                            checkout this edgefleet runs from, else from the package index
  /etc/edgefleet/agent.toml                 the config (0640 root:edgefleet), from systemd/agent.toml.in
  /etc/edgefleet/trust/NAME.pub             the release keys from ``--trust KEY.pub`` (the config's trust_dir;
                                            0644 root, the directory 0755 root): read-only to the agent, which
                                            runs only bundles signed by one of them (agent/trust.py)
  /etc/systemd/system/edgefleet-agent.service   the unit (systemd/edgefleet-agent.service)
  /etc/systemd/system/edgefleet-agent.service.d/network.conf   the addresses the agent may reach: IPAddressDeny=any
                                            + localhost, the controller's and broker's addresses (resolved now)
                                            and the nameservers of /etc/resolv.conf
  /etc/systemd/system/edgefleet-agent.service.d/accelerators.conf   only with accelerators (``--accelerator``,
                                            default auto: those /dev has): PrivateDevices=no, DevicePolicy=closed
                                            and a DeviceAllow= per node (agent/systemd.accelerator_dropin)
  the system user and group ``edgefleet``   (not under --root)
  the group ``edgefleet-api``               the local API socket's group: applications join it (not under --root)

and, where systemd runs (``/run/systemd/system`` exists; never under --root), ``systemctl daemon-reload`` and
``systemctl enable --now edgefleet-agent``. Every step checks before it acts, so a second run changes nothing.

``--wheels DIR`` installs the venv offline from a wheelhouse made by ``edgefleet agent bundle-wheels`` (pip
--no-index --find-links DIR); a wheelhouse made for another platform is refused.

``--root DIR`` is for image builds (and tests): no systemctl; the user and groups are made in DIR/etc when it
has an /etc/passwd (an image); and the venv is made for the image, as it will be at boot: its scripts start with
``#!/opt/edgefleet/bin/python``. When DIR holds a python3 (an image's root filesystem), the venv is made by that
python, inside DIR: with chroot where DIR's machine is this host's, under emulation (proot + qemu-user,
agent/wheels.py) for an aarch64 root on an x86_64 host; it is installed from a wheelhouse (``--wheels``, or one
made now from this checkout for DIR's machine). When DIR has no python3 (a staging directory), the venv is made by
this host's python and its paths are rewritten to /opt/edgefleet: the image must then have the same python at the
same path.
"""

from __future__ import annotations

import grp
import hashlib
import ipaddress
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

from agent import config as agent_config
from agent.errors import EdgefleetError

SERVICE = "edgefleet-agent"
USER = GROUP = "edgefleet"
API_GROUP = "edgefleet-api"  # the config's default api_group; the unit's SupplementaryGroups=
STATE_DIR = "/var/lib/edgefleet"
VENV, CONFIG, UNIT = "/opt/edgefleet", "/etc/edgefleet/agent.toml", f"/etc/systemd/system/{SERVICE}.service"
NETWORK_DROPIN = f"/etc/systemd/system/{SERVICE}.service.d/network.conf"
# the accelerators the agent may use (agent/systemd.accelerator_dropin): absent, the unit's PrivateDevices=yes stands
ACCELERATOR_DROPIN = f"/etc/systemd/system/{SERVICE}.service.d/accelerators.conf"
ACCELERATOR_CHOICES = ("none", "auto", "nvidia", "dri", "npu")
_STAMP = ".edgefleet-install.json"  # in the venv: what was installed into it, to skip a same-source rerun
# not copied when installing from a source checkout
_SKIP = {".git", ".venv", "__pycache__", "build", "dist", ".pytest_cache", ".ruff_cache", ".cache", "out",
         "demo-out", "bench-out", "tests", "bench"}

Say = Callable[[str], None]


class InstallError(EdgefleetError):
    pass


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise InstallError(f"`edgefleet agent {what}` must run as root (it writes /opt, /etc and manages "
                           f"the {USER} user and the service); try sudo")


def _under(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _systemd_running(root: Path) -> bool:
    return root == Path("/") and Path("/run/systemd/system").is_dir()


def _systemctl(say: Say, *args: str, check: bool = True) -> bool:
    say("systemctl " + " ".join(args))
    r = subprocess.run(["systemctl", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode and check:
        raise InstallError(f"systemctl {' '.join(args)} failed: {r.stderr.strip() or r.returncode} "
                           f"(see `systemctl status {SERVICE}` and `journalctl -u {SERVICE}`)")
    return r.returncode == 0


# --- where the source and the unit come from ------------------------------------------------------------------
def checkout() -> Path | None:
    """The source checkout this edgefleet runs from (a pyproject.toml naming edgefleet above `agent`)."""
    return _edgefleet_tree(Path(__file__).resolve().parent.parent)


def _edgefleet_tree(d: Path) -> Path | None:
    try:
        project = tomllib.loads((d / "pyproject.toml").read_text()).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return d if project.get("name") == "edgefleet" else None


def data_file(name: str) -> Path:
    """systemd/NAME: in the checkout, or where a wheel's data files land (PREFIX/share/edgefleet/systemd)."""
    tree = checkout()
    for d in ([tree / "systemd"] if tree else []) + [Path(sys.prefix) / "share" / "edgefleet" / "systemd"]:
        if (d / name).is_file():
            return d / name
    raise InstallError(f"cannot find {name} (it ships in the source's systemd/ directory): run install from a "
                       f"source checkout of edgefleet")


def _with_extras(requirement: str, extras: list[str]) -> str:
    m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?(.*)", requirement)
    if not m:
        raise InstallError(f"--source {requirement!r} is neither a directory, a file nor a requirement")
    have = [e.strip() for e in (m[2] or "").split(",") if e.strip()]
    return f"{m[1]}[{','.join(dict.fromkeys(have + extras))}]{m[3]}"


def _tree_digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(p for p in d.rglob("*") if p.is_file()):
        h.update(str(p.relative_to(d)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _copy_source(src: Path, dest: Path) -> None:
    """The files a build needs, without venvs, caches or build output (nothing is written into ``src``)."""
    def ignore(d: str, names: list[str]) -> set[str]:
        return {n for n in names if n in _SKIP or n.endswith(".egg-info")
                or (Path(d, n) / "pyvenv.cfg").exists()}

    shutil.copytree(src, dest, ignore=ignore)


# --- the venv ------------------------------------------------------------------------------------------------
def _base_python(python: str | None) -> str:
    # The distro's python by default: the service runs as `edgefleet` with ProtectHome=yes, so a base
    # interpreter under /root or /home (pyenv, a user's venv) would be unreadable to it.
    exe = python or ("/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable)
    probe = "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))"
    try:
        ok = subprocess.run([exe, "-c", probe], capture_output=True).returncode == 0
    except OSError:
        ok = False
    if not ok:
        raise InstallError(f"{exe} is not a Python >= 3.11 with venv and ensurepip (on Debian: apt install "
                           f"python3-venv); name one with --python")
    return exe


def _venv(venv: Path, source: str | None, extras: list[str], python: str | None, say: Say,
          wheelhouse: tuple[Path, object] | None = None, final: str | None = None) -> bool:
    """Create the venv if needed and pip install edgefleet into it; True if anything changed. ``wheelhouse``:
    (DIR, its manifest) to install offline from. ``final``: where the venv will be at boot (its paths are
    rewritten to it), when that is not where it is made."""
    changed = False
    if not (venv / "bin" / "python").exists():
        exe = _base_python(python)
        say(f"venv: creating {venv} ({exe} -m venv)")
        subprocess.run([exe, "-m", "venv", str(venv)], check=True)
        changed = True
    extras = list(dict.fromkeys(["agent", *extras]))
    stamp_path = venv / _STAMP
    if wheelhouse is not None:
        wdir, doc = wheelhouse
        stamp = {"wheelhouse": _manifest_digest(wdir), "extras": extras}
        if _stamp_is(stamp_path, stamp):
            say(f"venv: {venv} already has edgefleet[{','.join(extras)}] from the wheelhouse {wdir}")
            return changed
        if not changed:  # same version number, other code: pip would call it satisfied
            subprocess.run(_pip_cmd(venv, "uninstall", "--quiet", "--yes", "edgefleet"), env=_pip_env(),
                           capture_output=True)
        what = f"edgefleet[{','.join(extras)}] offline from {wdir}"
        say(f"venv: pip install {what}")
        before = _pip(venv, "freeze")
        r = subprocess.run(_pip_cmd(venv, "install", "--quiet", "--no-index", "--find-links", str(wdir),
                                    f"edgefleet[{','.join(extras)}]"), env=_pip_env())
        if r.returncode:
            raise InstallError(f"pip install {what} into {venv} failed (pip's output is above)")
        return _installed(venv, stamp_path, stamp, final, say) or changed or _pip(venv, "freeze") != before
    tree = _edgefleet_tree(Path(source).resolve()) if source and Path(source).is_dir() else None
    if source and Path(source).is_dir() and tree is None:
        raise InstallError(f"--source {source}: not an edgefleet source tree (no pyproject.toml naming edgefleet)")
    if source is None:
        tree = checkout()
    with tempfile.TemporaryDirectory(prefix="edgefleet-install-") as tmp:
        if tree is not None:
            src = Path(tmp) / "edgefleet"
            _copy_source(tree, src)
            stamp = {"source": str(tree), "extras": extras, "digest": _tree_digest(src)}
            if _stamp_is(stamp_path, stamp):
                say(f"venv: {venv} already has edgefleet[{','.join(extras)}] from {tree}")
                return changed
            spec, what = f"{src}[{','.join(extras)}]", f"edgefleet[{','.join(extras)}] from {tree}"
        elif source and Path(source).is_file():
            stamp, spec = None, f"{Path(source).resolve()}[{','.join(extras)}]"
            what = spec
        else:
            stamp, spec = None, _with_extras(source or "edgefleet", extras)
            what = f"{spec} from the package index"
        say(f"venv: pip install {what} (a minute or two)")
        before = _pip(venv, "freeze")
        r = subprocess.run(_pip_cmd(venv, "install", "--quiet", spec), env=_pip_env())
        if r.returncode:
            raise InstallError(f"pip install {what} into {venv} failed (pip's output is above)")
    # a rebuilt checkout counts as a change (its version may not say so); from an index, what pip changed
    return _installed(venv, stamp_path, stamp, final, say) or changed or _pip(venv, "freeze") != before


def _stamp_is(path: Path, stamp: dict) -> bool:
    try:
        return json.loads(path.read_text()) == stamp
    except (OSError, ValueError):
        return False


def _manifest_digest(wdir: Path) -> str:
    from agent import wheels

    return hashlib.sha256((wdir / wheels.MANIFEST).read_bytes()).hexdigest()


def _installed(venv: Path, stamp_path: Path, stamp: dict | None, final: str | None, say: Say) -> bool:
    """After pip: the paths rewritten to ``final``, the stamp written, and the venv's edgefleet run once."""
    if final is not None:
        _relocate(venv, final, say)
    if stamp is not None:
        stamp_path.write_text(json.dumps(stamp))
    # through the venv's python (its scripts' first line may name a path that exists only in the image)
    version = subprocess.run([str(venv / "bin" / "python"), "-m", "edgefleet.cli", "--version"],
                             capture_output=True, text=True, env=_pip_env(), cwd="/")
    if version.returncode:
        raise InstallError(f"{venv}/bin/edgefleet does not run: {version.stderr.strip()}")
    say(f"venv: {venv}/bin/edgefleet is {version.stdout.strip()}")
    return stamp is not None


def _relocate(venv: Path, final: str, say: Say) -> None:
    """Make a venv made at ``venv`` name ``final`` instead (where it will be at boot): the scripts' first lines,
    pyvenv.cfg, the activate scripts, and the bytecode's file names."""
    old = str(venv).encode()
    if old == final.encode():
        return
    n = 0
    for p in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]:
        if p.is_symlink() or not p.is_file():
            continue
        data = p.read_bytes()
        if old in data and b"\0" not in data[:4096]:
            p.write_bytes(data.replace(old + b"/", final.encode() + b"/").replace(old, final.encode()))
            n += 1
    # compiled with the build path in co_filename; recompile naming the final path (tracebacks show it)
    subprocess.run([str(venv / "bin" / "python"), "-m", "compileall", "-q", "-f", "-s", str(venv), "-p", final,
                    str(venv / "lib")], capture_output=True, env=_pip_env())
    say(f"venv: paths rewritten to {final} ({n} files: the scripts start with #!{final}/bin/python)")


def _venv_in_root(root: Path, machine: str, wdir: Path, doc, extras: list[str], say: Say) -> bool:
    """Make /opt/edgefleet inside ``root`` with the root's own python (chroot, or emulated), offline from the
    wheelhouse ``wdir``; True if anything changed."""
    from agent import wheels

    run_in = wheels.in_root(root, machine)
    venv = _under(root, VENV)
    extras = list(dict.fromkeys(["agent", *extras]))
    stamp = {"wheelhouse": _manifest_digest(wdir), "extras": extras}
    if _stamp_is(venv / _STAMP, stamp):
        say(f"venv: {venv} already has edgefleet[{','.join(extras)}] from the wheelhouse {wdir}")
        return False
    how = "chroot" if machine == wheels.host_machine() else f"emulated {machine}"

    def inside(argv: list[str], what: str, capture: bool = False) -> str:
        r = subprocess.run(run_in(argv), stdin=subprocess.DEVNULL, text=True,
                           capture_output=capture, stdout=None if capture else subprocess.DEVNULL)
        if r.returncode:
            tail = [ln for ln in (r.stderr or r.stdout or "").splitlines() if ln.strip() and "proot warning" not in ln]
            raise InstallError(f"{what} in {root} ({how}) failed: {tail[-1] if tail else f'exit {r.returncode}'}")
        return r.stdout or ""

    t0 = time.monotonic()
    created = not (venv / "pyvenv.cfg").exists()
    if created:
        say(f"venv: creating {VENV} in {root} with its own python ({how}: /usr/bin/python3 -m venv {VENV})")
        inside(["/usr/bin/python3", "-m", "venv", VENV], "python3 -m venv", capture=True)
    staged = Path(tempfile.mkdtemp(prefix="edgefleet-wheels-", dir=_under(root, "/tmp")))
    try:
        for w in [*doc.wheels]:  # hard links where the root is on the same file system
            try:
                os.link(wdir / w.file, staged / w.file)
            except OSError:
                shutil.copy2(wdir / w.file, staged / w.file)
        guest = "/" + str(staged.relative_to(root))
        pip = [f"{VENV}/bin/python", "-m", "pip", "--disable-pip-version-check", "--no-cache-dir"]
        if not created:  # same version number, other code: pip would call it satisfied
            subprocess.run(run_in([*pip, "uninstall", "--quiet", "--yes", "edgefleet"]), capture_output=True,
                           stdin=subprocess.DEVNULL)
        say(f"venv: pip install edgefleet[{','.join(extras)}] offline from {wdir} ({how})")
        inside([*pip, "install", "--quiet", "--no-index", "--find-links", guest, f"edgefleet[{','.join(extras)}]"],
               "pip install", capture=True)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    (venv / _STAMP).write_text(json.dumps(stamp))
    version = inside([f"{VENV}/bin/edgefleet", "--version"], f"{VENV}/bin/edgefleet --version", capture=True)
    say(f"venv: {VENV}/bin/edgefleet in {root} is {version.strip()} ({time.monotonic() - t0:.0f} s)")
    return True


def _root_python(root: Path, machine: str) -> str:
    """The root's python3 version (X.Y), checked to make a venv; InstallError (one line) otherwise."""
    from agent import wheels

    probe = "import sys, venv, ensurepip; print('%d.%d' % sys.version_info[:2])"
    r = subprocess.run(wheels.in_root(root, machine)(["/usr/bin/python3", "-c", probe]), capture_output=True,
                       text=True, stdin=subprocess.DEVNULL)
    version = r.stdout.strip()
    if r.returncode or tuple(map(int, version.split("."))) < (3, 11):
        raise InstallError(f"{root}/usr/bin/python3 is not a Python >= 3.11 with venv and ensurepip "
                           f"({version or 'it does not run'}); in a Debian image: apt install python3-venv")
    return version


def _pip_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _pip_cmd(venv: Path, *args: str) -> list[str]:
    return [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args]


def _pip(venv: Path, *args: str) -> str:
    return subprocess.run(_pip_cmd(venv, *args), capture_output=True, text=True, env=_pip_env()).stdout


# --- the config ----------------------------------------------------------------------------------------------
def _render_config(device_id: str | None, broker: str | None, controller: str | None, api: str | None,
                   interval: float) -> bytes:
    def line(key: str, value: str | None) -> str:  # a JSON string is a TOML basic string
        return f"{key} = {json.dumps(value)}" if value is not None else f"# {key} = (from the enrollment)"

    text = Template(data_file("agent.toml.in").read_text()).substitute(
        device_id=line("device_id", device_id), broker=line("broker", broker),
        controller=line("controller", controller),
        api_line=f"api = {json.dumps(api)}" if api else f"# api = {json.dumps(agent_config.DEFAULT_API)}",
        telemetry_interval_s=repr(float(interval)))
    return text.encode()


def _check_config(content: bytes, origin: str) -> agent_config.AgentConfig:
    """Validate with agent.config, as the agent will; and the service can only write its StateDirectory."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agent.toml"
        path.write_bytes(content)
        try:
            cfg = agent_config.load(path)
        except agent_config.ConfigError as e:
            raise InstallError(f"{origin}: {str(e).removeprefix(f'{path}: ')}") from None
    if Path(cfg.state_dir) != Path(STATE_DIR):
        raise InstallError(f"{origin}: state_dir must be {STATE_DIR} for the service (its StateDirectory=; "
                           f"ProtectSystem=strict makes every other path read-only)")
    if Path(cfg.trust_dir) == Path(STATE_DIR) or Path(STATE_DIR) in Path(cfg.trust_dir).parents:
        raise InstallError(f"{origin}: trust_dir {cfg.trust_dir} is inside the state dir, which the agent can write: "
                           f"keep it under /etc/edgefleet (the default /etc/edgefleet/trust)")
    return cfg


def _plan_config(target: Path, *, config_file: Path | None, device_id: str | None, broker: str | None,
                 controller: str | None, api: str | None, telemetry_interval: float | None,
                 force: bool, enrolling: bool = False) -> bytes | None:
    """The config to write (validated), or None to keep the one there. Raises before anything is changed.
    ``enrolling``: a --token was given, so the device id and broker come from the enrollment."""
    flags = {"--device-id": device_id, "--broker": broker, "--controller": controller}
    if enrolling:
        flags = {"--controller": controller}
    given = [f for f, v in {**flags, "--api": api, "--telemetry-interval": telemetry_interval}.items()
             if v is not None]
    if config_file is not None:
        if given:
            raise InstallError(f"--config FILE or {', '.join(given)}: not both")
        try:
            content = config_file.read_bytes()
        except OSError as e:
            raise InstallError(f"cannot read {config_file}: {e.strerror}") from None
        _check_config(content, str(config_file))
    elif given:
        missing = [f for f, v in flags.items() if v is None]
        if missing and not target.exists():
            raise InstallError(f"a new config needs {', '.join(missing)} (or --config FILE)")
        if missing:
            raise InstallError(f"{target} exists; to write a new one give {', '.join(flags)} "
                               f"(missing: {', '.join(missing)}) with --force")
        content = _render_config(device_id, broker, controller, api,
                                 10.0 if telemetry_interval is None else telemetry_interval)
        _check_config(content, "the config from --device-id/--broker/--controller")
    elif target.exists():
        _check_config(target.read_bytes(), str(target))
        return None
    else:
        raise InstallError(f"no config at {target}: give --controller --token --ca-fingerprint (or --device-id, "
                           f"--broker and --controller, or --config FILE)")
    if target.exists() and target.read_bytes() != content and not force:
        raise InstallError(f"{target} exists and differs; --force overwrites it (or leave out the config "
                           f"options to keep it)")
    return content


def _write(path: Path, content: bytes, mode: int, gid: int = 0) -> None:
    """Atomically: a temp file in the same directory, fsynced, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chown(tmp, 0, gid)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _lookup(root: Path, table: str, name: str) -> int | None:
    """The id of user/group ``name`` (table ``passwd`` or ``group``) on this machine, or in ROOT/etc/ for an image."""
    if root == Path("/"):
        try:
            return pwd.getpwnam(name).pw_uid if table == "passwd" else grp.getgrnam(name).gr_gid
        except KeyError:
            return None
    try:
        lines = _under(root, f"/etc/{table}").read_text().splitlines()
    except OSError:
        return None
    return next((int(f[2]) for f in (ln.split(":") for ln in lines) if len(f) > 2 and f[0] == name), None)


def _image(root: Path) -> bool:
    """``root`` is an image's root filesystem (it has its own /etc/passwd): the service's user is made in it."""
    return root != Path("/") and _under(root, "/etc/passwd").is_file()


def _group_id(say: Say, root: Path = Path("/")) -> int:
    gid = _lookup(root, "group", GROUP)
    if gid is None:
        say(f"config: no group {GROUP} on this machine: the config stays root:root (create the group in the "
            f"image, then chgrp {GROUP} etc/edgefleet/agent.toml)")
        return 0
    return gid


def _ensure_user(say: Say, root: Path = Path("/")) -> bool:
    """The service's user and groups, on this machine or (``--prefix``) in an image's /etc (the unit's User= and
    SupplementaryGroups= must exist when the image boots)."""
    changed = False
    prefix = [] if root == Path("/") else ["--prefix", str(root)]
    where = "" if root == Path("/") else f" in {root}"
    for group in (API_GROUP, GROUP):
        if _lookup(root, "group", group) is None:
            say(f"user: groupadd --system {group}{where}"
                + (" (the local API socket's group: add applications' users to it)" if group == API_GROUP else ""))
            subprocess.run(["groupadd", *prefix, "--system", group], check=True)
            changed = True
    if _lookup(root, "passwd", USER) is not None:
        say(f"user: {USER} exists{where}")
    else:
        shell = "/usr/sbin/nologin" if _under(root, "/usr/sbin/nologin").exists() else "/bin/false"
        say(f"user: useradd --system {USER}{where} (home {STATE_DIR}, shell {shell})")
        subprocess.run(["useradd", *prefix, "--system", "--gid", GROUP, "--home-dir", STATE_DIR, "--no-create-home",
                        "--shell", shell, "--comment", "edgefleet agent", USER], check=True)
        changed = True
    return changed


# --- the network drop-in ---------------------------------------------------------------------------------------
def network_dropin(urls: dict[str, str], resolv_conf: Path = Path("/etc/resolv.conf")) -> bytes:
    """The unit's drop-in that lets the agent reach only localhost, the hosts of ``urls`` ({what: URL}, e.g. the
    controller's and the broker's; resolved now) and the nameservers of ``resolv_conf`` (so names still
    resolve). Raises InstallError naming a host that does not resolve."""
    lines = ["# Written by `edgefleet agent install` from agent.toml and /etc/resolv.conf: the only addresses the",
             "# agent may exchange packets with. Re-run install after the controller's or the broker's address",
             "# changes (it rewrites this file only when it changed). Addresses of your own (e.g. the clients of a",
             "# TCP api) go in a drop-in next to this one, e.g. local.conf with IPAddressAllow=ADDRESS.",
             "[Service]", "IPAddressDeny=any", "IPAddressAllow=localhost"]
    for what, url in urls.items():
        host = urlsplit(url).hostname
        if not host:
            continue
        try:
            addrs = sorted({ai[4][0] for ai in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})
        except (OSError, UnicodeError) as e:
            raise InstallError(f"cannot resolve the {what}'s host {host} ({e}): install writes the addresses the "
                               f"agent may reach into {NETWORK_DROPIN}; make {host} resolvable here, or use an IP "
                               f"address in the config") from None
        lines.append(f"# the {what}: {host}")
        lines += [f"IPAddressAllow={a.split('%')[0]}" for a in addrs]
    try:
        resolv = resolv_conf.read_text(errors="replace").splitlines()
    except OSError:
        resolv = []
    servers = [ln.split()[1].split("%")[0] for ln in resolv if ln.split()[:1] == ["nameserver"] and len(ln.split()) > 1]
    servers = [a for a in dict.fromkeys(servers) if _is_ip(a)]
    if servers:
        lines.append(f"# the nameservers in {resolv_conf}")
        lines += [f"IPAddressAllow={a}" for a in servers]
    return ("\n".join(lines) + "\n").encode()


def _trust(trust_dir: Path, keys: list, say: Say) -> None:
    """The release keys into trust_dir, root's (0755, each key 0644): under ProtectSystem=strict, and by its
    owner and mode, the agent can read it and never write it."""
    from agent import trustdir

    for key in keys:
        path, new = trustdir.add(trust_dir, key)
        say(f"trust: {'wrote' if new else 'already trusts'} release key {key.name} ({key.keyid}): {path}")
    if trust_dir.is_dir():
        st = trust_dir.stat()
        if (st.st_uid, st.st_gid, st.st_mode & 0o7777) != (0, 0, trustdir.DIR_MODE):
            say(f"trust: {trust_dir} made root:root 0755 (the agent reads it, only root writes it)")
            os.chown(trust_dir, 0, 0)
            os.chmod(trust_dir, trustdir.DIR_MODE)
    if not trustdir.trusted_files(trust_dir):
        say(f"warning: no release key in {trust_dir}: the device will refuse every bundle until one is added "
            f"(--trust KEY.pub, or edgefleet agent trust add KEY.pub)")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


# --- the commands --------------------------------------------------------------------------------------------
def _identity(root: Path):
    """The enrollment in the service's state dir, or None."""
    from agent import identity

    try:
        return identity.Identity.load(_under(root, STATE_DIR))
    except identity.IdentityError:
        return None


def _enroll(root: Path, controller: str | None, token: str, ca_fingerprint: str, device_id: str | None,
            say: Say) -> None:
    """Enroll into the service's state dir (once: an enrolled state dir is kept), owned by the service's user."""
    from agent import identity

    state = _under(root, STATE_DIR)
    existing = identity.Identity.load(state)
    if existing is not None:
        say(f"identity: already enrolled as {existing.device_id} (certificate until "
            f"{identity.utc(existing.not_after)}); keeping it")
        return
    if controller is None:
        try:
            controller = tomllib.loads(_under(root, CONFIG).read_text()).get("controller")
        except (OSError, tomllib.TOMLDecodeError):
            controller = None
        if controller is None:
            raise InstallError("--token needs --controller https://HOST:PORT (or a config naming the controller)")
    state.mkdir(parents=True, exist_ok=True)
    ident = identity.enroll(state, controller, token, ca_fingerprint, device_id)
    say(f"identity: enrolled as {ident.device_id} (key made here, certificate until {identity.utc(ident.not_after)}, "
        f"broker {ident.broker})")
    uid, gid = _lookup(root, "passwd", USER), _lookup(root, "group", GROUP)
    if uid is not None and gid is not None:  # on this machine, or in an image with the user
        for p in [state, *state.rglob("*")]:
            os.chown(p, uid, gid)


def _plan_accelerators(root: Path, wanted: list[str] | tuple[str, ...] | None) -> list[str]:
    """The kinds of accelerator the unit lets the agent use: ``wanted`` (``--accelerator``, repeatable; default
    auto: the kinds whose device nodes this machine's /dev has, or for --root the image's)."""
    from agent.systemd import ACCELERATORS, accelerators_present

    wanted = list(wanted or ["auto"])
    bad = [w for w in wanted if w not in ACCELERATOR_CHOICES]
    if bad:
        raise InstallError(f"--accelerator {bad[0]!r}: choose from {', '.join(ACCELERATOR_CHOICES)}")
    if "none" in wanted:
        if set(wanted) != {"none"}:
            raise InstallError("--accelerator none goes alone (it gives the agent no accelerator)")
        return []
    kinds = set(w for w in wanted if w != "auto")
    if "auto" in wanted:
        kinds |= set(accelerators_present(_under(root, "/dev")))
    return [k for k in ACCELERATORS if k in kinds]


def _accelerator_unit(root: Path, kinds: list[str], say: Say) -> bool:
    """Write (or remove, for no accelerators) the unit's accelerators.conf; True when it changed."""
    from agent.systemd import ACCELERATOR_GROUPS, accelerator_dropin

    path = _under(root, ACCELERATOR_DROPIN)
    content = accelerator_dropin(kinds, _under(root, "/dev"))
    if content is None:
        if path.exists():
            say(f"unit: removing {path} (no accelerators: PrivateDevices=yes)")
            path.unlink()
            return True
        return False
    if "SupplementaryGroups=" in content.decode():
        for group in ACCELERATOR_GROUPS:
            if _lookup(root, "group", group) is None:
                say(f"unit: no group {group} here: the unit will not start until it exists (groupadd -r {group})")
    if path.exists() and path.read_bytes() == content:
        say(f"unit: {path} is up to date")
        return False
    say(f"unit: writing {path} (the agent may use {', '.join(kinds)})")
    _write(path, content, 0o644)
    return True


def install(*, root: str | Path = "/", device_id: str | None = None, broker: str | None = None,
            controller: str | None = None, api: str | None = None, telemetry_interval: float | None = None,
            config_file: str | Path | None = None, force: bool = False, source: str | None = None,
            extras: list[str] | tuple[str, ...] = (), python: str | None = None, token: str | None = None,
            ca_fingerprint: str | None = None, trust: list[str | Path] | tuple = (),
            wheels: str | Path | None = None, accelerators: list[str] | tuple[str, ...] | None = None,
            say: Say = print) -> None:
    _require_root("install")
    root = Path(root).resolve()
    kinds = _plan_accelerators(root, accelerators)
    config_path, unit_path = _under(root, CONFIG), _under(root, UNIT)
    if (token is None) != (ca_fingerprint is None):
        raise InstallError("--token and --ca-fingerprint go together (both from `edgefleet fleet enroll`)")
    plan_venv = _plan_venv(root, wheels, source, list(extras), python)
    # everything that can be refused is checked before anything is changed
    content = _plan_config(config_path, config_file=Path(config_file) if config_file else None,
                           device_id=device_id, broker=broker, controller=controller, api=api,
                           telemetry_interval=telemetry_interval, force=force, enrolling=token is not None)
    unit = data_file(f"{SERVICE}.service").read_bytes()
    cfg = _check_config(content if content is not None else config_path.read_bytes(), str(config_path))
    from agent import trustdir

    keys = trustdir.read_keys(trust)
    trust_path = _under(root, cfg.trust_dir)
    dropin_path = _under(root, NETWORK_DROPIN)
    dropin = network_dropin({k: v for k, v in (("controller", cfg.controller), ("broker", cfg.broker)) if v},
                            _under(root, "/etc/resolv.conf"))
    old_umask = os.umask(0o022)  # the venv must be readable by the service's user
    try:
        changed = False
        if root == Path("/") or _image(root):
            changed |= _ensure_user(say, root)
        else:
            say(f"--root {root}: no user (no etc/passwd there), no systemctl")
        changed |= plan_venv(say)
        gid = _group_id(say, root)
        if content is None:
            say(f"config: keeping {config_path}")
            os.chown(config_path, 0, gid)
            os.chmod(config_path, 0o640)
        elif config_path.exists() and config_path.read_bytes() == content:
            say(f"config: {config_path} is up to date")
            os.chown(config_path, 0, gid)
            os.chmod(config_path, 0o640)
        else:
            say(f"config: writing {config_path}")
            _write(config_path, content, 0o640, gid)
            changed = True
        if unit_path.exists() and unit_path.read_bytes() == unit:
            say(f"unit: {unit_path} is up to date")
        else:
            say(f"unit: writing {unit_path}")
            _write(unit_path, unit, 0o644)
            changed = True
        _trust(trust_path, keys, say)
        if token is not None:
            _enroll(root, controller, token, ca_fingerprint, device_id, say)
        ident = _identity(root)
        if ident is not None:  # the addresses the enrollment gave (the config's, when it names its own, win)
            dropin = network_dropin({"controller": cfg.controller or ident.controller,
                                     "broker": cfg.broker or ident.broker}, _under(root, "/etc/resolv.conf"))
        if dropin_path.exists() and dropin_path.read_bytes() == dropin:
            say(f"unit: {dropin_path} is up to date")
        else:
            say(f"unit: writing {dropin_path} (the addresses the agent may reach)")
            _write(dropin_path, dropin, 0o644)
            changed = True
        changed |= _accelerator_unit(root, kinds, say)
        where = agent_config.parse_api_address(cfg.api) if cfg.api else None
        if isinstance(where, tuple) and not agent_config.is_loopback(where[0]):
            say(f"unit: the api listens on {cfg.api} for other hosts: allow their addresses with "
                f"IPAddressAllow= in a drop-in of your own ({dropin_path.parent}/local.conf)")
    finally:
        os.umask(old_umask)
    if _systemd_running(root):
        _systemctl(say, "daemon-reload")
        was_active = _systemctl(say, "is-active", "--quiet", SERVICE, check=False)
        _systemctl(say, "enable", "--now", SERVICE)
        if was_active and changed:
            _systemctl(say, "restart", SERVICE)
        say(f"done: {SERVICE} is running (systemctl status {SERVICE}; journalctl -u {SERVICE} -f)")
    elif root == Path("/"):
        say(f"done; systemd is not running here (no /run/systemd/system): where it runs, "
            f"`systemctl enable --now {SERVICE}` starts the agent")
    else:
        say(f"done under {root} (an image build enables the unit with `systemctl --root {root} enable {SERVICE}`)")


def _plan_venv(root: Path, wheels_dir: str | Path | None, source: str | None, extras: list[str],
               python: str | None) -> Callable[[Say], bool]:
    """How the venv will be made, every refusal raised now (before anything is changed): a function doing it."""
    from agent import wheels

    if wheels_dir is not None and source is not None:
        raise InstallError("--wheels DIR or --source: not both")
    machine = wheels.root_machine(root) if root != Path("/") else None
    where = "this machine" if machine is None else f"the root {root}"
    machine = machine or wheels.host_machine()
    if machine in wheels.ARM32:
        raise InstallError(f"{where} is {machine}: {wheels.ARM32_WHY.replace('--platform aarch64', 'an aarch64 image')}")
    doc = None
    if wheels_dir is not None:
        wdir = Path(wheels_dir).absolute()
        doc = wheels.read(wdir)
        if doc.platform != machine:
            raise InstallError(f"--wheels {wdir} is for {doc.platform}, {where} is {machine}: make one with "
                               f"`edgefleet agent bundle-wheels --platform {machine}`")
        missing = [e for e in extras if e not in doc.extras]
        if missing:
            raise InstallError(f"--extra {', '.join(missing)}: the wheelhouse {wdir} holds only "
                               f"{', '.join(doc.extras)} (bundle-wheels --runtimes adds runtimes)")
        extras = [*doc.extras, *extras]
    image = root != Path("/") and wheels.root_machine(root) is not None
    if not image:
        final = VENV if root != Path("/") else None
        return lambda say: _venv(_under(root, VENV), source, extras, python, say,
                                 None if doc is None else (wdir, doc), final)
    if source is not None or python is not None:
        raise InstallError(f"{root} holds a python3, so the venv is made by it from a wheelhouse: give --wheels DIR "
                           f"(from `edgefleet agent bundle-wheels --platform {machine}`) instead of "
                           f"{'--source' if source is not None else '--python'}")
    version = _root_python(root, machine)
    if doc is not None and doc.python != version:
        raise InstallError(f"--wheels {wdir} is for CPython {doc.python}, {root}/usr/bin/python3 is {version}: "
                           f"make one with `edgefleet agent bundle-wheels --platform {machine} "
                           f"--python-version {version}`")

    def make(say: Say) -> bool:
        nonlocal doc, wdir
        if doc is not None:
            return _venv_in_root(root, machine, wdir, doc, extras, say)
        with tempfile.TemporaryDirectory(prefix="edgefleet-wheelhouse-") as tmp:
            say(f"venv: no --wheels: making a wheelhouse for {machine} / CPython {version} from this checkout")
            runtimes = [r for r, e in (("tflite", "litert"), ("openvino", "openvino")) if e in extras]
            wdir = Path(tmp) / "wheels"
            doc = wheels.bundle(platform=machine, out=wdir, runtimes=runtimes, python=version,
                                say=lambda line: say(f"venv: {line}"))
            return _venv_in_root(root, machine, wdir, doc, extras, say)

    return make


def uninstall(*, root: str | Path = "/", purge: bool = False, say: Say = print) -> None:
    _require_root("uninstall")
    root = Path(root).resolve()
    venv, unit_path = _under(root, VENV), _under(root, UNIT)
    if _systemd_running(root):
        if unit_path.exists():
            _systemctl(say, "disable", "--now", SERVICE, check=False)
    elif root != Path("/"):
        say(f"--root {root}: no user, no systemctl")
    for dropin_path in (_under(root, ACCELERATOR_DROPIN), _under(root, NETWORK_DROPIN)):
        if dropin_path.exists():
            say(f"unit: removing {dropin_path}")
            dropin_path.unlink()
            if not any(dropin_path.parent.iterdir()):
                dropin_path.parent.rmdir()
    if unit_path.exists():
        say(f"unit: removing {unit_path}")
        unit_path.unlink()
        if _systemd_running(root):
            _systemctl(say, "daemon-reload")
            _systemctl(say, "reset-failed", SERVICE, check=False)
    else:
        say(f"unit: {unit_path} is not there")
    if (venv / "pyvenv.cfg").exists():
        say(f"venv: removing {venv}")
        shutil.rmtree(venv)
    elif venv.exists():
        say(f"venv: {venv} is not a venv; leaving it")
    else:
        say(f"venv: {venv} is not there")
    if not purge:
        say(f"kept the config {_under(root, CONFIG)} and the state {_under(root, STATE_DIR)} (--purge removes "
            f"them, the {USER} user and the {API_GROUP} group)")
        return
    for what, path in (("config", _under(root, CONFIG).parent), ("state", _under(root, STATE_DIR))):
        if path.exists():
            say(f"{what}: removing {path}")
            shutil.rmtree(path)
        else:
            say(f"{what}: {path} is not there")
    if root == Path("/"):
        try:
            pwd.getpwnam(USER)
            say(f"user: userdel {USER}")
            subprocess.run(["userdel", USER], check=True)
        except KeyError:
            say(f"user: {USER} is not there")
        for group in (GROUP, API_GROUP):
            try:
                grp.getgrnam(group)
                say(f"user: groupdel {group}")
                subprocess.run(["groupdel", group], check=True)
            except KeyError:
                pass
