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


class _S(msgspec.Struct, forbid_unknown_fields=True):
    pass


class RolloutBundle(_S):
    sha256: str
    name: str | None
    version: str | None


class RolloutOptions(_S):
    waves: list[str]
    soak_s: float
    wave_timeout_s: float
    max_error_rate: float | None  # a fraction
    max_p95_ms: float | None
    max_p95_regression: float | None  # a fraction
    min_inferences: int
    auto_rollback: bool


class RolloutDeviceRollback(_S):
    deployment_id: str | None  # null: the device was left as is (``what`` says why)
    sha256: str | None  # the model it was sent back to
    version: str | None  # that model's version
    what: str
    phase: str | None  # its phase in the rollback deployment


class RolloutDevice(_S):
    device_id: str
    phase: str  # waiting (its wave has not started), pending (published, no report yet), or the agent's phase
    reason: str
    online: bool
    since: float | None
    active_since: float | None
    soaked: bool
    inferences: int  # on the new bundle since it became active
    errors: int
    error_rate: float | None  # errors / (inferences + errors)
    p95_ms: float | None  # inference-weighted mean of the windows' p95
    baseline_p95_ms: float | None  # the same on the model being replaced (with --max-p95-regression)
    verdict: str  # the threshold it crossed
    previous: str | None  # sha256 it ran when its wave was published
    note: str
    rollback: RolloutDeviceRollback | None


class RolloutWave(_S):
    wave: int
    status: str  # waiting, rolling, passed, failed, timed_out, stopped
    deployment_id: str
    started: float | None
    deadline: float | None
    finished: float | None
    devices: list[RolloutDevice]


class RolloutView(_S):
    """A rollout, each wave with each device's phase and figures."""
    id: str
    status: str  # running, paused, completed, halted, aborted, rolled_back
    reason: str
    created: float
    finished: float | None
    paused_at: float | None
    bundle: RolloutBundle
    targets: list[str]
    options: RolloutOptions
    current_wave: int  # 1-based
    wave_count: int
    device_count: int
    waves: list[RolloutWave]
    unpublished: list[str]  # devices whose desired model the broker has not taken yet (retried)


class RolloutSummary(_S):
    id: str
    status: str
    reason: str
    created: float
    finished: float | None
    bundle: RolloutBundle
    targets: list[str]
    current_wave: int
    wave_count: int
    device_count: int
    unpublished: list[str]
    phases: dict[str, int]  # how many devices are in each phase


def openapi() -> tuple[dict[str, Any], dict[str, Any]]:
    """(paths, component schemas) of this API, for fleet/openapi.py to merge into its document; errors refer to
    its ``#/components/schemas/Error``."""
    (req, one, many), components = msgspec.json.schema_components(
        [RolloutRequest, RolloutView, list[RolloutSummary]], ref_template="#/components/schemas/{name}")

    def answer(schema: dict, description: str) -> dict:
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    def err(description: str) -> dict:
        return answer({"$ref": "#/components/schemas/Error"}, description)

    rid = {"name": "rollout_id", "in": "path", "required": True, "description": "The rollout's id.",
           "schema": {"type": "string"}}
    action = {"name": "action", "in": "path", "required": True, "schema": {"enum": list(ACTIONS)},
              "description": "pause (no new wave starts), resume, abort (stop; devices stay where they are), "
                             "rollback (send every device the rollout touched back to its previous model)."}
    paths = {
        "/api/rollouts": {
            "get": {"summary": "Every rollout, newest first.", "operationId": "listRollouts",
                    "responses": {"200": answer(many, "The rollouts.")}},
            "post": {"summary": "Start a staged rollout of an uploaded bundle (its first wave is published before "
                                "the answer).", "operationId": "createRollout",
                     "requestBody": {"required": True, "content": {"application/json": {"schema": req}}},
                     "responses": {"201": answer(one, "The rollout."),
                                   "400": err("A malformed request, target, waves or threshold."),
                                   "404": err("An unknown bundle, device or tag."),
                                   "409": err("A target device is in another rollout that is still going.")}}},
        "/api/rollouts/{rollout_id}": {"get": {
            "summary": "One rollout: each wave and each device's phase and figures.", "operationId": "getRollout",
            "parameters": [rid], "responses": {"200": answer(one, "The rollout."), "404": err("No such rollout.")}}},
        "/api/rollouts/{rollout_id}/{action}": {"post": {
            "summary": "Pause, resume, abort or roll back a rollout.", "operationId": "actOnRollout",
            "parameters": [rid, action],
            "responses": {"200": answer(one, "The rollout after the action."), "400": err("An unknown action."),
                          "404": err("No such rollout."),
                          "409": err("The rollout's status does not allow the action.")}}},
    }
    return paths, components


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
