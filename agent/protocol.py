"""Wire contract v1: the MQTT topics and messages that devices and the fleet speak.

Every payload is JSON with ``"v": 1`` and decodes into one of the typed structs below,
which reject unknown and ill-typed fields with a message naming the field. Topic strings
are built here and nowhere else.

Every string, list and map has a bound, so a message is refused (with the field named, e.g.
``Expected `str` of length <= 2000 - at `$.reason```) before anything acts on it:

=========================  =================================================================
device_id                  ``[a-z0-9][a-z0-9._-]{0,62}``: ASCII lowercase, 1-63 characters
sha256                     exactly 64 lowercase hex digits
deployment_id, cmd id      ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``, 1-64 characters (the fleet makes
                           ``dep-20261201-120000-1a2b3c``, ``ro-...-w2``, ``ro-...-rb1``)
boot_id                    ``[A-Za-z0-9._-]{1,64}`` (the agent's is 16 hex digits); the retained
                           last will's state may leave it empty
model name                 ``[A-Za-z0-9][A-Za-z0-9._+-]{0,127}`` (the converter's grammar)
version                    ``[A-Za-z0-9][A-Za-z0-9._+-]{0,63}``
runtime, precision         ``[A-Za-z0-9][A-Za-z0-9._+-]{0,31}``
arch, agent_version        ``[A-Za-z0-9._+-]``, at most 32 / 64 characters
cpu_flags, runtimes        at most 64 / 16 items of ``[A-Za-z0-9._+-]{1,32}``
devices (state)            at most 16 runtimes x 16 devices, each ``[A-Za-z0-9._+-]{1,32}``
serving (active model)     device and provider ``[A-Za-z0-9._+-]{1,32}``; fallback at most 2000 characters
accelerators (telemetry)   at most 16; name ``[A-Za-z0-9._+-]{1,32}``, kind gpu|npu, utilization 0..100 or
                           null (unknown), memory bytes >= 0 or null
errors (telemetry)         at most 64 kinds, keys ``[A-Za-z0-9._-]{1,64}``, counts >= 0
histogram                  at most 64 buckets, counts >= 0
quality bins               at most 16 outputs x 8 features x 64 bins; confusion at most 1089 cells
                           (33 x 33: the profile's 32 classes + "other"); refusal reasons at most 16
event reason               at most 2000 characters (the agent cuts longer ones where it builds them)
Desired.url                1-2048 characters (which URLs a device fetches is the agent's policy:
                           agent/updater.py)
Desired.size               1 .. 2**40 bytes (the agent's ``max_bundle_bytes`` is lower)
Desired.settings           at most 64 entries, keys ``[A-Za-z0-9._-]{1,64}``, strings <= 1024
keyid, sig                 16 hex digits; base64 (at most 200 characters): the controller's signature over a
                           desired or cmd (agent/signing.py), a trust statement's
Desired.trust              at most 64 trust statements; a statement's ``key`` is one PEM public key
Ack.ranges                 1..256 ranges ``[first, last]`` of seqs (each >= 0)
seq, counts, bytes, time   >= 0; percentages 0..100 (cpu_percent: >= 0, one core is 100);
                           temperature_c -273.15..1000
=========================  =================================================================
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace
from typing import Annotated, Any, Literal

import msgspec

from agent.errors import EdgefleetError

VERSION = 1
PREFIX = "edgefleet/v1"

# device -> fleet
STATE = "state"
TELEMETRY = "telemetry"
EVENTS = "events"
QUALITY = "quality"  # additive: the model-quality counts of a window (its own topic: see Quality)
# fleet -> device
DESIRED = "desired"
CMD = "cmd"
ACK = "ack"  # additive: what the controller has stored (see Ack)
KINDS = (STATE, TELEMETRY, EVENTS, QUALITY, DESIRED, CMD, ACK)
DEVICE_KINDS = (STATE, TELEMETRY, EVENTS, QUALITY)

# Upper bounds (ms) of the latency histogram's buckets; the last bucket is everything above.
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

StorageState = Literal["ok", "full", "read_only"]  # can the agent write its state dir
EventKind = Literal[
    "downloading", "verifying", "activating", "active", "failed", "rolled_back", "error"
]

# --- the bounds (use the compiled patterns with fullmatch) -----------------------------------------------
SHA256_RE = re.compile(r"[0-9a-f]{64}")
DEVICE_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # deployment ids, cmd ids
BOOT_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,31}")  # runtime, precision
MAX_REASON = 2000
MAX_URL = 2048
MAX_SIZE = 1 << 40
MAX_SETTINGS = 64
MAX_SETTING_CHARS = 1024


def _pattern(regex: re.Pattern[str]) -> str:
    """``regex`` as a msgspec/JSON Schema pattern that must match the whole string. msgspec applies
    patterns with ``re.search``, where ``$`` also matches before a trailing newline: ``(?!\\n)`` refuses that
    (and is a no-op for JSON Schema's ECMA-262 regexes, where ``$`` is the end)."""
    return f"^(?:{regex.pattern})$(?!\\n)"


def _str(regex: re.Pattern[str] | None = None, max_length: int | None = None, **kw: Any) -> Any:
    meta = {"pattern": _pattern(regex)} if regex is not None else {}
    if max_length is not None:
        meta["max_length"] = max_length
    return Annotated[str, msgspec.Meta(**meta, **kw)]


Sha256 = _str(SHA256_RE, min_length=64, max_length=64)
DeviceId = _str(DEVICE_ID_RE)
Id = _str(ID_RE)
BootId = _str(BOOT_ID_RE)
Name = _str(NAME_RE)
Version = _str(VERSION_RE)
Token = _str(TOKEN_RE)
Reason = _str(max_length=MAX_REASON)
Url = _str(min_length=1, max_length=MAX_URL)
KEYID_RE = re.compile(r"[0-9a-f]{16}")
KeyId = _str(KEYID_RE)
Signature = _str(re.compile(r"[A-Za-z0-9+/=]{1,200}"))  # base64 of an ed25519 signature (88 characters)
PemKey = _str(re.compile(r"-----BEGIN PUBLIC KEY-----\n[A-Za-z0-9+/=\n]{1,300}-----END PUBLIC KEY-----\n?"))
MAX_STATEMENTS = 64
MAX_ACCELERATORS = 16  # a telemetry message's accelerators (agent/accel.py reports at most this many)
_Short = Annotated[str, msgspec.Meta(pattern=_pattern(re.compile(r"[A-Za-z0-9._+-]{1,32}")))]
_Str64 = Annotated[str, msgspec.Meta(pattern=_pattern(re.compile(r"[A-Za-z0-9._+-]{0,64}")))]
_Key = Annotated[str, msgspec.Meta(pattern=_pattern(re.compile(r"[A-Za-z0-9._-]{1,64}")))]
Count = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]
Ms = Annotated[float, msgspec.Meta(ge=0)]


class ProtocolError(EdgefleetError, ValueError):
    """A topic or payload that does not follow the contract; the message says why."""


class _Msg(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=False):
    pass


class Serving(_Msg):
    """What really runs the active model (issue 14), as the runtime reports it after loading, not what the bundle
    asked for: ``device`` in the runtime's own words (OpenVINO "CPU", "GPU.0", "NPU"; ONNX Runtime and LiteRT
    "CPU" or "GPU"), ``provider`` the engine inside the runtime (an ONNX Runtime execution provider such as
    "CPUExecutionProvider", the OpenVINO device plugin, a LiteRT delegate or "builtin"), ``fallback`` why the
    bundle's earlier choices are not the ones serving ("" when its first choice runs)."""

    device: _Short
    provider: _Short
    fallback: Reason = ""


class AcceleratorUsage(_Msg):
    """One accelerator's load over the telemetry window, where the machine exposes it (agent/accel.py). None is
    "this machine does not say", never a made-up 0."""

    name: _Short  # the device node's name: "nvidia0", "card0", "accel0"
    kind: Literal["gpu", "npu"]
    driver: _Str64 = ""  # the kernel driver or library it was read from: "nvml", "i915", "xe", "intel_vpu"
    utilization_percent: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None
    memory_used_bytes: Count | None = None
    memory_total_bytes: Count | None = None


class ActiveModel(_Msg):
    name: Name
    version: Version
    sha256: Sha256
    runtime: Token
    precision: Token
    deployment_id: Id | None = None
    # additive, optional: the release key that signed the running bundle, and the bundle's serial
    signed_by: KeyId | None = None
    serial: Count | None = None
    serving: Serving | None = None  # additive, optional: the device and provider that really run it


class State(_Msg):
    device_id: DeviceId
    online: bool
    time: Seconds
    boot_id: Annotated[str, msgspec.Meta(pattern=_pattern(re.compile(f"(?:{BOOT_ID_RE.pattern})?")))] = ""
    agent_version: Annotated[str, msgspec.Meta(pattern=_pattern(re.compile(r"[A-Za-z0-9._+-]{0,64}")))] = ""
    arch: Annotated[str, msgspec.Meta(pattern=_pattern(re.compile(r"[A-Za-z0-9._+-]{0,32}")))] = ""
    cpu_flags: Annotated[list[_Short], msgspec.Meta(max_length=64)] = []
    runtimes: Annotated[list[_Short], msgspec.Meta(max_length=16)] = []
    active: ActiveModel | None = None
    # additive, optional (older controllers ignore them, older agents leave them out):
    storage: StorageState = "ok"  # the state dir: writable, full, or read-only (agent/outbox.py)
    clock_synced: bool | None = None  # the OS's word on the wall clock (agent/clock.py); None: unknown
    # additive, optional: runtime -> the devices / providers it can use on this machine (agent/runtimes)
    devices: Annotated[dict[_Short, Annotated[list[_Short], msgspec.Meta(max_length=16)]],
                       msgspec.Meta(max_length=16)] = {}
    v: int = VERSION


class Latency(_Msg):
    p50: Ms
    p95: Ms
    p99: Ms
    max: Ms
    mean: Ms


class Telemetry(_Msg):
    device_id: DeviceId
    boot_id: BootId
    seq: Count
    time: Seconds
    interval_s: Annotated[float, msgspec.Meta(gt=0)]
    inferences: Count
    errors: Annotated[dict[_Key, Count], msgspec.Meta(max_length=64)] = {}
    latency_ms: Latency | None = None
    histogram: Annotated[list[Count], msgspec.Meta(max_length=64)] = []
    active: ActiveModel | None = None
    cpu_percent: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # of one core: up to 100 x cores
    rss_bytes: Count = 0
    memory_percent: Annotated[float, msgspec.Meta(ge=0, le=100)] = 0.0
    disk_free_bytes: Count = 0
    temperature_c: Annotated[float, msgspec.Meta(ge=-273.15, le=1000)] | None = None
    load1: Annotated[float, msgspec.Meta(ge=0)] | None = None
    outbox_pending: Count = 0  # queued on the device, not yet acknowledged (by the controller: agent/link.py)
    outbox_dropped: Count = 0  # messages the device's full (or too old) outbox dropped, ever
    storage: StorageState = "ok"  # additive, optional: as in State
    clock_synced: bool | None = None  # additive, optional: as in State
    # additive, optional: None from an agent that does not report them; [] from one that finds none
    accelerators: Annotated[list[AcceleratorUsage], msgspec.Meta(max_length=MAX_ACCELERATORS)] | None = None
    v: int = VERSION


class Event(_Msg):
    device_id: DeviceId
    boot_id: BootId
    seq: Count
    time: Seconds
    kind: EventKind
    deployment_id: Id | None = None
    sha256: Sha256 | None = None
    version: Version | None = None
    reason: Reason = ""
    v: int = VERSION


MAX_QUALITY_OUTPUTS = 16
MAX_QUALITY_BINS = 64
MAX_CONFUSION = 33 * 33
_Feature = Annotated[str, msgspec.Meta(pattern=_pattern(re.compile(r"[a-z][a-z0-9_]{0,31}")))]
_Bins = Annotated[list[Count], msgspec.Meta(max_length=MAX_QUALITY_BINS)]


class Canary(_Msg):
    """The bundle's golden inputs run on the device against their fp32 outputs (in the bundle)."""

    runs: Count  # golden inputs run in this window
    agree: Count  # of them, how many agree with fp32 (classifier: the same top-1 class; other outputs: within
    #               the bundle's tolerance, agent/quality.py)
    max_abs_err: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # the largest |device - fp32| over them
    time: Seconds = 0.0  # when the last run ended


class Feedback(_Msg):
    """Ground truth the device's applications joined to predictions (POST /v1/feedback) in this window."""

    labels: Count = 0  # labels joined
    # [true bin, predicted bin, count] over the profile's first classifier output's class bins (its classes in
    # order, then "other"): a sparse confusion matrix
    confusion: Annotated[list[Annotated[list[Count], msgspec.Meta(min_length=3, max_length=3)]],
                         msgspec.Meta(max_length=MAX_CONFUSION)] = []
    refused: Annotated[dict[_Key, Count], msgspec.Meta(max_length=16)] = {}  # reason -> labels refused


class Quality(_Msg):
    """One window's model-quality counts, on its own topic (``edgefleet/v1/<id>/quality``) so that telemetry
    stays as it was: a controller from before this message never subscribes to it (v1 decoders refuse unknown
    fields, so a new Telemetry field would have made them drop whole telemetry messages). It takes a seq from
    the device's one counter, like telemetry and events.

    ``bins[i]`` holds the counts for the profile's ``outputs[i]`` (agent/quality.py), feature -> counts; the
    ``profile`` id names those bins, so the controller refuses counts that do not match the bundle's profile."""

    device_id: DeviceId
    boot_id: BootId
    seq: Count
    time: Seconds
    interval_s: Annotated[float, msgspec.Meta(gt=0)]
    sha256: Sha256  # the bundle whose outputs these are
    version: Version
    profile: Sha256  # the id of the bundle's profile.json: the bins these counts follow
    served: Count = 0  # outputs folded into ``bins`` in this window
    bins: Annotated[list[Annotated[dict[_Feature, _Bins], msgspec.Meta(max_length=8)]],
                    msgspec.Meta(max_length=MAX_QUALITY_OUTPUTS)] = []
    canary: Canary | None = None
    feedback: Feedback | None = None
    deployment_id: Id | None = None
    v: int = VERSION


class TrustStatement(_Msg):
    """A change to the release keys devices trust, signed (``by``) by a key they trust already: ``add`` a key
    (signed by a trusted release key), or ``remove`` one (by a trusted release key or the controller's key).
    See agent/signing.py and agent/trust.py."""

    op: Literal["add", "remove"]
    keyid: KeyId
    time: Seconds
    name: Annotated[str, msgspec.Meta(pattern=_pattern(re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")))] = "key"
    key: PemKey | None = None  # add: the new public key (PEM)
    by: Annotated[str, msgspec.Meta(pattern=_pattern(re.compile(r"(?:[0-9a-f]{16})?")))] = ""
    sig: Annotated[str, msgspec.Meta(pattern=_pattern(re.compile(r"[A-Za-z0-9+/=]{0,200}")))] = ""
    v: int = VERSION


_SigField = Annotated[str, msgspec.Meta(pattern=_pattern(re.compile(r"[A-Za-z0-9+/=]{0,200}")))]
_KeyIdField = Annotated[str, msgspec.Meta(pattern=_pattern(re.compile(r"(?:[0-9a-f]{16})?")))]


class Desired(_Msg):
    deployment_id: Id
    name: Name
    version: Version
    url: Url
    sha256: Sha256
    size: Annotated[int, msgspec.Meta(ge=1, le=MAX_SIZE)]
    settings: Annotated[dict[_Key, bool | int | float | Annotated[str, msgspec.Meta(max_length=MAX_SETTING_CHARS)]],
                        msgspec.Meta(max_length=MAX_SETTINGS)] = {}
    time: Seconds = 0.0  # when the controller issued it
    # signed desired state (agent/signing.py): for which device, until when, in what order; a rollback to a
    # bundle the device ran before may have a lower serial; the trust statements the fleet holds
    device_id: DeviceId | None = None
    expires: Seconds = 0.0
    counter: Count = 0
    rollback: bool = False
    trust: Annotated[list[TrustStatement], msgspec.Meta(max_length=MAX_STATEMENTS)] = []
    keyid: _KeyIdField = ""
    sig: _SigField = ""
    v: int = VERSION


class Cmd(_Msg):
    id: Id
    kind: Literal["ping", "rollback", "report"]
    time: Seconds = 0.0
    # signed as a desired is (agent/signing.py)
    device_id: DeviceId | None = None
    expires: Seconds = 0.0
    counter: Count = 0
    keyid: _KeyIdField = ""
    sig: _SigField = ""
    v: int = VERSION


MAX_ACK_RANGES = 256  # ranges in one ack message; the controller sends more messages when it needs more


class Ack(_Msg):
    """The controller's end-to-end acknowledgement (``edgefleet/v1/<id>/ack``, fleet -> device): the seqs of this
    boot's telemetry, events and quality messages that it has stored (newly, or before: a duplicate), as inclusive
    ``[first, last]`` ranges. Ranges, never "everything up to N": several controller workers may share a device's
    traffic, and each acknowledges only what it stored itself. On its own topic so that older agents (strict v1
    decoders) never see it: they do not subscribe to it, and older controllers never publish it
    (agent/link.py says what an agent does without acks)."""

    device_id: DeviceId
    boot_id: BootId  # the boot_id the acknowledged messages carry (a replay after a restart carries the old one)
    ranges: Annotated[list[Annotated[list[Count], msgspec.Meta(min_length=2, max_length=2)]],
                      msgspec.Meta(min_length=1, max_length=MAX_ACK_RANGES)]
    time: Seconds = 0.0
    v: int = VERSION


def seq_ranges(seqs) -> list[list[int]]:
    """Sorted, merged inclusive ranges of the given seqs: ``{1, 2, 3, 7}`` -> ``[[1, 3], [7, 7]]``."""
    out: list[list[int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


Message = State | Telemetry | Event | Quality | Desired | Cmd | Ack
_TYPES: dict[str, type] = {
    STATE: State, TELEMETRY: Telemetry, EVENTS: Event, QUALITY: Quality, DESIRED: Desired, CMD: Cmd, ACK: Ack
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
    if not isinstance(device_id, str) or not DEVICE_ID_RE.fullmatch(device_id):
        raise ProtocolError(
            f"invalid device id {device_id!r}: use 1-63 ASCII lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return device_id


def check_sha256(sha: str) -> str:
    if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
        raise ProtocolError(f"invalid sha256 {sha!r}: expected 64 lowercase hex digits")
    return sha


def clip(text: str, limit: int = MAX_REASON) -> str:
    """``text`` cut to ``limit`` characters (ending in '…' when cut): free text the agent builds, e.g. from
    an exception, always fits the contract."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Named(msgspec.Struct):  # unknown fields ignored, anything typed: only to salvage what is valid
    deployment_id: Any = None
    sha256: Any = None
    version: Any = None


def named(desired: bytes | object) -> SimpleNamespace:
    """The (deployment_id, sha256, version) of a desired message, a payload or an object, each kept only if
    it is itself valid (else None): what an event about it (a refusal) may name."""
    if isinstance(desired, (bytes, bytearray, memoryview)):
        try:
            desired = msgspec.json.decode(desired, type=_Named)
        except (msgspec.DecodeError, RecursionError):
            desired = _Named()
    out = SimpleNamespace()
    for field, kind in (("deployment_id", Id), ("sha256", Sha256), ("version", Version)):
        try:
            value = msgspec.convert(getattr(desired, field, None), kind)
        except msgspec.ValidationError:
            value = None
        setattr(out, field, value)
    return out


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
    except RecursionError:
        raise ProtocolError(f"{kind} payload nests too deeply") from None
    if msg.v != VERSION:
        raise ProtocolError(f"{kind} message has version {msg.v}, expected {VERSION}")
    return msg


def check(msg: Message) -> Message:
    """Validate a message built in-process (constructing a struct checks no bounds) as ``decode`` would."""
    try:
        return msgspec.convert(msgspec.to_builtins(msg), type(msg))
    except msgspec.ValidationError as e:
        raise ProtocolError(f"invalid {type(msg).__name__.lower()} message: {e}") from None


def now() -> float:
    return time.time()
