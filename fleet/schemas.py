"""The JSON API's bodies as msgspec Structs: what ``fleet.openapi`` publishes as JSON Schema, and what
``tests/test_web.py`` decodes the real answers into.

The API builds plain dicts (from the store, the rollout engine); these Structs describe them. They forbid
unknown fields, so a field the API starts returning without being described here fails that test: add it
here (the document follows). Request bodies the API already decodes with are used as they are
(``fleet.api.DeployRequest``, ``TagsPut``, ``TagsPost``, ``fleet.api_rollouts.RolloutRequest``,
``fleet.api_admin.TokenRequest``).

The constrained types below (ids, tags, targets, durations, ...) are what the server enforces: the request
Structs are decoded with them, so the document declares exactly what a request is refused for (what JSON
Schema cannot say, e.g. that waves increase, is in each operation's description).
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
from msgspec import Meta

from agent import protocol
from agent.bundle import Manifest

_HINTS: dict[str, str] = {}  # pattern -> what it asks for, in words (``explain``)


def _text(pattern: str, hint: str, **kw) -> Meta:
    _HINTS[pattern] = _HINTS[pattern.replace("\\", "\\\\")] = hint  # msgspec's messages double backslashes
    return Meta(pattern=pattern, description=f"{hint[0].upper()}{hint[1:]}.", **kw)


_N = r"[0-9]+(\.[0-9]+)?"
_PCT = r"([1-9][0-9]?(\.[0-9]+)?|0\.[0-9]*[1-9][0-9]*|100)%"  # (0%, 100%]
_COUNT = r"[1-9][0-9]{0,8}"
DEVICE_ID = f"^{protocol.DEVICE_ID_RE.pattern}$"  # the wire contract's
SHA256 = r"^[0-9a-f]{64}$"
TAG = r"^[A-Za-z0-9._-]{1,64}$"
TARGET = r"^(all|tag:[A-Za-z0-9._-]{1,64}|[a-z0-9][a-z0-9._-]{0,62})$"
TOKEN_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
DEPLOYMENT_ID = r"^(dep|ro)-[0-9]{8}-[0-9]{6}-[0-9a-f]{6}(-w[0-9]{1,6}|-rb[0-9]{1,6})?$"
ROLLOUT_ID = r"^ro-[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$"
WAVE = rf"^({_COUNT}|{_PCT})$"
WAVES = rf"^({_COUNT}|{_PCT})(,({_COUNT}|{_PCT})){{0,99}}$"
DURATION = rf"^({_N}|{_N}[hH]({_N}[mM])?({_N}[sS])?|{_N}[mM]({_N}[sS])?|{_N}[sS])$"
RATE = r"^([0-9]{1,2}(\.[0-9]+)?%|0(\.[0-9]+)?)$"  # [0%, 100%)
REGRESSION = r"^(([1-9][0-9]{0,3}(\.[0-9]+)?|0\.[0-9]*[1-9][0-9]*)%|[1-9][0-9]?(\.[0-9]+)?|0\.[0-9]*[1-9][0-9]*)$"
MAX_IDS = 10_000  # device ids or targets in one request
MAX_TAGS = 100  # tags in one request

DeviceId = Annotated[str, _text(DEVICE_ID, "a device id: 1-63 of a-z, 0-9, '.', '_', '-', starting with a "
                                           "letter or digit")]
Sha256 = Annotated[str, _text(SHA256, "a sha256: 64 lowercase hex digits")]
Tag = Annotated[str, _text(TAG, "a tag: 1-64 of A-Z, a-z, 0-9, '.', '_', '-'")]
Target = Annotated[str, _text(TARGET, "a target: a device id, tag:NAME or all")]
TokenName = Annotated[str, _text(TOKEN_NAME, "a token name: 1-64 of a-z, 0-9, '.', '_', '-', starting with a "
                                             "letter or digit")]
Wave = Annotated[int, Meta(ge=1, le=999_999_999)] | Annotated[str, _text(
    WAVE, "a wave: a device count (1, 2, ...) or a percentage of the targets in (0%, 100%]", max_length=32)]
Waves = Annotated[str, _text(WAVES, "waves: counts or percentages, comma-separated, e.g. 1,10%,50%,100%",
                             max_length=1000)]
Duration = Annotated[str, _text(DURATION, "a duration like 30s, 5m, 1h30m, or seconds", max_length=64)] | \
    Annotated[float, Meta(ge=0)]
Rate = Annotated[str, _text(RATE, "a rate in [0%, 100%) like 1% (or a fraction like 0.01)", max_length=64)] | \
    Annotated[float, Meta(ge=0, lt=1)]
Regression = Annotated[str, _text(REGRESSION, "a regression above 0% like 20% (or a fraction like 0.2)",
                                  max_length=64)] | Annotated[float, Meta(gt=0, le=100)]
_AT = re.compile(r"(.*) - at `\$\.?(.*)`", re.S)
_REGEX = re.compile(r"Expected `str` matching regex '(.*)'", re.S)


def _whole(value):
    """JSON's 3.0 is the integer 3 (as JSON Schema says): whole floats become ints, which float fields take too."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_whole(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    return value


def decode_request(body: bytes, type_: type):
    """A JSON request body as ``type_`` (a request Struct); msgspec.DecodeError (ValidationError) when it is not."""
    return msgspec.convert(_whole(msgspec.json.decode(body)), type_)


def explain(err: msgspec.ValidationError | msgspec.DecodeError) -> str:
    """A request's decode error in words, naming the field: ``targets[0] must be a target: a device id, ...``."""
    text = str(err)
    at = _AT.fullmatch(text)
    if not at:
        return text
    what, where = at[1], at[2] or "the body"
    regex = _REGEX.fullmatch(what)
    if regex and regex[1] in _HINTS:
        return f"{where} must be {_HINTS[regex[1]]}"
    return f"{where}: {what}"


class _S(msgspec.Struct, forbid_unknown_fields=True):
    pass


class Error(_S):
    """Every 4xx/5xx answer of the JSON API."""
    error: str


class Status(_S):
    ok: bool
    broker: str
    mqtt_connected: bool
    devices: int
    received: int  # messages taken in from devices
    duplicates: int  # redeliveries ignored
    invalid: dict[str, int]  # messages dropped, by reason
    worker: str | None = None  # this controller's worker name (fleet serve --worker); null: the only controller
    leader: bool = True  # whether it runs the rollout driver, the offline sweep and retention (fleet/leader.py)


class BundleUploaded(_S):
    sha256: str
    size: int
    manifest: Manifest
    signed_by: str | None  # the key id of the release key that signed it (null: unsigned, under --allow-unsigned)
    signer: str | None  # that key's name in this fleet (null: unsigned, or a key the fleet does not list)


class BundleRow(_S):
    """An uploaded bundle, who signed it and its serial."""
    sha256: str
    size: int
    name: str
    version: str
    target: str
    runtime: str
    precision: str
    uploaded: float
    serial: int | None  # the manifest's serial (only grows per model name; 0: none)
    signed_by: str | None  # the signing key's id (null: unsigned)
    signer: str | None  # its name here


class ReleaseKey(_S):
    """A release key the fleet accepts bundles from (or did: ``removed``)."""
    keyid: str  # the first 16 hex digits of the sha256 of its raw public key
    name: str
    pem: str
    added: float
    removed: float | None
    status: str  # active | removed
    statement: dict | None  # the signed ``add`` statement it came with: devices learn the key from it
    removal: dict | None  # the controller's signed ``remove`` statement


class ReleaseKeyChanged(ReleaseKey):
    """A key just added or removed, and how many devices' desired models went out again with the new trust
    statements."""
    republished: int


class Signer(_S):
    """Which release key signed the running bundle, and its serial."""
    keyid: str | None  # null: an unsigned bundle
    name: str | None  # the key's name in this fleet
    serial: int | None
    source: str  # device (its state said so) | bundle (the controller's record of the bundle it runs)
    removed: bool  # the key was removed from the fleet since


class DeploymentDevice(_S):
    device_id: str
    phase: str  # pending, downloading, verifying, activating, active, failed, rolled_back
    reason: str
    updated: float


class Deployment(_S):
    id: str
    bundle_sha256: str
    created: float
    targets: list[str]
    devices: list[DeploymentDevice]


class DeploymentCreated(Deployment):
    """A new deployment, with what the controller warns about (it is made all the same)."""
    # e.g. a device that last reported less free disk than the bundle needs (2 x its size: download + unpack)
    warnings: list[str]


class Device(_S):
    """A registered device as its last state message described it."""
    id: str
    first_seen: float
    last_seen: float
    online: bool
    state_time: float | None
    boot_id: str
    agent_version: str
    arch: str
    cpu_flags: list[str]
    runtimes: list[str]
    active_name: str | None
    active_version: str | None
    active_sha256: str | None
    active_runtime: str | None
    active_precision: str | None
    active_deployment_id: str | None
    interval_s: float | None
    inferences: int
    errors: int
    seq_max: int
    seq_count: int
    duplicates: int
    status_online: int | None = None  # the last recorded transition: 1 online, 0 offline
    status_time: float | None = None
    storage: str | None = None  # ok, full or read_only: whether its state dir takes writes (its latest report)
    storage_since: float | None = None
    clock_synced: bool | None = None  # whether its OS says its clock is synchronised (null: unknown)
    disk_free_bytes: int | None = None  # free space in its state dir's filesystem (its latest telemetry)
    active_signed_by: str | None = None  # the key that signed its running bundle, as it says
    active_serial: int | None = None  # and that bundle's serial
    active_serving: "Serving | None" = None  # what really runs its active model (null: it does not say)
    runtime_devices: dict[str, list[str]] = {}  # runtime -> the devices it can use there, as the device says
    tags: list[str] = []


class DeviceTags(_S):
    device_id: str
    tags: list[str]


class ActiveModel(_S):
    name: str
    version: str
    precision: str
    runtime: str
    sha256: str
    signed_by: str | None = None  # the release key id the device says signed it
    serial: int | None = None


class LatencyMs(_S):
    p50: float
    p95: float
    p99: float


class LastDeployment(_S):
    deployment_id: str
    phase: str
    reason: str


class Recent(_S):
    """The device's telemetry windows of the last ``window_s`` seconds."""
    window_s: float
    windows: int
    inferences: int
    errors: int
    errors_by_kind: dict[str, int]
    inferences_per_min: float | None
    error_rate: float | None  # errors / (inferences + errors)


class Health(_S):
    """One device's health: totals since it registered, its recent and latest telemetry, its last deployment."""
    device_id: str
    online: bool
    status: str  # online | offline
    status_since: float | None
    tags: list[str]
    model: ActiveModel | None
    inferences: int
    errors: int
    inferences_per_min: float | None
    error_rate: float | None
    recent: Recent
    latency_ms: LatencyMs | None  # the latest window that had inferences
    cpu_percent: float | None
    rss_bytes: int | None
    memory_percent: float | None
    temperature_c: float | None  # null: the device has no sensor
    last_seen: float
    last_seen_ago_s: float
    deployment: LastDeployment | None
    seq_gaps: int
    duplicates: int
    outbox_dropped: int | None
    outbox_pending: int | None
    identity_conflict: "IdentityConflict | None"  # two devices use this identity (a cloned image)
    storage: str | None  # ok, full or read_only: whether its state dir takes writes; null: never reported
    storage_since: float | None  # when that state was first reported
    disk_free_bytes: int | None  # free space in its state dir's filesystem, from its latest telemetry
    clock: "DeviceClock"
    quality: "HealthQuality | None"  # model quality over the last 10 minutes (null: the device sent none)
    serving: "Serving | None"  # what really runs the active model (null: none active, or not said)
    accelerators: "list[Accelerator] | None"  # from its latest telemetry (null: not reported; []: none)


class Serving(_S):
    """What really runs the device's active model, as the runtime reported it after loading."""
    device: str  # in the runtime's words: "CPU", "GPU.0", "NPU"
    provider: str  # the engine inside the runtime: "CPUExecutionProvider", an OpenVINO plugin, a LiteRT delegate
    fallback: str  # why the bundle's earlier accelerator choices are not the ones running ("": its first one is)


class Accelerator(_S):
    """One accelerator of the device and its load over its latest telemetry window; null: the machine does not
    say (never a made-up 0)."""
    name: str  # "nvidia0", "card0", "accel0"
    kind: str  # gpu | npu
    driver: str  # "nvml", "i915", "xe", "amdgpu", "intel_vpu"
    utilization_percent: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None


# -- model quality (fleet/quality.py, fleet/api_quality.py) ------------------------------------------------------
class _QualityFigures(_S):
    sha256: str  # the bundle the figures are of (the device's latest window's in the time asked)
    version: str
    windows: int  # quality windows summed
    served: int  # outputs folded into their bins
    psi_ref: float | None  # drift vs the bundle's reference: the largest PSI over outputs and features
    js_ref: float | None  # the largest Jensen-Shannon divergence, bits
    band_ref: str  # stable (< 0.1), moderate (< 0.25), significant, or "too few" (below min_served outputs)
    psi_fleet: float | None  # drift vs every other device on the same bundle in the same time
    js_fleet: float | None
    band_fleet: str
    band: str  # the worse of band_ref and band_fleet
    canary_runs: int
    canary_agreement: float | None  # agree / runs
    accuracy: float | None  # from feedback labels
    labels: int


class HealthQuality(_QualityFigures):
    """A device's model quality in the fleet table (``fleet.quality.summary``)."""
    window_s: float  # over the last this many seconds


class HealthPage(_S):
    """A page of the fleet's health (``fleet.paging``): ``next`` the cursor of the next page (pass it as ``cursor``
    with the same filters and sort), null at the end; ``limit`` the page's size asked for."""
    devices: list[Health]
    next: str | None
    limit: int


class DevicePage(_S):
    """A page of the registered devices, by id (``fleet.paging``); ``next`` and ``limit`` as in HealthPage."""
    devices: list[Device]
    next: str | None
    limit: int


class QualityRow(_QualityFigures):
    """One device in the fleet's quality view."""
    device_id: str


class QualityPage(_S):
    """The fleet's quality over [since, until), worst first (the worse drift band, the larger PSI, the lower canary
    agreement, the lower accuracy); ``next``: the ``offset`` of the next page, null at the end."""
    since: float
    until: float
    min_served: int  # outputs (a device's, and the other devices') below which drift is not judged
    total: int  # devices that sent quality in the window
    devices: list[QualityRow]
    next: int | None
    refused: dict[str, int]  # quality messages the controller refused since its database was made, by reason


class DriftWorst(_S):
    output: str
    feature: str


class DriftFeature(_S):
    output: str
    feature: str  # classifier: class, confidence, margin, entropy; other outputs: value
    psi: float
    p: float  # how likely sampling alone gives a PSI this large (agent.quality.drift_p)
    js: float  # bits
    band: str  # stable unless p < 0.001
    count: int  # the device's counts in it


class Drift(_S):
    """Drift from an expected distribution: the worst of the outputs' features (worst band, then largest PSI;
    null below min_served)."""
    psi: float | None
    p: float | None  # that feature's p: how likely sampling alone gives its PSI
    js: float | None  # the largest over the features
    band: str  # stable, moderate, significant (a band above stable only when p < 0.001), or "too few"
    worst: DriftWorst | None
    served: int  # the device's outputs
    expected_served: int | None  # the expected side's (the reference's samples, the other devices' outputs)
    features: list[DriftFeature]


class FleetDrift(Drift):
    devices: int  # the other devices on the same bundle


class QualityDrift(_S):
    reference: Drift  # vs the bundle's profile (the fp32 reference on the converter's held-out data)
    fleet: FleetDrift  # vs the sum of every other device's counts on the same bundle


class CanaryFigures(_S):
    """The golden inputs the device ran against their fp32 outputs."""
    runs: int
    agree: int
    agreement: float | None  # agree / runs
    interval: list[float] | None  # its 95 % Wilson interval
    max_abs_err: float | None
    last_time: float | None  # the last run (controller time)


class ClassScores(_S):
    precision: float | None  # tp / predicted (null: never predicted)
    recall: float | None  # tp / support (null: no label of it)
    f1: float | None
    support: int  # labels of this class
    predicted: int  # labelled predictions of this class
    tp: int
    precision_interval: list[float] | None  # 95 % Wilson
    recall_interval: list[float] | None
    class_: int | str = msgspec.field(name="class")  # a class id, or "other" (every class without a bin)


class MacroScores(_S):
    precision: float | None  # the mean over the classes where it is defined
    recall: float | None
    f1: float | None


class FeedbackFigures(_S):
    """From the labels the device's applications gave (POST /v1/feedback on the device)."""
    labels: int  # as the device counted them
    scored: int  # in the confusion matrix
    accuracy: float | None
    accuracy_interval: list[float] | None  # 95 % Wilson
    classes: list[int | str]  # the confusion matrix's class ids: the profile's classes, then "other"
    confusion: list[list[int]]  # rows: true class, columns: prediction
    per_class: list[ClassScores]
    macro: MacroScores


class QualityVersion(_S):
    sha256: str
    version: str
    windows: int
    served: int


class DeviceQuality(_S):
    """One device's model quality on one bundle over [since, until) (``fleet.quality.device``)."""
    device_id: str
    since: float
    until: float
    sha256: str | None  # null: no quality in the window
    version: str | None
    profile: str | None  # the bundle's profile id (null: the controller has no profile for it)
    min_served: int
    windows: int
    served: int
    first: float | None  # the first and last window's time
    last: float | None
    versions: list[QualityVersion]  # every bundle the device reported on in the window, newest first
    drift: QualityDrift | None  # null: no profile
    canary: CanaryFigures
    feedback: FeedbackFigures | None
    refused: dict[str, int]  # feedback labels the device's agent refused, by reason


class QualityPoint(_S):
    time: float  # a window's time, or a bucket's start
    windows: int
    served: int
    psi: float | None  # vs the reference (null below min_served in the point)
    band: str | None
    canary_runs: int
    canary_agreement: float | None
    labels: int
    accuracy: float | None


class QualitySeries(_S):
    """A device's quality per window (or per ``step`` bucket), oldest first: for charts."""
    device_id: str
    sha256: str | None
    since: float
    until: float
    step: float | None
    min_served: int
    points: list[QualityPoint]


class DeviceClock(_S):
    """The device's clock against the controller's, estimated from its messages (sent time against received
    time, the least delayed message of its current boot). Its windows and events are filed at its time + this."""
    offset_s: float | None  # controller - device: positive when the device is behind; null until it sent any
    synced: bool | None  # what its OS says (adjtimex); null: it does not know or did not say
    exceeds_max: bool  # |offset_s| > max_offset_s (fleet serve --max-clock-offset)
    max_offset_s: float
    boot_id: str | None  # the boot the estimate is of
    jumps: int  # steps of its clock seen in that boot (e.g. NTP syncing mid-run)


class IdentityConflict(_S):
    """Births from boot ids that alternate: two devices hold this device's certificate and take its session
    from each other."""
    since: float  # the first takeover seen
    last: float  # the latest
    takeovers: int
    boot_ids: list[str]  # the latest boot ids seen, oldest first


class Identity(_S):
    arch: str
    agent_version: str
    runtimes: list[str]
    cpu_flags: list[str]
    boot_id: str
    first_seen: float
    devices: dict[str, list[str]] = {}  # runtime -> the devices / providers it can use on the device


class ErrorCount(_S):
    count: int
    last_time: float


class EventRow(_S):
    boot_id: str
    seq: int
    time: float
    kind: str
    deployment_id: str | None
    sha256: str | None
    version: str | None
    reason: str


class DeploymentHistoryRow(_S):
    deployment_id: str
    bundle_sha256: str
    name: str | None
    version: str | None
    created: float
    phase: str
    reason: str
    updated: float


class Transition(_S):
    time: float
    online: bool
    reason: str  # birth, last will, offline state, heartbeat timeout


class DeviceDetail(Health):
    """A device's health with its identity, errors by kind, recent events and errors, deployments and
    online/offline transitions (lists newest first)."""
    identity: Identity
    errors_by_kind: dict[str, ErrorCount]
    events: list[EventRow]
    recent_errors: list[EventRow]
    deployments: list[DeploymentHistoryRow]
    transitions: list[Transition]
    signer: Signer | None  # who signed the running bundle (null: the running bundle is unknown)
    quality_report: DeviceQuality  # model quality over the same 10 minutes, in full


class RolloutBundle(_S):
    sha256: str
    name: str | None
    version: str | None


class RolloutOptions(_S):
    waves: list[str]
    soak_s: float
    wave_timeout_s: float
    max_error_rate: float | None  # a fraction
    max_p95_ms: float | None
    max_p95_regression: float | None  # a fraction
    min_inferences: int
    auto_rollback: bool
    max_drift_psi: float | None
    min_canary_agreement: float | None  # a fraction
    max_accuracy_drop: float | None  # a fraction (points of accuracy)
    min_labels: int


class RolloutDeviceRollback(_S):
    deployment_id: str | None  # null: the device was left as is (``what`` says why)
    sha256: str | None  # the model it was sent back to
    version: str | None  # that model's version
    what: str
    phase: str | None  # its phase in the rollback deployment


class RolloutDevice(_S):
    device_id: str
    phase: str  # waiting (its wave has not started), pending (published, no report yet), or the agent's phase
    reason: str
    online: bool
    since: float | None
    active_since: float | None
    soaked: bool
    inferences: int  # on the new bundle since its wave was published
    errors: int
    error_rate: float | None  # errors / (inferences + errors)
    p95_ms: float | None  # inference-weighted mean of the windows' p95
    baseline_p95_ms: float | None  # the same on the model being replaced (with --max-p95-regression)
    verdict: str  # the threshold it crossed
    served: int  # outputs folded into its quality bins on the new bundle
    drift_psi: float | None  # PSI against the bundle's reference (the largest over outputs and features)
    canary_agreement: float | None  # golden inputs agreeing with fp32 / run
    labels: int  # feedback labels on the new bundle
    accuracy: float | None
    baseline_accuracy: float | None  # on the model being replaced (with --max-accuracy-drop)
    previous: str | None  # sha256 it ran when its wave was published
    note: str
    rollback: RolloutDeviceRollback | None


class RolloutWave(_S):
    wave: int
    status: str  # waiting, rolling, passed, failed, timed_out, stopped
    deployment_id: str
    started: float | None
    deadline: float | None
    finished: float | None
    devices: list[RolloutDevice]


class Rollout(_S):
    """A rollout, each wave with each device's phase and figures."""
    id: str
    status: str  # running, paused, completed, halted, aborted, rolled_back
    reason: str
    created: float
    finished: float | None
    paused_at: float | None
    bundle: RolloutBundle
    targets: list[str]
    options: RolloutOptions
    current_wave: int  # 1-based
    wave_count: int
    device_count: int
    waves: list[RolloutWave]
    unpublished: list[str]  # devices whose desired model the broker has not taken yet (retried)


class RolloutCreated(Rollout):
    """A new rollout, with what the controller warns about (it is started all the same)."""
    # e.g. a target that last reported less free disk than the bundle needs (2 x its size: download + unpack)
    warnings: list[str]


class RolloutSummary(_S):
    id: str
    status: str
    reason: str
    created: float
    finished: float | None
    bundle: RolloutBundle
    targets: list[str]
    current_wave: int
    wave_count: int
    device_count: int
    unpublished: list[str]
    phases: dict[str, int]  # how many devices are in each phase


# -- what the dashboard reads from a bundle's manifest -------------------------------------------------------
# A manifest's ``report`` is whatever the bundle's maker wrote (``edgefleet convert`` writes these fields and
# more). The device page shows it through these Structs: unknown fields are ignored, missing ones default, and
# a field of the wrong type makes the whole report "unreadable" rather than reach the page as it is.


class _Lenient(msgspec.Struct):
    pass


class ReportSettings(_Lenient):
    intra_op_threads: int | None = None


class ReportLatency(_Lenient):
    p50: float | None = None
    p95: float | None = None
    batch: int = 1
    settings: ReportSettings | None = None


class ReportAgreement(_Lenient):
    samples: int | None = None
    top1: float | None = None
    top5: float | None = None
    kl: float | None = None
    sqnr_db: float | None = None
    min_cosine: float | None = None  # bundles made before the SQNR/KL metrics
    max_abs_err: float | None = None


class ReportGate(_Lenient):
    passed: bool | None = None
    reason: str = ""


class ReportHost(_Lenient):
    cpu: str = "?"
    cpus: int | None = None
    machine: str = ""


class ConverterReport(_Lenient):
    """The converter's measurements of one variant, as the device page shows them."""
    target: str | None = None
    variant: str | None = None
    size_bytes: int | None = None
    latency_ms: ReportLatency | None = None
    speedup_vs_fp32: float | None = None
    agreement: ReportAgreement | None = None
    accuracy: float | None = None
    gate: ReportGate | None = None
    host: ReportHost | None = None


# -- operators (fleet/api_admin.py) ---------------------------------------------------------------------------


class Token(_S):
    """An API token as listed: never its secret (only its sha256 is kept)."""
    id: int
    name: str
    role: str  # read, operator or admin
    created: float
    last_used: float | None  # written at most once a minute
    revoked: float | None


class TokenCreated(Token):
    """A new token with its secret, shown this once."""
    token: str


class AuditEntry(_S):
    id: int
    time: float
    actor: str  # a token's name, device:<id> or enrollment
    action: str  # e.g. "POST /api/rollouts", "login", "enroll"
    target: str
    status: int | None  # the HTTP status it was answered with
    remote: str  # the client's address
    detail: str


class AuditPage(_S):
    """The audit trail, newest first; ``next``: the ``before`` of the next (older) page, null at the end."""
    entries: list[AuditEntry]
    next: int | None


# -- identities (fleet/api_enroll.py) ------------------------------------------------------------------------------
class EnrollmentToken(_S):
    """A new enrollment token: its secret is here and nowhere else (the controller keeps its sha256)."""
    id: str
    token: str
    kind: str  # device | provision
    device_id: str | None
    prefix: str
    count: int
    expires: float
    ca_fingerprint: str  # what the device pins: the sha256 of the fleet CA's DER bytes
    controller: str  # the URL devices enroll at


class EnrollmentRow(_S):
    id: str
    kind: str
    device_id: str | None
    prefix: str
    uses_left: int
    used: int
    created: float
    expires: float
    created_by: str
    revoked: float | None
    state: str  # open | used | expired | revoked


class Enrolled(_S):
    """What an enrolling (or renewing) device gets: its certificate, the CA, and where its fleet is."""
    device_id: str
    certificate: str  # PEM, CN = device_id
    ca: str  # PEM
    broker: str
    controller: str
    not_after: float
    serial: str  # hex
    controller_key: str | None  # PEM: the ed25519 key the controller signs every desired and cmd with


class Revoked(_S):
    device_id: str
    revoked_certificates: list[str]  # serials (hex) now in the CRL


class EnrollmentRevoked(_S):
    id: str
    revoked: bool


class Certificate(_S):
    serial: str
    device_id: str
    fingerprint: str
    not_before: float
    not_after: float
    issued: float
    kind: str  # enroll | renew | kick (the controller's own, to end a revoked device's session)
    revoked: float | None
    reason: str
