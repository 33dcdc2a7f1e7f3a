"""The agent as a systemd service, on real things: sd_notify on a real socket from a real `edgefleet agent run`
against a real mosquitto, real signals, the unit through systemd-analyze, install/uninstall into a real
directory, and, where systemd is PID 1, a real SIGKILL and restart."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from util import issue_tls, release_pub, wait_for

from agent import protocol, systemd
from agent.config import AgentConfig, load, validate
from agent.daemon import Agent

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "edgefleet-agent.service"
OUTPUT = "save_infer_model/scale_0.tmp_1"
EDGEFLEET = [sys.executable, "-m", "edgefleet.cli"]
IS_ROOT = os.geteuid() == 0


class NotifySocket:
    """A datagram socket standing where systemd's would be: records every message it is sent."""

    def __init__(self, address: str) -> None:
        self.address = address  # as NOTIFY_SOCKET says it: a path, or @name in the abstract namespace
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self._sock.settimeout(0.2)
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                self.messages.append(self._sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def lines(self) -> list[str]:
        """Every KEY=VALUE line received, in order."""
        return [line for m in list(self.messages) for line in m.split("\n")]

    def count(self, line: str) -> int:
        return self.lines().count(line)

    def close(self) -> None:
        self._closed = True
        self._reader.join()
        self._sock.close()


@pytest.fixture
def notify_socket():
    s = NotifySocket(f"@edgefleet-test-{uuid.uuid4().hex}")
    yield s
    s.close()


def _write_config(path: Path, *, broker, api_port: int, state_dir: Path, interval: float | str = 1.0,
                  keepalive: int = 15) -> None:
    """d1's config on the ``broker`` fixture: its certificate from the broker's CA given as TLS files (the way a
    device whose identity comes from elsewhere is set up), no controller to speak of."""
    tls = issue_tls(broker.pki, "d1", path.parent / "tls")
    value = f'"{interval}"' if isinstance(interval, str) else repr(interval)
    path.write_text(f'device_id = "d1"\nbroker = "{broker.url}"\ncontroller = "https://127.0.0.1:9"\n'
                    f'state_dir = "{state_dir}"\napi = "127.0.0.1:{api_port}"\n'
                    f'tls_ca = "{tls.ca}"\ntls_cert = "{tls.cert}"\ntls_key = "{tls.key}"\n'
                    f"telemetry_interval_s = {value}\nkeepalive_s = {keepalive}\n")


class Telemetry:
    """A paho subscriber to d1's telemetry (with the controller's identity: only it may read a device's
    reports): records each message's interval_s."""

    def __init__(self, broker) -> None:
        from agent.transport import make_client, parse_url

        self.intervals: list[float] = []
        url = parse_url(broker.url)
        self._c = make_client(url, f"watcher-{uuid.uuid4().hex[:8]}", broker.pki.controller_tls())
        topic = protocol.topic("d1", protocol.TELEMETRY)
        self._c.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self._c.on_message = lambda c, u, m: self.intervals.append(
            protocol.decode(protocol.TELEMETRY, m.payload).interval_s)
        self._c.connect(url.host, url.port)
        self._c.loop_start()

    def close(self) -> None:
        self._c.disconnect()
        self._c.loop_stop()


@pytest.fixture
def agent_process(tmp_path, mosquitto, free_port, notify_socket):
    """A real `edgefleet agent run` with NOTIFY_SOCKET and a 400 ms watchdog, as systemd would start it."""
    cfg = tmp_path / "agent.toml"
    _write_config(cfg, broker=mosquitto, api_port=free_port, state_dir=tmp_path / "state")
    log = tmp_path / "agent.log"
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "400000"}
    with open(log, "wb") as err:
        proc = subprocess.Popen([*EDGEFLEET, "agent", "run", "--config", str(cfg)], env=env, stderr=err,
                                stdout=subprocess.DEVNULL)
    proc.config, proc.log = cfg, log
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ready_then_watchdog_then_stopping_on_sigterm(agent_process, notify_socket, mosquitto):
    wait_for(lambda: "READY=1" in notify_socket.lines() or agent_process.poll() is not None, what="READY=1")
    assert agent_process.poll() is None, agent_process.log.read_text()
    wait_for(lambda: notify_socket.count("WATCHDOG=1") >= 5, what="WATCHDOG=1, repeatedly")
    lines = notify_socket.lines()
    assert lines.index("READY=1") < lines.index("WATCHDOG=1")  # the watchdog is petted by the serving loop
    wait_for(lambda: any(x.startswith("STATUS=serving no model yet; connected to") for x in notify_socket.lines()),
             what="STATUS saying the broker is connected")  # READY=1 did not wait for it

    agent_process.send_signal(signal.SIGTERM)
    assert agent_process.wait(timeout=60) == 0, agent_process.log.read_text()
    lines = notify_socket.lines()
    assert "STOPPING=1" in lines and lines.index("STOPPING=1") > lines.index("READY=1")
    assert "Traceback" not in agent_process.log.read_text()


def test_sighup_reloads_the_config_and_refuses_an_invalid_one(agent_process, notify_socket, mosquitto, free_port,
                                                              tmp_path):
    telemetry = Telemetry(mosquitto)
    try:
        wait_for(lambda: "READY=1" in notify_socket.lines() or agent_process.poll() is not None, what="READY=1")
        assert agent_process.poll() is None, agent_process.log.read_text()
        wait_for(lambda: 1.0 in telemetry.intervals, what="telemetry every 1 s")

        # a valid change: the interval applies live; keepalive_s needs a restart, and the log says so
        _write_config(agent_process.config, broker=mosquitto, api_port=free_port, state_dir=tmp_path / "state",
                      interval=0.25, keepalive=20)
        agent_process.send_signal(signal.SIGHUP)
        wait_for(lambda: notify_socket.count("RELOADING=1") == 1 and notify_socket.count("READY=1") == 2,
                 what="RELOADING=1, then READY=1")
        reload_msg = next(m for m in notify_socket.messages if "RELOADING=1" in m)
        assert "MONOTONIC_USEC=" in reload_msg
        lines = notify_socket.lines()
        assert lines.index("RELOADING=1") < len(lines) - 1 - lines[::-1].index("READY=1")
        wait_for(lambda: 0.25 in telemetry.intervals, what="telemetry at the new interval")
        log = agent_process.log.read_text()
        assert "reload: telemetry_interval_s 1.0 -> 0.25" in log
        assert "reload: keepalive_s changed; takes effect at the next restart" in log

        # an invalid file: one line naming the field, and the agent runs on with the config it had
        agent_process.config.write_text(agent_process.config.read_text().replace(
            "telemetry_interval_s = 0.25", 'telemetry_interval_s = "fast"'))
        agent_process.send_signal(signal.SIGHUP)
        wait_for(lambda: notify_socket.count("RELOADING=1") == 2 and notify_socket.count("READY=1") == 3,
                 what="the second reload's RELOADING=1, READY=1")
        refused = [x for x in agent_process.log.read_text().splitlines() if "reload refused" in x]
        assert len(refused) == 1 and "telemetry_interval_s" in refused[0], refused
        assert any(x.startswith("STATUS=reload refused") for x in notify_socket.lines())
        seen, pets = len(telemetry.intervals), notify_socket.count("WATCHDOG=1")
        wait_for(lambda: len(telemetry.intervals) > seen + 2 and notify_socket.count("WATCHDOG=1") > pets + 2,
                 what="telemetry and watchdog going on after a refused reload")
        assert set(telemetry.intervals[seen:]) == {0.25}
        assert agent_process.poll() is None
    finally:
        telemetry.close()
    agent_process.send_signal(signal.SIGTERM)
    assert agent_process.wait(timeout=60) == 0, agent_process.log.read_text()


def test_the_watchdog_check_names_a_dead_network_thread(tmp_path, mosquitto, free_port):
    tls = issue_tls(mosquitto.pki, "d1", tmp_path / "tls")
    agent = Agent(validate(AgentConfig(device_id="d1", broker=mosquitto.url, controller="https://127.0.0.1:9",
                                       state_dir=str(tmp_path / "state"), api=f"127.0.0.1:{free_port}",
                                       telemetry_interval_s=0.5, tls_ca=tls.ca, tls_cert=tls.cert, tls_key=tls.key)))
    agent.start()
    try:
        assert agent._wedged() is None
        agent.link.stop()  # paho's network thread ends: no more WATCHDOG=1, systemd would restart the agent
        assert agent._wedged() == "the MQTT network thread has died"
    finally:
        agent.stop()
    assert agent._wedged() == "the telemetry thread has died"


def test_notify_speaks_to_a_path_socket_and_the_watchdog_reads_its_environment(tmp_path, monkeypatch):
    assert not systemd.notify("READY=1")  # no NOTIFY_SOCKET: a no-op
    s = NotifySocket(str(tmp_path / "notify"))
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", s.address)
        assert systemd.status("two\nlines") and systemd.ready()
        wait_for(lambda: s.lines() == ["STATUS=two lines", "READY=1"], what="the two messages")
    finally:
        s.close()
    env = {"NOTIFY_SOCKET": s.address, "WATCHDOG_USEC": "30000000"}
    assert systemd.Watchdog.from_env(env).period_s == 15
    assert systemd.Watchdog.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).enabled
    assert not systemd.Watchdog.from_env({**env, "WATCHDOG_PID": "1"}).enabled  # inherited, not ours
    assert not systemd.Watchdog.from_env({"WATCHDOG_USEC": "30000000"}).enabled


# --- the unit ------------------------------------------------------------------------------------------------
def _verify(unit_text: str, exec_start: Path, tmp_path: Path, dropin: str | None = None,
            accelerators: str | None = None) -> Path:
    """systemd-analyze verify a copy of the unit whose ExecStart names ``exec_start`` (verify wants it to exist),
    with ``dropin`` as its network.conf and ``accelerators`` as its accelerators.conf; it exits 0 even for unknown
    keys, so any output at all fails the test. Returns the copy."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (scripts/setup.sh installs Debian's systemd package)")
    assert "ExecStart=/opt/edgefleet/bin/edgefleet " in unit_text
    d = tmp_path / "verify"
    d.mkdir(exist_ok=True)
    unit = d / "edgefleet-agent.service"
    unit.write_text(unit_text.replace("ExecStart=/opt/edgefleet/bin/edgefleet ", f"ExecStart={exec_start} "))
    if dropin is not None:
        (d / "edgefleet-agent.service.d").mkdir(exist_ok=True)
        (d / "edgefleet-agent.service.d" / "network.conf").write_text(dropin)
    if accelerators is not None:
        (d / "edgefleet-agent.service.d").mkdir(exist_ok=True)
        (d / "edgefleet-agent.service.d" / "accelerators.conf").write_text(accelerators)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    return unit


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    exe = Path(sys.executable).parent / "edgefleet"
    assert exe.exists(), exe
    _verify(UNIT.read_text(), exe, tmp_path)
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(UNIT)
    s = unit["Service"]
    assert s["Type"] == "notify" and s["WatchdogSec"] == "30" and s["Restart"] == "always"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert (s["User"], s["Group"], s["StateDirectory"], s["ConfigurationDirectory"]) == ("edgefleet",) * 4
    assert s["ProtectSystem"] == "strict" and s["NoNewPrivileges"] == "yes" and s["CapabilityBoundingSet"] == ""
    assert s["MemoryMax"] == "1G" and s["TasksMax"] == "256" and s["SystemCallFilter"] == "@system-service"
    assert s["ProtectProc"] == "invisible" and s["SupplementaryGroups"] == "edgefleet-api"
    assert s["RuntimeDirectory"] == "edgefleet" and s["RuntimeDirectoryMode"] == "0711"


def test_systemd_analyze_security_rates_the_unit_and_its_network_drop_in(tmp_path):
    """Not a threshold on a score: the drop-in's IP allow list is what `systemd-analyze security` reads."""
    from agent.install import network_dropin

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    exe = Path(sys.executable).parent / "edgefleet"
    dropin = network_dropin({"controller": "http://127.0.0.1:8080", "broker": "mqtt://127.0.0.1:1883"}).decode()
    unit = _verify(UNIT.read_text(), exe, tmp_path, dropin)
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                       capture_output=True, text=True)
    lines = {line.split()[1]: line for line in r.stdout.splitlines() if line[:1] in "✓✗" and len(line.split()) > 1}
    for ok in ("SystemCallFilter=~@mount", "SystemCallFilter=~@debug", "ProtectProc=", "PrivateMounts="):
        assert lines[ok].startswith("✓"), lines[ok]
    assert "allow list with non-localhost entries" in lines["IPAddressDeny="], lines["IPAddressDeny="]
    assert "Overall exposure level" in r.stdout


def _fake_dev(root: Path) -> Path:
    """A /dev with the nodes of an NVIDIA GPU, an Intel GPU's render node and an NPU (hardware this machine lacks:
    plain files stand for the nodes; only their names are read)."""
    dev = root / "dev"
    for node in ("nvidia0", "nvidiactl", "nvidia-uvm", "dri/card0", "dri/renderD128", "accel/accel0", "null"):
        (dev / node).parent.mkdir(parents=True, exist_ok=True)
        (dev / node).touch()
    return dev


@pytest.mark.parametrize("kinds, allow, groups", [
    (["nvidia"], ["/dev/nvidia-uvm", "/dev/nvidia0", "/dev/nvidiactl", "char-nvidia-frontend", "char-nvidia-uvm"],
     False),
    (["dri"], ["/dev/dri/renderD128"], True),
    (["npu"], ["/dev/accel/accel0"], True),
    (["nvidia", "dri", "npu"], ["/dev/nvidia-uvm", "/dev/nvidia0", "/dev/nvidiactl", "char-nvidia-frontend",
                                "char-nvidia-uvm", "/dev/dri/renderD128", "/dev/accel/accel0"], True),
])
def test_an_accelerator_drop_in_opens_its_nodes_alone_and_passes_verify(tmp_path, kinds, allow, groups):
    dev = _fake_dev(tmp_path)
    assert systemd.accelerators_present(dev) == ["nvidia", "dri", "npu"]
    text = systemd.accelerator_dropin(kinds, dev).decode()
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert lines[:3] == ["[Service]", "PrivateDevices=no", "DevicePolicy=closed"]
    assert [ln.split("=", 1)[1] for ln in lines if ln.startswith("DeviceAllow=")] == [f"{a} rw" for a in allow]
    assert ("SupplementaryGroups=render video" in lines) is groups  # added to the unit's edgefleet-api
    unit = _verify(UNIT.read_text(), Path(sys.executable).parent / "edgefleet", tmp_path, accelerators=text)
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                       capture_output=True, text=True)
    seen = {line.split()[1]: line for line in r.stdout.splitlines() if line[:1] in "✓✗" and len(line.split()) > 1}
    assert seen["PrivateDevices="].startswith("✗") and seen["DeviceAllow="].startswith("✗"), r.stdout  # in effect


def test_no_accelerator_leaves_the_unit_as_it_is(tmp_path):
    from agent.install import InstallError, _plan_accelerators

    dev = _fake_dev(tmp_path)
    assert systemd.accelerator_dropin([], dev) is None  # no drop-in: PrivateDevices=yes stands
    assert _plan_accelerators(tmp_path, ["none"]) == []
    assert _plan_accelerators(tmp_path, None) == _plan_accelerators(tmp_path, ["auto"]) == ["nvidia", "dri", "npu"]
    assert _plan_accelerators(tmp_path, ["npu", "dri"]) == ["dri", "npu"]
    assert _plan_accelerators(tmp_path / "image", None) == []  # an image's /dev has none
    assert systemd.accelerators_present(Path("/dev")) == [  # this machine: exactly what its /dev has
        k for k, pattern in (("nvidia", "nvidia*"), ("dri", "dri/renderD*"), ("npu", "accel/accel*"))
        if list(Path("/dev").glob(pattern))]
    empty = systemd.accelerator_dropin(["dri"], tmp_path / "image" / "dev").decode()  # asked for, not there yet
    assert "DeviceAllow=char-drm rw" in empty and "/dev/" not in empty.replace("# ", "")
    with pytest.raises(InstallError, match="none goes alone"):
        _plan_accelerators(tmp_path, ["none", "dri"])
    unit = _verify(UNIT.read_text(), Path(sys.executable).parent / "edgefleet", tmp_path)
    s = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                       capture_output=True, text=True).stdout
    assert next(ln for ln in s.splitlines() if "PrivateDevices=" in ln).startswith("✓"), s


def test_the_network_drop_in_allows_localhost_the_controller_the_broker_and_the_nameservers(tmp_path):
    from agent.install import InstallError, network_dropin

    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# generated\nsearch lan\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\n"
                      "nameserver 192.0.2.53\noptions edns0\n")
    text = network_dropin({"controller": "https://192.0.2.10:8443", "broker": "mqtt://[2001:db8::7]:1883"},
                          resolv).decode()
    allow = [x.split("=", 1)[1] for x in text.splitlines() if x.startswith("IPAddressAllow=")]
    assert text.splitlines()[text.splitlines().index("[Service]") + 1] == "IPAddressDeny=any"
    assert allow == ["localhost", "192.0.2.10", "2001:db8::7", "192.0.2.53", "fe80::1"], allow
    with pytest.raises(InstallError, match="no-such-host.invalid"):
        network_dropin({"broker": "mqtt://no-such-host.invalid:1883"}, resolv)


# --- the system call filter, for real ---------------------------------------------------------------------------
_SECCOMP_EXEC = """
import ctypes, os, sys
lib = ctypes.CDLL("libseccomp.so.2")
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = lib.seccomp_init(0x80000000)  # SCMP_ACT_KILL_PROCESS: any call outside the list ends the process (SIGSYS)
for name in open(sys.argv[1]).read().split():
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr != -1:  # __NR_SCMP_ERROR: not a call on this architecture
        lib.seccomp_rule_add(ctx, 0x7FFF0000, nr, 0)  # SCMP_ACT_ALLOW
assert lib.seccomp_load(ctx) == 0, "seccomp_load failed"
os.execv(sys.argv[2], sys.argv[2:])
"""


def _syscall_set(name: str) -> set[str]:
    """What systemd puts in a set such as @system-service (nested sets resolved), as this systemd defines it."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                         check=True).stdout.split()
    calls = set()
    for item in out[1:]:
        if item.startswith("@"):
            calls |= _syscall_set(item)
        elif not item.startswith("#") and item.isidentifier():
            calls.add(item)
    return calls


def _agent_bundle(runtime: str, bundles, tmp_path: Path) -> Path:
    if runtime == "onnxruntime":
        return bundles["v1"]
    from edgefleet.data import text_direction
    from edgefleet.models import model_path

    import numpy as np

    np.savez(tmp_path / "calib.npz", x=text_direction(30)[0])
    out = tmp_path / "converted"
    r = subprocess.run([*EDGEFLEET, "convert", str(model_path("ocr-cls")), "--target", "intel", "--calib",
                        str(tmp_path / "calib.npz"), "--input-shape", "x=1x3x48x192", "--out", str(out), "--name",
                        "ocr-cls"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return next(out.glob("*-intel-ov-int8.tar"))


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("openvino", marks=pytest.mark.slow)])
def test_the_agent_serves_under_the_units_system_call_filter(tmp_path, mosquitto, bundles, crops, runtime):
    """The agent, its model loaded and serving, under a seccomp filter allowing exactly @system-service (the unit's
    SystemCallFilter=), built with libseccomp: any other call would kill it with SIGSYS."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    try:
        import ctypes

        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        pytest.skip("libseccomp2 is not installed")
    from test_agent_api import AgentClient
    from util import preload

    allowed = tmp_path / "allowed"
    allowed.write_text("\n".join(sorted(_syscall_set("@system-service"))))
    sha = preload(tmp_path / "state", _agent_bundle(runtime, bundles, tmp_path))
    cfg = tmp_path / "agent.toml"
    tls = issue_tls(mosquitto.pki, "d1", tmp_path / "tls")  # over mutual TLS, as every agent speaks
    cfg.write_text(f'device_id = "d1"\nbroker = "{mosquitto.url}"\ncontroller = "https://127.0.0.1:9"\n'
                   f'tls_ca = "{tls.ca}"\ntls_cert = "{tls.cert}"\ntls_key = "{tls.key}"\n'
                   f'state_dir = "{tmp_path / "state"}"\ntelemetry_interval_s = 0.5\n')
    log = tmp_path / "agent.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", _SECCOMP_EXEC, str(allowed), sys.executable, "-m",
                                 "edgefleet.cli", "agent", "run", "--config", str(cfg)], stderr=err)
    try:
        client = AgentClient(f"unix:{tmp_path}/state/agent.sock")

        def serving():
            assert proc.poll() is None, (proc.returncode, log.read_text())
            try:
                return client.status()
            except Exception:
                return None

        status = wait_for(serving, what="the agent under seccomp")
        assert status["active"]["sha256"] == sha and status["active"]["runtime"] == runtime
        x, _ = crops
        for i in range(5):
            assert client.infer({"x": x[i : i + 1]})[OUTPUT].shape == (1, 2)
        wait_for(lambda: client.status()["broker_connected"], what="the broker link")
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (proc.returncode, log.read_text())  # -31 would be SIGSYS
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()



# --- install / uninstall -------------------------------------------------------------------------------------
def _edgefleet(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEFLEET, *map(str, args)], capture_output=True, text=True, **kw)


def test_install_and_uninstall_refuse_a_non_root_user_in_one_line(tmp_path):
    for args in (["install", "--root", tmp_path, "--device-id", "d1"], ["uninstall", "--root", tmp_path]):
        cmd = [*EDGEFLEET, "agent", *map(str, args)]
        if IS_ROOT:  # drop to nobody for real
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
        assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and "must run as root" in r.stderr, r.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not IS_ROOT, reason="install checks as root: run as root (as CI does)")
def test_install_refuses_a_bad_trust_key_or_a_trust_dir_the_agent_could_write_before_changing_anything(tmp_path):
    root = tmp_path / "root"
    not_a_key = tmp_path / "release.key"
    not_a_key.write_text("-----BEGIN PRIVATE KEY-----\n")
    base = ["agent", "install", "--root", root, "--source", tmp_path / "nowhere"]
    flags = ["--device-id", "d1", "--broker", "mqtts://127.0.0.1:8883", "--controller", "https://127.0.0.1:8443"]
    writable = tmp_path / "agent.toml"
    writable.write_text('state_dir = "/var/lib/edgefleet"\ntrust_dir = "/var/lib/edgefleet/trust"\n')
    for extra, needle in (([*flags, "--trust", release_pub(), "--trust", not_a_key], "not a PEM public key"),
                          ([*flags, "--trust", tmp_path / "missing.pub"], "cannot read public key"),
                          (["--config", writable, "--trust", release_pub()], "inside the state dir")):
        r = _edgefleet(*base, *extra)
        assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and needle in r.stderr, r.stderr
        assert not root.exists()


@pytest.mark.slow
@pytest.mark.skipif(not IS_ROOT, reason="install writes root-owned files: run as root (as CI does)")
def test_install_under_a_root_dir_is_idempotent_and_uninstall_purges_it(tmp_path):
    from fleet.app import Fleet

    fleet = Fleet(tmp_path / "fleet", release_keys=[release_pub()],
                  http_port=0, mqtt_listen="127.0.0.1:0").start_background()
    try:
        token = fleet.enrollment.create_token(device_id="d1")
        _installed_and_purged(tmp_path, fleet, token)
    finally:
        fleet.stop()


def _installed_and_purged(tmp_path, fleet, token):
    root = tmp_path / "root"
    args = ["agent", "install", "--root", root, "--device-id", "d1", "--controller", fleet.http_url,
            "--token", token["token"], "--ca-fingerprint", token["ca_fingerprint"], "--source", ROOT,
            "--trust", release_pub()]
    _fake_dev(root)  # the image's /dev has an NVIDIA GPU, a render node and an NPU: auto opens them
    r = _edgefleet(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "identity: enrolled as d1" in r.stdout, r.stdout
    # the release key: root's, read-only to the agent (0644 in a 0755 directory; the unit's ProtectSystem=strict
    # and ReadOnlyPaths=-/etc/edgefleet make it read-only even to a process running as root in the unit)
    trust = root / "etc/edgefleet/trust"
    assert "trust: wrote release key tests" in r.stdout and "refuse every bundle" not in r.stdout, r.stdout
    assert (trust / "tests.pub").read_bytes() == release_pub().read_bytes()
    for p, mode in ((trust, 0o755), (trust / "tests.pub", 0o644)):
        assert (stat.S_IMODE(p.stat().st_mode), p.stat().st_uid, p.stat().st_gid) == (mode, 0, 0), p
    venv, config = root / "opt/edgefleet", root / "etc/edgefleet/agent.toml"
    unit = root / "etc/systemd/system/edgefleet-agent.service"
    ident = root / "var/lib/edgefleet/identity"
    keys = list(ident.glob("device-*.key"))
    assert len(keys) == 1 and stat.S_IMODE(keys[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(ident.stat().st_mode) == 0o700
    assert fleet.store.enrolled_ids() == {"d1"}
    dropin = root / "etc/systemd/system/edgefleet-agent.service.d/network.conf"

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # a staging root (no python3 of its own): the scripts name the venv's path in the image, not under --root
    assert (venv / "bin/edgefleet").read_text().splitlines()[0] == "#!/opt/edgefleet/bin/python"
    help_ = subprocess.run([venv / "bin/python", "-m", "edgefleet.cli", "agent", "--help"], capture_output=True,
                           text=True, env=env, cwd=tmp_path)
    assert help_.returncode == 0 and "install" in help_.stdout, help_.stderr
    where = subprocess.run([venv / "bin/python", "-c", "import agent; print(agent.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path).stdout
    assert where.startswith(str(venv)), where  # its own copy, not this checkout

    cfg = load(config)
    assert (cfg.device_id, cfg.broker, cfg.state_dir) == ("d1", None, "/var/lib/edgefleet")  # broker: enrolled
    assert stat.S_IMODE(config.stat().st_mode) == 0o640 and config.stat().st_uid == 0
    assert unit.read_bytes() == UNIT.read_bytes()
    allowed = [x for x in dropin.read_text().splitlines() if x.startswith("IPAddress")]
    assert allowed[:2] == ["IPAddressDeny=any", "IPAddressAllow=localhost"] and "IPAddressAllow=127.0.0.1" in allowed
    accel = dropin.parent / "accelerators.conf"
    assert accel.read_bytes() == systemd.accelerator_dropin(["nvidia", "dri", "npu"], root / "dev")
    assert "no group render here" in r.stdout, r.stdout  # a staging root has no /etc/group to check against
    _verify(unit.read_text(), venv / "bin/edgefleet", tmp_path, dropin.read_text(), accel.read_text())
    assert "api =" not in config.read_text().replace("# api =", "")  # the default: the runtime dir's socket

    before = {p: p.stat().st_mtime_ns for p in (config, unit, dropin, accel, venv / "bin/edgefleet",
                                                  trust / "tests.pub")}
    again = _edgefleet(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "trust: already trusts release key tests" in again.stdout, again.stdout
    assert "already has edgefleet[agent]" in again.stdout and "is up to date" in again.stdout, again.stdout
    assert "already enrolled as d1" in again.stdout, again.stdout  # the token is used up: not asked again
    assert {p: p.stat().st_mtime_ns for p in before} == before

    other = _edgefleet(*[a if a != "d1" else "d2" for a in args])
    assert other.returncode == 2 and "exists and differs; --force overwrites it" in other.stderr, other.stderr
    assert load(config).device_id == "d1"
    r = _edgefleet(*args, "--accelerator", "none")  # today's unit alone: PrivateDevices=yes
    assert r.returncode == 0 and "removing" in r.stdout and not accel.exists(), r.stdout + r.stderr
    assert unit.read_bytes() == UNIT.read_bytes() and dropin.exists()

    for _ in range(2):  # the second run finds nothing to remove, and says so
        r = _edgefleet("agent", "uninstall", "--root", root, "--purge")
        assert r.returncode == 0, r.stdout + r.stderr
        assert not venv.exists() and not config.parent.exists() and not unit.exists()
        assert not dropin.parent.exists()


def _pid1() -> str:
    try:
        return Path("/proc/1/comm").read_text().strip()
    except OSError:
        return "unknown"


def _show(prop: str) -> str:
    return subprocess.run(["systemctl", "show", "-p", prop, "--value", "edgefleet-agent"], capture_output=True,
                          text=True).stdout.strip()


@pytest.mark.slow
def test_systemd_restarts_the_agent_after_a_sigkill(tmp_path):
    if not Path("/run/systemd/system").is_dir():
        pytest.skip(f"systemd is not PID 1 here (PID 1 is {_pid1()!r}): run in a VM or a container booted "
                    f"with systemd to see it restart the agent")
    if not IS_ROOT:
        pytest.skip("installing the service needs root")
    if Path("/etc/systemd/system/edgefleet-agent.service").exists() or Path("/etc/edgefleet").exists():
        pytest.skip("an edgefleet agent is installed on this machine already; not touching it")
    from fleet.app import Fleet

    fleet = Fleet(tmp_path / "fleet", release_keys=[release_pub()],
                  http_port=0, mqtt_listen="127.0.0.1:0").start_background()
    token = fleet.enrollment.create_token(device_id="systemd-test")
    r = _edgefleet("agent", "install", "--controller", fleet.http_url, "--token", token["token"],
                   "--ca-fingerprint", token["ca_fingerprint"], "--telemetry-interval", "1", "--source", ROOT)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: _show("ActiveState") == "active" and _show("MainPID") not in ("", "0"), what="active")
        first = int(_show("MainPID"))
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: _show("ActiveState") == "active" and _show("MainPID") not in ("", "0", str(first)),
                 timeout=120, what="systemd to restart the agent")
        assert int(_show("NRestarts")) >= 1
    finally:
        u = _edgefleet("agent", "uninstall", "--purge")
        fleet.stop()
        assert u.returncode == 0, u.stdout + u.stderr
