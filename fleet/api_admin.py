"""The admin API: ``GET/POST /api/tokens``, ``DELETE /api/tokens/{name}`` and ``GET /api/audit``.

Tokens are made and revoked by ``fleet.auth.Auth``; a new token's secret is in the answer to its creation
and nowhere else. Each creation and revocation is in the audit trail (by the guard, which records every
write, with the token's name as its target).
"""

from __future__ import annotations

from typing import Literal

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleet.auth import ADMIN, Auth, AuthError, allow
from fleet.schemas import TokenName, decode_request, explain

MAX_AUDIT = 1000  # entries in one page


class TokenRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A token to create: its role, and its name (default: the role and 6 random hex digits)."""

    role: Literal["read", "operator", "admin"]
    name: TokenName | None = None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _int(request: Request, name: str, low: int, high: int, default: int | None) -> int | None:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise AuthError(f"{name}={text!r} is out of range: a whole number from {low} to {high}")
    return int(text)


def routes(auth: Auth) -> list[Route]:
    async def tokens(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(await run_in_threadpool(auth.tokens))
        try:
            req = decode_request(await request.body(), TokenRequest)
        except msgspec.DecodeError as e:
            return _error(400, f"invalid token request: {explain(e)}")
        try:
            secret, row = await run_in_threadpool(auth.create_token, req.role, req.name)
        except AuthError as e:
            return _error(e.status, str(e))
        request.state.audit = {"target": row["name"], "detail": f"created, role {row['role']}"}
        return JSONResponse({**row, "token": secret}, status_code=201)

    async def revoke(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            row = await run_in_threadpool(auth.revoke_token, name)
        except AuthError as e:
            return _error(e.status, str(e))
        request.state.audit = {"target": name, "detail": f"revoked, role {row['role']}"}
        return JSONResponse(row)

    async def audit(request: Request) -> Response:
        unknown = sorted(set(request.query_params) - {"limit", "before"})
        if unknown:
            return _error(400, f"unknown query parameter {unknown[0]!r}: this endpoint takes before, limit")
        try:
            limit = _int(request, "limit", 1, MAX_AUDIT, 100)
            before = _int(request, "before", 1, 2**62, None)
        except AuthError as e:
            return _error(400, str(e))
        entries = await run_in_threadpool(auth.store.audit, limit, before)
        more = len(entries) == limit and entries[-1]["id"] > 1
        return JSONResponse({"entries": entries, "next": entries[-1]["id"] if more else None})

    return [
        allow(Route("/api/tokens", tokens, methods=["GET", "POST"]), ADMIN),
        allow(Route("/api/tokens/{name}", revoke, methods=["DELETE"]), ADMIN),
        allow(Route("/api/audit", audit, methods=["GET"]), ADMIN),
    ]
