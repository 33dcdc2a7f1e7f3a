"""The agent's config file (TOML), decoded into one typed struct that names any bad field."""

from __future__ import annotations

import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from agent.errors import EdgefleetError
from agent.protocol import MAX_SIZE, ProtocolError, check_device_id


class ConfigError(EdgefleetError):
    pass


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    device_id: str
    broker: str  # mqtt://HOST:PORT
    controller: str  # http://HOST:PORT of the fleet controller (bundle downloads)
    state_dir: str  # models, downloads, the current/previous links
    api: str = "127.0.0.1:8470"  # local inference: HOST:PORT, or unix:/path/to.sock
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
    bundle_origins: list[str] = []  # http(s)://HOST[:PORT] bundles may come from, besides the controller's

    @property
    def broker_host_port(self) -> tuple[str, int]:
        return parse_mqtt_url(self.broker)


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """``mqtt://HOST[:PORT]`` -> (host, port); the port defaults to 1883."""
    try:
        parts = urlsplit(url)
        port = parts.port or 1883
    except ValueError:
        raise ConfigError(f"broker {url!r} has an invalid port") from None
    if parts.scheme != "mqtt" or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(f"broker {url!r} is not an mqtt://HOST:PORT URL")
    return parts.hostname, port


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
    """``HOST:PORT`` -> (host, port); ``unix:/path`` -> '/path'."""
    if addr.startswith("unix:"):
        path = addr[5:]
        if not path:
            raise ConfigError(f"api {addr!r}: unix: needs a socket path")
        return path
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"api {addr!r} is neither HOST:PORT nor unix:/path")
    return host, int(port)


def validate(cfg: AgentConfig) -> AgentConfig:
    try:
        check_device_id(cfg.device_id)
    except ProtocolError as e:
        raise ConfigError(f"device_id: {e}") from None
    parse_mqtt_url(cfg.broker)
    parse_origin(cfg.controller, "controller", path_ok=True)
    for origin in cfg.bundle_origins:
        parse_origin(origin, "bundle_origins:")
    parse_api_address(cfg.api)
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
        lines.append(f"{field} = {value!r}" if not isinstance(value, str) else f'{field} = "{value}"')
    return "\n".join(lines) + "\n"
