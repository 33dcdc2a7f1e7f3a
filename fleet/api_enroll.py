"""Enrollment over HTTPS: what devices call (``/enroll/*``) and what administrators call (``/api/enrollments``,
``/api/provisioning``, ``/api/devices/{id}/revoke``, ``/api/certificates``), over ``fleet.enroll.Enrollment``.

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

from fleet.auth import ADMIN, PUBLIC, READ, allow
from fleet.enroll import MAX_COUNT, MAX_TTL_S, EnrollError, Enrollment
from fleet.schemas import decode_request, explain

Csr = Annotated[str, msgspec.Meta(min_length=1, max_length=16384, pattern=r"^-----BEGIN CERTIFICATE REQUEST-----",
                                  description="a PEM certificate signing request")]
DeviceId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]


class EnrollRequest(msgspec.Struct, forbid_unknown_fields=True):
    token: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    csr: Csr
    device_id: DeviceId | None = None  # required with a provisioning token: the id the device chose


class RenewRequest(msgspec.Struct, forbid_unknown_fields=True):
    csr: Csr


Ttl = Annotated[float, msgspec.Meta(ge=60, le=MAX_TTL_S, description="seconds the token is valid")]


class EnrollmentCreate(msgspec.Struct, forbid_unknown_fields=True):
    """A one-time token that enrolls this device id."""
    device_id: DeviceId
    ttl_s: Ttl = 3600.0


class ProvisioningCreate(msgspec.Struct, forbid_unknown_fields=True):
    """A provisioning token: ``count`` devices flashed from one image enroll with it, each under an id it makes
    at first boot, starting with ``prefix``."""
    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)]
    ttl_s: Ttl = 7 * 86400.0
    prefix: Annotated[str, msgspec.Meta(pattern=r"^([a-z0-9][a-z0-9._-]{0,31})?$")] = ""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _decode(request: Request, cls: type) -> Any:
    try:
        return decode_request(await request.body(), cls)  # JSON's 3.0 is the integer 3, as the schema says
    except msgspec.DecodeError as e:
        raise EnrollError(400, f"invalid request: {explain(e)}") from None


def _actor(request: Request) -> str:
    caller = (request.scope.get("state") or {}).get("caller")
    return caller.name if caller is not None else ""


def _audit(request: Request, actor: str, action: str, target: str, status: int, detail: str = "") -> None:
    auth = getattr(request.app.state, "auth", None)
    if auth is not None:
        auth.audit(actor, action, target, detail, status=status, remote=(request.client or ("", 0))[0])


def routes(enrollment: Enrollment) -> list[Route]:
    """The routes, each declaring who may call it (fleet.auth): devices' routes are public at the door and
    authenticate themselves (a token, a client certificate); the rest are for administrators."""

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
        answer = await call(enrollment.enroll, req.token, req.csr, req.device_id)
        device = msgspec.json.decode(answer.body).get("device_id") if answer.status_code == 200 else req.device_id
        await run_in_threadpool(_audit, request, "enrollment", "POST /enroll", device or "", answer.status_code,
                                "" if answer.status_code == 200 else msgspec.json.decode(answer.body)["error"])
        return answer

    async def renew(request: Request) -> Response:
        der = (request.scope.get("state") or {}).get("peer_cert")
        device_id = await run_in_threadpool(enrollment.device_identity, der)
        if device_id is None:
            return _error(401, "renewal needs this device's valid, unrevoked client certificate (mutual TLS)")
        try:
            req = await _decode(request, RenewRequest)
        except EnrollError as e:
            return _error(e.status, str(e))
        answer = await call(enrollment.renew, device_id, req.csr)
        await run_in_threadpool(_audit, request, f"device:{device_id}", "POST /enroll/renew", device_id,
                                answer.status_code)
        return answer

    async def create(request: Request) -> Response:
        try:
            req = await _decode(request, EnrollmentCreate)
        except EnrollError as e:
            return _error(e.status, str(e))
        request.state.audit = {"target": req.device_id}
        return await call(lambda: enrollment.create_token(device_id=req.device_id, ttl_s=req.ttl_s,
                                                          by=_actor(request)), status=201)

    async def provision(request: Request) -> Response:
        try:
            req = await _decode(request, ProvisioningCreate)
        except EnrollError as e:
            return _error(e.status, str(e))
        request.state.audit = {"target": f"{req.count} x {req.prefix or 'any id'}*"}
        return await call(lambda: enrollment.create_token(ttl_s=req.ttl_s, count=req.count, prefix=req.prefix,
                                                          by=_actor(request)), status=201)

    async def list_tokens(request: Request) -> Response:
        return await call(enrollment.tokens)

    async def revoke_token(request: Request) -> Response:
        return await call(enrollment.revoke_token, request.path_params["token_id"])

    async def revoke_device(request: Request) -> Response:
        return await call(enrollment.revoke, request.path_params["device_id"], _actor(request))

    async def certificates(request: Request) -> Response:
        device = request.query_params.get("device")
        return await call(lambda: enrollment.store.certificates(device))

    async def enrollments(request: Request) -> Response:
        return await (create(request) if request.method == "POST" else list_tokens(request))

    return [
        allow(Route("/enroll/ca.pem", ca_pem, methods=["GET"]), PUBLIC),
        allow(Route("/enroll", enroll, methods=["POST"]), PUBLIC),  # the enrollment token is its credential
        allow(Route("/enroll/renew", renew, methods=["POST"]), PUBLIC),  # the client certificate is
        allow(Route("/api/enrollments", enrollments, methods=["GET", "POST"]), ADMIN),
        allow(Route("/api/provisioning", provision, methods=["POST"]), ADMIN),
        allow(Route("/api/enrollments/{token_id}/revoke", revoke_token, methods=["POST"]), ADMIN),
        allow(Route("/api/devices/{device_id}/revoke", revoke_device, methods=["POST"]), ADMIN),
        allow(Route("/api/certificates", certificates, methods=["GET"]), READ),
    ]
