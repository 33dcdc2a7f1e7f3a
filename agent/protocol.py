"""Wire contract v1: the MQTT topics and messages that devices and the fleet speak.

Every payload is JSON with ``"v": 1`` and decodes into one of the typed structs below,
which reject unknown and ill-typed fields with a message naming the field. Topic strings
are built here and nowhere else.
"""

from __future__ import annotations

import time
from typing import Literal

import msgspec

from agent.errors import EdgefleetError

VERSION = 1
PREFIX = "edgefleet/v1"

# device -> fleet
STATE = "state"
TELEMETRY = "telemetry"
EVENTS = "events"
# fleet -> device
DESIRED = "desired"
CMD = "cmd"
KINDS = (STATE, TELEMETRY, EVENTS, DESIRED, CMD)
DEVICE_KINDS = (STATE, TELEMETRY, EVENTS)

# Upper bounds (ms) of the latency histogram's buckets; the last bucket is everything above.
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

EventKind = Literal[
    "downloading", "verifying", "activating", "active", "failed", "rolled_back", "error"
]


class ProtocolError(EdgefleetError, ValueError):
    """A topic or payload that does not follow the contract; the message says why."""


class _Msg(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=False):
    pass


class ActiveModel(_Msg):
    name: str
    version: str
    sha256: str
    runtime: str
    precision: str
    deployment_id: str | None = None


class State(_Msg):
    device_id: str
    online: bool
    time: float
    boot_id: str = ""
    agent_version: str = ""
    arch: str = ""
    cpu_flags: list[str] = []
    runtimes: list[str] = []
    active: ActiveModel | None = None
    v: int = VERSION


class Latency(_Msg):
    p50: float
    p95: float
    p99: float
    max: float
    mean: float


class Telemetry(_Msg):
    device_id: str
    boot_id: str
    seq: int
    time: float
    interval_s: float
    inferences: int
    errors: dict[str, int] = {}
    latency_ms: Latency | None = None
    histogram: list[int] = []
    active: ActiveModel | None = None
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    memory_percent: float = 0.0
    disk_free_bytes: int = 0
    temperature_c: float | None = None
    load1: float | None = None
    outbox_pending: int = 0  # messages queued on the device, not yet acknowledged by the broker
    outbox_dropped: int = 0  # messages the device's full (or too old) outbox dropped, ever
    v: int = VERSION


class Event(_Msg):
    device_id: str
    boot_id: str
    seq: int
    time: float
    kind: EventKind
    deployment_id: str | None = None
    sha256: str | None = None
    version: str | None = None
    reason: str = ""
    v: int = VERSION


class Desired(_Msg):
    deployment_id: str
    name: str
    version: str
    url: str
    sha256: str
    size: int
    settings: dict[str, str | int | float | bool] = {}
    time: float = 0.0
    v: int = VERSION


class Cmd(_Msg):
    id: str
    kind: Literal["ping", "rollback", "report"]
    time: float = 0.0
    v: int = VERSION


Message = State | Telemetry | Event | Desired | Cmd
_TYPES: dict[str, type] = {
    STATE: State, TELEMETRY: Telemetry, EVENTS: Event, DESIRED: Desired, CMD: Cmd
}
_ENCODER = msgspec.json.Encoder()
_DECODERS = {kind: msgspec.json.Decoder(cls) for kind, cls in _TYPES.items()}


def topic(device_id: str, kind: str) -> str:
    """The topic of one device's messages of one kind."""
    check_device_id(device_id)
    if kind not in KINDS:
        raise ProtocolError(f"unknown message kind {kind!r}")
    return f"{PREFIX}/{device_id}/{kind}"


def subscription(kind: str, device_id: str = "+") -> str:
    """A topic filter: one kind of message from every device (or one)."""
    return f"{PREFIX}/{device_id}/{kind}"


def parse_topic(name: str) -> tuple[str, str]:
    """Split a topic into (device_id, kind), or raise ProtocolError."""
    parts = name.split("/")
    if len(parts) != 4 or "/".join(parts[:2]) != PREFIX or parts[3] not in KINDS:
        raise ProtocolError(f"not an edgefleet v1 topic: {name!r}")
    check_device_id(parts[2])
    return parts[2], parts[3]


def check_device_id(device_id: str) -> str:
    ok = 0 < len(device_id) <= 128 and all(c.isalnum() or c in "-_." for c in device_id)
    if not ok:
        raise ProtocolError(
            f"invalid device id {device_id!r}: use 1-128 letters, digits, '-', '_' or '.'"
        )
    return device_id


def encode(msg: Message) -> bytes:
    return _ENCODER.encode(msg)


def decode(kind: str, payload: bytes) -> Message:
    """Decode and validate one payload of the given kind; ProtocolError names what is wrong."""
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    try:
        msg = decoder.decode(payload)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"invalid {kind} message: {e}") from None
    except msgspec.DecodeError as e:
        raise ProtocolError(f"{kind} payload is not JSON: {e}") from None
    if msg.v != VERSION:
        raise ProtocolError(f"{kind} message has version {msg.v}, expected {VERSION}")
    return msg


def now() -> float:
    return time.time()
