"""The local API's binary framing (docs/wire.md): the fast path on the agent's Unix socket, beside HTTP.

Why: HTTP parsing and an .npz per call cost about a millisecond, more than the PP-OCR classifier's own run. A
frame is ``MAGIC | u32 LE header length | u64 LE body length | JSON header | raw body``; arrays travel as their
raw little-endian C-order bytes, read with ``recv_into`` into one buffer the inputs are ``np.frombuffer`` views
of, and replies go out with one ``sendmsg`` of the header and the outputs' own memory (no concatenation).

The server side (``Session``) runs on a thread of its own per connection (agent/api.py accepts them and tells
frames from HTTP by the first 4 bytes), reading and writing there (no event loop hop per request); it keeps the
HTTP side's bounds: a header of at most ``HEADER_MAX`` bytes within ``HEAD_TIMEOUT_S`` (agent/http1.py), a body
within ``BODY_TIMEOUT_S``, an idle connection closed after ``IDLE_TIMEOUT_S``; a body over
``api_max_body_bytes`` is refused from the prefix, the declared names, dtypes, shapes and byte counts are
checked against the model before a byte of the body is read, and the bodies held at once across binary
connections are bounded (``ByteBudget``: ``api_workers + 1`` full-size ones, as for HTTP).

Large tensors can skip the socket: a client registers a sealed memfd once per connection (``SharedRegion``,
op ``register``, the descriptor passed with SCM_RIGHTS) and names ``{"shm": {"offset", "nbytes"}}`` in it.
"""

from __future__ import annotations

import array
import fcntl
import hmac
import json
import logging
import math
import mmap
import os
import socket
import struct
import threading
import time

import msgspec
import numpy as np

from agent import http1
from agent.engine import InferenceError, check_declared
from agent.errors import EdgefleetError
from agent.feeds import size_text

log = logging.getLogger("edgefleet.agent.api")

MAGIC = b"EFW1"
PREFIX = struct.Struct("<4sIQ")  # magic, header length, body length: 16 bytes
HEADER_MAX = 64 << 10
SCRATCH = HEADER_MAX + PREFIX.size + 4096  # the client's read buffer: a whole small answer in one read
ALIGN = 64  # where the agent puts each output in a shared region
ROOM_TIMEOUT_S = 10.0  # how long a body waits for room in the ByteBudget before the client is told to retry
MAX_FDS = 4  # descriptors a frame may carry (all but a register's one are closed at once)
# the dtypes a tensor may have, by numpy's name; always little-endian
DTYPES = {name: np.dtype(name).newbyteorder("<") for name in (
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32",
    "float64")}
_NAMES = {d.newbyteorder(order): n for n, d in DTYPES.items() for order in "<>"}  # dtype.name is slow
_LITTLE = frozenset(DTYPES.values())


# --- the header, typed ---------------------------------------------------------------------------------------
class Shm(msgspec.Struct, forbid_unknown_fields=True):
    offset: int
    nbytes: int


class Tensor(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    dtype: str
    shape: list[int]
    shm: Shm | None = None


class Infer(msgspec.Struct, tag="infer", tag_field="op", forbid_unknown_fields=True):
    inputs: list[Tensor]
    outputs_shm: Shm | None = None


class Status(msgspec.Struct, tag="status", tag_field="op", forbid_unknown_fields=True):
    pass


class Feedback(msgspec.Struct, tag="feedback", tag_field="op", forbid_unknown_fields=True):
    id: object = msgspec.UNSET
    label: object = msgspec.UNSET
    labels: object = msgspec.UNSET


class Register(msgspec.Struct, tag="register", tag_field="op", forbid_unknown_fields=True):
    pass


class Auth(msgspec.Struct, tag="auth", tag_field="op", forbid_unknown_fields=True):
    token: str


_DECODER = msgspec.json.Decoder(Infer | Status | Feedback | Register | Auth)
_encode = msgspec.json.Encoder().encode


class Refusal(Exception):
    """An error frame to answer; ``close``: the stream cannot go on (framing lost, or a body left unread)."""

    def __init__(self, kind: str, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.kind, self.close = kind, close


class _Gone(Exception):
    """The client closed, or a timeout passed: end the connection quietly."""


def nbytes_of(dtype: np.dtype, shape) -> int:
    return dtype.itemsize * math.prod(shape)  # Python ints: no overflow


def _raw(a: np.ndarray) -> memoryview:
    """The bytes of ``a`` as the wire carries them (little-endian, C order), without a copy when it is already so."""
    if a.dtype in _LITTLE and a.flags.c_contiguous and a.size:
        return memoryview(a).cast("B")
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype)
    return memoryview(a.reshape(-1).view(np.uint8))


class Stream:
    """A blocking socket whose every call the kernel bounds (SO_RCVTIMEO / SO_SNDTIMEO of ``step`` seconds),
    longer deadlines kept by calling again until they pass. A read waits in the kernel for all its bytes
    (MSG_WAITALL): one system call and one wake-up, not a poll and a read per chunk as they arrive."""

    def __init__(self, sock: socket.socket, step: float) -> None:
        sock.settimeout(None)
        step = max(step, 0.001)
        tv = struct.pack("ll", int(step), int(step % 1 * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self.sock = sock

    def recv_into(self, view: memoryview, deadline: float, flags: int = 0) -> int:
        """Bytes read (all of ``view`` with MSG_WAITALL unless a step passes; 0: the peer closed), waiting
        until ``deadline`` for the first."""
        while True:
            try:
                return self.sock.recv_into(view, len(view), flags)
            except (BlockingIOError, InterruptedError):  # a step passed with nothing read
                if time.monotonic() >= deadline:
                    raise TimeoutError("timed out") from None

    def recvmsg_into(self, view: memoryview, deadline: float) -> tuple[int, list[int]]:
        """As recv_into, and the descriptors that came with these bytes (SCM_RIGHTS)."""
        while True:
            try:
                n, anc, _, _ = self.sock.recvmsg_into([view], socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_WAITALL)
                break
            except (BlockingIOError, InterruptedError):
                if time.monotonic() >= deadline:
                    raise TimeoutError("timed out") from None
        fds = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += array.array("i", data[:len(data) - len(data) % 4])
        return n, fds

    def fill(self, view: memoryview, deadline: float) -> None:
        """Exactly ``len(view)`` bytes; ConnectionError when the peer closes first."""
        got, n = 0, len(view)
        while got < n:
            if got and time.monotonic() >= deadline:
                raise TimeoutError("timed out")
            k = self.recv_into(view[got:], deadline, socket.MSG_WAITALL)
            if not k:
                raise ConnectionError("the peer closed the connection mid-frame")
            got += k

    def send(self, bufs: list, deadline: float, fds: list[int] | None = None) -> None:
        """``sendmsg`` of ``bufs`` (scatter: nothing is joined), again for whatever a partial send left."""
        views = [memoryview(b).cast("B") for b in bufs if len(b)]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while views:
            try:
                n = self.sock.sendmsg(views[:512], anc)
            except (BlockingIOError, InterruptedError):
                n = 0
            anc = [] if n else anc
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if n:
                views[0] = views[0][n:]
            if views and time.monotonic() >= deadline:
                raise TimeoutError("timed out sending")


def frame(header: dict, body_len: int = 0) -> bytes:
    """The prefix and header of a frame whose body is ``body_len`` bytes."""
    h = _encode(header)
    return PREFIX.pack(MAGIC, len(h), body_len) + h


# --- the server side -----------------------------------------------------------------------------------------
def first_bytes(sock: socket.socket, timeout: float) -> str | None:
    """'wire' when the connection starts with MAGIC, 'http' when it starts with anything else, None when the
    client closes or sends nothing within ``timeout`` (0: look at what is there now). Peeks: the bytes stay for
    whoever reads them next."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        sock.settimeout(max(left, 0.0))  # 0: only what is there already
        try:
            seen = sock.recv(len(MAGIC), socket.MSG_PEEK)
        except (TimeoutError, BlockingIOError):
            return None
        except OSError:
            return None
        if not seen:
            return None
        if seen == MAGIC:
            return "wire"
        if not MAGIC.startswith(seen):
            return "http"
        if left <= 0:
            return None
        time.sleep(0.005)  # a few bytes of the magic so far (MSG_WAITALL does not wait with MSG_PEEK)


class ByteBudget:
    """The request-body bytes binary connections hold at once (thread-safe; agent/http1.py's BodyBudget is the
    event loop's): a connection whose body does not fit waits for room, up to a deadline."""

    def __init__(self, total: int) -> None:
        self.free = total
        self._cond = threading.Condition()

    def take(self, n: int, deadline: float) -> bool:
        with self._cond:
            while self.free < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self.free -= n
            return True

    def give(self, n: int) -> None:
        with self._cond:
            self.free += n
            self._cond.notify_all()


class Region:
    """A client's sealed memfd, mapped for the connection's life."""

    def __init__(self, fd: int, max_bytes: int) -> None:
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            raise Refusal("bad_shm", "the descriptor is not a memfd (os.memfd_create with MFD_ALLOW_SEALING)") from None
        if not seals & fcntl.F_SEAL_SHRINK:
            raise Refusal("bad_shm", "the memfd is not sealed against shrinking: add F_SEAL_SHRINK (fcntl "
                                     "F_ADD_SEALS) before registering it")
        size = os.fstat(fd).st_size
        if not 0 < size <= max_bytes:
            raise Refusal("bad_shm", f"a region of {size_text(size)}: 1 byte to {size_text(max_bytes)} "
                                     f"(api_max_body_bytes)")
        try:
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.writable = True
        except PermissionError:  # F_SEAL_WRITE: inputs only
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            self.writable = False
        self.size = size

    def check(self, shm: Shm, what: str) -> None:
        if not (0 <= shm.offset and 0 <= shm.nbytes and shm.offset + shm.nbytes <= self.size):
            raise Refusal("bad_shm", f"{what}: offset {shm.offset} + {shm.nbytes} bytes is outside the "
                                     f"registered region of {self.size} bytes")

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # an array still views it: unmapped when that goes
            pass


class Session:
    """One binary connection, served on the calling thread (reads and writes with deadlines). ``since`` and
    ``busy`` are what the server's connection cap looks at (as for an HTTP connection)."""

    def __init__(self, sock: socket.socket, site) -> None:
        self.sock, self.site = sock, site
        self.io: Stream | None = None
        self.since = time.monotonic()
        self.busy = False
        self.region: Region | None = None
        self._authed = site.token is None
        self._prefix = bytearray(PREFIX.size)
        self._unread = 0  # body bytes of the current frame not read yet
        self.closed = False

    def close(self) -> None:
        """From another thread (the cap, or the server stopping): the blocked read wakes with EOF."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def serve(self) -> None:
        wait = http1.HEAD_TIMEOUT_S  # the first frame's magic is there already
        try:
            self.io = Stream(self.sock, min(http1.HEAD_TIMEOUT_S, http1.BODY_TIMEOUT_S, http1.IDLE_TIMEOUT_S,
                                            http1.WRITE_TIMEOUT_S, http1.LINGER_S))
            while not self.closed:
                self.since = time.monotonic()
                if not self._one(wait):
                    break
                wait = http1.IDLE_TIMEOUT_S
        except (_Gone, OSError):  # the client went away, or took too long
            pass
        finally:
            if self.region is not None:
                self.region.close()
                self.region = None

    def _one(self, wait: float) -> bool:
        """Read one frame and answer it; False: close the connection."""
        self._unread = 0
        try:
            fds = self._read_prefix(wait)
            magic, hlen, blen = PREFIX.unpack(self._prefix)
            self._unread = blen
            try:
                if magic != MAGIC:
                    raise Refusal("bad_request", f"not a frame: it starts with {bytes(magic)!r}, not {MAGIC!r} "
                                                 f"(docs/wire.md)", close=True)
                if hlen > HEADER_MAX:
                    raise Refusal("bad_request", f"a header of {size_text(hlen)} is over the "
                                                 f"{size_text(HEADER_MAX)} limit", close=True)
                if blen > self.site.max_body:
                    cap = size_text(self.site.max_body)
                    raise Refusal("too_large", f"a body of {size_text(blen)}: at most {cap} (api_max_body_bytes is "
                                               f"{cap}; larger tensors go in a shared region)", close=True)
                header = bytearray(hlen)
                self.io.fill(memoryview(header), time.monotonic() + http1.HEAD_TIMEOUT_S)
                try:
                    req = _DECODER.decode(header)
                except msgspec.DecodeError as e:
                    raise Refusal("bad_request", f"bad header: {str(e).splitlines()[0][:300]}") from None
                self._dispatch(req, blen, fds)
            finally:
                for fd in fds:
                    os.close(fd)
        except Refusal as e:
            self._refuse(e)
            return not e.close
        except (_Gone, OSError):
            raise
        except Exception as e:
            log.exception("the local API failed on a frame")
            self._refuse(Refusal("internal", f"internal error: {type(e).__name__}", close=True))
            return False
        return True

    def _dispatch(self, req, blen: int, fds: list[int]) -> None:
        if isinstance(req, Auth):
            self._no_body(blen, "auth")
            if self.site.token is None or hmac.compare_digest(req.token.encode(), self.site.token):
                self._authed = True
                return self._reply({"ok": True})
            raise Refusal("unauthorized", "wrong token", close=True)
        if not self._authed:
            raise Refusal("unauthorized", "this agent's API needs a token: send {\"op\": \"auth\", \"token\": ...} "
                                          "first (the token in its api_token_file)", close=True)
        if isinstance(req, Infer):
            return self._infer(req, blen)
        if isinstance(req, Status):
            self._no_body(blen, "status")
            return self._reply({"ok": True, "status": self.site.status()})
        if isinstance(req, Feedback):
            self._no_body(blen, "feedback")
            doc = {k: getattr(req, k) for k in ("id", "label", "labels") if getattr(req, k) is not msgspec.UNSET}
            status, answer = self.site.labels(json.dumps(doc).encode())
            if status != 200:
                raise Refusal(answer.get("kind", "bad_request"), answer["error"])
            return self._reply({"ok": True, **answer})
        self._no_body(blen, "register")  # Register
        if len(fds) != 1:
            raise Refusal("bad_shm", f"op register carries one descriptor (SCM_RIGHTS), not {len(fds)}")
        region = Region(fds[0], self.site.max_body)
        if self.region is not None:
            self.region.close()
        self.region = region
        self._reply({"ok": True, "nbytes": region.size, "writable": region.writable})

    def _no_body(self, blen: int, op: str) -> None:
        if blen:
            raise Refusal("bad_request", f"op {op} takes no body ({blen} bytes sent)")

    # --- inference ---------------------------------------------------------------------------------------------
    def _infer(self, req: Infer, blen: int) -> None:
        engine = self.site.engine
        model = engine.current
        if model is None:
            engine.window.error("no_model")
            raise Refusal("no_model", "no model is active on this device yet")
        try:
            plan = _plan(req, model.manifest.inputs, blen, self.region)
        except Refusal as e:
            if e.kind == "bad_input":
                engine.window.error("bad_input")
            raise
        if not self.site.wire_budget.take(blen, time.monotonic() + ROOM_TIMEOUT_S):
            raise Refusal("busy", "the agent is busy with other large requests: retry", close=True)
        deadline = time.monotonic() + http1.BODY_TIMEOUT_S
        try:
            body = np.empty(blen, np.uint8)
            if blen:
                self.io.fill(memoryview(body), deadline)
            self._unread = 0
            self._run(req, plan, body)
        finally:
            self.site.wire_budget.give(blen)

    def _run(self, req: Infer, plan: list[tuple], body: np.ndarray) -> None:
        engine = self.site.engine
        feeds = {}
        for name, dtype, shape, offset, nbytes, shared in plan:
            source = self.region.map if shared else body
            a = np.frombuffer(source, dtype, math.prod(shape), offset).reshape(shape) if nbytes else \
                np.empty(shape, dtype)
            feeds[name] = a if a.flags.aligned else a.copy()
        self.busy = True
        try:
            try:
                outputs, rid = engine.serve(feeds)
            except InferenceError as e:
                raise Refusal(e.kind, str(e)) from None
            del feeds
            self._send_outputs(rid, outputs, req.outputs_shm)
        finally:
            self.busy = False

    def _send_outputs(self, rid: str, outputs: dict, out: Shm | None) -> None:
        metas, bufs, placed = [], [], []
        raws = [(name, _raw(a), a) for name, a in outputs.items()]
        for name, _, a in raws:
            if a.dtype not in _NAMES:
                raise Refusal("runtime", f"output {name!r} is {a.dtype}: not a dtype the wire carries")
        if out is not None and self.region is not None and self.region.writable:
            self.region.check(out, "outputs_shm")
            at = out.offset
            for name, raw, a in raws:
                at = -(-at // ALIGN) * ALIGN
                placed.append(at)
                at += len(raw)
            if at > out.offset + out.nbytes:  # they do not fit: in the body then
                placed = []
        for i, (name, raw, a) in enumerate(raws):
            meta = {"name": name, "dtype": _NAMES[a.dtype], "shape": list(a.shape)}
            if placed:
                self.region.map[placed[i]:placed[i] + len(raw)] = raw
                meta["shm"] = {"offset": placed[i], "nbytes": len(raw)}
            else:
                bufs.append(raw)
            metas.append(meta)
        self._reply({"ok": True, "id": rid, "outputs": metas}, bufs)

    # --- reading and writing -----------------------------------------------------------------------------------
    def _read_prefix(self, wait: float) -> list[int]:
        """The 16-byte prefix; the descriptors that came with its first byte (a register's memfd)."""
        view = memoryview(self._prefix)
        n, fds = self.io.recvmsg_into(view, time.monotonic() + wait)
        if n == 0:
            for fd in fds:
                os.close(fd)
            raise _Gone
        try:
            self.io.fill(view[n:], time.monotonic() + http1.HEAD_TIMEOUT_S)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def _drain(self, n: int) -> None:
        """Drop a refused body of ``n`` bytes (at most api_max_body_bytes) so the connection goes on."""
        scratch = memoryview(bytearray(min(n, 1 << 16)))
        deadline = time.monotonic() + http1.BODY_TIMEOUT_S
        while n > 0:
            k = min(n, len(scratch))
            self.io.fill(scratch[:k], deadline)
            n -= k

    def _reply(self, header: dict, bufs: list = ()) -> None:
        self.io.send([frame(header, sum(len(b) for b in bufs)), *bufs], time.monotonic() + http1.WRITE_TIMEOUT_S)

    def _refuse(self, e: Refusal) -> None:
        """The error frame. With the body still unread: dropped first (the connection goes on), or, when the
        connection closes, for up to LINGER_S after the answer so the client reads it, not a reset."""
        if not e.close and self._unread:
            self._drain(self._unread)
            self._unread = 0
        self._reply({"ok": False, "kind": e.kind, "error": " ".join(str(e).split())[:1000]})  # one bounded line
        if e.close:
            try:
                self.sock.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + http1.LINGER_S
                scratch = memoryview(bytearray(1 << 16))
                while self.io.recv_into(scratch, deadline):
                    pass
            except OSError:
                pass


def _plan(req: Infer, specs, blen: int, region: Region | None) -> list[tuple]:
    """(name, dtype, shape, offset, nbytes, in shared memory) of each input, checked against the model's inputs
    and against the body's length and the region, before a byte of the body is read. Raises Refusal."""
    declared, plan, at = {}, [], 0
    if len(req.inputs) > len(specs):
        raise Refusal("bad_input", f"{len(req.inputs)} inputs: the model takes {len(specs)}")
    for t in req.inputs:
        dtype = DTYPES.get(t.dtype)
        if dtype is None:
            raise Refusal("bad_input", f"input {t.name[:100]!r}: dtype {t.dtype[:40]!r} is not one of "
                                       f"{', '.join(DTYPES)}")
        if t.name in declared:
            raise Refusal("bad_input", f"input {t.name[:100]!r} is named twice")
        if any(d < 0 for d in t.shape) or len(t.shape) > 32:
            raise Refusal("bad_input", f"input {t.name[:100]!r}: shape {t.shape[:33]} (dimensions >= 0, at most 32)")
        declared[t.name] = (dtype, tuple(t.shape))
    try:
        check_declared(specs, declared)
    except InferenceError as e:
        raise Refusal("bad_input", str(e)) from None
    for t in req.inputs:
        dtype, shape = declared[t.name]
        nbytes = nbytes_of(dtype, shape)
        if t.shm is not None:
            if region is None:
                raise Refusal("bad_shm", f"input {t.name!r} is in shared memory, but no region is registered")
            region.check(t.shm, f"input {t.name!r}")
            if t.shm.nbytes != nbytes:
                raise Refusal("bad_input", f"input {t.name!r}: {t.dtype}{list(shape)} is {nbytes} bytes, its shm "
                                           f"says {t.shm.nbytes}")
            plan.append((t.name, dtype, shape, t.shm.offset, nbytes, True))
        else:
            plan.append((t.name, dtype, shape, at, nbytes, False))
            at += nbytes
    if at != blen:
        raise Refusal("bad_input", f"the inputs declare {at} bytes of body, the frame carries {blen}")
    if req.outputs_shm is not None:
        if region is None:
            raise Refusal("bad_shm", "outputs_shm needs a registered region")
        region.check(req.outputs_shm, "outputs_shm")
    return plan


# --- the client side -----------------------------------------------------------------------------------------
class SharedRegion:
    """A sealed memfd to register with the agent (``AgentClient.register``): tensors in it skip the socket.
    Sealed against shrinking and growing, as the agent requires (a shrunk region would crash its reader)."""

    def __init__(self, nbytes: int) -> None:
        self.fd = os.memfd_create("edgefleet-tensors", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, nbytes)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self.map = mmap.mmap(self.fd, nbytes)
        except BaseException:
            os.close(self.fd)
            raise
        self.size = nbytes

    def put(self, offset: int, a: np.ndarray) -> dict:
        """Copy ``a`` in at ``offset``: the shm field of a tensor there."""
        raw = _raw(a)
        self.map[offset:offset + len(raw)] = raw
        return {"offset": offset, "nbytes": len(raw)}

    def view(self, offset: int, dtype: np.dtype, shape) -> np.ndarray:
        return np.frombuffer(self.map, dtype, math.prod(shape), offset).reshape(shape)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass
        os.close(self.fd)


class Channel:
    """One client connection speaking frames (one per thread in AgentClient)."""

    def __init__(self, path: str, timeout: float, token: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)  # blocking: with a timeout, a full backlog is an EAGAIN, not a wait
            self.io = Stream(self.sock, timeout)
        except BaseException:
            self.sock.close()
            raise
        self.timeout = timeout
        self.region: SharedRegion | None = None
        self._scratch = memoryview(bytearray(SCRATCH))
        if token:
            self.call({"op": "auth", "token": token})

    def call(self, header: dict, bufs: list = (), fds: list[int] | None = None) -> tuple[dict, np.ndarray]:
        """Send a frame, read the answer: (its header, its body). An error frame raises Refused."""
        deadline = time.monotonic() + self.timeout
        self.io.send([frame(header, sum(len(b) for b in bufs)), *bufs], deadline, fds)
        # one read takes a small answer whole: nothing follows the answer (one request at a time), so reading
        # past its end cannot take another frame's bytes
        scratch, got = self._scratch, 0
        while got < PREFIX.size:
            k = self.io.recv_into(scratch[got:], deadline)
            if not k:
                raise (ConnectionError if got else Closed)("the agent closed the connection")
            got += k
        magic, hlen, blen = PREFIX.unpack(scratch[:PREFIX.size])
        if magic != MAGIC or hlen > HEADER_MAX:
            raise EdgefleetError(f"the agent's answer is not a frame (starts with {bytes(magic)!r})")
        end = PREFIX.size + hlen
        if got < end:
            self.io.fill(scratch[got:end], deadline)
            got = end
        head = scratch[PREFIX.size:end]
        body = np.empty(blen, np.uint8)
        if blen:
            early = min(got - end, blen)
            body[:early] = scratch[end:end + early]
            self.io.fill(memoryview(body)[early:], deadline)
        try:
            doc = msgspec.json.decode(head)
        except msgspec.DecodeError as e:
            raise EdgefleetError(f"the agent's answer has a bad header: {e}") from None
        if not isinstance(doc, dict) or not doc.get("ok"):
            raise Refused(doc.get("kind", "other"), doc.get("error", "(no message)"))
        return doc, body

    def close(self) -> None:
        self.sock.close()
        if self.region is not None:
            self.region.close()
            self.region = None


class Closed(ConnectionError):
    """The agent closed the connection before answering (idle timeout, or the cap made room): retry once."""


class Refused(EdgefleetError):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def outputs_of(doc: dict, body: np.ndarray, region: SharedRegion | None = None) -> dict[str, np.ndarray]:
    """The output arrays an answer describes: views of its body, or copies out of the shared region."""
    out, at = {}, 0
    try:
        for o in doc["outputs"]:
            dtype, shape = DTYPES[o["dtype"]], tuple(o["shape"])
            n = math.prod(shape)
            if "shm" in o:
                out[o["name"]] = region.view(o["shm"]["offset"], dtype, shape).copy()
                continue
            out[o["name"]] = np.frombuffer(body, dtype, n, at).reshape(shape) if n else np.empty(shape, dtype)
            at += n * dtype.itemsize
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise EdgefleetError(f"the agent's answer does not describe its outputs: {type(e).__name__}: {e}") from None
    if at != len(body):
        raise EdgefleetError(f"the agent's answer declares {at} bytes of outputs and carries {len(body)}")
    return out


def infer_frame(inputs: dict[str, np.ndarray], region: SharedRegion | None = None) -> tuple[dict, list]:
    """The header and body of an infer request; with ``region``, the inputs are copied into it and the outputs
    asked back into the rest of it."""
    metas, bufs, at = [], [], 0
    for name, a in inputs.items():
        a = np.asarray(a)
        dtype = _NAMES.get(a.dtype)
        if dtype is None:
            raise EdgefleetError(f"input {name!r} is {a.dtype}: send one of {', '.join(DTYPES)}")
        meta = {"name": name, "dtype": dtype, "shape": list(a.shape)}
        if region is not None:
            meta["shm"] = region.put(at, a)
            at = -(-(at + meta["shm"]["nbytes"]) // ALIGN) * ALIGN
        else:
            bufs.append(_raw(a))
        metas.append(meta)
    header = {"op": "infer", "inputs": metas}
    if region is not None:
        header["outputs_shm"] = {"offset": at, "nbytes": max(0, region.size - at)}
    return header, bufs
