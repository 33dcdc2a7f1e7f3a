"""The JSON API the CLI speaks, and the bundle downloads devices make (with HTTP Range, to resume).

Every error is JSON: ``{"error": "..."}`` with a 4xx/5xx status. Database and MQTT calls block, so
they run in Starlette's thread pool, never on the event loop. Every route declares who may call it
(``fleet.auth.allow``); ``fleet.guard.Guard``, in front of the whole app, enforces it.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable

import msgspec
from msgspec import Meta
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from agent import protocol
from agent.bundle import BundleError, read_member, read_signed
from agent.errors import EdgefleetError
from fleet import health as health_
from fleet import login, quality, targets
from fleet.api_admin import routes as admin_routes
from fleet.api_enroll import routes as enroll_routes
from fleet.api_keys import routes as key_routes
from fleet.api_quality import routes as quality_routes
from fleet.api_reads import routes as read_routes
from fleet.api_rollouts import routes as rollout_routes
from fleet.auth import BUNDLE, DEVICE, OPERATOR, READ, Auth, allow
from fleet.guard import Guard
from fleet.link import Link
from fleet.schemas import MAX_IDS, MAX_TAGS, DeviceId, Sha256, Tag, decode_request, explain
from fleet.store import Store
from fleet.web import routes as web_routes

if TYPE_CHECKING:
    from fleet.enroll import Enrollment
    from fleet.keys import Keys

_SHA256 = re.compile(r"[0-9a-f]{64}")


class DeployRequest(msgspec.Struct, forbid_unknown_fields=True):
    bundle: Sha256
    devices: Annotated[list[DeviceId], Meta(min_length=1, max_length=MAX_IDS)]
    rollback: bool = False  # sent back to an older bundle on purpose: the devices take a lower serial


class TagsPut(msgspec.Struct, forbid_unknown_fields=True):
    tags: Annotated[list[Tag], Meta(max_length=MAX_TAGS)]


class TagsPost(msgspec.Struct, forbid_unknown_fields=True):
    """At least one of add and remove names a tag."""
    add: Annotated[list[Tag], Meta(max_length=MAX_TAGS)] = []
    remove: Annotated[list[Tag], Meta(max_length=MAX_TAGS)] = []


MAX_LIST = 1000  # the most events or transitions one device report lists


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _unknown_params(request: Request, allowed: set[str]) -> JSONResponse | None:
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        return _error(400, f"unknown query parameter {unknown[0]!r}: this endpoint takes "
                           f"{', '.join(sorted(allowed))}")
    return None


def new_deployment_id() -> str:
    return f"dep-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def create_app(store: Store, link: Link, bundles_dir: Path, public_url: Callable[[], str], auth: Auth,
               enrollment: "Enrollment | None" = None, keys: "Keys | None" = None,
               allow_unsigned: bool = False, metrics_per_device: bool = False) -> Starlette:
    """The Starlette app over one store and one link; ``public_url()`` is the base URL devices download from,
    ``auth`` says who may call it (fleet.auth, enforced by fleet.guard), ``enrollment`` (None in insecure mode)
    issues and revokes device identities, ``keys`` (fleet.keys) are the release keys uploads must be signed by
    (None: no policy, every readable bundle is taken), ``allow_unsigned`` relaxes that for experiments,
    ``metrics_per_device``: ``/metrics`` gives each device's series too (fleet.metrics)."""
    bundles_dir = Path(bundles_dir)

    async def status(request: Request) -> Response:
        count = await run_in_threadpool(store.device_count)
        leader = getattr(request.app.state, "leader", None)  # fleet.app.Fleet.is_leader (absent: a bare app)
        return JSONResponse({"ok": True, "broker": link.broker_url, "mqtt_connected": link.connected,
                             "devices": count, "received": link.received, "duplicates": link.duplicates,
                             "invalid": link.invalid, "worker": getattr(request.app.state, "worker", None),
                             "leader": True if leader is None else leader()})

    async def upload_bundle(request: Request) -> Response:
        bundles_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=bundles_dir, prefix=".upload-", suffix=".part")
        tmp = Path(name)
        try:
            h, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    h.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            sha = h.hexdigest()
            try:
                parsed = await run_in_threadpool(lambda: read_signed(tmp, check_files=True))
                profile = await run_in_threadpool(read_member, tmp, quality.PROFILE, quality.MAX_PROFILE_BYTES)
                if profile is not None:
                    quality.load_profile(profile)  # refused here, not after the file is kept
            except (BundleError, EdgefleetError) as e:
                return _error(400, str(e).replace(str(tmp), "upload"))
            manifest, signed_by, signer = parsed.manifest, None, None
            if keys is not None:
                from fleet.keys import KeysError

                try:
                    signed_by, signer = await run_in_threadpool(keys.check_upload, parsed.sig, parsed.manifest_bytes,
                                                                allow_unsigned)
                except KeysError as e:
                    return _error(e.status, str(e))
            final = bundles_dir / f"{sha}.tar"
            if final.exists():
                tmp.unlink()
            else:
                os.replace(tmp, final)
            doc = msgspec.to_builtins(manifest)
            await run_in_threadpool(store.add_bundle, sha, size, doc, signed_by, signer, profile)
            request.state.audit = {"target": sha, "detail": f"{manifest.name} {manifest.version}, signed by "
                                                            f"{signer or signed_by or 'nobody'}"}
            return JSONResponse({"sha256": sha, "size": size, "manifest": doc, "signed_by": signed_by,
                                 "signer": signer})
        finally:
            tmp.unlink(missing_ok=True)

    async def bundles(request: Request) -> Response:
        if request.method == "POST":
            return await upload_bundle(request)
        return JSONResponse(await run_in_threadpool(store.bundles))

    async def download_bundle(request: Request) -> Response:
        sha = request.path_params["sha256"]
        path = bundles_dir / f"{sha}.tar"
        if not _SHA256.fullmatch(sha) or not path.is_file():
            return _error(404, f"unknown bundle {sha}")
        return FileResponse(path, media_type="application/x-tar", filename=f"{sha}.tar")

    async def deploy(request: Request) -> Response:
        try:
            req = decode_request(await request.body(), DeployRequest)
        except msgspec.DecodeError as e:
            return _error(400, f"invalid deployment request: {explain(e)}")
        devices = list(dict.fromkeys(req.devices))
        if not devices:
            return _error(400, "a deployment needs at least one device")
        for d in devices:
            try:
                protocol.check_device_id(d)
            except protocol.ProtocolError as e:
                return _error(400, str(e))
        return await run_in_threadpool(_deploy, req.bundle, devices, req.rollback)

    def _deploy(sha: str, devices: list[str], rollback: bool = False) -> Response:
        bundle = store.bundle(sha) if _SHA256.fullmatch(sha) else None
        if bundle is None:
            return _error(404, f"unknown bundle {sha!r}: upload it first")
        dep_id = new_deployment_id()
        store.add_deployment(dep_id, sha, devices)
        desired = protocol.Desired(
            deployment_id=dep_id, name=bundle["name"], version=bundle["version"],
            url=f"{public_url().rstrip('/')}/bundles/{sha}", sha256=sha, size=bundle["size"],
            settings={}, time=time.time(), rollback=rollback)
        failed = []
        for d in devices:
            try:
                link.publish_desired(d, desired)
            except EdgefleetError as e:
                failed.append(d)
                store.set_phase(dep_id, d, "failed", f"not published: {e}")
        if failed:
            return _error(503, f"deployment {dep_id}: the broker did not take the desired model for "
                               f"{', '.join(failed)}")
        return JSONResponse({**store.deployment(dep_id), "warnings": health_.disk_warnings(store, devices, bundle)})

    async def device_tags(request: Request) -> Response:
        """PUT {"tags": [...]} replaces a device's tags; POST {"add": [...], "remove": [...]} changes them."""
        device_id = request.path_params["device_id"]
        body = await request.body()
        try:
            if request.method == "PUT":
                req = decode_request(body, TagsPut)
                change = {"replace": req.tags}
            else:
                req = decode_request(body, TagsPost)
                if not req.add and not req.remove:
                    return _error(400, "nothing to change: give tags to add and/or remove")
                change = {"add": req.add, "remove": req.remove}
        except msgspec.DecodeError as e:
            return _error(400, f"invalid tags request: {explain(e)}")
        try:
            tags = await run_in_threadpool(lambda: store.set_tags(device_id, **change))
        except targets.TargetError as e:
            return _error(e.status, str(e))
        if tags is None:
            return _error(404, f"unknown device {device_id!r}")
        return JSONResponse({"device_id": device_id, "tags": tags})

    def device_health(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        bad = _unknown_params(request, {"events", "transitions"})
        if bad:
            return bad
        limits = {}
        for name in ("events", "transitions"):
            text = request.query_params.get(name)
            if text is not None:
                if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIST:
                    return _error(400, f"{name}={text!r} is out of range: a whole number from 1 to {MAX_LIST}")
                limits[name] = int(text)
        detail = store.device_detail(device_id, **limits)
        if detail is None:
            return _error(404, f"unknown device {device_id!r}")
        return JSONResponse(detail)

    def deployment(request: Request) -> Response:
        dep_id = request.path_params["deployment_id"]
        found = store.deployment(dep_id)
        if found is None:
            return _error(404, f"unknown deployment {dep_id!r}")
        return JSONResponse(found)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        response = _error(exc.status_code, exc.detail)
        response.headers.update(exc.headers or {})  # a 405's Allow (RFC 9110)
        return response

    routes = [
        allow(Route("/api/status", status), READ),
        allow(Route("/api/bundles", bundles, methods=["GET", "POST"]), GET=READ, POST=OPERATOR, body=BUNDLE),
        allow(Route("/bundles/{sha256}", download_bundle, methods=["GET", "HEAD"]), DEVICE),
        allow(Route("/api/deployments", deploy, methods=["POST"]), OPERATOR),
        allow(Route("/api/deployments/{deployment_id}", deployment), READ),
        *read_routes(store),  # /api/health, /api/devices: pages (fleet/api_reads.py, fleet/paging.py)
        allow(Route("/api/devices/{device_id}/tags", device_tags, methods=["PUT", "POST"]), OPERATOR),
        allow(Route("/api/health/{device_id}", device_health), READ),
        *rollout_routes(),  # /api/rollouts (fleet/api_rollouts.py)
        *quality_routes(store),  # /api/quality, /api/devices/{id}/quality[/series] (fleet/api_quality.py)
        *admin_routes(auth),  # /api/tokens, /api/audit (fleet/api_admin.py)
        *(key_routes(keys) if keys is not None else []),  # /api/keys (fleet/api_keys.py)
        *login.routes(auth),  # /login, /logout
        *web_routes(store, metrics_per_device),  # the dashboard, its series, /metrics, /api/openapi.json, /static
        *(enroll_routes(enrollment) if enrollment is not None else []),  # /enroll/*, enrollments, revocation
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.add_middleware(Guard, auth=auth, routes=app.routes)
    app.state.auth = auth
    return app
