"""The release keys API (admin): ``GET /api/keys``, ``POST /api/keys``, ``DELETE /api/keys/{keyid}`` over
``fleet.keys.Keys``. Each change is in the audit trail (the guard records every write)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleet.auth import ADMIN, allow
from fleet.keys import KeysError, Keys
from fleet.schemas import decode_request, explain

KEYID = r"^[0-9a-f]{16}$"


class KeyRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A release public key to list (PEM), its name (default: the statement's, else key-<id>), and optionally
    the signed ``add`` statement (``edgefleet keys rotate``) that tells devices to trust it."""
    key: Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=r"^-----BEGIN PUBLIC KEY-----")]
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] | None = None
    statement: dict[str, Any] | None = None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def routes(keys: Keys) -> list[Route]:
    async def collection(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(await run_in_threadpool(keys.list))
        try:
            req = decode_request(await request.body(), KeyRequest)
        except msgspec.DecodeError as e:
            return _error(400, f"invalid key request: {explain(e)}")
        try:
            row = await run_in_threadpool(keys.add, req.key, req.name, req.statement)
        except KeysError as e:
            return _error(e.status, str(e))
        request.state.audit = {"target": row["keyid"], "detail": f"added {row['name']}"
                               + (" with a trust statement" if row["statement"] else "")}
        return JSONResponse(row, status_code=201)

    async def remove(request: Request) -> Response:
        keyid = request.path_params["keyid"]
        try:
            row = await run_in_threadpool(keys.remove, keyid)
        except KeysError as e:
            return _error(e.status, str(e))
        request.state.audit = {"target": keyid, "detail": f"removed {row['name']}"}
        return JSONResponse(row)

    return [
        allow(Route("/api/keys", collection, methods=["GET", "POST"]), ADMIN),
        allow(Route("/api/keys/{keyid}", remove, methods=["DELETE"]), ADMIN),
    ]
