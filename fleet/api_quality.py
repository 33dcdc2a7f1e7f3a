"""The model-quality API (fleet/quality.py), read-only:

- ``GET /api/devices/{device_id}/quality?since=&until=&sha256=``: one device's quality on one bundle
  (``schemas.DeviceQuality``);
- ``GET /api/devices/{device_id}/quality/series?since=&until=&sha256=&step=``: per window, for charts
  (``schemas.QualitySeries``);
- ``GET /api/quality?since=&until=&limit=&offset=``: every device that sent quality, worst first, a page at a time
  (``schemas.QualityPage``).

``since`` and ``until`` are unix times in seconds on the controller's time line, the window [since, until);
``until`` defaults to now and ``since`` to an hour before ``until``. A bad parameter is a 400 naming it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent import protocol
from fleet import quality
from fleet.auth import READ, allow

if TYPE_CHECKING:
    from fleet.store import Store

MAX_PAGE = 1000  # devices in one page of the fleet view
DEFAULT_PAGE = 100


class ParamError(ValueError):
    """A query parameter out of range; the message names it."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _params(request: Request, allowed: set[str]) -> dict[str, str]:
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise ParamError(f"unknown query parameter {unknown[0]!r}: this endpoint takes {', '.join(sorted(allowed))}")
    for name in request.query_params:
        if len(request.query_params.getlist(name)) > 1:
            raise ParamError(f"{name} is given more than once")
    return dict(request.query_params)


def _time(q: dict[str, str], name: str) -> float | None:
    text = q.get(name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ParamError(f"{name}={text!r} is not a unix time in seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ParamError(f"{name}={text!r} is not a unix time in seconds")
    return value


def _window(q: dict[str, str]) -> tuple[float, float]:
    try:
        return quality.window(_time(q, "since"), _time(q, "until"))
    except quality.WindowError as e:
        raise ParamError(str(e)) from None


def _sha(q: dict[str, str]) -> str | None:
    sha = q.get("sha256")
    if sha is not None and not protocol.SHA256_RE.fullmatch(sha):
        raise ParamError(f"sha256={sha[:80]!r} is not a sha256 (64 lowercase hex digits)")
    return sha


def _int(q: dict[str, str], name: str, low: int, high: int, default: int) -> int:
    text = q.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise ParamError(f"{name}={text[:80]!r} is out of range: a whole number from {low} to {high}")
    return int(text)


def routes(store: "Store") -> list[Route]:
    def device_quality(request: Request) -> Response:
        try:
            q = _params(request, {"since", "until", "sha256"})
            since, until = _window(q)
            sha = _sha(q)
        except ParamError as e:
            return _error(400, str(e))
        found = quality.device(store, request.path_params["device_id"], since, until, sha)
        if found is None:
            return _error(404, f"unknown device {request.path_params['device_id']!r}")
        return JSONResponse(found)

    def device_series(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        try:
            q = _params(request, {"since", "until", "sha256", "step"})
            since, until = _window(q)
            sha = _sha(q)
            step = _time(q, "step")
            if step is not None and not 1 <= step <= until - since:
                raise ParamError(f"step={q['step']!r}: must be seconds in [1, until - since]")
        except ParamError as e:
            return _error(400, str(e))
        if not store.has_device(device_id):
            return _error(404, f"unknown device {device_id!r}")
        return JSONResponse(quality.series(store, device_id, since, until, sha, step))

    async def fleet_quality(request: Request) -> Response:
        try:
            q = _params(request, {"since", "until", "limit", "offset"})
            since, until = _window(q)
            limit = _int(q, "limit", 1, MAX_PAGE, DEFAULT_PAGE)
            offset = _int(q, "offset", 0, 10**9, 0)
        except ParamError as e:
            return _error(400, str(e))
        rows = await run_in_threadpool(quality.summary, store, since, until)
        refused = await run_in_threadpool(quality.refused, store)
        page = rows[offset:offset + limit]
        return JSONResponse({"since": since, "until": until, "min_served": quality.MIN_SERVED, "total": len(rows),
                             "devices": page, "next": offset + limit if offset + limit < len(rows) else None,
                             "refused": refused})

    return [
        allow(Route("/api/devices/{device_id}/quality", device_quality), READ),
        allow(Route("/api/devices/{device_id}/quality/series", device_series), READ),
        allow(Route("/api/quality", fleet_quality), READ),
    ]
