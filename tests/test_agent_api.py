"""The agent's local inference API under attack, on real things: a real `edgefleet agent run` process with a real
model (the PP-OCR classifier, verified into its state dir) and a real mosquitto, attacked through its real
socket. Each attack is refused by one defence; without it the test fails (see each test's note)."""

from __future__ import annotations

import grp
import io
import json
import os
import pickle
import signal
import socket
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import psutil
import pytest
from util import issue_tls, preload, wait_for

from agent.api import AgentClient, InferenceServer, to_npz
from agent.config import AgentConfig, ConfigError, validate
from agent.engine import Engine
from agent.errors import EdgefleetError

EDGEFLEET = [sys.executable, "-m", "edgefleet.cli"]
OUTPUT = "save_infer_model/scale_0.tmp_1"
MIB = 1 << 20
IS_ROOT = os.geteuid() == 0


class AgentProcess:
    """A real `edgefleet agent run` with the model `bundles["v1"]` active, serving its local API."""

    def __init__(self, tmp_path: Path, broker, bundles, extra: str = "", api: str | None = None,
                 env: dict | None = None, model: bool = True) -> None:
        self.state = tmp_path / "state"
        if model:
            self.sha = preload(self.state, bundles["v1"])
        self.config = tmp_path / "agent.toml"
        tls = issue_tls(broker.pki, "d1", tmp_path / "tls")  # d1's certificate from the broker's CA
        self.config.write_text(f'device_id = "d1"\nbroker = "{broker.url}"\ncontroller = "https://127.0.0.1:9"\n'
                               f'tls_ca = "{tls.ca}"\ntls_cert = "{tls.cert}"\ntls_key = "{tls.key}"\n'
                               f'state_dir = "{self.state}"\n' + (f'api = "{api}"\n' if api else "") + extra)
        self.api = api or f"unix:{self.state}/agent.sock"
        self.log = tmp_path / "agent.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen([*EDGEFLEET, "agent", "run", "--config", str(self.config)], stderr=err,
                                         stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        self.ps = psutil.Process(self.proc.pid)

    def wait_serving(self, token: str | None = None) -> dict:
        client = AgentClient(self.api, token=token)

        def up():
            assert self.proc.poll() is None, self.log.read_text()
            try:
                return client.status()
            except EdgefleetError:
                return None

        return wait_for(up, what="the agent's API")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def start_agent(tmp_path, mosquitto, bundles):
    started = []

    def start(**kw) -> AgentProcess:
        a = AgentProcess(tmp_path / f"a{len(started)}", mosquitto, bundles, **kw)
        started.append(a)
        return a

    (tmp_path / "a0").mkdir()
    yield start
    for a in started:
        a.stop()
        assert "Traceback" not in a.log.read_text(), a.log.read_text()


@pytest.fixture
def agent(start_agent):
    a = start_agent()
    status = a.wait_serving()
    assert status["active"]["sha256"] == a.sha
    return a


def _vm_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _raw(address: str, data: bytes, *, timeout: float = 30.0) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it (or the timeout: a hang guard)."""
    s = _connect(address, timeout)
    try:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out
    finally:
        s.close()


def _connect(address: str, timeout: float = 30.0) -> socket.socket:
    if address.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(address[5:])  # blocking: a full backlog waits
        s.settimeout(timeout)
    else:
        host, port = address.rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=timeout)
    return s


def _status_line(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


# --- (a) an .npz that expands 1000:1 ------------------------------------------------------------------------------
def _npz_declaring(shape: tuple[int, ...], zeros: int) -> bytes:
    """An .npz whose x.npy header declares float32 ``shape`` followed by ``zeros`` bytes of zeros, deflated."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z, z.open("x.npy", "w") as f:
        f.write(header.getvalue())
        chunk = bytes(MIB)
        for _ in range(zeros // MIB):
            f.write(chunk)
    return buf.getvalue()


def test_an_npz_declaring_8_gib_is_refused_from_its_header_while_memory_stays_flat(agent):
    """Defence: agent/feeds.py reads each member's .npy header and checks the declared size before decoding.
    Without it (np.load, as before), the agent allocates the declared array and inflates the 512 MiB of zeros
    this body carries: its peak RSS grows by that much and the 50 MiB bound fails."""
    rows = -(-(8 << 30) // (3 * 48 * 192 * 4))  # float32[rows, 3, 48, 192] is 8 GiB: the model's shape, batch aside
    body = _npz_declaring((rows, 3, 48, 192), 512 * MIB)
    assert len(body) < 4 * MIB  # what the attacker sends
    pid = agent.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _vm_kib(pid, "VmRSS")
    status, ctype, reply = AgentClient(agent.api)._request("POST", "/v1/infer", body)
    grown_mib = (_vm_kib(pid, "VmHWM") - before) / 1024
    assert grown_mib < 50, f"the agent's peak RSS grew by {grown_mib:.0f} MiB"
    error = json.loads(reply)["error"]
    assert status == 413, (status, reply)
    assert "input 'x'" in error and "8.0 GiB" in error and "api_max_body_bytes" in error, error
    # and it serves on
    assert AgentClient(agent.api).infer({"x": np.zeros((1, 3, 48, 192), np.float32)})[OUTPUT].shape == (1, 2)


# --- (b) slow connections ----------------------------------------------------------------------------------------
def test_200_slow_connections_do_not_stop_status_or_inference(agent, crops):
    """Defences: one event loop reads every connection (no thread per connection) and at api_max_connections
    (64 here) a new connection closes the one that has waited on its client longest. Without the eviction the
    status request is refused at the cap; with a thread per connection (as before) the agent's thread count
    grows by ~200."""
    pid = agent.proc.pid
    threads_before = agent.ps.num_threads()
    slow = []
    try:
        for i in range(200):
            s = _connect(agent.api)
            s.sendall(b"GET /v1/status HTTP/1.1\r\nX-Slow: ")  # a head that never ends
            slow.append(s)
        for s in slow:  # trickle one more byte on each
            try:
                s.sendall(b"a")
            except OSError:
                pass  # already closed by the agent to make room
        client = AgentClient(agent.api)
        status = client.status()
        assert status["active"]["sha256"] == agent.sha
        x, _ = crops
        assert client.infer({"x": x[:1]})[OUTPUT].shape == (1, 2)
        assert agent.ps.num_threads() - threads_before < 10
        open_fds = len(os.listdir(f"/proc/{pid}/fd"))
        assert open_fds < 64 + 40, open_fds  # the cap holds: not one descriptor per slow connection
    finally:
        for s in slow:
            s.close()


def test_a_connection_that_sends_nothing_is_closed_by_the_header_timeout(tmp_path, monkeypatch):
    """In process, with the head timeout at 0.2 s: the server closes the connection by itself (the test waits
    for that; no bound on how fast). Without the timeout the recv below times out instead."""
    from agent import http1

    monkeypatch.setattr(http1, "HEAD_TIMEOUT_S", 0.2)
    server = InferenceServer(f"unix:{tmp_path}/a.sock", Engine(), lambda: {})
    server.start()
    try:
        idle, partial = _connect(server.address), _connect(server.address)
        partial.sendall(b"GET /v1/status HTTP/1.1\r\n")
        for s in (idle, partial):
            assert s.recv(100) == b""  # closed by the server
        assert AgentClient(server.address).status() == {}
    finally:
        server.stop()


# --- (c) an oversized body ---------------------------------------------------------------------------------------
def test_a_body_over_the_cap_gets_413_before_it_is_sent(start_agent):
    """Defence: the Content-Length is checked before the body is read. The body is never sent here: without the
    check the agent would wait for it and the reply would not come (the socket timeout fails the test)."""
    a = start_agent(extra=f"api_max_body_bytes = {MIB}\n")
    a.wait_serving()
    head = "POST /v1/infer HTTP/1.1\r\nContent-Type: application/x-npz\r\nConnection: close\r\nContent-Length: {}\r\n\r\n"
    status, body = _status_line(_raw(a.api, head.format(MIB + 1).encode()))
    assert status == 413 and "api_max_body_bytes is 1.0 MiB" in body["error"], body
    # one byte less is read (and, being no .npz, refused as such)
    status, body = _status_line(_raw(a.api, head.format(MIB).encode() + bytes(MIB)))
    assert status == 400 and "not an .npz" in body["error"], body
    # a client that sends it all the same reads the refusal, not a reset connection
    with pytest.raises(EdgefleetError, match="api_max_body_bytes is 1.0 MiB"):
        AgentClient(a.api).infer({"x": np.zeros((12, 3, 48, 192), np.float32)})  # 1.3 MiB
    assert a.proc.poll() is None


# --- (d) TCP and the token ---------------------------------------------------------------------------------------
def test_tcp_beyond_loopback_needs_a_token(start_agent, free_port, tmp_path):
    """Defence: agent/config.py refuses a non-loopback HOST:PORT without api_token_file, naming the field."""
    a = start_agent(api=f"0.0.0.0:{free_port}")
    assert a.proc.wait(timeout=60) == 2
    err = a.log.read_text().strip().splitlines()
    assert len(err) == 1 and "api_token_file" in err[0] and "0.0.0.0" in err[0], err
    token_file = tmp_path / "token"
    token_file.write_text("t" * 32 + "\n")
    cfg = AgentConfig(device_id="d1", broker="mqtts://127.0.0.1:1", controller="https://x", state_dir="/tmp/s",
                      api=f"0.0.0.0:{free_port}", api_token_file=str(token_file))
    assert validate(cfg) is cfg
    with pytest.raises(ConfigError, match="api_token_file"):
        validate(AgentConfig(device_id="d1", broker="mqtts://127.0.0.1:1", controller="https://x", state_dir="/tmp/s",
                             api=f"[2001:db8::1]:{free_port}"))


def test_with_a_token_every_request_needs_it(start_agent, free_port, tmp_path):
    """Defence: the bearer token check (hmac.compare_digest) before routing. Without it the 401s below are 200s."""
    token = "s3cret-" + "x" * 32
    token_file = tmp_path / "api.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o640)
    a = start_agent(api=f"127.0.0.1:{free_port}", extra=f'api_token_file = "{token_file}"\n')
    a.wait_serving(token=token)
    for auth in (b"", b"Authorization: Bearer wrong-" + b"x" * 32 + b"\r\n", b"Authorization: Basic Zm9v\r\n"):
        for request, body in ((b"GET /v1/status HTTP/1.1\r\n", b""),
                              (b"POST /v1/infer HTTP/1.1\r\nContent-Length: 4\r\n", b"abcd")):
            status, body = _status_line(_raw(a.api, request + auth + b"Connection: close\r\n\r\n" + body))
            assert status == 401 and "Bearer" in body["error"], (request, auth, body)
    with pytest.raises(EdgefleetError, match="Bearer"):
        AgentClient(a.api).status()
    out = AgentClient(a.api, token=token).infer({"x": np.zeros((1, 3, 48, 192), np.float32)})
    assert out[OUTPUT].shape == (1, 2)
    # the CLI: --token, or EDGEFLEET_AGENT_TOKEN
    r = subprocess.run([*EDGEFLEET, "agent", "status", "--api", a.api, "--token", token], capture_output=True,
                       text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["device_id"] == "d1", r.stderr
    r = subprocess.run([*EDGEFLEET, "agent", "status", "--api", a.api], capture_output=True, text=True,
                       env={**os.environ, "EDGEFLEET_AGENT_TOKEN": token})
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*EDGEFLEET, "agent", "status", "--api", a.api], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "EDGEFLEET_AGENT_TOKEN"})
    assert r.returncode != 0 and len(r.stderr.splitlines()) == 1 and "Bearer" in r.stderr, r.stderr


def test_a_token_file_every_user_can_read_is_refused(start_agent, free_port, tmp_path):
    token_file = tmp_path / "api.token"
    token_file.write_text("x" * 40)
    token_file.chmod(0o644)
    a = start_agent(api=f"127.0.0.1:{free_port}", extra=f'api_token_file = "{token_file}"\n')
    assert a.proc.wait(timeout=60) == 2
    err = a.log.read_text().strip().splitlines()
    assert len(err) == 1 and "readable by every user" in err[0] and str(token_file) in err[0], err


def test_tcp_without_a_token_refuses_a_foreign_host_header(start_agent, free_port):
    """Defence: on TCP without a token, a Host that is not a loopback address (a web page that rebound its name
    to 127.0.0.1) is refused; without the check this is a 200."""
    a = start_agent(api=f"127.0.0.1:{free_port}")
    a.wait_serving()
    status, body = _status_line(_raw(a.api, b"GET /v1/status HTTP/1.1\r\nHost: attacker.example\r\n"
                                            b"Connection: close\r\n\r\n"))
    assert status == 400 and "loopback" in body["error"], body
    status, _ = _status_line(_raw(a.api, f"GET /v1/status HTTP/1.1\r\nHost: localhost:{free_port}\r\n"
                                         f"Connection: close\r\n\r\n".encode()))
    assert status == 200


# --- (e) the Unix socket, its mode and group ---------------------------------------------------------------------
def _other_group() -> grp.struct_group:
    """A group that exists here, other than this process's own when that is possible."""
    if IS_ROOT:
        for g in grp.getgrall():
            if g.gr_gid not in (0, os.getgid()):
                return g
    for gid in os.getgroups():
        if gid != os.getgid():
            return grp.getgrgid(gid)
    return grp.getgrgid(os.getgid())


def test_the_default_api_is_a_0660_socket_in_the_configured_group(start_agent, tmp_path):
    """Defences: bind, chmod 0660, chown to api_group, then listen. Without them the socket has the umask's mode
    and the agent's group, and (as root) a user outside the group could connect if the mode allowed it."""
    group = _other_group()
    runtime = Path(f"/tmp/ef-rt-{os.getpid()}")  # a short path any user may traverse, like /run/edgefleet
    runtime.mkdir(mode=0o711)
    try:
        a = start_agent(extra=f'api_group = "{group.gr_name}"\n', env={"RUNTIME_DIRECTORY": str(runtime)})
        a.api = f"unix:{runtime}/agent.sock"  # no `api` in the config: the default, in RUNTIME_DIRECTORY
        a.wait_serving()
        st = os.stat(runtime / "agent.sock")
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
        assert st.st_gid == group.gr_gid, (st.st_gid, group)
        if IS_ROOT and group.gr_gid != 0:
            probe = ("import socket, sys; s = socket.socket(socket.AF_UNIX)\n"
                     "try: s.connect(sys.argv[1]); print('connected')\n"
                     "except PermissionError: print('refused')\n")
            for gid, expected in ((65534, "refused"), (group.gr_gid, "connected")):
                r = subprocess.run(["setpriv", "--reuid=65534", f"--regid={gid}", "--clear-groups", sys.executable,
                                    "-c", probe, str(runtime / "agent.sock")], capture_output=True, text=True,
                                   cwd="/")
                assert r.stdout.strip() == expected, (gid, r.stdout, r.stderr)
        a.stop()
        assert not (runtime / "agent.sock").exists()  # removed on the way out
    finally:
        for p in runtime.iterdir():
            p.unlink()
        runtime.rmdir()


def test_a_missing_api_group_keeps_the_agents_group_and_says_so_once(start_agent):
    a = start_agent(extra='api_group = "edgefleet-no-such-group"\n')
    a.wait_serving()
    st = os.stat(a.state / "agent.sock")
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getegid()
    lines = [x for x in a.log.read_text().splitlines() if "edgefleet-no-such-group" in x]
    assert len(lines) == 1 and "does not exist" in lines[0], lines


def test_a_socket_path_over_107_bytes_is_a_config_error(tmp_path):
    long_dir = "/tmp/" + "d" * 110
    with pytest.raises(ConfigError, match="at most 107"):
        validate(AgentConfig(device_id="d1", broker="mqtts://127.0.0.1:1", controller="https://x", state_dir="/tmp/s",
                             api=f"unix:{long_dir}/agent.sock"))
    cfg = validate(AgentConfig(device_id="d1", broker="mqtts://127.0.0.1:1", controller="https://x",
                               state_dir=long_dir))
    with pytest.raises(ConfigError, match="state_dir: .* at most 107"):
        InferenceServer.from_config(cfg, Engine(), dict)


def test_a_live_socket_is_not_taken_over(start_agent, tmp_path):
    a = start_agent()
    a.wait_serving()
    with pytest.raises(EdgefleetError, match="another process is serving on it"):
        InferenceServer(a.api, Engine(), dict)
    assert a.wait_serving()


# --- (f) pickles -------------------------------------------------------------------------------------------------
class _Trap:
    """Unpickling this creates ``path``: the proof that something unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pickled_object_array_is_refused_and_never_unpickled(agent, tmp_path):
    """Defence: an object dtype in an .npy header is refused before its data is read. Without the check the
    refusal names the dtype mismatch instead (this test wants the pickle named); with np.load(allow_pickle=True)
    the trap file appears."""
    marker = tmp_path / "unpickled"
    arr = np.empty(1, dtype=object)
    arr[0] = _Trap(str(marker))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z, z.open("x.npy", "w") as f:
        np.lib.format.write_array(f, arr, allow_pickle=True)
    assert b"builtins" in buf.getvalue() or pickle.DEFAULT_PROTOCOL  # the body does carry a pickle
    status, _, reply = AgentClient(agent.api)._request("POST", "/v1/infer", buf.getvalue())
    error = json.loads(reply)["error"]
    assert status == 400 and "object array" in error and "pickle" in error, error
    assert not marker.exists()
    assert agent.proc.poll() is None


# --- the rest of the wire contract -------------------------------------------------------------------------------
def test_json_bodies_are_bounded_and_checked_before_they_become_arrays(agent):
    client = AgentClient(agent.api)
    x = np.zeros((1, 3, 48, 192), np.float32)
    status, _, reply = client._request("POST", "/v1/infer", json.dumps({"inputs": {"x": x.tolist()}}).encode(),
                                       "application/json")
    assert status == 200 and np.asarray(json.loads(reply)["outputs"][OUTPUT]).shape == (1, 2)
    for body, code, needle in [
        (b"[" * 100_000, 400, "not JSON"),
        (json.dumps({"inputs": {"x": [[1.0] * 5]}}).encode(), 400, "shape [1, 5]"),
        (json.dumps({"inputs": {"y": 1}}).encode(), 400, "do not match"),
        (b'{"inputs": {"x": [' + b"0," * (5 * MIB) + b"0]}}", 413, "JSON bodies are at most 8.0 MiB"),
    ]:
        status, _, reply = client._request("POST", "/v1/infer", body, "application/json")
        assert status == code and needle in json.loads(reply)["error"], (status, reply[:300])


def test_malformed_http_is_answered_in_json(agent):
    cases = [
        (b"GET /v1/status HTTP/2.0\r\n\r\n", 505),
        (b"nonsense\r\n\r\n", 400),
        (b"GET /v1/status HTTP/1.1\r\nX: " + b"a" * (20 << 10) + b"\r\n\r\n", 431),
        (b"POST /v1/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
        (b"POST /v1/infer HTTP/1.1\r\n\r\n", 411),
        (b"POST /v1/infer HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n", 404),
    ]
    for request, code in cases:
        status, body = _status_line(_raw(agent.api, request))
        assert status == code and body["error"], (request[:60], status, body)
    # keep-alive and pipelining: two requests in one write, two replies
    reply = _raw(agent.api, b"GET /v1/status HTTP/1.1\r\n\r\nGET /v1/status HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert reply.count(b"HTTP/1.1 200 OK") == 2
    assert to_npz  # the client's encoder is still exported
