"""The rollouts' JSON API: ``GET/POST /api/rollouts``, ``GET /api/rollouts/{id}``,
``POST /api/rollouts/{id}/{pause|resume|abort|rollback}``.

The endpoints use the controller's ``fleet.rollouts.Rollouts`` at ``request.app.state.rollouts`` (set by
``fleet.app.Fleet``). Errors are ``{"error": "..."}``: 400 for a malformed request, 404 for an unknown bundle,
device, tag or rollout, 409 for an action the rollout's status does not allow.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleet.auth import OPERATOR, READ, allow
from fleet.rollout import RolloutError
from fleet.schemas import MAX_IDS, Duration, Rate, Regression, Sha256, Target, Wave, Waves, decode_request, explain


class RolloutRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A rollout to create. Durations are seconds or text like 30s, 5m, 1h; rates are fractions (0.01) or
    text like "1%". Besides what each field says: waves increase and end at 100% (or at the targets'
    device count), a wave asks for no more devices than the targets have, and the wave timeout is longer
    than the soak."""

    bundle: Sha256  # the sha256 of an uploaded bundle
    targets: Annotated[list[Target], Meta(min_length=1, max_length=MAX_IDS)]  # device ids, tag:NAME, all
    # cumulative: counts or percentages, e.g. "1,10%,50%,100%"
    waves: Annotated[list[Wave], Meta(min_length=1, max_length=100)] | Waves | None = None
    soak: Duration | None = None  # default 0 with one wave, 5m with waves
    wave_timeout: Duration | None = None  # default 30m
    max_error_rate: Rate | None = None
    max_p95_ms: Annotated[float, Meta(gt=0)] | None = None
    max_p95_regression: Regression | None = None  # e.g. "20%": p95 at most 20 % above the previous model's
    # a device soaks until it has served this many (and is judged from then)
    min_inferences: Annotated[int, Meta(ge=0, le=1_000_000_000)] = 0
    auto_rollback: bool = True
    # quality gates (fleet/quality.py): PSI against the bundle's reference, golden-input agreement, accuracy from
    # the applications' feedback against the model being replaced (with at least min_labels labels on each side)
    max_drift_psi: Annotated[float, Meta(gt=0, le=1000)] | None = None
    min_canary_agreement: Annotated[float, Meta(gt=0, le=1)] | None = None  # a fraction: 0.95
    max_accuracy_drop: Rate | None = None  # e.g. "5%": 5 points
    min_labels: Annotated[int, Meta(ge=1, le=1_000_000_000)] = 30


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


async def rollouts(request: Request) -> Response:
    """GET lists them, POST creates one (one route, so that a 405 names both methods)."""
    return await (create_rollout(request) if request.method == "POST" else _call(request, "list"))


async def create_rollout(request: Request) -> Response:
    try:
        req = decode_request(await request.body(), RolloutRequest)
    except msgspec.DecodeError as e:
        return _error(400, f"invalid rollout request: {explain(e)}")
    opts = {f: getattr(req, f) for f in req.__struct_fields__ if f not in ("bundle", "targets")}
    response = await _call(request, "create", req.bundle, req.targets, status=201, **opts)
    if response.status_code == 201:
        request.state.audit = {"target": msgspec.json.decode(response.body)["id"], "detail": req.bundle}
    return response


async def get_rollout(request: Request) -> Response:
    return await _call(request, "get", request.path_params["rollout_id"])


async def act_on_rollout(request: Request) -> Response:
    return await _call(request, "act", request.path_params["rollout_id"], request.path_params["action"])


def routes() -> list[Route]:
    return [
        allow(Route("/api/rollouts", rollouts, methods=["GET", "POST"]), GET=READ, POST=OPERATOR),
        allow(Route("/api/rollouts/{rollout_id}", get_rollout, methods=["GET"]), READ),
        allow(Route("/api/rollouts/{rollout_id}/{action}", act_on_rollout, methods=["POST"]), OPERATOR),
    ]
