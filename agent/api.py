"""Local inference for the device's applications: a small HTTP server and its Python client.

The address is ``HOST:PORT`` (keep it on 127.0.0.1) or ``unix:/path/to.sock``.

    POST /v1/infer   body: an .npz (one array per input)  -> an .npz of the outputs
                     or JSON {"inputs": {name: nested lists}} -> JSON {"outputs": {...}}
    GET  /v1/status  -> JSON: device, active model, its inputs and outputs, counters
"""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from agent.config import parse_api_address
from agent.engine import Engine, InferenceError
from agent.errors import EdgefleetError

NPZ = "application/x-npz"
MAX_BODY = 256 << 20


def to_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def from_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgefleet-agent"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # TCP: a kept-alive connection must not wait 40 ms for a delayed ACK
    engine: Engine
    status: Callable[[], dict]

    def log_message(self, format, *args) -> None:  # quiet; and unix sockets have no client address
        pass

    def _reply(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj) -> None:
        self._reply(code, json.dumps(obj).encode())

    def do_GET(self) -> None:
        if self.path == "/v1/status":
            self._json(200, self.status())
        else:
            self._json(404, {"error": f"no such endpoint {self.path}"})

    def do_POST(self) -> None:
        if self.path != "/v1/infer":
            return self._json(404, {"error": f"no such endpoint {self.path}"})
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            return self._json(400, {"error": f"body of {length} bytes: send 1 byte to {MAX_BODY >> 20} MiB"})
        body = self.rfile.read(length)
        as_json = (self.headers.get("Content-Type") or "").startswith("application/json")
        try:
            feeds = self._decode(body, as_json)
        except ValueError as e:
            self.engine.window.error("bad_input")
            return self._json(400, {"error": str(e)})
        try:
            outputs = self.engine.infer(feeds)
        except InferenceError as e:
            code = {"bad_input": 400, "no_model": 503}.get(e.kind, 500)
            return self._json(code, {"error": str(e), "kind": e.kind})
        if as_json:
            self._json(200, {"outputs": {k: v.tolist() for k, v in outputs.items()}})
        else:
            self._reply(200, to_npz(outputs), NPZ)

    def _decode(self, body: bytes, as_json: bool) -> dict[str, np.ndarray]:
        if not as_json:
            try:
                return from_npz(body)
            except Exception as e:
                raise ValueError(f"body is not an .npz of arrays: {e}") from None
        model = self.engine.current
        try:
            inputs = json.loads(body)["inputs"]
            dtypes = {s.name: s.dtype for s in model.manifest.inputs} if model else {}
            return {k: np.asarray(v, dtype=dtypes.get(k)) for k, v in inputs.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f'body is not JSON {{"inputs": {{name: array}}}}: {e}') from None


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        sock, _ = super().get_request()
        return sock, ("unix", 0)


class InferenceServer:
    def __init__(self, address: str, engine: Engine, status: Callable[[], dict]) -> None:
        where = parse_api_address(address)
        handler = type("Handler", (_Handler,), {"engine": engine, "status": staticmethod(status),
                                                "disable_nagle_algorithm": not isinstance(where, str)})
        try:
            if isinstance(where, str):
                if os.path.exists(where):
                    os.unlink(where)  # a socket left by a previous run
                self._server = _UnixServer(where, handler)
            else:
                self._server = ThreadingHTTPServer(where, handler)
        except OSError as e:
            raise EdgefleetError(f"cannot listen on api address {address!r}: {e.strerror or e}") from None
        self.address = address if isinstance(where, str) else f"{where[0]}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="agent-api", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class _TcpConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers and body go out at once


class AgentClient:
    """What an application on the device uses: ``AgentClient("127.0.0.1:8470").infer({"x": x})``."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.address = address
        self._where = parse_api_address(address)
        self._timeout = timeout
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if isinstance(self._where, str):
                conn = _UnixConnection(self._where, self._timeout)
            else:
                conn = _TcpConnection(*self._where, timeout=self._timeout)
            self._local.conn = conn
        return conn

    def _request(self, method: str, path: str, body: bytes | None = None, ctype: str = NPZ):
        headers = {"Content-Type": ctype} if body is not None else {}
        for attempt in (0, 1):  # one retry on a kept-alive connection the server closed
            conn = self._conn()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.getheader("Content-Type", ""), resp.read()
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                conn.close()
                self._local.conn = None
                if attempt or not isinstance(e, (http.client.RemoteDisconnected, BrokenPipeError)):
                    raise EdgefleetError(f"cannot reach the agent at {self.address}: {e}") from None

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        status, ctype, body = self._request("POST", "/v1/infer", to_npz(inputs))
        if status != 200:
            raise EdgefleetError(f"agent refused the inference: {_error(body)}")
        return from_npz(body)

    def status(self) -> dict:
        status, _, body = self._request("GET", "/v1/status")
        if status != 200:
            raise EdgefleetError(f"agent status failed: {_error(body)}")
        return json.loads(body)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()


def _error(body: bytes) -> str:
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")
