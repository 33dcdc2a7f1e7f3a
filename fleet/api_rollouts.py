"""The rollouts' JSON API: ``GET/POST /api/rollouts``, ``GET /api/rollouts/{id}``,
``POST /api/rollouts/{id}/{pause|resume|abort|rollback}``.

The endpoints use the controller's ``fleet.rollouts.Rollouts`` at ``request.app.state.rollouts`` (set by
``fleet.app.Fleet``). Errors are ``{"error": "..."}``: 400 for a malformed request, 404 for an unknown bundle,
device, tag or rollout, 409 for an action the rollout's status does not allow.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleet.rollout import ACTIONS, RolloutError


class RolloutRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A rollout to create. Durations are seconds or text like 30s, 5m, 1h; rates are fractions (0.01) or
    text like "1%"."""

    bundle: str  # the sha256 of an uploaded bundle
    targets: list[str]  # device ids, tag:NAME, all
    waves: list[str | int] | str | None = None  # cumulative: counts or percentages, e.g. "1,10%,50%,100%"
    soak: str | float | None = None  # default 0 with one wave, 5m with waves
    wave_timeout: str | float | None = None  # default 30m
    max_error_rate: str | float | None = None
    max_p95_ms: float | None = None
    max_p95_regression: str | float | None = None  # e.g. "20%": p95 at most 20 % above the previous model's
    min_inferences: int = 0  # a device soaks until it has served this many (and is judged from then)
    auto_rollback: bool = True


_decoder = msgspec.json.Decoder(RolloutRequest)


# -- what the API answers (for the OpenAPI document; the e2e tests decode real answers with these) ----------


# The response types are in fleet/schemas.py (Rollout, RolloutSummary), with the rest of the API's.


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _rollouts(request: Request) -> Any:
    return getattr(request.app.state, "rollouts", None)


async def _call(request: Request, fn, *args: Any, status: int = 200, **kw: Any) -> Response:
    rollouts = _rollouts(request)
    if rollouts is None:
        return _error(503, "rollouts are not running in this controller")
    try:
        return JSONResponse(await run_in_threadpool(getattr(rollouts, fn), *args, **kw), status_code=status)
    except RolloutError as e:
        return _error(e.status, str(e))


async def list_rollouts(request: Request) -> Response:
    return await _call(request, "list")


async def create_rollout(request: Request) -> Response:
    try:
        req = _decoder.decode(await request.body())
    except msgspec.DecodeError as e:
        return _error(400, f"invalid rollout request: {e}")
    opts = {f: getattr(req, f) for f in req.__struct_fields__ if f not in ("bundle", "targets")}
    return await _call(request, "create", req.bundle, req.targets, status=201, **opts)


async def get_rollout(request: Request) -> Response:
    return await _call(request, "get", request.path_params["rollout_id"])


async def act_on_rollout(request: Request) -> Response:
    return await _call(request, "act", request.path_params["rollout_id"], request.path_params["action"])


def routes() -> list[Route]:
    return [
        Route("/api/rollouts", list_rollouts, methods=["GET"]),
        Route("/api/rollouts", create_rollout, methods=["POST"]),
        Route("/api/rollouts/{rollout_id}", get_rollout, methods=["GET"]),
        Route("/api/rollouts/{rollout_id}/{action}", act_on_rollout, methods=["POST"]),
    ]
