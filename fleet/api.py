"""The JSON API the CLI speaks, and the bundle downloads devices make (with HTTP Range, to resume).

Every error is JSON: ``{"error": "..."}`` with a 4xx/5xx status. Database and MQTT calls block, so
they run in Starlette's thread pool, never on the event loop.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import Callable

import msgspec
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from agent import protocol
from agent.bundle import BundleError, read_manifest
from agent.errors import EdgefleetError
from fleet.link import Link
from fleet.store import Store

_SHA256 = re.compile(r"[0-9a-f]{64}")


class DeployRequest(msgspec.Struct, forbid_unknown_fields=True):
    bundle: str
    devices: list[str]


_deploy_decoder = msgspec.json.Decoder(DeployRequest)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def new_deployment_id() -> str:
    return f"dep-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def create_app(store: Store, link: Link, bundles_dir: Path, public_url: Callable[[], str]) -> Starlette:
    """The Starlette app over one store and one link; ``public_url()`` is the base URL devices download from."""
    bundles_dir = Path(bundles_dir)

    async def status(request: Request) -> Response:
        count = await run_in_threadpool(store.device_count)
        return JSONResponse({"ok": True, "broker": link.broker_url, "mqtt_connected": link.connected,
                             "devices": count, "received": link.received, "duplicates": link.duplicates,
                             "invalid": link.invalid})

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
                manifest = await run_in_threadpool(read_manifest, tmp)
            except BundleError as e:
                return _error(400, str(e).replace(str(tmp), "upload"))
            final = bundles_dir / f"{sha}.tar"
            if final.exists():
                tmp.unlink()
            else:
                os.replace(tmp, final)
            doc = msgspec.to_builtins(manifest)
            await run_in_threadpool(store.add_bundle, sha, size, doc)
            return JSONResponse({"sha256": sha, "size": size, "manifest": doc})
        finally:
            tmp.unlink(missing_ok=True)

    async def download_bundle(request: Request) -> Response:
        sha = request.path_params["sha256"]
        path = bundles_dir / f"{sha}.tar"
        if not _SHA256.fullmatch(sha) or not path.is_file():
            return _error(404, f"unknown bundle {sha}")
        return FileResponse(path, media_type="application/x-tar", filename=f"{sha}.tar")

    async def deploy(request: Request) -> Response:
        try:
            req = _deploy_decoder.decode(await request.body())
        except msgspec.DecodeError as e:
            return _error(400, f"invalid deployment request: {e}")
        devices = list(dict.fromkeys(req.devices))
        if not devices:
            return _error(400, "a deployment needs at least one device")
        for d in devices:
            try:
                protocol.check_device_id(d)
            except protocol.ProtocolError as e:
                return _error(400, str(e))
        return await run_in_threadpool(_deploy, req.bundle, devices)

    def _deploy(sha: str, devices: list[str]) -> Response:
        bundle = store.bundle(sha) if _SHA256.fullmatch(sha) else None
        if bundle is None:
            return _error(404, f"unknown bundle {sha!r}: upload it first")
        dep_id = new_deployment_id()
        store.add_deployment(dep_id, sha, devices)
        desired = protocol.Desired(
            deployment_id=dep_id, name=bundle["name"], version=bundle["version"],
            url=f"{public_url().rstrip('/')}/bundles/{sha}", sha256=sha, size=bundle["size"],
            settings={}, time=time.time())
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
        return JSONResponse(store.deployment(dep_id))

    def devices(request: Request) -> Response:
        return JSONResponse(store.devices())

    def health(request: Request) -> Response:
        return JSONResponse(store.health())

    def device_health(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        detail = store.device_detail(device_id)
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
        return _error(exc.status_code, exc.detail)

    routes = [
        Route("/api/status", status),
        Route("/api/bundles", upload_bundle, methods=["POST"]),
        Route("/bundles/{sha256}", download_bundle, methods=["GET", "HEAD"]),
        Route("/api/deployments", deploy, methods=["POST"]),
        Route("/api/deployments/{deployment_id}", deployment),
        Route("/api/devices", devices),
        Route("/api/health", health),
        Route("/api/health/{device_id}", device_health),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})
