"""The binary protocol on the agent's Unix socket (agent/wire.py, docs/wire.md), on real things: a real
InferenceServer on a real Unix socket serving a real ONNX Runtime session of the PP-OCR classifier. Each attack
is answered with an error frame or a closed connection, and a bystander connection opened before it is served
after it; each test fails if the defence it names is taken away."""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from util import preload, wait_for

from agent import http1, wire
from agent.api import AgentClient, FeedbackRefused, InferenceServer
from agent.engine import Engine, Loaded
from agent.errors import EdgefleetError
from agent.store import ModelStore

OUTPUT = "save_infer_model/scale_0.tmp_1"
DOC = Path(__file__).resolve().parent.parent / "docs" / "wire.md"
MIB = 1 << 20


# --- the protocol with socket + struct + json only, as docs/wire.md shows it ---------------------------------------
def frame(header: dict, body: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return b"EFW1" + struct.pack("<IQ", len(h), len(body)) + h + body


def exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def answer(s: socket.socket) -> tuple[dict, bytes]:
    magic, h, b = struct.unpack("<4sIQ", exactly(s, 16))
    assert magic == b"EFW1"
    return json.loads(exactly(s, h)), exactly(s, b)


def closed(s: socket.socket) -> bool:
    """The agent closed this connection (EOF), reading whatever came before."""
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True


def infer_header(x: np.ndarray, name: str = "x", dtype: str = "float32") -> dict:
    return {"op": "infer", "inputs": [{"name": name, "dtype": dtype, "shape": list(x.shape)}]}


# --- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(bundles, tmp_path_factory):
    state = tmp_path_factory.mktemp("wire-state")
    sha = preload(state, bundles["v1"])
    store = ModelStore(state)
    eng = Engine()
    eng.swap(Loaded(sha, store.models / sha, store.manifest(store.models / sha)))
    yield eng
    eng.current.close()


@pytest.fixture
def serve(tmp_path):
    started = []

    def start(engine, **kw) -> InferenceServer:
        server = InferenceServer(f"unix:{tmp_path}/s{len(started)}.sock", engine, lambda: {"device_id": "d1"}, **kw)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(serve, engine):
    return serve(engine, max_body_bytes=MIB, max_connections=8)


@pytest.fixture
def x(crops):
    return np.ascontiguousarray(crops[0][:2])


def connect(server: InferenceServer, timeout: float = 30.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(server.address[5:])
    s.settimeout(timeout)
    return s


class Bystander:
    """A connection opened before an attack, that must be served the same after it."""

    def __init__(self, server, x) -> None:
        self.s, self.x = connect(server), x
        self.expected = self.infer()

    def infer(self) -> np.ndarray:
        self.s.sendall(frame(infer_header(self.x), self.x.tobytes()))
        head, body = answer(self.s)
        assert head["ok"], head
        return np.frombuffer(body, np.float32).reshape(head["outputs"][0]["shape"])

    def check(self) -> None:
        assert np.array_equal(self.infer(), self.expected)


# --- what it serves -----------------------------------------------------------------------------------------------
def test_outputs_are_those_of_the_runtime_called_directly(server, engine, x):
    direct = engine.current.session.run({"x": x})[OUTPUT]
    client = AgentClient(server.address)
    assert client.transport == "wire"
    out, rid = client.infer({"x": x}, with_id=True)
    assert re.fullmatch(r"[0-9a-f]{16}", rid) and out[OUTPUT].dtype == np.float32
    assert np.array_equal(out[OUTPUT], direct)
    assert np.array_equal(client.infer({"x": x}, shm=True)[OUTPUT], direct)  # through a shared region
    assert np.array_equal(client.infer({"x": x[:1]}, shm=True)[OUTPUT], direct[:1])  # the region is reused
    batch = np.concatenate([x] * 4)  # 0.8 MiB: a region twice that is over the cap, one for the inputs is not
    fresh = AgentClient(server.address)
    assert np.array_equal(fresh.infer({"x": batch}, shm=True)[OUTPUT], np.concatenate([direct] * 4))
    assert fresh._local.chan.region.size < MIB
    fresh.close()
    assert np.array_equal(AgentClient(server.address, transport="http").infer({"x": x})[OUTPUT], direct)
    assert client.status() == {"device_id": "d1"}
    # feedback as over HTTP: this bundle has no profile.json, so both refuse the label for the same reason
    reasons = []
    for transport in ("wire", "http"):
        with pytest.raises(FeedbackRefused) as e:
            AgentClient(server.address, transport=transport).feedback(rid, 0)
        reasons.append(e.value.reason)
    assert reasons[0] == reasons[1] and reasons[0] != "other", reasons
    client.close()


def test_the_documented_bytes_and_a_stdlib_client_speak_to_the_agent(server, engine, x):
    """docs/wire.md's worked example, sent byte for byte, and its socket + struct + json client."""
    status_hex = re.search(r"^(45 46 57 31 0f [0-9a-f ]+)$", DOC.read_text(), re.M)[1]
    s = connect(server)
    s.sendall(bytes.fromhex(status_hex))
    head, body = answer(s)
    assert head == {"ok": True, "status": {"device_id": "d1"}} and body == b""
    direct = engine.current.session.run({"x": x})[OUTPUT]
    for _ in range(3):  # one connection, many requests
        s.sendall(frame(infer_header(x), x.astype("<f4").tobytes()))
        head, body = answer(s)
        assert head["ok"] and re.fullmatch(r"[0-9a-f]{16}", head["id"]), head
        assert head["outputs"] == [{"name": OUTPUT, "dtype": "float32", "shape": [2, 2]}]
        assert np.array_equal(np.frombuffer(body, "<f4").reshape(2, 2), direct)
    s.close()


def test_binary_and_http_interleave_on_the_same_socket(server, x):
    b, h = connect(server), connect(server)
    for i in range(3):
        b.sendall(frame({"op": "status"}))
        assert answer(b)[0]["status"] == {"device_id": "d1"}
        h.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        head = h.recv(65536)
        assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b'{"device_id": "d1"}'), head
    http_client = AgentClient(server.address, transport="http")
    wire_client = AgentClient(server.address)
    for _ in range(3):
        assert np.array_equal(http_client.infer({"x": x})[OUTPUT], wire_client.infer({"x": x})[OUTPUT])


def test_a_client_reconnects_once_after_the_idle_timeout(server, x, monkeypatch):
    monkeypatch.setattr(http1, "IDLE_TIMEOUT_S", 0.2)
    client = AgentClient(server.address)
    first = client.infer({"x": x})[OUTPUT]
    wait_for(lambda: not server._wire, what="the idle connection to be closed by the agent")
    assert np.array_equal(client.infer({"x": x})[OUTPUT], first)


# --- bad frames ----------------------------------------------------------------------------------------------------
def test_garbage_after_the_magic_and_non_json_headers_get_error_frames(server, x):
    """Defences: the prefix's lengths are checked (64 KiB header cap) and the header is decoded into typed
    structs (msgspec). Without the cap, the first connection waits for 4 GiB of header (the recv times out)."""
    by = Bystander(server, x)
    s = connect(server, timeout=10)
    s.sendall(b"EFW1" + b"\xff" * 12)  # a header of 4 GiB, a body of 16 EiB
    head, _ = answer(s)
    assert head["ok"] is False and head["kind"] == "bad_request" and "64.0 KiB" in head["error"], head
    assert closed(s)
    s = connect(server)
    for header, needle in ((b"not json{", "bad header"), (b'{"op": "fly"}', "$.op"),
                           (b'{"op": "infer", "inputs": [{"name": "x"}]}', "dtype"),
                           (b'{"op": "status", "extra": 1}', "extra"), (b"\xff\xfe", "bad header")):
        s.sendall(b"EFW1" + struct.pack("<IQ", len(header), 8) + header + bytes(8))
        head, body = answer(s)
        assert head["ok"] is False and head["kind"] == "bad_request" and needle in head["error"], (header, head)
        assert "\n" not in head["error"] and body == b""
    s.sendall(frame({"op": "status"}))  # the same connection goes on: the bodies were dropped
    assert answer(s)[0]["ok"]
    s.sendall(b"EFWX" + bytes(12))  # framing lost: answered, then closed
    head, _ = answer(s)
    assert head["kind"] == "bad_request" and "not a frame" in head["error"], head
    assert closed(s)
    by.check()


@pytest.mark.parametrize("cut", ["header", "body"])
def test_a_truncated_frame_ends_its_connection_only(server, x, cut):
    by = Bystander(server, x)
    before = len(server._wire)
    s = connect(server)
    data = frame(infer_header(x), x.tobytes())
    s.sendall(data[:30] if cut == "header" else data[:-1000])
    s.shutdown(socket.SHUT_WR)  # the client goes away mid-frame
    assert closed(s)
    wait_for(lambda: len(server._wire) == before, what="the truncated connection's thread to end")
    by.check()


def test_inputs_that_do_not_match_the_model_are_refused_before_the_body_is_read(server, x):
    """Defence: the header is checked against the model (engine.check_declared) and the body length against
    the declared sizes before the body is read. Each refusal names the problem; the connection goes on."""
    by = Bystander(server, x)
    s = connect(server)
    cases = [
        (infer_header(x, dtype="float64"), x.astype(np.float64).tobytes(), "is float64, the model takes float32"),
        (infer_header(x[:, :, :, :96]), x[:, :, :, :96].tobytes(), "has shape [2, 3, 48, 96]"),
        (infer_header(x, name="y"), x.tobytes(), "do not match the model's ['x']"),
        (infer_header(x, dtype="object"), x.tobytes(), "dtype 'object' is not one of"),
        (infer_header(x), x.tobytes()[:-4], "the frame carries"),
        ({"op": "infer", "inputs": [*infer_header(x)["inputs"]] * 2}, x.tobytes() * 2, "2 inputs: the model takes 1"),
        ({"op": "infer", "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3, 48, 192]}]}, b"",
         "dimensions >= 0"),
    ]
    for header, body, needle in cases:
        s.sendall(frame(header, body))
        head, _ = answer(s)
        assert head["ok"] is False and head["kind"] == "bad_input" and needle in head["error"], (needle, head)
    s.sendall(frame(infer_header(x), x.tobytes()))
    assert answer(s)[0]["ok"]
    by.check()


def test_a_header_announcing_gigabytes_is_refused_before_any_body_byte_is_sent(server, x):
    """Defence: the body length in the prefix is checked against api_max_body_bytes before anything is read or
    allocated. Only the prefix and header are sent here: without the check the agent would wait for the 8 GiB
    (and allocate them), the answer would not come and the recv would time out."""
    by = Bystander(server, x)
    rows = (8 << 30) // x[0].nbytes
    header = json.dumps(infer_header(x[:1].repeat(1, 0))).replace('"shape": [1,', f'"shape": [{rows},').encode()
    for blen in (rows * x[0].nbytes, 1 << 62):
        s = connect(server, timeout=10)
        s.sendall(b"EFW1" + struct.pack("<IQ", len(header), blen) + header)
        head, body = answer(s)
        assert head["ok"] is False and head["kind"] == "too_large", head
        assert "api_max_body_bytes is 1.0 MiB" in head["error"] and body == b"", head
        assert closed(s)
    # the Python client, sending it all the same, reads the refusal rather than a reset connection
    with pytest.raises(EdgefleetError, match="api_max_body_bytes is 1.0 MiB"):
        AgentClient(server.address).infer({"x": np.zeros((12, 3, 48, 192), np.float32)})  # 1.3 MiB
    by.check()


def test_a_client_that_stalls_is_closed_after_the_timeout_while_others_are_served(serve, engine, x, monkeypatch):
    """Defence: every read has a deadline (the first bytes and a frame's head: HEAD_TIMEOUT_S, its body:
    BODY_TIMEOUT_S). Without them the stalled connections are never closed and the recvs below time out."""
    monkeypatch.setattr(http1, "HEAD_TIMEOUT_S", 0.3)
    monkeypatch.setattr(http1, "BODY_TIMEOUT_S", 0.3)
    server = serve(engine, max_body_bytes=MIB)
    by = Bystander(server, x)
    silent, in_prefix, in_body = connect(server, 10), connect(server, 10), connect(server, 10)
    in_prefix.sendall(b"EFW1\x10\x00")
    in_body.sendall(frame(infer_header(x), x.tobytes())[:-1000])
    by.check()  # served while they stall
    for s in (silent, in_prefix, in_body):
        assert closed(s)
    by.check()


def test_a_flood_of_connections_stays_within_api_max_connections(serve, engine, x, monkeypatch):
    """Defence: binary and HTTP connections count against one cap (4 here); at the cap a new connection closes
    the one that has waited longest on its client. Without it the 40 stalled connections all stay open, each
    with a thread, until the head timeout (made longer than the wait here)."""
    monkeypatch.setattr(http1, "HEAD_TIMEOUT_S", 120.0)
    server = serve(engine, max_body_bytes=MIB, max_connections=4)
    threads_before = threading.active_count()
    flood = []
    for i in range(40):
        s = connect(server, 10)
        try:
            s.sendall(b"EFW1" if i % 2 else b"GET /v1/status HTTP/1.1\r\n")  # binary and HTTP, both stalled
        except (BrokenPipeError, ConnectionResetError):  # already closed by the cap (a busy machine's timing)
            pass
        flood.append(s)

    def still_open() -> int:
        n = 0
        for s in flood:
            s.setblocking(False)
            try:
                n += s.recv(1 << 16) != b""
            except BlockingIOError:
                n += 1
            except ConnectionResetError:
                pass
        return n

    wait_for(lambda: still_open() <= 4, timeout=20, what="the connections beyond the cap to be closed")
    assert threading.active_count() - threads_before <= 4 + 2
    client = AgentClient(server.address)
    assert client.infer({"x": x})[OUTPUT].shape == (2, 2)  # a normal client gets in (it evicts a stalled one)
    assert len(server._conns) + len(server._wire) <= 4
    for s in flood:
        s.close()


def test_bodies_held_at_once_are_bounded(serve, engine, x, monkeypatch):
    """Defence: binary bodies count against one budget (api_workers + 1 full-size bodies: 2 MiB here). Two
    clients hold 0.9 MiB each, stalled mid-body; the third's body does not fit, and once ROOM_TIMEOUT_S has
    passed it is told the agent is busy. Without the budget it is allocated and waited for (the recv times
    out)."""
    monkeypatch.setattr(wire, "ROOM_TIMEOUT_S", 0.3)
    server = serve(engine, max_body_bytes=MIB, workers=1)
    rows = (MIB * 9 // 10) // x[0].nbytes
    big = np.zeros((rows, 3, 48, 192), np.float32)
    stalled = []
    for _ in range(2):
        s = connect(server, timeout=10)
        s.sendall(frame(infer_header(big), big.tobytes())[:-100])
        stalled.append(s)
    wait_for(lambda: server.wire_budget.free < 2 * MIB - 2 * big.nbytes + 1, what="two bodies being read")
    s = connect(server, timeout=10)
    h = json.dumps(infer_header(big)).encode()
    s.sendall(b"EFW1" + struct.pack("<IQ", len(h), big.nbytes) + h)  # its body never comes
    head, _ = answer(s)
    assert head["ok"] is False and head["kind"] == "busy" and "retry" in head["error"], head
    for s in stalled:
        s.close()
    wait_for(lambda: server.wire_budget.free == 2 * MIB, what="the budget to be given back")


def test_with_a_token_every_connection_authenticates_first(serve, engine, x):
    """Defence: without the auth op's check, the first status is answered."""
    server = serve(engine, token=b"t" * 32)
    s = connect(server)
    s.sendall(frame({"op": "status"}))
    head, _ = answer(s)
    assert head["kind"] == "unauthorized" and closed(s), head
    s = connect(server)
    s.sendall(frame({"op": "auth", "token": "wrong"}) + frame({"op": "status"}))
    assert answer(s)[0]["kind"] == "unauthorized" and closed(s)
    with pytest.raises(EdgefleetError, match="needs a token"):
        AgentClient(server.address).status()
    assert AgentClient(server.address, token="t" * 32).infer({"x": x})[OUTPUT].shape == (2, 2)


def test_no_model_is_an_error_frame_and_status_still_answers(serve):
    server = serve(Engine())
    client = AgentClient(server.address)
    with pytest.raises(EdgefleetError, match="no model is active"):
        client.infer({"x": np.zeros((1, 3, 48, 192), np.float32)})
    assert client.status() == {"device_id": "d1"}


# --- shared memory -------------------------------------------------------------------------------------------------
def _register(s: socket.socket, fd: int) -> dict:
    s.sendmsg([frame({"op": "register"})], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
    return answer(s)[0]


def _memfd(nbytes: int, seals: int) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, nbytes)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_an_unsealed_memfd_or_a_plain_file_is_refused(server, x, tmp_path):
    """Defence: F_GET_SEALS must show F_SEAL_SHRINK; without it a client could truncate the region under the
    agent's mapping and crash it with SIGBUS: here the unsealed memfd is truncated after registering, and an
    inference reading it would kill the test process."""
    by = Bystander(server, x)
    s = connect(server)
    unsealed = _memfd(MIB, 0)
    head = _register(s, unsealed)
    assert head["ok"] is False and head["kind"] == "bad_shm" and "F_SEAL_SHRINK" in head["error"], head
    os.ftruncate(unsealed, 0)
    s.sendall(frame({"op": "infer", "inputs": [{**infer_header(x)["inputs"][0],
                                                 "shm": {"offset": 0, "nbytes": x.nbytes}}]}))
    head, _ = answer(s)
    assert head["kind"] == "bad_shm" and "no region is registered" in head["error"], head
    with open(tmp_path / "f", "wb+") as f:
        f.truncate(MIB)
        head = _register(s, f.fileno())
    assert head["kind"] == "bad_shm" and "not a memfd" in head["error"], head
    big = _memfd(2 * MIB, fcntl.F_SEAL_SHRINK)
    head = _register(s, big)
    assert head["kind"] == "bad_shm" and "api_max_body_bytes" in head["error"], head
    for fd in (unsealed, big):
        os.close(fd)
    s.sendall(frame({"op": "status"}))  # the connection goes on
    assert answer(s)[0]["ok"]
    by.check()


def test_shared_memory_offsets_outside_the_region_are_refused(server, engine, x):
    """Defence: each tensor's offset and size are checked against the registered region before it is read.
    Without it the first request reads past the mapping (a crash), or its input from the wrong bytes."""
    by = Bystander(server, x)
    s = connect(server)
    fd = _memfd(MIB, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    assert _register(s, fd) == {"ok": True, "nbytes": MIB, "writable": True}
    os.pwrite(fd, x.tobytes(), 4096)
    tensor = infer_header(x)["inputs"][0]
    for shm, needle in (({"offset": MIB - 100, "nbytes": x.nbytes}, "outside the registered region"),
                        ({"offset": -8, "nbytes": x.nbytes}, "outside the registered region"),
                        ({"offset": 4096, "nbytes": 8}, "its shm says 8")):
        s.sendall(frame({"op": "infer", "inputs": [{**tensor, "shm": shm}]}))
        head, _ = answer(s)
        assert head["ok"] is False and needle in head["error"], (shm, head)
    s.sendall(frame({"op": "infer", "inputs": [{**tensor, "shm": {"offset": 4096, "nbytes": x.nbytes}}],
                     "outputs_shm": {"offset": MIB - 16, "nbytes": 64}}))
    head, _ = answer(s)
    assert head["kind"] == "bad_shm" and "outputs_shm" in head["error"], head
    s.sendall(frame({"op": "infer", "inputs": [{**tensor, "shm": {"offset": 4096, "nbytes": x.nbytes}}],
                     "outputs_shm": {"offset": 4096 + x.nbytes, "nbytes": 4096}}))
    head, body = answer(s)
    out = head["outputs"][0]
    assert head["ok"] and body == b"" and out["shm"]["offset"] % 64 == 0, head
    got = np.frombuffer(os.pread(fd, out["shm"]["nbytes"], out["shm"]["offset"]), np.float32).reshape(2, 2)
    assert np.array_equal(got, engine.current.session.run({"x": x})[OUTPUT])
    os.close(fd)
    by.check()


def test_descriptors_sent_with_other_frames_are_closed(server, x):
    """Defence: every descriptor that arrives with a frame but a register's is closed at once. Without it each
    of these frames leaves the agent one more open descriptor."""
    s = connect(server)
    with open(os.devnull) as f:
        fds_before = None
        for _ in range(21):
            s.sendmsg([frame({"op": "status"})], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", f.fileno()))])
            assert answer(s)[0]["ok"]
            fds_before = fds_before or len(os.listdir("/proc/self/fd"))  # this connection open, in this process
        assert len(os.listdir("/proc/self/fd")) - fds_before <= 2  # not 20
    s.close()
