"""The dashboard the controller serves, and what it reads: pages, the charts' series, ``/metrics``, the
OpenAPI document and the static files (CSS, script, the vendored uPlot).

``routes(store)`` is mounted by ``fleet.api.create_app``. Pages are server-rendered (``fleet.pages``);
the store is read in the thread pool. The fleet page stays the same size at any fleet size: the fleet's
aggregates at the top (``fleet.aggregate``: counts by status, models and versions, the worst devices by error
rate and p95) and one page of the device table (``fleet.paging``: the API's filters and cursor in its links). Model quality comes from ``fleet.quality`` as it computes it: the
fleet page's worst devices (``quality.summary`` over the last ``QUALITY_WINDOW_S``), a device page's quality
over the page's range (``quality.device``) and its charts' columns (``Series.quality``). Rollouts are read
through the controller's own JSON API (``/api/rollouts``, ``/api/rollouts/{id}``) with an in-process ASGI
call, so the pages render exactly what the API answers, and a controller without a rollout engine still
serves every page.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from fleet import aggregate, api_reads, metrics, openapi, pages, pages_quality, pages_rollout, paging, quality, targets
from fleet.auth import PUBLIC, READ, allow
from fleet.series import SeriesError, parse_window, recent_rates, series
from fleet.store import Store

STATIC = Path(__file__).parent / "static"
_ENCODER = msgspec.json.Encoder()
QUALITY_WINDOW_S = quality.DEFAULT_WINDOW_S  # the fleet page's worst devices: over the last hour
QUALITY_ROWS = 10  # the fleet page's worst devices: this many unless ?quality=all
OVERVIEW_ROWS = 50  # the fleet page's device table: this many a page unless ?limit= (fleet.paging)


def _device_row(store: Store, device_id: str) -> dict[str, Any] | None:
    row = store.device_row(device_id)
    if row is None:
        return None
    d = dict(row)
    d["runtimes"] = json.loads(d["runtimes"])
    return d


def _rates(store: Store, health: list[dict], now: float) -> dict:
    """Our own recent rates, only where the health report has none (``fleet.pages._rates``)."""
    return {} if health and "inferences_per_min" in health[0] else recent_rates(store, now)


def _overview_data(store: Store, q: paging.Query) -> tuple[aggregate.Fleet, paging.Page, dict, list[dict]]:
    """The fleet's aggregates (counted by the database: ``fleet.aggregate.from_store``), one page of its device
    table (read by the store a page at a time: ``fleet.api_reads.health_page``), that page's rates and the worst
    quality rows."""
    now = time.time()
    found = api_reads.health_page(store, q, now, check_tag=False)
    return (aggregate.from_store(store, now), found, _rates(store, found.items, now) if found.items else {},
            quality.summary(store, now - QUALITY_WINDOW_S, now))


def _overview_query(request: Request) -> paging.Query:
    """The overview's listing parameters: the API's (``fleet.paging``), OVERVIEW_ROWS rows unless ?limit=."""
    params = {k: v for k, v in request.query_params.items() if k != "quality" and v != ""}  # a form's blanks
    q = paging.parse(params, sortable=True)
    return q if "limit" in params else dataclasses.replace(q, limit=OVERVIEW_ROWS)


def _href(request: Request, cursor: str | None) -> str | None:
    """The overview with the same parameters but the cursor (None: no such page; "": the first page)."""
    if cursor is None:
        return None
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor" and v != ""]
    params += [("cursor", cursor)] if cursor else []
    return "/" + (f"?{urlencode(params)}" if params else "")


def _device_data(store: Store, device_id: str, since: float) -> tuple[tuple, dict] | None:
    """(pages.device's positional data, its ``quality``: ``fleet.quality.device`` over the page's range, plus
    ``ever``: whether the device ever sent a quality window)."""
    detail = store.device_detail(device_id)
    if detail is None:
        return None
    now = time.time()
    info = _device_row(store, device_id) or {}
    rates = _rates(store, [detail], now).get(device_id, {})
    bundle = store.bundle(detail["model"]["sha256"]) if detail["model"] else None
    history = {sha: b for sha in {r["bundle_sha256"] for r in detail["deployments"]}
               if (b := store.bundle(sha)) is not None}
    q = quality.device(store, device_id, now - since, now) or {}
    q["ever"] = bool(q.get("sha256")) or store.has_quality(device_id)
    return (detail, info, rates, bundle, history), q


_FORWARDED = (b"host", b"authorization", b"cookie")  # so the inner request is the caller's own


async def internal_get(request: Request, path: str) -> tuple[int, Any]:
    """GET ``path`` from this same app in-process, as the caller of ``request``: (status, decoded JSON or None)."""
    app = request.scope["app"]
    headers = [(k, v) for k, v in request.scope["headers"] if k.lower() in _FORWARDED]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "GET", "scheme": request.scope.get("scheme", "http"), "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"accept", b"application/json"), *headers],
             "client": request.scope.get("client"), "server": request.scope.get("server")}
    status, chunks = 500, []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    except Exception:
        return 500, None
    try:
        return status, json.loads(b"".join(chunks) or b"null")
    except ValueError:
        return status, None


def routes(store: Store, metrics_per_device: bool = False) -> list[BaseRoute]:
    """The dashboard's routes over one store; ``metrics_per_device``: /metrics gives each device's series too."""

    async def overview(request: Request) -> Response:
        try:
            q = _overview_query(request)
        except (paging.PageError, targets.TargetError) as err:
            return HTMLResponse(pages.not_found("Bad request", str(err)), status_code=400)
        agg, found, rates, worst = await run_in_threadpool(_overview_data, store, q)
        rollouts = pages_rollout.rollout_list(*await internal_get(request, "/api/rollouts"))
        limit = None if request.query_params.get("quality") == "all" else QUALITY_ROWS
        panel = pages_quality.worst_panel(worst, limit, QUALITY_WINDOW_S)
        nav = pages.page_nav(_href(request, found.prev), _href(request, found.next), len(found.items))
        form = pages.filter_form(dict(request.query_params), sorted({m for m, _ in agg.models}), paging.STATUSES)
        return HTMLResponse(pages.overview(agg, found.items, rates, rollouts, quality=panel, nav=nav, filters=form))

    async def device(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        try:
            since, _ = parse_window(request.query_params.get("since"), None)
        except SeriesError:
            since = 3600
        data = await run_in_threadpool(_device_data, store, device_id, since)
        if data is None:
            return HTMLResponse(pages.not_found("No such device", f"No device {device_id!r} has reported to "
                                                                  f"this controller."), status_code=404)
        return HTMLResponse(pages.device(*data[0], since=int(since),
                                         quality=pages_quality.device_section(data[1], since)))

    async def rollout(request: Request) -> Response:
        rollout_id = request.path_params["rollout_id"]
        status, data = await internal_get(request, "/api/rollouts/" + quote(rollout_id, safe=""))
        if status == 200 and isinstance(data, dict):
            return HTMLResponse(pages_rollout.rollout_page(rollout_id, data))
        if status == 404:
            return HTMLResponse(pages.not_found("No such rollout", f"This controller has no rollout "
                                                                   f"{rollout_id!r}."), status_code=404)
        why = data.get("error") if isinstance(data, dict) else None
        return HTMLResponse(pages.not_found("Rollout unavailable", f"The rollout API answered {status}"
                                                                   f"{': ' + why if why else ''}."), status_code=502)

    def device_series(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        unknown = sorted(set(request.query_params) - {"since", "step"})
        if unknown:
            return JSONResponse({"error": f"unknown query parameter {unknown[0]!r}: this endpoint takes since, step"},
                                status_code=400)
        try:
            since, step = parse_window(request.query_params.get("since"), request.query_params.get("step"))
        except SeriesError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        if not store.has_device(device_id):
            return JSONResponse({"error": f"unknown device {device_id!r}"}, status_code=404)
        return Response(_ENCODER.encode(series(store, device_id, since, step)), media_type="application/json")

    return [
        allow(Route("/", overview), READ, page=True),
        allow(Route("/devices/{device_id}", device), READ, page=True),
        allow(Route("/rollouts/{rollout_id}", rollout), READ, page=True),
        allow(Route("/api/devices/{device_id}/series", device_series), READ),
        *(allow(r, READ) for r in metrics.routes(store, metrics_per_device)),
        *(allow(r, READ) for r in openapi.routes()),
        allow(Mount("/static", StaticFiles(directory=STATIC), name="static"), PUBLIC),
    ]
