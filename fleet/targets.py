"""Targets: which devices a command means. A target is a device id, ``tag:NAME`` or ``all``.

``resolve(store, ["cam-1", "tag:lobby", "all"])`` -> registered device ids, in the order given (a tag's or
all's devices sorted by id), each once. Malformed targets raise ``TargetError`` (HTTP 400), a device id that
never registered or a tag no device carries raise ``UnknownTarget`` (HTTP 404); ``.status`` holds the code.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from agent import protocol
from agent.errors import EdgefleetError

if TYPE_CHECKING:
    from fleet.store import Store

ALL = "all"
TAG = "tag:"
MAX_TAG = 64
_TAG = re.compile(r"[A-Za-z0-9._-]{1,64}")  # fleet.schemas.TAG


class TargetError(EdgefleetError, ValueError):
    """A malformed target or tag; the message says what a good one looks like."""

    status = 400


class UnknownTarget(TargetError):
    """A well-formed target that names nothing the controller knows."""

    status = 404


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise TargetError(f"invalid tag {tag!r}: use 1-{MAX_TAG} ASCII letters, digits, '-', '_' or '.'")
    return tag


def parse(target: str) -> tuple[str, str | None]:
    """One target -> ("all", None) | ("tag", NAME) | ("device", ID), or TargetError."""
    if not isinstance(target, str):
        raise TargetError(f"invalid target {target!r}: expected a device id, tag:NAME or all")
    if target == ALL:
        return "all", None
    if target.startswith(TAG):
        return "tag", check_tag(target[len(TAG):])
    try:
        return "device", protocol.check_device_id(target)
    except protocol.ProtocolError:
        raise TargetError(f"invalid target {target!r}: expected a device id (1-63 of a-z, 0-9, '-', '_' "
                          f"or '.'), tag:NAME or all") from None


def resolve(store: "Store", targets: list[str]) -> list[str]:
    """The registered device ids that ``targets`` name (see the module doc)."""
    if isinstance(targets, str) or not isinstance(targets, (list, tuple)):
        raise TargetError("targets must be a list of device ids, tag:NAME or all")
    if not targets:
        raise TargetError("no target given: name device ids, tag:NAME or all")
    parsed = [parse(t) for t in targets]  # every target well-formed before any is looked up
    known = set(store.device_ids())
    out: dict[str, None] = {}
    for kind, value in parsed:
        if kind == "all":
            if not known:
                raise UnknownTarget("'all' names no device: none has registered yet")
            ids = sorted(known)
        elif kind == "tag":
            ids = store.device_ids(tag=value)
            if not ids:
                raise UnknownTarget(f"unknown tag {value!r}: no device carries it")
        else:
            if value not in known:
                raise UnknownTarget(f"unknown device {value!r}: it has never reported to this controller")
            ids = [value]
        out.update(dict.fromkeys(ids))
    return list(out)
