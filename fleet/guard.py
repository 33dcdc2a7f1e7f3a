"""``Guard``: the ASGI middleware in front of every route of the controller's app (``fleet.auth`` says who
may do what; this applies it to each request).

In order, for each HTTP request:
1. the Host must be one the controller answers to (``Auth.host_allowed``), else 400: DNS rebinding;
2. the route it names must declare who may call it (``fleet.auth.allow``), else 403 for everybody;
3. a write's Origin, when the browser sends one, must be the controller's own, else 403: cross-site requests;
4. the caller: a bearer token (``Authorization: Bearer eft_...``), else the dashboard's session cookie (which
   only ever reads), else, for ``/bundles/{sha}``, the device ``device_identity(scope)`` names. None where
   one is needed: 401 with ``WWW-Authenticate: Bearer`` (a dashboard page redirects to ``/login``); one with
   too small a role: 403;
5. a request body must be of the route's media type (JSON routes: ``application/json``), else 415, and no
   bigger than its cap, checked from Content-Length first and again while it streams in, else 413 (the
   upload's temporary file is removed by the upload itself, as for any error);
6. every write by a known caller goes to the audit trail with its route, target and status.
Every answer carries the security headers (CSP, nosniff, same-origin referrers only, no framing).
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute, Match

from fleet.auth import DEVICE, MEDIA, PUBLIC, Access, Auth, Caller, access

log = logging.getLogger("edgefleet.fleet.guard")

SESSION_COOKIE = "edgefleet_session"
SECURE_SESSION_COOKIE = "__Host-edgefleet_session"  # over https: Secure, Path=/, no Domain, by the browser's rules
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"), (b"x-frame-options", b"DENY")]
READS = ("GET", "HEAD", "OPTIONS")


def cookie_name(scheme: str) -> str:
    return SECURE_SESSION_COOKIE if scheme == "https" else SESSION_COOKIE


class BodyTooLarge(Exception):
    pass


def _headers(scope: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in scope.get("headers", ()):
        key = k.decode("latin-1").lower()
        out[key] = out[key] + ", " + v.decode("latin-1") if key in out and key != "cookie" else v.decode("latin-1")
    return out


def session_value(scope: dict) -> str:
    """The session cookie's value, or "" (other cookies of the same host, however odd, are left alone)."""
    name = cookie_name(scope.get("scheme", "http"))
    for k, v in scope.get("headers", ()):
        if k.lower() == b"cookie":
            for pair in v.decode("latin-1").split(";"):
                key, sep, value = pair.strip().partition("=")
                if sep and key == name:
                    return value.strip()
    return ""


class Guard:
    def __init__(self, app: Any, auth: Auth, routes: list[BaseRoute]) -> None:
        self.app = app
        self.auth = auth
        self.routes = routes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._secured(scope, send)
        headers = _headers(scope)
        method = scope["method"]
        auth = self.auth
        if not auth.host_allowed(headers.get("host")):
            return await _json(send, 400, f"this controller does not answer to the host "
                                          f"{headers.get('host', '(none)')!r}: reach it by an address it serves, "
                                          f"or start it with --hostname NAME")
        route, acc, full = self._route(scope)
        if route is None:
            return await self.app(scope, receive, send)  # no such path: 404
        if acc is None:
            return await _json(send, 403, f"{getattr(route, 'path', scope['path'])} declares no role "
                                          f"(fleet.auth.allow): refused")
        needed = acc.role(method)
        write = method not in READS
        origin = headers.get("origin")
        if write and origin is not None and not auth.origin_allowed(origin, scope.get("scheme", "http"),
                                                                    headers["host"]):
            return await _json(send, 403, f"a write from {origin!r} is refused: only pages of this controller "
                                          f"may send one")
        caller = None
        if needed != PUBLIC:
            caller, problem = await run_in_threadpool(self._identify, scope, headers, needed)
            if caller is None:
                if acc.page and problem is None:
                    target = scope["path"] + ("?" + scope["query_string"].decode("latin-1")
                                              if scope.get("query_string") else "")
                    return await _send(send, 303, b"", [(b"location", f"/login?next={quote(target, safe='')}"
                                                         .encode())])
                log.info("refused %s %s from %s: %s", method, scope["path"], _remote(scope), problem or "no token")
                return await _json(send, 401, problem or "this needs a token: send Authorization: Bearer TOKEN "
                                                         "(edgefleet fleet token create)",
                                   [(b"www-authenticate", b'Bearer realm="edgefleet"'
                                     + (b', error="invalid_token"' if problem else b""))])
            if not caller.may(needed):
                if write:
                    await run_in_threadpool(self._audit, scope, route, caller, 403)
                what = "a device or an operator token" if needed == DEVICE else f"the {needed} role"
                return await _json(send, 403, f"{caller.name} has the {caller.role} role"
                                              f"{' (a dashboard session only reads)' if caller.via == 'session' else ''}"
                                              f": {method} {getattr(route, 'path', '')} needs {what}")
            scope.setdefault("state", {})["caller"] = caller
        limit = auth.limits[acc.body]
        received, status = 0, 0

        async def receive_capped() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._body_refusal(headers, acc, write) if full else None  # else: a 405 follows
            if refusal is not None:
                return await _json(send_status, *refusal)
            try:
                await self.app(scope, receive_capped, send_status)
            except BodyTooLarge:
                if status:
                    raise
                await _json(send_status, 413, _too_large(acc, limit))
        finally:
            if write and caller is not None:
                await run_in_threadpool(self._audit, scope, route, caller, status or 500)

    # -- the parts -----------------------------------------------------------------------------------------
    def _route(self, scope: dict) -> tuple[BaseRoute | None, Access | None, bool]:
        """The route the router will pick, its access, and whether it has the request's method."""
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route, access(route), True
            if match is Match.PARTIAL and partial is None:
                partial = route
        return partial, access(partial) if partial is not None else None, False

    def _identify(self, scope: dict, headers: dict[str, str], needed: str) -> tuple[Caller | None, str | None]:
        """(the caller, None) or (None, why a credential given is no good; None when there was none)."""
        authz = headers.get("authorization")
        if authz is not None:
            scheme, _, secret = authz.partition(" ")
            if scheme.lower() != "bearer" or not secret.strip():
                return None, "use Authorization: Bearer TOKEN"
            caller = self.auth.check_token(secret.strip())
            return (caller, None) if caller else (None, "this token is not valid (or was revoked)")
        if needed == DEVICE:
            device = self.auth.device_identity(scope)
            if device:
                return Caller(f"device:{device}", DEVICE, "device"), None
        value = session_value(scope)
        if value:
            caller = self.auth.check_session(value)
            if caller:
                return caller, None
        return None, None

    def _body_refusal(self, headers: dict[str, str], acc: Access, write: bool) -> tuple[int, str] | None:
        length = headers.get("content-length")
        has_body = "transfer-encoding" in headers or (length is not None and length.strip() != "0")
        if write and has_body:
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media not in MEDIA[acc.body]:
                return 415, (f"this endpoint takes {' or '.join(MEDIA[acc.body])} "
                             f"(Content-Type: {media or 'none'} is refused)")
        if length is not None:
            if not length.strip().isdigit():
                return 400, f"invalid Content-Length {length!r}"
            if int(length) > self.auth.limits[acc.body]:
                return 413, _too_large(acc, self.auth.limits[acc.body])
        return None

    def _audit(self, scope: dict, route: BaseRoute, caller: Caller, status: int) -> None:
        extra = scope.get("state", {}).get("audit") or {}
        self.auth.audit(caller.name, f"{scope['method']} {getattr(route, 'path', scope['path'])}",
                        extra.get("target", scope["path"]), extra.get("detail", ""), status=status,
                        remote=_remote(scope))

    def _secured(self, scope: dict, send: Any) -> Any:
        static = scope["path"].startswith("/static/")

        async def secured(message: dict) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", ())}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in have]
                if not static and b"cache-control" not in have:
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        return secured


def _remote(scope: dict) -> str:
    client = scope.get("client")
    return client[0] if client else ""


def _too_large(acc: Access, limit: int) -> str:
    what = "a bundle upload" if acc.body == "bundle" else "a request body"
    return f"{what} may have at most {limit} bytes here"


async def _send(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Any, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await _send(send, status, json.dumps({"error": message}).encode(),
                [(b"content-type", b"application/json"), *headers])
