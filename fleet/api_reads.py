"""The fleet's listings, a page at a time (``fleet.paging``): ``GET /api/health`` and ``GET /api/devices``.

Both answer ``{"devices": [...], "next": CURSOR | null, "limit": N}`` and, when there is a next page, a
``Link: <...>; rel="next"`` header; ``?limit=`` (default 100, at most 1000), ``?cursor=`` (the previous
page's ``next``), filters ``status``, ``tag``, ``model``, ``version``, ``prefix`` (of the device id); health
also ``sort`` and ``order``. A bad parameter is a 400 naming it, an unknown tag a 404.

Which store read feeds a page (the cheapest that has what the filters and the sort need): bare ids (sorted by
id, filtered by tag and prefix), the registry's rows (status, model, version), or every health entry (a sort
on any column but the id). For the first two, only the page's own devices are read in full afterwards: a page
of health costs one health entry a device on it, not the fleet's. The store will later read only one page
itself (``fleet.paging``'s module doc); these functions are where it plugs in.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleet import paging, targets
from fleet.auth import READ, allow

if TYPE_CHECKING:
    from fleet.store import Store


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _query(request: Request, sortable: bool, extra: set[str] = frozenset()) -> paging.Query:
    """The request's listing parameters (``extra``: repeatable ones the endpoint reads itself)."""
    allowed = set(paging.PARAMS) | extra
    for name in request.query_params:
        if name not in extra and len(request.query_params.getlist(name)) > 1:
            raise paging.PageError(f"{name} is given more than once")
    return paging.parse({k: v for k, v in request.query_params.items() if k not in extra}, allowed, sortable)


def _known_tag(store: "Store", q: paging.Query) -> None:
    if q.filters.tag is not None and not store.device_ids(tag=q.filters.tag):
        raise targets.UnknownTarget(f"unknown tag {q.filters.tag!r}: no device carries it")


def _answer(request: Request, q: paging.Query, found: paging.Page, extra: list[tuple[str, str]] = ()) -> Response:
    response = JSONResponse({"devices": found.items, "next": found.next, "limit": q.limit})
    if found.next is not None:
        response.headers["Link"] = paging.link(request.url.path, q, found.next, extra)
    return response


def health_page(store: "Store", q: paging.Query, now: float | None = None) -> paging.Page:
    """A page of health entries (``fleet.health.entry``)."""
    now = time.time() if now is None else now
    _known_tag(store, q)
    if q.sort != "device":  # a figure's order needs every entry
        return paging.page(store.health(now=now), q.cursor, q.limit, q.filters, q.sort, q.descending)
    rows: list[Any] = store.devices() if q.filters.on_registry else store.device_ids(tag=q.filters.tag)
    found = paging.page(rows, q.cursor, q.limit, q.filters, q.sort, q.descending)
    items = [h for r in found.items for h in store.health(paging.row_id(r), now=now)]
    return paging.Page(items, found.next)


def devices_page(store: "Store", q: paging.Query, ids: list[str] | None = None) -> paging.Page:
    """A page of registry rows (``Store.devices``), of all devices or of ``ids``."""
    _known_tag(store, q)
    if ids is None and not q.filters.on_registry:
        found = paging.page(store.device_ids(tag=q.filters.tag), q.cursor, q.limit, q.filters)
        return paging.Page(store.devices(found.items) if found.items else [], found.next)
    return paging.page(store.devices(ids), q.cursor, q.limit, q.filters)


def routes(store: "Store") -> list[Route]:
    def health(request: Request) -> Response:
        try:
            q = _query(request, sortable=True)
            found = health_page(store, q)
        except targets.TargetError as e:  # a malformed tag (400), an unknown one (404)
            return _error(e.status, str(e))
        except paging.PageError as e:
            return _error(400, str(e))
        order = request.query_params.get("order")
        extra = [("sort", q.sort)] + ([("order", order)] if order else [])
        return _answer(request, q, found, extra if q.sort != "device" or order else [])

    def devices(request: Request) -> Response:
        try:
            q = _query(request, sortable=False, extra={"target"})
            wanted = request.query_params.getlist("target")
            ids = targets.resolve(store, wanted) if wanted else None
            found = devices_page(store, q, ids)
        except targets.TargetError as e:
            return _error(e.status, str(e))
        except paging.PageError as e:
            return _error(400, str(e))
        return _answer(request, q, found, [("target", t) for t in wanted])

    return [allow(Route("/api/health", health), READ), allow(Route("/api/devices", devices), READ)]
