"""Who may call the controller: operator tokens with roles, the dashboard's sign-in sessions, the Host and
Origin the controller answers to, and the audit trail.

Roles, each including the ones before it: ``read`` (GETs: the API, ``/metrics``, the dashboard),
``operator`` (writes: uploads, deployments, rollouts and their actions, tags), ``admin`` (tokens, the audit
trail, enrollment and revocation). A token is ``eft_`` and 43 random URL-safe characters (256 bits); only
its sha256 is stored, so it is shown once, when it is created.

Every route declares who may call it, with one line where it is built::

    allow(Route("/api/status", status), READ)
    allow(Route("/api/rollouts", rollouts, methods=["GET", "POST"]), GET=READ, POST=OPERATOR)

``fleet.guard.Guard`` enforces it for the whole app, default deny: a route that declares nothing is refused
to everybody. Besides the roles there is ``PUBLIC`` (static files, the sign-in page, the enrollment routes,
which authenticate themselves) and ``DEVICE`` (``/bundles/{sha}``: a device's identity, as
``device_identity(scope)`` reads it from the TLS client certificate, or an operator token).

The dashboard signs in with a token into a session cookie (HttpOnly, SameSite=Strict, Secure over https)
whose random value is stored hashed with an expiry and tied to the token: revoking the token ends its
sessions. A session only ever grants ``read``, whatever the token's role, so a page another site makes the
browser load can never write: every write needs the token in the ``Authorization`` header.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.errors import EdgefleetError
from agent.files import write_atomic
from fleet.schemas import TOKEN_NAME

PUBLIC, DEVICE, READ, OPERATOR, ADMIN = "public", "device", "read", "operator", "admin"
ROLES = (READ, OPERATOR, ADMIN)  # what a token can have, least first
_RANK = {DEVICE: 0, READ: 1, OPERATOR: 2, ADMIN: 3}

# What a request body may be, per route: the media types it takes and the most bytes it may have.
JSON, BUNDLE, FORM = "json", "bundle", "form"
MEDIA = {JSON: ("application/json",), BUNDLE: ("application/x-tar", "application/octet-stream"),
         FORM: ("application/x-www-form-urlencoded",)}
MAX_JSON_BYTES = 1 << 20
MAX_FORM_BYTES = 64 << 10
DEFAULT_MAX_BUNDLE_BYTES = 2 << 30

TOKEN_PREFIX = "eft_"
_NAME = re.compile(TOKEN_NAME[1:-1])
RESERVED_NAMES = {"anonymous", "enrollment"}  # audit actors that are not tokens
ADMIN_TOKEN = "admin.token"  # in the controller's data dir
SESSION_TTL_S = 12 * 3600.0
TOUCH_EVERY_S = 60.0  # a token's last_used is written at most this often
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class AuthError(EdgefleetError):
    """A token request the controller cannot take; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Access:
    """Who may call a route: the role each method needs (``"*"``: any method), whether it is a dashboard page
    (no credential: redirect to the sign-in page instead of 401) and what its request bodies are."""

    roles: dict[str, str]
    page: bool = False
    body: str = JSON

    def role(self, method: str) -> str:
        """The role ``method`` needs; for a method the route does not have (a 405 follows), the least any of
        its methods needs, so that only a caller who may use the route learns which methods it has."""
        method = "GET" if method == "HEAD" else method
        if method in self.roles:
            return self.roles[method]
        if "*" in self.roles:
            return self.roles["*"]
        return min(self.roles.values(), key=lambda r: -1 if r == PUBLIC else _RANK[r])


ACCESS_ATTR = "edgefleet_access"


def allow(route: Any, role: str | None = None, /, *, page: bool = False, body: str = JSON, **by_method: str) -> Any:
    """Declare who may call ``route`` (a Starlette Route or Mount) and return it: one role for every method,
    or one per method (``GET=READ, POST=OPERATOR``; HEAD goes with GET)."""
    if (role is None) == (not by_method):
        raise TypeError("allow() takes one role, or a role per method")
    methods = {m for m in (getattr(route, "methods", None) or ()) if m != "HEAD"}
    roles = {"*": role} if role is not None else {m.upper(): r for m, r in by_method.items()}
    if role is None and set(roles) != methods:
        raise TypeError(f"{getattr(route, 'path', route)}: give a role for each of {sorted(methods)}")
    for r in roles.values():
        if r != PUBLIC and r not in _RANK:
            raise TypeError(f"unknown role {r!r}")
    if body not in MEDIA:
        raise TypeError(f"unknown body kind {body!r}")
    setattr(route, ACCESS_ATTR, Access(roles, page, body))
    return route


def access(route: Any) -> Access | None:
    return getattr(route, ACCESS_ATTR, None)


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: a token's name (or ``device:<id>``) and the role it has here."""

    name: str
    role: str
    via: str  # token, session or device
    token_id: int | None = None

    def may(self, needed: str) -> bool:
        if needed == PUBLIC:
            return True
        if needed == DEVICE:
            return self.via == "device" or _RANK[self.role] >= _RANK[OPERATOR]
        return self.via != "device" and _RANK[self.role] >= _RANK[needed]


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def no_device(scope: dict) -> str | None:
    """No device identity: only an operator token reads ``/bundles/{sha}``."""
    return None


def any_caller_is_a_device(scope: dict) -> str | None:
    """For a controller without client certificates (plain HTTP): anyone who reaches ``/bundles/{sha}`` counts
    as a device. Bundles are then as open as they were before tokens; TLS client certificates close this."""
    return "unverified"


def _host_name(value: str) -> str:
    """A Host header's (or URL netloc's) host part, lowercased, without port, brackets or a trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _origin(scheme: str, netloc: str) -> tuple[str, str, int | None]:
    parts = urlsplit(f"{scheme}://{netloc}")
    try:
        port = parts.port
    except ValueError:
        return ("", "", None)
    return (parts.scheme, (parts.hostname or "").rstrip("."), port or {"http": 80, "https": 443}.get(parts.scheme))


class Auth:
    """Tokens, sessions, the Host/Origin allow-list and the audit trail of one controller, over its store.

    ``hosts``: the names the controller is reached by (Host headers naming anything else are refused, which
    stops DNS rebinding; an IP address is always accepted, as no DNS answer can put one there).
    ``public_origins``: origins besides the request's own that a browser may send writes from (the public URL's).
    ``device_identity(scope)``: the device a request comes from (its TLS client certificate), or None."""

    def __init__(self, store: Any, hosts: Iterable[str] = LOOPBACK_NAMES, public_origins: Iterable[str] = (),
                 device_identity: Callable[[dict], str | None] = no_device,
                 max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES, max_json_bytes: int = MAX_JSON_BYTES,
                 session_ttl_s: float = SESSION_TTL_S, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.hosts = {_host_name(h) for h in hosts if h}
        self.public_origins = {_origin(*o.split("://", 1)) for o in public_origins if "://" in o}
        self.device_identity = device_identity
        self.limits = {JSON: max_json_bytes, BUNDLE: max_bundle_bytes, FORM: MAX_FORM_BYTES}
        self.session_ttl_s = session_ttl_s
        self.clock = clock

    @classmethod
    def for_controller(cls, store: Any, bind_host: str, public_url: str, allowed_hosts: Iterable[str] = (),
                       **kw: Any) -> "Auth":
        """The allow-list of a controller bound to ``bind_host`` and reached at ``public_url``: its bind
        address, the loopback names, the public URL's host, ``allowed_hosts`` and, bound to every interface,
        this machine's names."""
        hosts = {*LOOPBACK_NAMES, bind_host, urlsplit(public_url).hostname or "", *allowed_hosts}
        if bind_host in ("", "0.0.0.0", "::"):
            hosts |= {socket.gethostname(), socket.getfqdn()}
        return cls(store, hosts=hosts, public_origins=[public_url], **kw)

    # -- Host and Origin ---------------------------------------------------------------------------------
    def host_allowed(self, host: str | None) -> bool:
        if not host:
            return False
        name = _host_name(host)
        return name in self.hosts or _is_ip(name)

    def origin_allowed(self, origin: str, scheme: str, host: str) -> bool:
        """A browser's Origin on a write: the controller's own (as this request reached it, or its public URL)."""
        if "://" not in origin:
            return False  # "null" and the like
        got = _origin(*origin.split("://", 1))
        return got[0] != "" and (got == _origin(scheme, host) or got in self.public_origins)

    # -- tokens --------------------------------------------------------------------------------------------
    def create_token(self, role: str, name: str | None = None) -> tuple[str, dict[str, Any]]:
        """A new token: (the secret, shown this once; its row)."""
        if role not in ROLES:
            raise AuthError(f"invalid role {role!r}: choose {', '.join(ROLES)}")
        if name is None:
            name = f"{role}-{secrets.token_hex(3)}"
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in RESERVED_NAMES:
            raise AuthError(f"invalid token name {name!r}: 1-64 lowercase letters, digits, '.', '_' or '-', "
                            f"starting with a letter or digit (not {' or '.join(sorted(RESERVED_NAMES))})")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = self.store.add_token(name, role, digest(secret), self.clock())
        if row is None:
            raise AuthError(f"a token called {name!r} exists: revoke it first or choose another name", 409)
        return secret, row

    def tokens(self) -> list[dict[str, Any]]:
        return self.store.tokens()

    def revoke_token(self, name: str) -> dict[str, Any]:
        row = self.store.revoke_token(name, self.clock())
        if row is None:
            raise AuthError(f"no active token called {name!r}", 404)
        return row

    def ensure_admin(self, data_dir: Path) -> str | None:
        """Without any admin token yet, create one called ``admin``, write it to ``data_dir/admin.token`` (0600,
        atomically) and return it; else None (the file, if still there, holds the first one)."""
        if self.store.has_active_token(ADMIN):
            return None
        path = Path(data_dir) / ADMIN_TOKEN
        name = ADMIN if not any(t["name"] == ADMIN and t["revoked"] is None for t in self.tokens()) else None
        secret, _ = self.create_token(ADMIN, name)
        write_atomic(path, (secret + "\n").encode(), 0o600)
        return secret

    def check_token(self, secret: str) -> Caller | None:
        row = self.store.active_token(digest(secret)) if secret.startswith(TOKEN_PREFIX) else None
        if row is None:
            return None
        now = self.clock()
        if row["last_used"] is None or now - row["last_used"] >= TOUCH_EVERY_S:
            self.store.token_used(row["id"], now)
        return Caller(row["name"], row["role"], "token", row["id"])

    # -- dashboard sessions -------------------------------------------------------------------------------
    def open_session(self, caller: Caller) -> str:
        """A new session for a token that signed in; returns the cookie's value (only its hash is kept)."""
        value = secrets.token_urlsafe(32)
        now = self.clock()
        self.store.add_session(digest(value), caller.token_id, now, now + self.session_ttl_s)
        return value

    def check_session(self, value: str) -> Caller | None:
        row = self.store.session(digest(value), self.clock()) if value else None
        if row is None:
            return None
        return Caller(row["name"], READ, "session", row["token_id"])  # a session only reads

    def end_session(self, value: str) -> None:
        if value:
            self.store.end_session(digest(value))

    # -- the audit trail ---------------------------------------------------------------------------------
    def audit(self, actor: str, action: str, target: str = "", detail: str = "", *, status: int | None = None,
              remote: str = "") -> None:
        """Record what ``actor`` (a token's name, ``device:<id>`` or ``enrollment``) did to ``target``."""
        self.store.add_audit(self.clock(), actor, action, target, status, remote, detail)
