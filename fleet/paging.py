"""Pages of the fleet's listings (``/api/health``, ``/api/devices``, the overview's device table): the query's
parameters, the filters, and the opaque cursor, in one place.

A page is a keyset page, not an offset: the cursor names the last entry of the previous page by its position
in the order (the sort column's value and the device id, ties broken by id), so a device that registers or
leaves between two requests shifts nothing, and every device is listed once when a client follows ``next``
to the end. The cursor is base64url of a small JSON array ``[version, sort, descending, null, value, id]``:
opaque to clients (they pass back what they were given), checked on the way in (a cursor of another sort, or
not one at all, is a 400).

Two ways to a page, one cursor: ``keyset(fetch, cursor, limit, sort, descending)`` when the store reads only the
page (``Store.device_page``: the filters in SQL, ``WHERE (value, id) > (?, ?) ORDER BY value, id LIMIT ?``,
for the sorts on the devices table's own columns), and ``page(rows, cursor, limit, filters, sort, descending)``,
which filters, orders and slices rows in Python (the registry's rows, health entries, or bare ids: for sorts on
derived figures). A row that lacks a field (a bare id has no ``tags``) is taken as already filtered on it by
its source.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlencode

from agent.errors import EdgefleetError
from fleet import targets
from fleet.health import SORTS, STATUSES, check_sort

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_CURSOR = 1024  # characters: a cursor is an id and one value, far below
MAX_NAME = 128  # model names and versions a filter may name (longer ones name nothing)
_CURSOR_VERSION = 1
_PREFIX = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # the start of a device id (agent.protocol.DEVICE_ID_RE)
FILTERS = ("status", "tag", "model", "version", "prefix")
PARAMS = ("limit", "cursor", *FILTERS)  # what every listing takes; /api/health adds sort and order


class PageError(EdgefleetError):
    """A bad listing parameter: the message names it and says what a good one is."""

    status = 400


@dataclass(frozen=True)
class Filters:
    """What a listing keeps: every given field must match (exact, but ``prefix`` of the device id)."""
    status: str | None = None  # online | offline
    tag: str | None = None
    model: str | None = None  # the active model's name ("" : devices without an active model)
    version: str | None = None  # the active model's version
    prefix: str | None = None  # of the device id

    @property
    def on_registry(self) -> bool:
        """Whether a filter needs more of a device than its id and tags (its status or active model)."""
        return self.status is not None or self.model is not None or self.version is not None

    def query(self) -> list[tuple[str, str]]:
        """The filters as query parameters (for the next page's link)."""
        return [(k, v) for k in FILTERS if (v := getattr(self, k)) is not None]

    def match(self, row: Mapping[str, Any]) -> bool:
        if self.prefix is not None and not row_id(row).startswith(self.prefix):
            return False
        if self.tag is not None and "tags" in row and self.tag not in row["tags"]:
            return False
        if self.status is not None and "online" in row and row["online"] != (self.status == "online"):
            return False
        if self.model is not None or self.version is not None:
            name, version = active(row)
            if self.model is not None and (name or "") != self.model:
                return False
            if self.version is not None and (version or "") != self.version:
                return False
        return True


@dataclass(frozen=True)
class Cursor:
    """The last entry of a page: its sort column's value (``null``: it had none) and its id."""
    sort: str
    descending: bool
    null: bool
    value: Any
    device_id: str

    def encode(self) -> str:
        raw = json.dumps([_CURSOR_VERSION, self.sort, self.descending, self.null, self.value, self.device_id],
                         separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    @classmethod
    def decode(cls, text: str) -> "Cursor":
        bad = PageError("invalid cursor: pass back the `next` of the previous page, unchanged")
        if len(text) > MAX_CURSOR or not re.fullmatch(r"[A-Za-z0-9_-]+", text):
            raise bad
        try:
            doc = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        except (binascii.Error, ValueError):
            raise bad from None
        if not (isinstance(doc, list) and len(doc) == 6 and doc[0] == _CURSOR_VERSION and doc[1] in SORTS
                and isinstance(doc[2], bool) and isinstance(doc[3], bool) and isinstance(doc[5], str)
                and (doc[4] is None or isinstance(doc[4], (str, int, float, bool)))):
            raise bad
        return cls(doc[1], doc[2], doc[3], doc[4], doc[5])


@dataclass(frozen=True)
class Query:
    """A listing's parsed parameters."""
    filters: Filters
    limit: int
    cursor: Cursor | None
    sort: str = "device"
    descending: bool | None = None  # None: the column's natural order


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next: str | None  # the cursor of the next page; None: this is the last
    prev: str | None = None  # the cursor of the previous page; "": the first page (no cursor); None: this is it


def row_id(row: Mapping[str, Any] | str) -> str:
    """A row's device id: a health entry's ``device_id``, a registry row's ``id``, or a bare id."""
    if isinstance(row, str):
        return row
    return row["device_id"] if "device_id" in row else row["id"]


def active(row: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """A row's active model (name, version): from a health entry's ``model`` or a registry row's columns."""
    if "model" in row:
        m = row["model"] or {}
        return m.get("name"), m.get("version")
    return row.get("active_name"), row.get("active_version")


def parse(params: Mapping[str, str], allowed: Iterable[str] = PARAMS, sortable: bool = False) -> Query:
    """A listing's query parameters -> Query, or a PageError (TargetError for a malformed tag) naming the first
    bad one. ``params``: the request's (one value a name; the first wins); ``sortable``: sort and order too."""
    allowed = set(allowed) | ({"sort", "order"} if sortable else set())
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise PageError(f"unknown query parameter {unknown[0]!r}: this endpoint takes {', '.join(sorted(allowed))}")
    limit = DEFAULT_LIMIT
    if (text := params.get("limit")) is not None:
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
            raise PageError(f"limit={text!r} is out of range: a whole number from 1 to {MAX_LIMIT}")
        limit = int(text)
    status = params.get("status")
    if status is not None and status not in STATUSES:
        raise PageError(f"invalid status {status!r}: choose {' or '.join(STATUSES)}")
    tag = params.get("tag")
    if tag is not None:
        targets.check_tag(tag)
    for name in ("model", "version"):
        if len(params.get(name) or "") > MAX_NAME:
            raise PageError(f"{name} is too long: at most {MAX_NAME} characters")
    prefix = params.get("prefix")
    if prefix is not None and not _PREFIX.fullmatch(prefix):
        raise PageError(f"invalid prefix {prefix!r}: the start of a device id (lowercase letters, digits, '.', "
                        f"'_' or '-', at most 63)")
    sort, descending = "device", None
    if sortable:
        if params.get("sort") is not None:
            try:
                sort = check_sort(params["sort"])
            except EdgefleetError as e:
                raise PageError(str(e)) from None
        order = params.get("order")
        if order not in (None, "asc", "desc"):
            raise PageError(f"invalid order {order!r}: choose asc or desc")
        descending = None if order is None else order == "desc"
    cursor = None
    if (text := params.get("cursor")) is not None:
        cursor = Cursor.decode(text)
        desc = SORTS[sort][1] if descending is None else descending
        if (cursor.sort, cursor.descending) != (sort, desc):
            raise PageError(f"invalid cursor: it continues a listing sorted by {cursor.sort} "
                            f"{'desc' if cursor.descending else 'asc'}, not by {sort} {'desc' if desc else 'asc'}")
    return Query(Filters(status, tag, params.get("model"), params.get("version"), prefix), limit, cursor, sort,
                 descending)


def _value(sort: str) -> Callable[[Any], Any]:
    """How to read the sort column from a row: the id for ``device`` (any row), else health.SORTS' reader."""
    return row_id if sort == "device" else SORTS[sort][0]


def page(rows: Iterable[Any], cursor: Cursor | None, limit: int, filters: Filters, sort: str = "device",
         descending: bool | None = None) -> Page:
    """The ``limit`` rows after ``cursor`` among those ``filters`` keep, in ``sort`` order (nulls last, ties by
    id), and the cursors of the next and previous pages. ``rows``: health entries, registry rows or bare ids
    (sort ``device`` only); in any order."""
    value = _value(sort)
    desc = SORTS[sort][1] if descending is None else descending
    kept = sorted((r for r in rows if filters.match({"id": r} if isinstance(r, str) else r)), key=row_id)
    known = [r for r in kept if value(r) is not None]
    ordered = sorted(known, key=value, reverse=desc) + [r for r in kept if value(r) is None]
    start = 0
    if cursor is not None:
        try:
            start = next((i for i, r in enumerate(ordered) if _after(value(r), row_id(r), cursor)), len(ordered))
        except TypeError:  # a value of another type than the column's: not a cursor this listing gave
            raise PageError("invalid cursor: pass back the `next` of the previous page, unchanged") from None
    items = ordered[start:start + limit]

    def after(i: int) -> str:  # the cursor of the page that starts at ordered[i + 1]
        v = value(ordered[i])
        return Cursor(sort, desc, v is None, v, row_id(ordered[i])).encode()

    nxt = after(start + limit - 1) if start + limit < len(ordered) else None
    prev = None if start == 0 else "" if start <= limit else after(start - limit - 1)
    return Page(items, nxt, prev)


# what a registry row (``SELECT * FROM devices``) holds of the sorts a store pages in SQL
# (``fleet.store.pages.SQL_SORTS``): the same values as the health entries' (``fleet.health.SORTS``)
_REGISTRY: dict[str, Callable[[Any], Any]] = {
    "device": lambda r: r["id"],
    "model": lambda r: r["active_name"],
    "version": lambda r: None if r["active_name"] is None else r["active_version"],
    "inferences": lambda r: r["inferences"],
    "errors": lambda r: r["errors"],
    "disk": lambda r: r["disk_free_bytes"],
}
_TEXT_SORTS = ("device", "model", "version")


def keyset(fetch: Callable[[tuple | None, int, bool], list[Any]], cursor: Cursor | None, limit: int,
           sort: str = "device", descending: bool | None = None) -> Page:
    """A page read by the store itself: ``fetch(after, n, backwards)`` returns at most ``n`` registry rows in
    the listing's order after the keyset ``after`` = (null, value, id) (None: from the start), or with
    ``backwards`` those not after it, nearest first. The same page, cursors and all, as ``page`` gives over
    every row; ``sort``: a column of the registry (``_REGISTRY``) or a figure the store derives and returns
    as the rows' ``sort_value``."""
    # a derived figure: the store adds its value (status: 0 or 1 there, a boolean in the entries)
    value = _REGISTRY.get(sort) or ((lambda r: bool(r["sort_value"])) if sort == "status" else
                                    (lambda r: r["sort_value"]))
    desc = SORTS[sort][1] if descending is None else descending
    after = None
    if cursor is not None:
        ok = cursor.value is None if cursor.null else (
            isinstance(cursor.value, str) if sort in _TEXT_SORTS else isinstance(cursor.value, bool)
            if sort == "status" else isinstance(cursor.value, (int, float)) and not isinstance(cursor.value, bool))
        if not ok:  # a value of another type than the column's: not a cursor this listing gave
            raise PageError("invalid cursor: pass back the `next` of the previous page, unchanged")
        after = (cursor.null, cursor.value, cursor.device_id)

    def at(r: Any) -> str:
        v = value(r)
        return Cursor(sort, desc, v is None, v, r["id"]).encode()

    rows = fetch(after, limit + 1, False)
    items = rows[:limit]
    nxt = at(items[-1]) if len(rows) > limit else None
    prev = None
    if after is not None:
        back = fetch(after, limit + 1, True)
        prev = "" if len(back) <= limit else at(back[limit])
    return Page(items, nxt, prev)


def _after(v: Any, device_id: str, c: Cursor) -> bool:
    """Whether a row (its sort value and id) comes after the cursor's: known values before nulls, values in
    the listing's order, then ids ascending."""
    if (v is None) != c.null:
        return v is None
    if v is not None and v != c.value:
        return v < c.value if c.descending else v > c.value
    return device_id > c.device_id


def link(path: str, query: Query, cursor: str, extra: list[tuple[str, str]] = ()) -> str:
    """The next page's ``Link`` header (RFC 8288): the same path, filters and limit, the new cursor."""
    params = [*extra, *query.filters.query(), ("limit", str(query.limit)), ("cursor", cursor)]
    return f'<{path}?{urlencode(params)}>; rel="next"'
