"""The agent's config file (TOML), decoded into one typed struct that names any bad field."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from agent.errors import EdgefleetError
from agent.protocol import ProtocolError, check_device_id


class ConfigError(EdgefleetError):
    pass


DEFAULT_API = "unix:/run/edgefleet/agent.sock"  # where the service's local API listens (its RuntimeDirectory=)


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    device_id: str
    broker: str  # mqtt://HOST:PORT
    controller: str  # http://HOST:PORT of the fleet controller (bundle downloads)
    state_dir: str  # models, downloads, the current/previous links
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
    # the local inference API (agent/api.py). Without `api`: a Unix socket, $RUNTIME_DIRECTORY/agent.sock under
    # systemd (/run/edgefleet/agent.sock), else state_dir/agent.sock; mode 0660, group api_group
    api_group: str = "edgefleet-api"  # the group applications join to use the socket
    api_token_file: str | None = None  # a file holding the bearer token every request must then carry
    api_max_body_bytes: int = 64 * 1024 * 1024  # a request body, and the decoded inputs it declares
    api_max_connections: int = 64  # open at once; beyond, the longest-waiting idle one is closed
    api_workers: int = 2  # inferences run at once (the rest queue); status never waits for them

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
    try:
        check_device_id(cfg.device_id)
    except ProtocolError as e:
        raise ConfigError(f"device_id: {e}") from None
    parse_mqtt_url(cfg.broker)
    if urlsplit(cfg.controller).scheme not in ("http", "https"):
        raise ConfigError(f"controller {cfg.controller!r} is not an http(s):// URL")
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
