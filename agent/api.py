"""Local inference for the device's applications: a small HTTP/1.1 server and its Python client.

    POST /v1/infer    body: an .npz (one array per input)  -> an .npz of the outputs
                      or JSON {"inputs": {name: nested lists}} -> JSON {"outputs": {...}, "id": REQUEST_ID}
                      every answer to a served inference has the header X-Request-Id: REQUEST_ID (16 hex digits)
    POST /v1/feedback JSON {"id": REQUEST_ID, "label": CLASS_INDEX} (or {"labels": [{"id", "label"}, ...]}): the
                      true class of that prediction, joined to it (agent/feedback.py); at most 64 KiB
    GET  /v1/status   -> JSON: device, active model, its inputs and outputs, counters, quality

Where it listens (config ``api``): by default a Unix socket, ``$RUNTIME_DIRECTORY/agent.sock`` under systemd
(``/run/edgefleet/agent.sock``, ``DEFAULT_ADDRESS``), else ``STATE_DIR/agent.sock``, mode 0660 and group
``api_group`` (the group applications join); or ``unix:/path``; or ``HOST:PORT``, on loopback only unless
``api_token_file`` is set. With a token every request needs ``Authorization: Bearer TOKEN``.

On the Unix socket the same connection may speak binary frames instead (agent/wire.py, docs/wire.md: the fast
path, no HTTP and no .npz): the event loop accepts every connection (at most ``api_max_connections``, binary
and HTTP together) and looks at its first 4 bytes: a frame's magic gets a thread of its own that serves the
connection with no event loop hop per request; anything else is served as HTTP, exactly as below.
``AgentClient`` speaks frames on a ``unix:`` address unless told ``transport="http"``.

Why one misbehaving client cannot exhaust the agent: one asyncio event loop thread reads every HTTP connection
(no thread per HTTP connection; agent/http1.py): a request head is at most 16 KiB and must arrive within
``HEAD_TIMEOUT_S``, a body within ``BODY_TIMEOUT_S``, an idle kept-alive connection is closed after
``IDLE_TIMEOUT_S``; at most ``api_max_connections`` are open (a new one closes the one that has waited
longest on its client); a body over ``api_max_body_bytes`` is refused from its Content-Length before a byte
of it is read, and the bodies held at once are bounded (``api_workers + 1`` full-size ones; beyond, reading
waits); an .npz is checked from its headers against the model's inputs before anything is decoded
(agent/feeds.py); inference runs on ``api_workers`` threads, so ``/v1/status`` is answered by the loop while
they are busy.
"""

from __future__ import annotations

import asyncio
import grp
import hmac
import http.client
import io
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from agent.config import DEFAULT_API, ConfigError, check_socket_path, is_loopback, parse_api_address
from agent.engine import Engine, InferenceError
from agent.errors import EdgefleetError
from agent import feedback, feeds, http1, wire
from agent.feeds import JSON_MAX_BYTES, FeedError, size_text
from agent.http1 import BodyBudget, Connection, HttpError, Reply, Request, error_reply

log = logging.getLogger("edgefleet.agent.api")

NPZ = "application/x-npz"
DEFAULT_ADDRESS = DEFAULT_API  # where the systemd service listens (/run/edgefleet: its RuntimeDirectory=)
SOCKET_NAME = "agent.sock"
REQUEST_ID = "X-Request-Id"  # the header naming a served inference, for POST /v1/feedback


def to_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def from_npz(data: bytes) -> dict[str, np.ndarray]:
    """The client's side: an .npz the agent sent (the agent decodes requests with agent.feeds)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def default_address(state_dir: str, environ: Mapping[str, str] | None = None) -> str:
    """``unix:$RUNTIME_DIRECTORY/agent.sock`` when systemd gives a runtime directory, else in ``state_dir``."""
    environ = os.environ if environ is None else environ
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    path = os.path.join(runtime or state_dir, SOCKET_NAME)
    check_socket_path(path, "RUNTIME_DIRECTORY" if runtime else "state_dir")
    return f"unix:{path}"


def read_token(path: str) -> bytes:
    """The bearer token in ``api_token_file``: one line, at least 16 characters, not readable by every user."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            token = f.read(4097).strip()
    except OSError as e:
        raise ConfigError(f"api_token_file {path}: {e.strerror}") from None
    if st.st_mode & stat.S_IROTH:
        raise ConfigError(f"api_token_file {path} is readable by every user (mode {stat.S_IMODE(st.st_mode):04o}): "
                          f"chmod o-rwx {path}")
    if not 16 <= len(token) <= 4096 or any(c <= 32 or c >= 127 for c in token):
        raise ConfigError(f"api_token_file {path}: the token must be 16 to 4096 printable ASCII characters "
                          f"on one line (e.g. `openssl rand -hex 32 > {path}`)")
    return token


class InferenceServer:
    """The local API on ``address`` (``HOST:PORT`` or ``unix:/path``), serving ``engine``. The socket is bound
    here (errors raise here); ``start()`` serves it from a thread of its own (an asyncio loop: the HTTP side,
    agent/http1.py); inference runs on ``workers`` threads."""

    def __init__(self, address: str, engine: Engine, status: Callable[[], dict], *, group: str | None = None,
                 token: bytes | None = None, max_body_bytes: int = 64 << 20, max_connections: int = 64,
                 workers: int = 2) -> None:
        where = parse_api_address(address)
        self.engine, self.status = engine, status
        self.max_body = max_body_bytes
        self.max_connections = max_connections
        self._token = token
        self._unix = where if isinstance(where, str) else None
        try:
            if self._unix is not None:
                self._sock = _listen_unix(self._unix, group)
                self.address = f"unix:{self._unix}"
                self._check_host = False
            else:
                self._sock = _listen_tcp(*where)
                port = self._sock.getsockname()[1]
                self.address = f"[{where[0]}]:{port}" if ":" in where[0] else f"{where[0]}:{port}"
                # without a token, a Host that is not a loopback address is a web page that rebound its name
                # to 127.0.0.1 (DNS rebinding), or a proxy: refused
                self._check_host = token is None
        except OSError as e:
            raise EdgefleetError(f"cannot listen on api address {address!r}: {e.strerror or e}") from None
        self._sock_id = _inode(self._unix)
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agent-api-worker")
        self.budget = BodyBudget(max_body_bytes * (workers + 1))  # body bytes held at once
        self.wire_budget = wire.ByteBudget(max_body_bytes * (workers + 1))  # and on binary connections
        self._conns: set[Connection] = set()
        self._wire: set[wire.Session] = set()  # Unix socket connections served on threads (agent/wire.py)
        self._admit_lock = threading.Lock()
        self._sniffing: dict[wire.Session, asyncio.TimerHandle] = {}  # accepted, first bytes not there yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._closing: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="agent-api", daemon=True)

    @classmethod
    def from_config(cls, cfg, engine: Engine, status: Callable[[], dict]) -> InferenceServer:
        """As the agent's config says (``api``, ``api_*``)."""
        address = cfg.api if cfg.api is not None else default_address(cfg.state_dir)
        token = read_token(cfg.api_token_file) if cfg.api_token_file else None
        return cls(address, engine, status, group=cfg.api_group, token=token, max_body_bytes=cfg.api_max_body_bytes,
                   max_connections=cfg.api_max_connections, workers=cfg.api_workers)

    @property
    def token(self) -> bytes | None:
        return self._token

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            raise EdgefleetError(f"the api server on {self.address} did not start: {self._failed}")

    def stop(self) -> None:
        for session in list(self._wire):
            session.close()
        if self._thread.is_alive() and self._loop is not None:
            self._loop.call_soon_threadsafe(self._closing.set)
            self._thread.join(timeout=10)
        elif not self._thread.is_alive():
            self._sock.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self._unix is not None and _inode(self._unix) == self._sock_id:
            os.unlink(self._unix)  # ours still (not a later agent's)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:
            self._failed = e
            log.exception("the api server stopped")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._closing = asyncio.Event()
        server = None
        if self._unix is None:
            server = await loop.create_server(lambda: Connection(self, loop, tcp=True), sock=self._sock)
        else:
            self._sock.setblocking(False)
            loop.add_reader(self._sock.fileno(), self._accept_unix)
        self._ready.set()
        await self._closing.wait()
        if server is not None:
            server.close()
        else:
            loop.remove_reader(self._sock.fileno())
            self._sock.close()
            for session in list(self._sniffing):
                self._unsniff(session)
                session.sock.close()
        for conn in list(self._conns):
            conn.close()
        if server is not None:
            await server.wait_closed()

    # --- the Unix socket: accepted on the event loop; binary frames on a thread each, or HTTP -------------------
    def _accept_unix(self) -> None:
        """The Unix socket is readable (on the event loop, which accepts every connection as asyncio's own server
        would): each connection counts against api_max_connections from here, HTTP and binary alike, and is
        told apart by its first 4 bytes (``_sniff``)."""
        for _ in range(128):
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE: stop accepting for a second, as asyncio's server does
                log.warning("api: accept failed (%s); retrying in 1 s", e)
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(1.0, self._loop.add_reader, self._sock.fileno(), self._accept_unix)
                return
            sock.setblocking(False)
            session = wire.Session(sock, self)
            if not self._room():
                sock.close()
                continue
            self._wire.add(session)
            self._sniff(session)

    def _sniff(self, session: wire.Session) -> None:
        """HTTP: to the event loop's HTTP side; a frame's magic (or the start of one): a thread of its own, where
        agent/wire.py serves it (no event loop hop per request); nothing yet: wait until readable, at most
        HEAD_TIMEOUT_S."""
        sock = session.sock
        try:
            seen = sock.recv(len(wire.MAGIC), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            self._sniffing[session] = self._loop.call_later(http1.HEAD_TIMEOUT_S, self._drop, session)
            self._loop.add_reader(sock.fileno(), self._resniff, session)
            return
        except OSError:
            seen = b""
        if not seen or session.closed:
            return self._drop(session)
        if not wire.MAGIC.startswith(seen):
            return self._to_http(session)
        self._loop.create_task(self._start_thread(session))

    async def _start_thread(self, session: wire.Session) -> None:
        """First let the loop finish what connections accepted before this one set going (an HTTP connection is
        made a few loop turns after its accept; at the cap, the one it evicts is closed a turn later), so that
        connections are served in the order they came, then give this one its thread."""
        for _ in range(5):
            await asyncio.sleep(0)
        if session.closed:
            return self._drop(session)
        try:
            threading.Thread(target=self._serve_unix, args=(session,), name="agent-api-conn", daemon=True).start()
        except RuntimeError:  # no thread to be had
            self._drop(session)

    def _resniff(self, session: wire.Session) -> None:
        self._unsniff(session)
        self._sniff(session)

    def _unsniff(self, session: wire.Session) -> None:
        timer = self._sniffing.pop(session, None)
        if timer is not None:
            timer.cancel()
            self._loop.remove_reader(session.sock.fileno())

    def _drop(self, session: wire.Session) -> None:
        self._unsniff(session)
        self._wire.discard(session)
        session.sock.close()

    def _serve_unix(self, session: wire.Session) -> None:
        """A binary connection's thread (its first bytes were the magic, or the start of it)."""
        sock, handed = session.sock, False
        try:
            kind = wire.first_bytes(sock, http1.HEAD_TIMEOUT_S)
            if kind == "wire" and not session.closed:
                session.serve()
            elif kind == "http" and not session.closed:
                self._loop.call_soon_threadsafe(self._to_http, session)
                handed = True
        except Exception:
            log.exception("the local API failed on a connection")
        finally:
            if not handed:
                self._wire.discard(session)
                sock.close()

    def _to_http(self, session: wire.Session) -> None:
        """On the event loop: serve an accepted socket as HTTP, exactly as on TCP (its Connection counts it
        against the cap from connection_made, as asyncio's own server would)."""
        loop, sock = self._loop, session.sock
        self._wire.discard(session)

        async def adopt():
            try:
                await loop.connect_accepted_socket(lambda: Connection(self, loop, tcp=False), sock)
            except (OSError, RuntimeError):  # the client already gone, or the loop closing
                sock.close()

        loop.create_task(adopt())

    def _room(self, conn: Connection | None = None) -> bool:
        """Room for one more connection (binary or HTTP): at the cap, close the one that has waited longest on
        its client; False when every open one is being served."""
        with self._admit_lock:
            if len(self._conns) + len(self._wire) < self.max_connections:
                return True
            waiting = [c for c in [*self._conns, *self._wire] if not c.busy and c is not conn]
            if not waiting:
                return False
            victim = min(waiting, key=lambda c: c.since)
            if isinstance(victim, wire.Session):
                self._wire.discard(victim)
                victim.close()  # its thread wakes and ends
            else:
                self._conns.discard(victim)
                if threading.get_ident() == self._loop_thread:
                    victim.close()
                else:
                    self._loop.call_soon_threadsafe(victim.close)
            return True

    # --- the Site a Connection serves (on the event loop's thread) ----------------------------------------------
    def admit(self, conn: Connection) -> bool:
        """Room for one more connection: at the cap, close the one that has waited longest on its client."""
        if not self._room(conn):
            return False
        self._conns.add(conn)
        return True

    def forget(self, conn: Connection) -> None:
        self._conns.discard(conn)

    def accept(self, req: Request, length: int | None) -> Reply | None:
        """A reply now, or None: read the body (then ``serve``)."""
        self._check_caller(req)
        if req.target == "/v1/infer" and req.method == "POST":
            if length is None:
                return error_reply(411, "POST /v1/infer needs a Content-Length")
            cap = min(self.max_body, JSON_MAX_BYTES) if _is_json(req) else self.max_body
            if not 0 < length <= cap:  # refused from the Content-Length: not a byte of the body is kept
                limit = (f"api_max_body_bytes is {size_text(self.max_body)}" if cap == self.max_body else
                         f"JSON bodies are at most {size_text(cap)}: send an .npz")
                return error_reply(413 if length else 400,
                                   f"a body of {size_text(length)}: send 1 byte to {size_text(cap)} ({limit})")
            return None
        if req.target == "/v1/feedback" and req.method == "POST":
            if length is None:
                return error_reply(411, "POST /v1/feedback needs a Content-Length")
            if not 0 < length <= feedback.MAX_BODY:
                return error_reply(413 if length else 400, f"a body of {size_text(length)}: feedback is 1 byte to "
                                                           f"{size_text(feedback.MAX_BODY)}", kind="bad_request")
            return None
        if req.target == "/v1/status" and req.method == "GET":
            return 200, json.dumps(self.status()).encode(), "application/json", ()
        if req.method in ("GET", "POST"):
            return error_reply(404, f"no such endpoint {req.target[:200]}")
        return error_reply(501, f"method {req.method[:20]} is not supported")

    def handle(self, req: Request, body: bytearray) -> Reply:
        """On a worker thread: decode (checked against the model first), infer, encode; or join feedback."""
        if req.target == "/v1/feedback":
            return self._feedback(bytes(body))
        return self._run_inference(body, _is_json(req))

    def _feedback(self, body: bytes) -> Reply:
        status, answer = self.labels(body)
        return status, json.dumps(answer).encode(), "application/json", ()

    def labels(self, body: bytes) -> tuple[int, dict]:
        """POST /v1/feedback and the wire's op feedback: (HTTP status, answer); a refusal's answer is
        {"error", "kind"}."""
        engine = self.engine
        if not engine.quality:
            return 404, {"error": "feedback is off on this device (quality = false in the agent's config)",
                         "kind": "disabled"}
        cur = engine.current
        active = cur.quality if cur is not None else None
        try:
            items, many = feedback.parse(body)
        except feedback.FeedbackError as e:
            if active is not None:
                active.refuse("bad_request")
            return 400, {"error": str(e), "kind": "bad_request"}
        refused: dict[str, int] = {}
        for rid, label in items:
            try:
                engine.feedback.label(rid, label, active)
            except feedback.Refused as e:
                if not many:
                    return feedback.STATUS[e.reason], {"error": str(e), "kind": e.reason}
                refused[e.reason] = refused.get(e.reason, 0) + 1
        return 200, {"accepted": len(items) - sum(refused.values()), "refused": refused}

    def _check_caller(self, req: Request) -> None:
        if self._token is not None:
            scheme, _, given = req.headers.get(b"authorization", b"").partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._token)):
                raise HttpError(401, "this agent's API needs Authorization: Bearer <the token in its api_token_file>",
                                (("WWW-Authenticate", 'Bearer realm="edgefleet-agent"'),))
        host = req.header(b"host")
        if self._check_host and host is not None and not is_loopback(_host_part(host)):
            raise HttpError(400, f"Host {host[:100]!r} is not a loopback address: this agent answers local callers")

    def _run_inference(self, body: bytearray, as_json: bool) -> Reply:
        try:
            model = self.engine.current
            if model is None:
                self.engine.window.error("no_model")
                return error_reply(503, "no model is active on this device yet", kind="no_model")
            try:
                decode = feeds.from_json if as_json else feeds.from_npz
                inputs = decode(body, model.manifest.inputs, self.max_body)
            except FeedError as e:
                self.engine.window.error("bad_input")
                return error_reply(e.status, str(e), kind="bad_input")
            del body
            try:
                outputs, rid = self.engine.serve(inputs)
            except InferenceError as e:
                return error_reply({"bad_input": 400, "no_model": 503}.get(e.kind, 500), str(e), kind=e.kind)
            headers = ((REQUEST_ID, rid),)
            if as_json:
                out = json.dumps({"outputs": {k: v.tolist() for k, v in outputs.items()}, "id": rid}).encode()
                return 200, out, "application/json", headers
            return 200, to_npz(outputs), NPZ, headers
        except Exception as e:
            log.exception("inference request failed")
            return error_reply(500, f"internal error: {type(e).__name__}: {e}")


def _is_json(req: Request) -> bool:
    return (req.header(b"content-type") or "").startswith("application/json")


# --- listening ---------------------------------------------------------------------------------------------------
def _host_part(host: str) -> str:
    """'127.0.0.1:8470' -> '127.0.0.1', '[::1]:8470' -> '::1', 'localhost' -> 'localhost'."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _inode(path: str | None) -> tuple[int, int] | None:
    try:
        st = os.lstat(path) if path else None
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st else None


def _listen_unix(path: str, group: str | None) -> socket.socket:
    """Bound, 0660 and in ``group`` before it listens (until listen(), a connect is refused)."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise EdgefleetError(f"cannot listen on api address unix:{path}: it exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # left by an agent that is gone
            else:
                raise EdgefleetError(f"cannot listen on api address unix:{path}: another process is serving on it")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o660)
        if group:
            _give_group(path, group)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _give_group(path: str, group: str) -> None:
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("api_group %s does not exist here: the api socket %s keeps the agent's group %s (to let "
                    "applications in: groupadd --system %s; usermod -aG %s APP_USER)", group, path,
                    _group_name(os.getegid()), group, group)
        return
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        log.warning("cannot give the api socket %s to group %s: the agent is not in it (under systemd: "
                    "SupplementaryGroups=%s); it keeps the group %s", path, group, group, _group_name(os.getegid()))


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _listen_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


# --- the client --------------------------------------------------------------------------------------------------
class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)  # blocking: with a timeout, a full backlog is an EAGAIN, not a wait
        self.sock.settimeout(self.timeout)


class _TcpConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers and body go out at once


class FeedbackRefused(EdgefleetError):
    """The agent refused a label; ``reason`` says why (agent/feedback.py: unknown_id, expired, duplicate, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class AgentClient:
    """What an application on the device uses: ``AgentClient().infer({"x": x})`` (the service's socket), or
    ``AgentClient("127.0.0.1:8470", token=...)``. Ground truth, when the application learns it::

        outputs, rid = client.infer({"x": x}, with_id=True)
        ...
        client.feedback(rid, true_class)

    On a ``unix:`` address it speaks the binary frames of agent/wire.py (docs/wire.md), one persistent
    connection per thread; ``transport="http"`` keeps HTTP there. A TCP address is always HTTP.
    ``infer(..., shm=True)`` passes the tensors through a shared memory region registered once per connection.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = 30.0, token: str | None = None,
                 transport: str = "auto") -> None:
        if transport not in ("auto", "wire", "http"):
            raise EdgefleetError(f"transport {transport!r}: auto, wire or http")
        self.address = address
        self._where = parse_api_address(address)
        self._timeout = timeout
        self._token = token
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._local = threading.local()
        self.transport = "wire" if isinstance(self._where, str) and transport != "http" else "http"
        if transport == "wire" and self.transport != "wire":
            raise EdgefleetError(f"transport wire needs a unix: address, not {address!r}")

    def _call(self, header: dict | None, bufs: list = (), shm_inputs: dict | None = None
              ) -> tuple[dict, np.ndarray]:
        """One frame on this thread's connection (made on first use); with ``shm_inputs``, an infer whose
        tensors go through the connection's shared region (registered when it is missing or too small).
        One retry on a fresh connection when the agent had closed it (idle, or evicted)."""
        for attempt in (0, 1):
            chan = getattr(self._local, "chan", None)
            try:
                if chan is None:
                    chan = self._local.chan = wire.Channel(self._where, self._timeout, self._token)
                if shm_inputs is not None:
                    self._region_for(chan, shm_inputs)
                    header, bufs = wire.infer_frame(shm_inputs, chan.region)
                return chan.call(header, bufs)
            except wire.Refused:
                raise
            except (OSError, EdgefleetError) as e:
                if chan is not None:
                    chan.close()
                self._local.chan = None
                retry = isinstance(e, (wire.Closed, BrokenPipeError, ConnectionResetError))
                if attempt or not retry:
                    raise EdgefleetError(f"cannot reach the agent at {self.address}: {e}") from None

    @staticmethod
    def _region_for(chan: wire.Channel, inputs: dict) -> None:
        """A region on ``chan`` that holds ``inputs``: as much again for the outputs (at least 1 MiB) when the
        agent takes that (api_max_body_bytes caps a region), else just the inputs (the outputs come in the
        answer's body)."""
        need = sum(-(-np.asarray(a).nbytes // wire.ALIGN) * wire.ALIGN for a in inputs.values())
        if chan.region is not None and chan.region.size >= need:
            return
        sizes = list(dict.fromkeys((max(1 << 20, -(-2 * need // 4096) * 4096), max(4096, -(-need // 4096) * 4096))))
        for i, size in enumerate(sizes):
            region = wire.SharedRegion(size)
            try:
                chan.call({"op": "register"}, fds=[region.fd])
            except wire.Refused as e:
                region.close()
                if e.kind != "bad_shm" or i == len(sizes) - 1:
                    raise
                continue
            except BaseException:
                region.close()
                raise
            if chan.region is not None:
                chan.region.close()
            chan.region = region
            return

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
        headers = {**self._headers, **({"Content-Type": ctype} if body is not None else {})}
        for attempt in (0, 1):  # one retry on a kept-alive connection the server closed (idle, or evicted)
            conn = self._conn()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                self._local.request_id = resp.getheader(REQUEST_ID)
                return resp.status, resp.getheader("Content-Type", ""), resp.read()
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                conn.close()
                self._local.conn = None
                retry = isinstance(e, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError))
                if attempt or not retry:
                    raise EdgefleetError(f"cannot reach the agent at {self.address}: {e}") from None

    def infer(self, inputs: dict[str, np.ndarray], *, with_id: bool = False, shm: bool = False):
        """The outputs; with ``with_id``, (outputs, request id): the id ``feedback`` takes. With ``shm`` (binary
        transport only), the inputs and outputs go through a shared memory region instead of the socket."""
        if self.transport == "wire":
            try:
                if shm:
                    doc, body = self._call(None, shm_inputs=inputs)
                    outputs = wire.outputs_of(doc, body, self._local.chan.region)
                else:
                    header, bufs = wire.infer_frame(inputs)
                    doc, body = self._call(header, bufs)
                    outputs = wire.outputs_of(doc, body)
            except wire.Refused as e:
                raise EdgefleetError(f"agent refused the inference: {e}") from None
            return (outputs, doc.get("id")) if with_id else outputs
        if shm:
            raise EdgefleetError("shared memory needs the binary transport (a unix: address, transport != http)")
        status, ctype, body = self._request("POST", "/v1/infer", to_npz(inputs))
        if status != 200:
            raise EdgefleetError(f"agent refused the inference: {_error(body)}")
        outputs = from_npz(body)
        return (outputs, self._local.request_id) if with_id else outputs

    def feedback(self, request_id: str, label: int | list[int]) -> None:
        """Tell the agent the true class of prediction ``request_id`` (a list of classes for a request of several
        rows). Raises FeedbackRefused (with its ``reason``) when the agent does not take it."""
        if self.transport == "wire":
            try:
                self._call({"op": "feedback", "id": request_id, "label": label})
            except wire.Refused as e:
                raise FeedbackRefused(e.kind, f"agent refused the label: {e}") from None
            return
        doc = json.dumps({"id": request_id, "label": label}).encode()
        status, _, body = self._request("POST", "/v1/feedback", doc, "application/json")
        if status != 200:
            try:
                reason = json.loads(body).get("kind", "other")
            except (ValueError, AttributeError):
                reason = "other"
            raise FeedbackRefused(reason, f"agent refused the label: {_error(body)}")

    def status(self) -> dict:
        if self.transport == "wire":
            try:
                return self._call({"op": "status"})[0]["status"]
            except wire.Refused as e:
                raise EdgefleetError(f"agent status failed: {e}") from None
        status, _, body = self._request("GET", "/v1/status")
        if status != 200:
            raise EdgefleetError(f"agent status failed: {_error(body)}")
        return json.loads(body)

    def close(self) -> None:
        for name in ("conn", "chan"):
            conn = getattr(self._local, name, None)
            if conn is not None:
                conn.close()
                setattr(self._local, name, None)


def _error(body: bytes) -> str:
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")
