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
  the system user and group ``edgefleet``   (not under --root)
  the group ``edgefleet-api``               the local API socket's group: applications join it (not under --root)

and, where systemd runs (``/run/systemd/system`` exists; never under --root), ``systemctl daemon-reload`` and
``systemctl enable --now edgefleet-agent``. Every step checks before it acts, so a second run changes nothing.

``--root DIR`` is for tests and for staging: no user, no systemctl, and the venv's scripts name
DIR/opt/edgefleet (venvs are not relocatable), so an image build runs install inside the image's chroot.
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


def _venv(venv: Path, source: str | None, extras: list[str], python: str | None, say: Say) -> bool:
    """Create the venv if needed and pip install edgefleet into it; True if anything changed."""
    changed = False
    if not (venv / "bin" / "python").exists():
        exe = _base_python(python)
        say(f"venv: creating {venv} ({exe} -m venv)")
        subprocess.run([exe, "-m", "venv", str(venv)], check=True)
        changed = True
    extras = list(dict.fromkeys(["agent", *extras]))
    tree = _edgefleet_tree(Path(source).resolve()) if source and Path(source).is_dir() else None
    if source and Path(source).is_dir() and tree is None:
        raise InstallError(f"--source {source}: not an edgefleet source tree (no pyproject.toml naming edgefleet)")
    if source is None:
        tree = checkout()
    stamp_path = venv / _STAMP
    with tempfile.TemporaryDirectory(prefix="edgefleet-install-") as tmp:
        if tree is not None:
            src = Path(tmp) / "edgefleet"
            _copy_source(tree, src)
            stamp = {"source": str(tree), "extras": extras, "digest": _tree_digest(src)}
            try:
                if json.loads(stamp_path.read_text()) == stamp:
                    say(f"venv: {venv} already has edgefleet[{','.join(extras)}] from {tree}")
                    return changed
            except (OSError, ValueError):
                pass
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
    if stamp is not None:
        stamp_path.write_text(json.dumps(stamp))
    version = subprocess.run([str(venv / "bin" / "edgefleet"), "--version"], capture_output=True, text=True)
    if version.returncode:
        raise InstallError(f"{venv}/bin/edgefleet does not run: {version.stderr.strip()}")
    say(f"venv: {venv}/bin/edgefleet is {version.stdout.strip()}")
    # a rebuilt checkout counts as a change (its version may not say so); from an index, what pip changed
    return changed or stamp is not None or _pip(venv, "freeze") != before


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


def _group_id(say: Say) -> int:
    try:
        return grp.getgrnam(GROUP).gr_gid
    except KeyError:
        say(f"config: no group {GROUP} on this machine: the config stays root:root (create the group in the "
            f"image, then chgrp {GROUP} etc/edgefleet/agent.toml)")
        return 0


def _ensure_user(say: Say) -> bool:
    changed = False
    try:
        grp.getgrnam(API_GROUP)
    except KeyError:
        say(f"user: groupadd --system {API_GROUP} (the local API socket's group: add applications' users to it)")
        subprocess.run(["groupadd", "--system", API_GROUP], check=True)
        changed = True
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        say(f"user: groupadd --system {GROUP}")
        subprocess.run(["groupadd", "--system", GROUP], check=True)
        changed = True
    try:
        pwd.getpwnam(USER)
        say(f"user: {USER} exists")
    except KeyError:
        shell = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
        say(f"user: useradd --system {USER} (home {STATE_DIR}, shell {shell})")
        subprocess.run(["useradd", "--system", "--gid", GROUP, "--home-dir", STATE_DIR, "--no-create-home",
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
    if root == Path("/"):
        uid, gid = pwd.getpwnam(USER).pw_uid, grp.getgrnam(GROUP).gr_gid
        for p in [state, *state.rglob("*")]:
            os.chown(p, uid, gid)


def install(*, root: str | Path = "/", device_id: str | None = None, broker: str | None = None,
            controller: str | None = None, api: str | None = None, telemetry_interval: float | None = None,
            config_file: str | Path | None = None, force: bool = False, source: str | None = None,
            extras: list[str] | tuple[str, ...] = (), python: str | None = None, token: str | None = None,
            ca_fingerprint: str | None = None, trust: list[str | Path] | tuple = (), say: Say = print) -> None:
    _require_root("install")
    root = Path(root).resolve()
    venv, config_path, unit_path = _under(root, VENV), _under(root, CONFIG), _under(root, UNIT)
    if (token is None) != (ca_fingerprint is None):
        raise InstallError("--token and --ca-fingerprint go together (both from `edgefleet fleet enroll`)")
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
        if root == Path("/"):
            changed |= _ensure_user(say)
        else:
            say(f"--root {root}: no user, no systemctl")
        changed |= _venv(venv, source, list(extras), python, say)
        gid = _group_id(say)
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


def uninstall(*, root: str | Path = "/", purge: bool = False, say: Say = print) -> None:
    _require_root("uninstall")
    root = Path(root).resolve()
    venv, unit_path = _under(root, VENV), _under(root, UNIT)
    if _systemd_running(root):
        if unit_path.exists():
            _systemctl(say, "disable", "--now", SERVICE, check=False)
    elif root != Path("/"):
        say(f"--root {root}: no user, no systemctl")
    dropin_path = _under(root, NETWORK_DROPIN)
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
