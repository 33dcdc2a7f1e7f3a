"""The fleet's listings, a page at a time (``fleet.paging``): ``GET /api/health`` and ``GET /api/devices``.

Both answer ``{"devices": [...], "next": CURSOR | null, "limit": N}`` and, when there is a next page, a
``Link: <...>; rel="next"`` header; ``?limit=`` (default 100, at most 1000), ``?cursor=`` (the previous
page's ``next``), filters ``status``, ``tag``, ``model``, ``version``, ``prefix`` (of the device id); health
also ``sort`` and ``order``. A bad parameter is a 400 naming it, an unknown tag a 404.

How a page is read: the store reads the page itself, filters and keyset in SQL (``Store.device_page``), for a
sort on a column of the devices table or on a figure the database derives per device (recent rates, the latest
window's latency and resources, the clock, the status: ``fleet.store.pages.PAGED_SORTS``), then the health
entries of just those devices in a few batched queries (``fleet.health.entries_for``). For a sort on silence or
model quality the filters are SQL and the order Python's, over the kept devices' entries.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleet import paging, targets
from fleet.auth import READ, allow
from fleet.health import SORTS, entries_for
from fleet.store.pages import PAGED_SORTS

if TYPE_CHECKING:
    from fleet.store import Store


MAX_IDS = 10_000  # a target's devices read by the store with IN (...) up to this many


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


def health_page(store: "Store", q: paging.Query, now: float | None = None, check_tag: bool = True) -> paging.Page:
    """A page of health entries (``fleet.health.entry``). ``check_tag``: an unknown tag is an error (the API's
    404), else an empty page (the overview's)."""
    now = time.time() if now is None else now
    if check_tag:
        _known_tag(store, q)
    if q.sort not in PAGED_SORTS:  # silence, quality: the order needs the kept devices' entries
        entries = entries_for(store, store.device_rows_where(now, q.filters), now)
        return paging.page(entries, q.cursor, q.limit, q.filters, q.sort, q.descending)
    desc = SORTS[q.sort][1] if q.descending is None else q.descending
    found = paging.keyset(lambda after, n, back: store.device_page(now, q.filters, q.sort, desc, after, n, back),
                          q.cursor, q.limit, q.sort, q.descending)
    return paging.Page(entries_for(store, found.items, now), found.next, found.prev)


def devices_page(store: "Store", q: paging.Query, ids: list[str] | None = None) -> paging.Page:
    """A page of registry rows (``Store.devices``), of all devices or of ``ids``."""
    _known_tag(store, q)
    if ids is not None and len(ids) > MAX_IDS:  # too long a list for IN (...): filtered in Python
        return paging.page(store.devices(ids), q.cursor, q.limit, q.filters)
    now = time.time()
    found = paging.keyset(lambda after, n, back: store.device_page(now, q.filters, "device", False, after, n, back,
                                                                   ids), q.cursor, q.limit)
    rows = found.items
    return paging.Page(store.device_dicts(rows, store.tags_of([r["id"] for r in rows]), now), found.next, found.prev)


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
