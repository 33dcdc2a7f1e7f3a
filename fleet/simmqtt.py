"""A small MQTT v5 client on asyncio streams, for the device simulator (fleet/simulate.py).

paho runs a thread (or a blocking TLS handshake) per client, which does not hold thousands of connections in
one process; this speaks just what an edgefleet device speaks, all on one event loop: CONNECT with a retained
last will and a session expiry, SUBSCRIBE, PUBLISH at QoS 1 both ways (PUBACK), PINGREQ and DISCONNECT. What
it publishes stays in ``pending`` until its PUBACK comes, and is sent again (DUP set, same packet id) after a
reconnect, as paho does for the agent.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Callable

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14
MAX_PACKET = 1 << 20  # what we accept from the broker


class MqttError(Exception):
    """The connection failed or the broker refused something; the message says what."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + _varint(len(body)) + body


def connect_packet(client_id: str, keepalive: int, session_expiry_s: int, clean_start: bool,
                   will: tuple[str, bytes] | None) -> bytes:
    """CONNECT: MQTT v5; the will (topic, payload) retained at QoS 1."""
    flags = 0x02 if clean_start else 0
    if will is not None:
        flags |= 0x04 | (1 << 3) | 0x20
    props = b"\x11" + struct.pack("!I", session_expiry_s)  # Session Expiry Interval
    body = _str("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive) + _varint(len(props)) + props
    body += _str(client_id)
    if will is not None:
        body += _varint(0) + _str(will[0]) + _str(will[1])
    return _packet(CONNECT, 0, body)


def publish_packet(topic: str, payload: bytes, packet_id: int, retain: bool = False, dup: bool = False) -> bytes:
    """PUBLISH at QoS 1."""
    flags = (0x08 if dup else 0) | (1 << 1) | (0x01 if retain else 0)
    return _packet(PUBLISH, flags, _str(topic) + struct.pack("!H", packet_id) + b"\x00" + payload)


class Connection:
    """One MQTT v5 connection. ``on_message(topic, payload)`` is called for every PUBLISH received (it is
    acknowledged after the call returns); ``closed`` is set when the connection ends, ``error`` says why."""

    def __init__(self, on_message: Callable[[str, bytes], None]) -> None:
        self.on_message = on_message
        self.pending: dict[int, bytes] = {}  # packet id -> our PUBLISH not yet acknowledged (kept across reconnects)
        self.refused = 0  # PUBACKs with a failure reason code (the ACL refused the topic)
        self.error: str | None = None
        self.closed = asyncio.Event()
        self._next_id = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self._suback: asyncio.Future | None = None
        self._ready = False  # the CONNACK came: publish() sends at once (before it, pending waits for the resend)

    @property
    def connected(self) -> bool:
        return self._ready and self._writer is not None and not self.closed.is_set()

    async def connect(self, host: str, port: int, ssl_context: ssl.SSLContext | None, client_id: str,
                      keepalive: int, session_expiry_s: int, will: tuple[str, bytes] | None,
                      timeout: float = 30.0, clean_start: bool = False) -> bool:
        """Open the connection and wait for the CONNACK; returns whether the broker had our session. Sends
        again what was pending. MqttError if it fails."""
        self.closed = asyncio.Event()
        self.error = None
        self._ready = False
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ssl_context, server_hostname=host if ssl_context else None,
                                        limit=MAX_PACKET), timeout)
            self._writer.write(connect_packet(client_id, keepalive, session_expiry_s, clean_start, will))
            kind, _, body = await asyncio.wait_for(self._read(), timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError) as e:
            self._close_transport()
            raise MqttError(_describe(e)) from None
        if kind != CONNACK or len(body) < 2:
            self._close_transport()
            raise MqttError(f"the broker answered packet type {kind}, not CONNACK")
        if body[1] >= 0x80:
            self._close_transport()
            raise MqttError(f"the broker refused the connection (reason code 0x{body[1]:02x})")
        for packet in self.pending.values():  # with DUP set: queued while away, or sent and not acknowledged
            self._writer.write(bytes([packet[0] | 0x08]) + packet[1:])
        self._ready = True
        self._task = asyncio.get_running_loop().create_task(self._read_loop())
        return bool(body[0] & 1)

    async def subscribe(self, topics: list[str], timeout: float = 30.0) -> None:
        packet_id = self._id()
        body = struct.pack("!H", packet_id) + b"\x00" + b"".join(_str(t) + b"\x01" for t in topics)
        self._suback = asyncio.get_running_loop().create_future()
        self._send(_packet(SUBSCRIBE, 0x02, body))
        try:
            codes = await asyncio.wait_for(self._suback, timeout)
        except asyncio.TimeoutError:
            raise MqttError("no SUBACK from the broker") from None
        if any(c >= 0x80 for c in codes):
            raise MqttError(f"the broker refused a subscription (reason codes {list(codes)})")

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """Queue a QoS 1 PUBLISH (sent now if connected, else after the next connect); returns its packet id."""
        packet_id = self._id()
        packet = publish_packet(topic, payload, packet_id, retain)
        self.pending[packet_id] = packet
        if self.connected:
            self._send(packet)
        return packet_id

    def ping(self) -> None:
        if self.connected:
            self._send(bytes([PINGREQ << 4, 0]))

    async def drain(self) -> None:
        if self.connected:
            try:
                await self._writer.drain()
            except (OSError, ssl.SSLError) as e:
                self._lost(_describe(e))

    async def disconnect(self) -> None:
        """A clean DISCONNECT (the broker sends no will)."""
        if self.connected:
            self._send(bytes([DISCONNECT << 4, 0]))
            await self.drain()
        self._close_transport()
        if self._task is not None:
            self._task.cancel()
        self.closed.set()

    # -- internals ------------------------------------------------------------------------------------------
    def _id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self.pending:
                return self._next_id
        raise MqttError("65535 messages are waiting for their PUBACK")

    def _send(self, data: bytes) -> None:
        try:
            self._writer.write(data)
        except (OSError, RuntimeError, AttributeError) as e:
            self._lost(str(e))

    async def _read(self) -> tuple[int, int, bytes]:
        first = await self._reader.readexactly(1)
        length, shift = 0, 0
        while True:
            b = (await self._reader.readexactly(1))[0]
            length |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 21:
                raise MqttError("malformed remaining length")
        if length > MAX_PACKET:
            raise MqttError(f"a packet of {length} bytes from the broker")
        return first[0] >> 4, first[0] & 0x0F, await self._reader.readexactly(length)

    async def _read_loop(self) -> None:
        try:
            while True:
                kind, flags, body = await self._read()
                if kind == PUBACK:
                    packet_id = struct.unpack_from("!H", body)[0]
                    if self.pending.pop(packet_id, None) is not None and len(body) > 2 and body[2] >= 0x80:
                        self.refused += 1
                elif kind == PUBLISH:
                    self._received(flags, body)
                elif kind == SUBACK and self._suback is not None and not self._suback.done():
                    n = body[2] if len(body) > 2 else 0
                    start = 3 + n if n < 0x80 else 4 + n  # skip the properties (short in practice)
                    self._suback.set_result(bytes(body[start:]))
                elif kind == DISCONNECT:
                    raise MqttError(f"the broker disconnected us (reason code 0x{body[0] if body else 0:02x})")
        except asyncio.CancelledError:
            raise
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError, MqttError, struct.error, IndexError) as e:
            self._lost("the broker closed the connection" if isinstance(e, asyncio.IncompleteReadError)
                       else _describe(e))

    def _received(self, flags: int, body: bytes) -> None:
        (n,) = struct.unpack_from("!H", body)
        topic = body[2:2 + n].decode("utf-8", "replace")
        pos, qos = 2 + n, (flags >> 1) & 3
        packet_id = None
        if qos:
            (packet_id,) = struct.unpack_from("!H", body, pos)
            pos += 2
        plen, shift = 0, 0
        while True:
            b = body[pos]
            pos += 1
            plen |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        try:
            self.on_message(topic, bytes(body[pos + plen:]))
        finally:
            if packet_id is not None:
                self._send(_packet(PUBACK, 0, struct.pack("!H", packet_id)))

    def _lost(self, why: str) -> None:
        if not self.closed.is_set():
            self.error = why
            self._close_transport()
            self.closed.set()
            if self._suback is not None and not self._suback.done():
                self._suback.set_exception(MqttError(why))

    def _close_transport(self) -> None:
        self._ready = False
        if self._writer is not None:
            try:
                self._writer.close()
            except (OSError, RuntimeError):
                pass
        self._writer = None


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    if isinstance(e, asyncio.IncompleteReadError):  # TLS 1.3 refuses a client certificate after the handshake
        return "the broker closed the connection (a revoked certificate, or one from another fleet's CA?)"
    from agent.transport import describe

    return describe(e)
