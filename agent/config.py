"""The agent's config file (TOML), decoded into one typed struct that names any bad field."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from agent import transport
from agent.errors import EdgefleetError
from agent.protocol import MAX_SIZE


class ConfigError(EdgefleetError):
    pass


DEFAULT_API = "unix:/run/edgefleet/agent.sock"  # where the service's local API listens (its RuntimeDirectory=)
RESERVE_MARGIN = 8 << 20  # min_free_bytes by default: outbox_max_bytes + this (the outbox's write-ahead log, a margin)


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    state_dir: str  # models, downloads, the current/previous links, the outbox, the identity
    # who this device is and where its fleet is: taken from the enrollment in state_dir/identity unless set here.
    # device_id may be a template for first-boot provisioning: cam-{mac}, {hostname}, {machine_id}, {random}
    device_id: str | None = None
    broker: str | None = None  # mqtts://HOST:PORT
    controller: str | None = None  # https://HOST:PORT of the fleet controller (bundle downloads)
    # TLS files, when they do not come from an enrollment by this fleet's CA (state_dir/identity)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # first-boot provisioning from an image: enroll with this token file, pinning the CA by this fingerprint
    provision_token_file: str | None = None
    ca_fingerprint: str | None = None
    insecure: bool = False  # plaintext mqtt:// and http:// with no identity: local experiments only
    api: str | None = None  # local inference: unix:/path/to.sock or HOST:PORT; none: the default socket (api_*)
    telemetry_interval_s: float = 10.0
    keepalive_s: int = 15  # MQTT keepalive; the broker sends the last will after ~1.5x this
    # probation after an update: roll back by itself when the new model misbehaves on real traffic
    rollback_window_s: float = 300.0
    rollback_min_inferences: int = 20  # judge only after this many inferences
    rollback_max_error_rate: float = 0.05  # runtime failures / inferences
    rollback_max_p95_ms: float | None = None  # default: the bundle's latency budget
    # the on-disk outbox of telemetry and events (state_dir/outbox.db): bounds on what waits for the broker;
    # beyond either, the oldest messages are dropped, counted and reported
    outbox_max_bytes: int = 64 * 1024 * 1024  # payload bytes queued
    outbox_max_age_s: float = 7 * 24 * 3600.0  # age of the oldest queued message
    # what a desired model may ask for, checked before anything is downloaded (agent/updater.py)
    max_bundle_bytes: int = 2 << 30  # a larger desired size is refused
    # room an update must leave free in the state dir's filesystem: a bundle whose download + unpack + this does
    # not fit is refused before a byte of it is written. None: outbox_max_bytes + RESERVE_MARGIN (room for the
    # outbox to fill up to its bound, its write-ahead log and a margin)
    min_free_bytes: int | None = None
    bundle_origins: list[str] = []
    # the release keys whose signed bundles this device runs (*.pub, root-owned; agent/trust.py)
    trust_dir: str = "/etc/edgefleet/trust"
    # the controller's public key, which signs every desired and cmd; default: the one the enrollment gave
    controller_key: str | None = None  # http(s)://HOST[:PORT] bundles may come from, besides the controller's
    # the local inference API (agent/api.py). Without `api`: a Unix socket, $RUNTIME_DIRECTORY/agent.sock under
    # systemd (/run/edgefleet/agent.sock), else state_dir/agent.sock; mode 0660, group api_group
    api_group: str = "edgefleet-api"  # the group applications join to use the socket
    api_token_file: str | None = None  # a file holding the bearer token every request must then carry
    api_max_body_bytes: int = 64 * 1024 * 1024  # a request body, and the decoded inputs it declares
    api_max_connections: int = 64  # open at once; beyond, the longest-waiting idle one is closed
    api_workers: int = 2  # inferences run at once (the rest queue); status never waits for them
    # model quality (issue 12; bundles with a profile.json): served outputs folded into the profile's bins, the
    # canary, feedback labels, sent as one `quality` message a telemetry window. false: none of it (a fleet whose
    # controller predates the quality topic never subscribes to it, and counts those seqs as gaps)
    quality: bool = True
    canary_interval_s: float = 3600.0  # the golden inputs run at activation and this often (0: at activation only)
    feedback_buffer: int = 1024  # predictions kept for POST /v1/feedback (the oldest are overwritten)
    feedback_ttl_s: float = 3600.0  # a label for an older prediction is refused (expired)
    feedback_max_per_window: int = 10_000  # labels taken in one telemetry window; beyond, refused (flood)



def min_free_bytes(cfg: AgentConfig) -> int:
    """The reserve an update leaves free (``min_free_bytes``, or its default from the outbox's bound)."""
    return cfg.min_free_bytes if cfg.min_free_bytes is not None else cfg.outbox_max_bytes + RESERVE_MARGIN


def parse_origin(url: str, what: str = "origin", path_ok: bool = False) -> str:
    """The origin of an http(s) URL, normalised: ``scheme://host:port`` (lowercase, the port explicit).

    Refuses other schemes, user info (``https://controller@evil/``) and, unless ``path_ok``, a path,
    query or fragment. Raises ConfigError naming ``what``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"{what} {url!r} is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} {url!r} is not an http(s)://HOST[:PORT] URL")
    if "@" in parts.netloc:
        raise ConfigError(f"{what} {url!r} has user info before its host")
    if not path_ok and (parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ConfigError(f"{what} {url!r} must be http(s)://HOST[:PORT], without a path")
    host = parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}:{port or (443 if parts.scheme == 'https' else 80)}"


def parse_api_address(addr: str) -> tuple[str, int] | str:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); ``unix:/path`` -> '/path'."""
    if addr.startswith("unix:"):
        path = addr[5:]
        if not path:
            raise ConfigError(f"api {addr!r}: unix: needs a socket path")
        check_socket_path(path, "api")
        return path
    host, sep, port = addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"api {addr!r} is neither HOST:PORT nor unix:/path")
    return host, int(port)


def check_socket_path(path: str, field: str) -> None:
    n = len(os.fsencode(path))
    if n >= 108:  # sockaddr_un.sun_path, with its NUL
        raise ConfigError(f"{field}: the Unix socket path {path} is {n} bytes; the kernel takes at most 107: "
                          f"set api = \"unix:/a/shorter/path.sock\"")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _validate_api(cfg: AgentConfig) -> None:
    where = parse_api_address(cfg.api) if cfg.api is not None else None
    if isinstance(where, tuple) and not is_loopback(where[0]) and not cfg.api_token_file:
        raise ConfigError(f"api {cfg.api!r} is not a loopback address: set api_token_file (every request then "
                          f"needs its token), or listen on 127.0.0.1 or a unix: socket")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", cfg.api_group):
        raise ConfigError(f"api_group {cfg.api_group[:40]!r} is not a group name")
    if cfg.api_token_file is not None and not cfg.api_token_file:
        raise ConfigError("api_token_file is empty: name a file, or leave the key out")
    if not 1024 <= cfg.api_max_body_bytes <= 1 << 40:
        raise ConfigError("api_max_body_bytes must be between 1024 and 2^40")
    if not 2 <= cfg.api_max_connections <= 65536:
        raise ConfigError("api_max_connections must be between 2 and 65536")
    if not 1 <= cfg.api_workers <= 64:
        raise ConfigError("api_workers must be between 1 and 64")


def validate(cfg: AgentConfig) -> AgentConfig:
    from agent.identity import IdentityError, check_template, normalize_fingerprint

    try:
        if cfg.device_id is not None:
            check_template(cfg.device_id)
        if cfg.ca_fingerprint is not None:
            normalize_fingerprint(cfg.ca_fingerprint)
    except IdentityError as e:
        raise ConfigError(str(e)) from None
    if cfg.broker is not None:
        try:
            transport.parse_url(cfg.broker, allow_plaintext=cfg.insecure)
        except transport.TransportError as e:
            raise ConfigError(f"{e}; insecure = true allows it for a local experiment" if "plaintext" in str(e)
                              else str(e)) from None
    if cfg.controller is not None:
        parse_origin(cfg.controller, "controller", path_ok=True)
        if urlsplit(cfg.controller).scheme == "http" and not cfg.insecure:
            raise ConfigError(f"controller {cfg.controller!r} is plaintext http: use https:// (insecure = true "
                              f"allows it for a local experiment)")
    if cfg.insecure and (cfg.broker is None or cfg.controller is None or cfg.device_id is None):
        raise ConfigError("insecure = true needs device_id, broker and controller (there is no enrollment)")
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise ConfigError("tls_cert and tls_key go together")
    if cfg.provision_token_file is not None and (cfg.ca_fingerprint is None or cfg.controller is None
                                                 or cfg.device_id is None):
        raise ConfigError("provision_token_file needs ca_fingerprint, controller and device_id (an id or a "
                          "template such as cam-{mac})")
    for origin in cfg.bundle_origins:
        parse_origin(origin, "bundle_origins:")
    _validate_api(cfg)
    if not cfg.telemetry_interval_s > 0:
        raise ConfigError("telemetry_interval_s must be > 0")
    if not 5 <= cfg.keepalive_s <= 3600:
        raise ConfigError("keepalive_s must be between 5 and 3600")
    if cfg.rollback_window_s < 0:
        raise ConfigError("rollback_window_s must be >= 0 (0: no probation)")
    if cfg.rollback_min_inferences < 1:
        raise ConfigError("rollback_min_inferences must be >= 1")
    if not 0 <= cfg.rollback_max_error_rate <= 1:
        raise ConfigError("rollback_max_error_rate must be between 0 and 1")
    if cfg.rollback_max_p95_ms is not None and cfg.rollback_max_p95_ms <= 0:
        raise ConfigError("rollback_max_p95_ms must be > 0")
    if not cfg.outbox_max_bytes > 0:
        raise ConfigError("outbox_max_bytes must be > 0")
    if not cfg.outbox_max_age_s > 0:
        raise ConfigError("outbox_max_age_s must be > 0")
    if not 1 <= cfg.max_bundle_bytes <= MAX_SIZE:
        raise ConfigError(f"max_bundle_bytes must be between 1 and {MAX_SIZE} (1 TiB)")
    if cfg.min_free_bytes is not None and not 0 <= cfg.min_free_bytes <= MAX_SIZE:
        raise ConfigError(f"min_free_bytes must be between 0 and {MAX_SIZE} (1 TiB)")
    if not 0 <= cfg.canary_interval_s <= 366 * 86400:
        raise ConfigError("canary_interval_s must be between 0 (at activation only) and 31622400 (a year)")
    if not 1 <= cfg.feedback_buffer <= 1_000_000:
        raise ConfigError("feedback_buffer must be between 1 and 1000000 predictions")
    if not 0 < cfg.feedback_ttl_s <= 366 * 86400:
        raise ConfigError("feedback_ttl_s must be > 0 and at most 31622400 (a year)")
    if not 0 <= cfg.feedback_max_per_window <= 10_000_000:
        raise ConfigError("feedback_max_per_window must be between 0 (no feedback) and 10000000")
    return cfg


def load(path: str | Path) -> AgentConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        cfg = msgspec.convert(data, AgentConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        return validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dumps(cfg: AgentConfig) -> str:
    """The config as TOML (for `agent install` and the demo)."""
    lines = []
    for field in cfg.__struct_fields__:
        value = getattr(cfg, field)
        if value is None:
            continue  # TOML has no null: an absent key takes the default
        lines.append(f"{field} = {json.dumps(value)}")  # JSON scalars and arrays of them are valid TOML
    return "\n".join(lines) + "\n"
