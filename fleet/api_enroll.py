"""Enrollment over HTTPS: what devices call (``/enroll/*``) and what administrators call (``/api/enrollments``,
``/api/devices/{id}/revoke``, ``/api/certificates``), over ``fleet.enroll.Enrollment``.

``GET /enroll/ca.pem`` is public: a device fetches it before it trusts anything, and checks its sha256 against
the fingerprint its administrator gave it. ``POST /enroll`` is authenticated by the enrollment token in its body,
``POST /enroll/renew`` by the device's TLS client certificate (the server puts the DER bytes in
``scope["state"]["peer_cert"]``, see ``fleet.app``). Errors are ``{"error": "..."}`` with a 4xx status.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleet.enroll import MAX_COUNT, MAX_TTL_S, EnrollError, Enrollment

Csr = Annotated[str, msgspec.Meta(min_length=1, max_length=16384, description="a PEM certificate signing request")]
DeviceId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]


class EnrollRequest(msgspec.Struct, forbid_unknown_fields=True):
    token: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    csr: Csr
    device_id: DeviceId | None = None  # required with a provisioning token: the id the device chose


class RenewRequest(msgspec.Struct, forbid_unknown_fields=True):
    csr: Csr


class EnrollmentCreate(msgspec.Struct, forbid_unknown_fields=True):
    """One device id (a one-time token), or a provisioning token: ``count`` devices choosing ids with ``prefix``."""
    device_id: DeviceId | None = None
    ttl_s: Annotated[float, msgspec.Meta(ge=60, le=MAX_TTL_S)] = 3600.0
    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)] = 1
    prefix: Annotated[str, msgspec.Meta(pattern=r"^([a-z0-9][a-z0-9._-]{0,31})?$")] = ""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _decode(request: Request, cls: type) -> Any:
    try:
        return msgspec.json.decode(await request.body(), type=cls)
    except msgspec.DecodeError as e:
        raise EnrollError(400, f"invalid request: {e}") from None


def routes(enrollment: Enrollment, actor=lambda request: "") -> list[Route]:
    """``actor(request)`` names who is calling (the auth layer's token name), for the records."""

    async def call(fn, *args: Any, status: int = 200) -> Response:
        try:
            return JSONResponse(await run_in_threadpool(fn, *args), status_code=status)
        except EnrollError as e:
            return _error(e.status, str(e))

    async def ca_pem(request: Request) -> Response:
        return Response(enrollment.pki.ca_pem(), media_type="application/x-pem-file")

    async def enroll(request: Request) -> Response:
        try:
            req = await _decode(request, EnrollRequest)
        except EnrollError as e:
            return _error(e.status, str(e))
        return await call(enrollment.enroll, req.token, req.csr, req.device_id)

    async def renew(request: Request) -> Response:
        der = (request.scope.get("state") or {}).get("peer_cert")
        device_id = await run_in_threadpool(enrollment.device_identity, der)
        if device_id is None:
            return _error(401, "renewal needs this device's valid, unrevoked client certificate (mutual TLS)")
        try:
            req = await _decode(request, RenewRequest)
        except EnrollError as e:
            return _error(e.status, str(e))
        return await call(enrollment.renew, device_id, req.csr)

    async def create(request: Request) -> Response:
        try:
            req = await _decode(request, EnrollmentCreate)
        except EnrollError as e:
            return _error(e.status, str(e))
        return await call(lambda: enrollment.create_token(device_id=req.device_id, ttl_s=req.ttl_s, count=req.count,
                                                          prefix=req.prefix, by=actor(request)), status=201)

    async def list_tokens(request: Request) -> Response:
        return await call(enrollment.tokens)

    async def revoke_token(request: Request) -> Response:
        return await call(enrollment.revoke_token, request.path_params["token_id"])

    async def revoke_device(request: Request) -> Response:
        return await call(enrollment.revoke, request.path_params["device_id"], actor(request))

    async def certificates(request: Request) -> Response:
        device = request.query_params.get("device")
        return await call(lambda: enrollment.store.certificates(device))

    return [
        Route("/enroll/ca.pem", ca_pem, methods=["GET"]),
        Route("/enroll", enroll, methods=["POST"]),
        Route("/enroll/renew", renew, methods=["POST"]),
        Route("/api/enrollments", create, methods=["POST"]),
        Route("/api/enrollments", list_tokens, methods=["GET"]),
        Route("/api/enrollments/{token_id}/revoke", revoke_token, methods=["POST"]),
        Route("/api/devices/{device_id}/revoke", revoke_device, methods=["POST"]),
        Route("/api/certificates", certificates, methods=["GET"]),
    ]
