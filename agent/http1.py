"""The little of HTTP/1.1 the local API speaks, as an asyncio protocol whose every resource is bounded.

A ``Connection`` reads a request head of at most ``HEAD_MAX`` bytes and ``MAX_HEADERS`` fields (431) within
``HEAD_TIMEOUT_S`` of its first byte (of the accept, on a new connection), asks its ``Site`` whether to take
the body (the site answers at once, e.g. 413 from the Content-Length, or says to read it), reads the body
into one buffer of exactly its Content-Length within ``BODY_TIMEOUT_S``, once the site's ``BodyBudget`` has
room for it (until then it stops reading: back-pressure), hands it to the site and writes the reply. Bodies
are Content-Length only (no chunked transfer coding: 411), HTTP/1.0 and 1.1 only (505), anything malformed is
a 400, always as JSON ``{"error": ...}``. A kept-alive connection idle for ``IDLE_TIMEOUT_S`` is closed; a
client that does not read its replies stops being read, and is closed after ``WRITE_TIMEOUT_S``. A body
refused unread is dropped (never kept) for up to ``LINGER_S`` so that the client reads the refusal rather
than a reset connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from http import HTTPStatus
from typing import Protocol

log = logging.getLogger("edgefleet.agent.api")

HEAD_MAX = 16 << 10  # request line + headers
MAX_HEADERS = 64
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 60.0
IDLE_TIMEOUT_S = 60.0
WRITE_TIMEOUT_S = 60.0
LINGER_S = 2.0

Reply = tuple[int, bytes, str, tuple[tuple[str, str], ...]]  # status, body, content type, extra headers


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


class Request:
    __slots__ = ("method", "target", "version", "headers")

    def __init__(self, method: str, target: str, version: str, headers: dict[bytes, bytes]) -> None:
        self.method, self.target, self.version, self.headers = method, target, version, headers

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get(b"connection", b"").lower()
        return self.version == "HTTP/1.1" and b"close" not in conn

    def content_length(self) -> int | None:
        """The body's length, None when there is none announced; a chunked body is refused (411)."""
        if b"transfer-encoding" in self.headers:
            raise HttpError(411, "send the body with a Content-Length (Transfer-Encoding is not supported)")
        value = self.headers.get(b"content-length")
        if value is None:
            return None
        if not value.isdigit() or len(value) > 18:
            raise HttpError(400, f"Content-Length {value[:40].decode('latin-1')!r} is not a number of bytes")
        return int(value)


def parse_head(head: bytes) -> Request:
    """``head``: the bytes up to and including the blank line that ends the headers."""
    lines = head.split(b"\r\n")[:-2]
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise HttpError(400, "malformed request line: expected METHOD TARGET HTTP/1.1")
    method, target, version = (p.decode("latin-1") for p in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/"):
            raise HttpError(505, f"{version} is not supported: speak HTTP/1.1")
        raise HttpError(400, "malformed request line: expected METHOD TARGET HTTP/1.1")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or line.startswith((b" ", b"\t")):
            raise HttpError(400, f"malformed header line {line[:60].decode('latin-1')!r}")
        name, value = name.lower(), value.strip(b" \t")
        if name in headers:
            if name in (b"content-length", b"authorization", b"host") and headers[name] != value:
                raise HttpError(400, f"conflicting {name.decode('latin-1')} headers")
            if name not in (b"content-length", b"authorization", b"host"):
                value = headers[name] + b", " + value
        headers[name] = value
    return Request(method, target, version, headers)


def response(status: int, body: bytes, ctype: str = "application/json", *, keep_alive: bool = True,
             headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The response head for ``body``."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", "Server: edgefleet-agent", f"Content-Type: {ctype}",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_body(message: str, **extra) -> bytes:
    return json.dumps({"error": message, **extra}).encode()


def _encode(reply: Reply, keep_alive: bool) -> bytes:
    status, body, ctype, headers = reply
    return response(status, body, ctype, keep_alive=keep_alive, headers=headers) + body


def error_reply(status: int, message: str, headers: tuple[tuple[str, str], ...] = (), **extra) -> Reply:
    return status, error_body(message, **extra), "application/json", headers


class Site(Protocol):
    """What a Connection serves."""

    budget: BodyBudget
    executor: Executor  # where handle() runs

    def admit(self, conn: Connection) -> bool: ...  # room for one more connection?

    def forget(self, conn: Connection) -> None: ...

    def accept(self, req: Request, length: int | None) -> Reply | None: ...  # a reply now, or None: read the body

    def handle(self, req: Request, body: bytearray) -> Reply: ...  # on an executor thread


class BodyBudget:
    """The request-body bytes held at once, across connections (event loop only). A connection that does not
    fit waits, not reading, in arrival order."""

    def __init__(self, total: int) -> None:
        self.free = total
        self._waiting: deque[tuple[int, Callable[[], None]]] = deque()

    def take(self, n: int, start: Callable[[], None]) -> bool:
        """Take ``n`` bytes now (True), or queue ``start`` to be called once they are taken (False)."""
        if not self._waiting and self.free >= n:
            self.free -= n
            return True
        self._waiting.append((n, start))
        return False

    def cancel(self, start: Callable[[], None]) -> None:
        if self._waiting:
            self._waiting = deque(w for w in self._waiting if w[1] is not start)

    def give(self, n: int) -> None:
        self.free += n
        while self._waiting and self.free >= self._waiting[0][0]:
            need, start = self._waiting.popleft()
            self.free -= need
            start()


class Connection(asyncio.Protocol):
    """One client connection; see the module's docstring. ``since`` and ``busy`` are what the site's
    connection cap looks at: the connection that has waited on its client (for a head, a body or room)
    longest is the one closed to make room; one whose request is being served (``busy``) never is."""

    def __init__(self, site: Site, loop: asyncio.AbstractEventLoop, *, tcp: bool) -> None:
        self.site, self.loop, self._tcp = site, loop, tcp
        self.transport: asyncio.Transport | None = None
        self.since = loop.time()
        self.busy = False
        self._state = "head"  # head | wait (for budget) | body | busy | drain | closed
        self._buf = bytearray()  # bytes of the next head (and anything pipelined after it)
        self._scanned = 0  # how much of _buf has been searched for the end of a head
        self._first = True  # no byte of the current head yet
        self._timer: asyncio.TimerHandle | None = None
        self._req: Request | None = None
        self._length = 0
        self._body: bytearray | None = None
        self._got = 0
        self._held = 0  # budget bytes this connection holds
        self._unread = 0  # drain: bytes of a refused body still to drop
        self._eof = False
        self._read_paused = False
        self._write_paused = False

    # --- asyncio callbacks -----------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self.site.admit(self):
            self._state = "closed"
            transport.abort()
            return
        if self._tcp:  # asyncio sets TCP_NODELAY only on sockets made with IPPROTO_TCP
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm(HEAD_TIMEOUT_S)

    def connection_lost(self, exc) -> None:
        self._state = "closed"
        self._disarm()
        self.site.budget.cancel(self._start_body)
        self._give_back()
        self._body = self._buf = None
        self.site.forget(self)

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == "body":
            self._body_data(data)
        elif state == "head":
            self._buf += data
            self._drive()
        elif state == "drain":
            self._unread -= len(data)
            if self._unread <= 0:
                self.transport.close()
        elif state != "closed":  # wait / busy: a pipelined next request, kept up to a head's worth
            self._buf += data
            if len(self._buf) > HEAD_MAX:
                self._pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        return self._state == "busy"  # keep the transport open to send the reply being computed, then close

    def pause_writing(self) -> None:  # the client does not read its replies: stop reading its requests
        self._write_paused = True
        self._pause_reading()
        self._arm(WRITE_TIMEOUT_S)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._state == "head":
            self._arm(IDLE_TIMEOUT_S)
            self._resume_reading()
            self._drive()

    # --- the request cycle -----------------------------------------------------------------------------------
    def _drive(self) -> None:
        """Serve every complete head in the buffer, while nothing else is in progress."""
        while self._state == "head" and not self._write_paused:
            if self._first and self._buf:
                self._first = False
                self.since = self.loop.time()
                self._arm(HEAD_TIMEOUT_S)
            end = self._buf.find(b"\r\n\r\n", max(0, self._scanned - 3), HEAD_MAX + 4)
            if end < 0:
                self._scanned = len(self._buf)
                if len(self._buf) > HEAD_MAX:
                    self._refuse(error_reply(431, f"request line and headers over {HEAD_MAX >> 10} KiB"), 0)
                return
            head = bytes(self._buf[:end + 4])
            del self._buf[:end + 4]
            self._scanned = 0
            self._request(head)

    def _request(self, head: bytes) -> None:
        length = 0
        try:
            req = parse_head(head)
            length = req.content_length() or 0
            reply = self.site.accept(req, req.content_length())
        except HttpError as e:
            return self._refuse(error_reply(e.status, str(e), e.headers), length)
        except Exception as e:
            log.exception("the local API failed on a request")
            return self._refuse(error_reply(500, f"internal error: {type(e).__name__}"), length)
        if reply is not None:
            if length or reply[0] == 411:  # a body the site does not want, or one of unknown length
                return self._refuse(reply, length)
            return self._reply(reply, req.keep_alive)
        self._req, self._length = req, length
        if self.site.budget.take(length, self._start_body):
            self._held = length
            self._start_body()
        else:
            self._state = "wait"
            self._pause_reading()
            self._arm(BODY_TIMEOUT_S)

    def _start_body(self) -> None:
        """Once the budget has room for the body (taken by BodyBudget when it was queued)."""
        self._held = self._length
        if self._state == "closed":
            return self._give_back()
        self._state, self._body, self._got = "body", bytearray(self._length), 0
        self.since = self.loop.time()
        self._arm(BODY_TIMEOUT_S)
        if b"100-continue" in self._req.headers.get(b"expect", b"").lower():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._resume_reading()
        if self._buf:
            early, self._buf = self._buf, bytearray()
            self._body_data(early)

    def _body_data(self, data) -> None:
        body = self._body
        n = min(len(data), len(body) - self._got)
        body[self._got:self._got + n] = memoryview(data)[:n]
        self._got += n
        if n < len(data):
            self._buf += memoryview(data)[n:]  # pipelined: the next request's
        if self._got == len(body):
            self._state, self.busy, self._body = "busy", True, None
            self._disarm()
            self._submit(body)

    def _submit(self, body: bytearray) -> None:
        """Run the site's handler on its executor. The worker writes the reply to the socket itself (through
        its own dup of the descriptor, so a connection closed meanwhile cannot hand it to another client):
        the reply does not wait for the event loop to wake; whatever does not fit the socket buffer is
        written by the loop afterwards."""
        req, site, loop = self._req, self.site, self.loop
        keep_alive = req.keep_alive and not self._eof
        fd = -1
        if self.transport.get_write_buffer_size() == 0:
            fd = os.dup(self.transport.get_extra_info("socket").fileno())

        def job() -> tuple[bool, bytes]:
            try:
                data = _encode(site.handle(req, body), keep_alive)
            except Exception as e:
                log.exception("the local API failed on a request")
                data = _encode(error_reply(500, f"internal error: {type(e).__name__}"), False)
            if fd < 0:
                return keep_alive, data
            try:
                return keep_alive, data[os.write(fd, data):]
            except (BlockingIOError, InterruptedError):
                return keep_alive, data
            except OSError:  # the client is gone
                return False, b""
            finally:
                os.close(fd)

        def done(f) -> None:
            try:
                loop.call_soon_threadsafe(self._served, f)
            except RuntimeError:  # the loop has closed (the server stopped)
                pass

        site.executor.submit(job).add_done_callback(done)

    def _served(self, f) -> None:
        self._give_back()
        self.busy = False
        if self._state == "closed" or f.cancelled():
            return
        keep_alive, rest = f.result()
        if rest:
            self.transport.write(rest)
        self._next(keep_alive)
        self._drive()

    def _reply(self, reply: Reply, keep_alive: bool) -> None:
        keep_alive = keep_alive and not self._eof
        self._write(reply, keep_alive)
        self._next(keep_alive)

    def _next(self, keep_alive: bool) -> None:
        if not keep_alive or self._eof:
            self._state = "closed"
            self.transport.close()
            return
        self._state, self._req, self._first = "head", None, True
        self.since = self.loop.time()
        if not self._write_paused:
            self._arm(IDLE_TIMEOUT_S)
            self._resume_reading()

    def _refuse(self, reply: Reply, unread: int) -> None:
        """Answer, then close; drop what still comes of an unread body for up to LINGER_S."""
        self._write(reply, False)
        unread -= len(self._buf)
        if unread > 0 and not self._eof and self.transport.can_write_eof():
            self._state, self._unread, self._buf = "drain", unread, bytearray()
            self.transport.write_eof()
            self._resume_reading()
            self._arm(LINGER_S)
        else:
            self._state = "closed"
            self.transport.close()

    def _write(self, reply: Reply, keep_alive: bool) -> None:
        self.transport.write(_encode(reply, keep_alive))

    # --- helpers ---------------------------------------------------------------------------------------------
    def _give_back(self) -> None:
        if self._held:
            held, self._held = self._held, 0
            self.site.budget.give(held)

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._state == "wait":  # no room for the body in time
            self.site.budget.cancel(self._start_body)
            return self._refuse(error_reply(503, "the agent is busy with other large requests: retry",
                                            (("Retry-After", "1"),)), self._length)
        if self._state != "busy":
            self.close()

    def _pause_reading(self) -> None:
        if not self._read_paused and not self.transport.is_closing():
            self._read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and not self.transport.is_closing():
            self._read_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Close now (a timeout, or the cap making room)."""
        self._state = "closed"
        self.transport.abort()
