"""The OpenAPI 3.1 document of the controller's HTTP API, served at ``/api/openapi.json``.

Bodies are msgspec Structs (``fleet.schemas``, and the request Structs the API decodes with); their JSON
Schemas come from msgspec. The document lists the operations the running app has (an operation described
here whose route is not mounted is left out); ``tests/test_web.py`` checks that every route is described,
that each described GET answers, and that the real answers decode into the described Structs.

Each operation's security, and its 401/403 answers, come from the role its route declares
(``fleet.auth.allow``): a bearer token, or for ``/bundles/{sha}`` a device's client certificate too.
Parameters and bodies declare the patterns, lengths, enums and bounds the server enforces (the request
Structs' constrained types are ``fleet.schemas``'); ``tests/test_api_fuzz.py`` runs schemathesis over it.
"""

from __future__ import annotations

import importlib
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleet import paging
from fleet import schemas as s
from fleet.auth import DEVICE, MEDIA, PUBLIC, access
from fleet.health import SORTS, STATUSES
from fleet.series import MAX_SINCE_S, Series

OPENAPI_PATH = "/api/openapi.json"
TAR = {"application/x-tar": {"schema": {"type": "string", "contentMediaType": "application/x-tar"}}}
UPLOAD = {m: {"schema": {"type": "string", "contentMediaType": m}} for m in MEDIA["bundle"]}
SECURITY = {
    "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "eft_ and 43 URL-safe characters",
               "description": "An API token (`edgefleet fleet token create --role read|operator|admin`). Roles: "
                              "read (GETs), operator (writes), admin (tokens, audit)."},
    "deviceCertificate": {"type": "mutualTLS", "description": "An enrolled device's TLS client certificate."},
}


def _request_struct(module: str, name: str) -> type | None:
    """A request Struct of the API's own modules (None where that part of the API is not there)."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _param(name: str, where: str, description: str, schema: dict | None = None, required: bool | None = None,
           explode: bool | None = None) -> dict:
    p = {"name": name, "in": where, "required": where == "path" if required is None else required,
         "description": description, "schema": schema or {"type": "string"}}
    if explode is not None:
        p["explode"] = explode
    return p


def operations() -> tuple[dict[str, dict[str, dict]], dict[str, Any]]:
    """Every operation this module describes: ({path: {method: operation}}, component schemas)."""
    requests = {"DeployRequest": _request_struct("fleet.api", "DeployRequest"),
                "TagsPut": _request_struct("fleet.api", "TagsPut"),
                "TagsPost": _request_struct("fleet.api", "TagsPost"),
                "RolloutRequest": _request_struct("fleet.api_rollouts", "RolloutRequest"),
                "TokenRequest": _request_struct("fleet.api_admin", "TokenRequest"),
                "KeyRequest": _request_struct("fleet.api_keys", "KeyRequest"),
                "EnrollRequest": _request_struct("fleet.api_enroll", "EnrollRequest"),
                "RenewRequest": _request_struct("fleet.api_enroll", "RenewRequest"),
                "EnrollmentCreate": _request_struct("fleet.api_enroll", "EnrollmentCreate"),
                "ProvisioningCreate": _request_struct("fleet.api_enroll", "ProvisioningCreate")}
    bodies = {"Error": s.Error, "Status": s.Status, "BundleUploaded": s.BundleUploaded, "Deployment": s.Deployment,
              "DevicePage": s.DevicePage, "DeviceTags": s.DeviceTags, "HealthPage": s.HealthPage,
              "DeviceDetail": s.DeviceDetail, "Series": Series, "Rollout": s.Rollout,
              "DeploymentCreated": s.DeploymentCreated, "RolloutCreated": s.RolloutCreated,
              "Rollouts": list[s.RolloutSummary], "Tokens": list[s.Token], "Token": s.Token,
              "TokenCreated": s.TokenCreated, "AuditPage": s.AuditPage, "EnrollmentToken": s.EnrollmentToken,
              "Enrollments": list[s.EnrollmentRow], "Enrolled": s.Enrolled, "Revoked": s.Revoked,
              "EnrollmentRevoked": s.EnrollmentRevoked, "Certificates": list[s.Certificate],
              "Bundles": list[s.BundleRow], "ReleaseKeys": list[s.ReleaseKey],
              "ReleaseKeyChanged": s.ReleaseKeyChanged, "DeviceQuality": s.DeviceQuality,
              "QualitySeries": s.QualitySeries, "QualityPage": s.QualityPage,
              **{k: v for k, v in requests.items() if v is not None}}
    refs, components = msgspec.json.schema_components(list(bodies.values()),
                                                      ref_template="#/components/schemas/{name}")
    ref = dict(zip(bodies, refs))
    if "TagsPost" in components:  # what msgspec cannot say: at least one of add and remove names a tag
        components["TagsPost"]["anyOf"] = [{"required": [k], "properties": {k: {"minItems": 1}}}
                                           for k in ("add", "remove")]

    def json_body(name: str, description: str) -> dict:
        return {"description": description, "content": {"application/json": {"schema": ref[name]}}}

    def err(description: str) -> dict:
        return json_body("Error", description)

    def page_body(name: str, description: str) -> dict:
        return {**json_body(name, description), "headers": {"Link": {
            "description": "`<URL>; rel=\"next\"`: the next page (the same filters, the new cursor); absent on the "
                           "last page.", "schema": {"type": "string"}}}}

    # the listings' parameters (fleet.paging)
    listing = [
        _param("limit", "query", f"How many devices a page (default {paging.DEFAULT_LIMIT}).",
               {"type": "integer", "minimum": 1, "maximum": paging.MAX_LIMIT}),
        _param("cursor", "query", "Where the page starts: the previous page's `next`, unchanged (opaque).",
               {"type": "string", "pattern": "^[A-Za-z0-9_-]+$", "maxLength": paging.MAX_CURSOR}),
        _param("status", "query", "Only devices online or offline.", {"type": "string", "enum": list(STATUSES)}),
        _param("tag", "query", "Only devices with this tag.", {"type": "string", "pattern": s.TAG}),
        _param("model", "query", "Only devices whose active model has this name (empty: no active model).",
               {"type": "string", "maxLength": paging.MAX_NAME}),
        _param("version", "query", "Only devices whose active model has this version.",
               {"type": "string", "maxLength": paging.MAX_NAME}),
        _param("prefix", "query", "Only devices whose id starts with this.",
               {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,62}$"}),
    ]

    def request(name: str) -> dict:
        return {"required": True, "content": {"application/json": {"schema": ref[name]}}} if name in ref else {}

    device = _param("device_id", "path", "The device's id.", {"type": "string", "pattern": s.DEVICE_ID})
    rollout = _param("rollout_id", "path", "The rollout's id.", {"type": "string", "pattern": s.ROLLOUT_ID})
    quality_window = [
        _param("since", "query", "Unix time (s) the window starts at, included (default: an hour before until).",
               {"type": "number", "minimum": 0}),
        _param("until", "query", "Unix time (s) the window ends at, excluded (default: now).",
               {"type": "number", "minimum": 0})]
    paths: dict[str, dict[str, dict]] = {
        "/api/status": {"get": {
            "summary": "The controller's status: broker, MQTT link and message counts.", "operationId": "status",
            "responses": {"200": json_body("Status", "The status.")}}},
        "/api/bundles": {
            "post": {
                "summary": "Upload a bundle (a tar written by `edgefleet convert`, signed by a release key the fleet "
                           "lists).", "operationId": "uploadBundle",
                "requestBody": {"required": True, "content": UPLOAD},
                "responses": {"200": json_body("BundleUploaded", "Stored (or already stored): its sha256, manifest "
                                                                 "and the key that signed it."),
                              "400": err("Not a valid bundle (a tar with a manifest the agent can read, every file "
                                         "matching it), or not signed by a release key the fleet lists (unsigned, "
                                         "an unknown or removed key, a signature that does not verify), unless "
                                         "the controller runs with --allow-unsigned.")}},
            "get": {"summary": "The uploaded bundles, newest first, with who signed each and its serial.",
                    "operationId": "listBundles",
                    "responses": {"200": json_body("Bundles", "The bundles.")}}},
        "/api/keys": {
            "get": {"summary": "The release keys the fleet accepts bundles from (and those removed).",
                    "operationId": "listKeys", "responses": {"200": json_body("ReleaseKeys", "Oldest first.")}},
            "post": {"summary": "List a release public key; with a signed `add` statement (`edgefleet keys rotate`) "
                                "devices are told to trust it too.", "operationId": "addKey",
                     "requestBody": request("KeyRequest"),
                     "responses": {"201": json_body("ReleaseKeyChanged", "The key, and how many devices got their "
                                                                         "desired model again."),
                                   "400": err("Not an ed25519 public key, a bad name, or a statement that is not "
                                              "for this key or does not verify with a listed key."),
                                   "409": err("The key is listed already, or was removed.")}}},
        "/api/keys/{keyid}": {"delete": {
            "summary": "Remove a release key: its bundles are refused, and devices get the controller's signed "
                       "removal with their next desired.", "operationId": "removeKey",
            "parameters": [_param("keyid", "path", "The key's id (16 hex digits).",
                                  {"type": "string", "pattern": "^[0-9a-f]{16}$"})],
            "responses": {"200": json_body("ReleaseKeyChanged", "The key, removed."),
                          "404": err("No such key."), "409": err("The key was removed already.")}}},
        "/bundles/{sha256}": {"get": {
            "summary": "Download a bundle (devices do, resuming with HTTP Range).", "operationId": "getBundle",
            "parameters": [_param("sha256", "path", "The bundle's sha256 (64 hex digits).",
                                  {"type": "string", "pattern": s.SHA256})],
            "responses": {"200": {"description": "The bundle.", "content": TAR},
                          "206": {"description": "The range asked for.", "content": TAR},
                          "404": err("No such bundle.")}}},
        "/api/deployments": {"post": {
            "summary": "Deploy an uploaded bundle to devices at once (publishes their desired model).",
            "operationId": "deploy", "requestBody": request("DeployRequest"),
            "responses": {"200": json_body("DeploymentCreated", "The deployment, each device pending, and "
                                                                 "warnings (a device that last reported too little "
                                                                 "free disk for the bundle): it is made anyway."),
                          "400": err("A malformed request or device id."),
                          "404": err("The bundle was not uploaded."),
                          "503": err("The broker did not take the desired model for some devices.")}}},
        "/api/deployments/{deployment_id}": {"get": {
            "summary": "A deployment and each device's phase.", "operationId": "getDeployment",
            "parameters": [_param("deployment_id", "path", "The deployment's id.",
                                  {"type": "string", "pattern": s.DEPLOYMENT_ID})],
            "responses": {"200": json_body("Deployment", "The deployment."), "404": err("No such deployment.")}}},
        "/api/devices": {"get": {
            "summary": "The registered devices, by id, a page at a time (follow `next`, or the `Link` header).",
            "operationId": "listDevices",
            "parameters": [_param("target", "query", "Only these: a device id, `tag:NAME` or `all`; repeatable.",
                                  {"type": "array", "items": {"type": "string", "pattern": s.TARGET}},
                                  explode=True), *listing],
            "responses": {"200": page_body("DevicePage", "A page of devices, by id."),
                          "400": err("A malformed target, filter, limit or cursor, or an unknown query parameter."),
                          "404": err("A target or the tag names no known device or tag.")}}},
        "/api/devices/{device_id}/tags": {
            "put": {"summary": "Replace a device's tags.", "operationId": "putDeviceTags", "parameters": [device],
                    "requestBody": request("TagsPut"),
                    "responses": {"200": json_body("DeviceTags", "The device's tags now."),
                                  "400": err("A malformed request or tag."), "404": err("No such device.")}},
            "post": {"summary": "Add and/or remove some of a device's tags.", "operationId": "changeDeviceTags",
                     "parameters": [device], "requestBody": request("TagsPost"),
                     "responses": {"200": json_body("DeviceTags", "The device's tags now."),
                                   "400": err("A malformed request or tag, or nothing to change."),
                                   "404": err("No such device.")}}},
        "/api/health": {"get": {
            "summary": "The devices' health, sortable and filterable, a page at a time (follow `next`, or the `Link` "
                       "header, to the end: each device once).", "operationId": "listHealth",
            "parameters": [
                *listing,
                _param("sort", "query", "Sort by a column (each has its natural order; nulls last, ties by id). "
                                        "Any column but `device` reads every device's health for each page.",
                       {"type": "string", "enum": list(SORTS)}),
                _param("order", "query", "asc or desc (each column has its natural default).",
                       {"type": "string", "enum": ["asc", "desc"]})],
            "responses": {"200": page_body("HealthPage", "A page of health entries."),
                          "400": err("An unknown sort column, a malformed filter, limit, order or cursor (or one of "
                                     "another sort), or an unknown query parameter."),
                          "404": err("No device carries the tag.")}}},
        "/api/health/{device_id}": {"get": {
            "summary": "One device's report: health, identity, errors, events, deployments, transitions.",
            "operationId": "getDeviceHealth",
            "parameters": [device,
                           _param("events", "query", "How many recent events (default 20).",
                                  {"type": "integer", "minimum": 1, "maximum": 1000}),
                           _param("transitions", "query", "How many online/offline transitions (default 50).",
                                  {"type": "integer", "minimum": 1, "maximum": 1000})],
            "responses": {"200": json_body("DeviceDetail", "The device's report."),
                          "400": err("A limit out of range or an unknown query parameter."),
                          "404": err("No such device.")}}},
        "/api/devices/{device_id}/series": {"get": {
            "summary": "One device's telemetry over time, column by column (the dashboard's charts), from raw "
                       "windows and rollups alike.", "operationId": "getDeviceSeries",
            "parameters": [
                device,
                _param("since", "query", "How far back, in seconds (default 3600).",
                       {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SINCE_S}),
                _param("step", "query", "Bucket width in seconds (default: one point per stored window or rollup, "
                                        "bucketed when there would be more than 1500).",
                       {"type": "number", "minimum": 1})],
            "responses": {"200": json_body("Series", "The series."),
                          "400": err("since or step out of range (step is at most since), or an unknown query "
                                     "parameter."),
                          "404": err("No such device.")}}},
        "/api/devices/{device_id}/quality": {"get": {
            "summary": "One device's model quality on one bundle over [since, until): drift against the bundle's "
                       "reference and against the other devices on it (PSI, Jensen-Shannon, bands), canary "
                       "agreement, feedback accuracy, per-class and macro precision / recall / F1 with Wilson "
                       "intervals, the confusion matrix.", "operationId": "getDeviceQuality",
            "parameters": [device, *quality_window,
                           _param("sha256", "query", "The bundle (default: the device's active one when it reported "
                                                     "on it in the window, else its latest window's).",
                                  {"type": "string", "pattern": s.SHA256})],
            "responses": {"200": json_body("DeviceQuality", "The device's quality (sha256 null: none in the "
                                                            "window)."),
                          "400": err("since, until or sha256 malformed or out of range (since must be before "
                                     "until, at most 400 days apart), or an unknown query parameter."),
                          "404": err("No such device.")}}},
        "/api/devices/{device_id}/quality/series": {"get": {
            "summary": "One device's model quality per window (or per step bucket), for charts: PSI vs the "
                       "reference, canary agreement, accuracy.", "operationId": "getDeviceQualitySeries",
            "parameters": [device, *quality_window,
                           _param("sha256", "query", "The bundle (default as for the device's quality).",
                                  {"type": "string", "pattern": s.SHA256}),
                           _param("step", "query", "Bucket width in seconds (default: one point per window, "
                                                   "bucketed when there would be more than 1500).",
                                  {"type": "number", "minimum": 1})],
            "responses": {"200": json_body("QualitySeries", "The points, oldest first."),
                          "400": err("since, until, sha256 or step malformed or out of range, or an unknown query "
                                     "parameter."),
                          "404": err("No such device.")}}},
        "/api/quality": {"get": {
            "summary": "The fleet's model quality over [since, until): one row a device that sent quality (on its "
                       "latest window's bundle), worst first, a page at a time; and the quality messages refused "
                       "by reason.", "operationId": "listQuality",
            "parameters": [*quality_window,
                           _param("limit", "query", "How many devices (default 100).",
                                  {"type": "integer", "minimum": 1, "maximum": 1000}),
                           _param("offset", "query", "Skip this many (the previous page's `next`).",
                                  {"type": "integer", "minimum": 0, "maximum": 10**9})],
            "responses": {"200": json_body("QualityPage", "A page of devices, worst first."),
                          "400": err("since, until, limit or offset malformed or out of range, or an unknown query "
                                     "parameter.")}}},
        "/api/rollouts": {
            "get": {"summary": "Every rollout, newest first.", "operationId": "listRollouts",
                    "responses": {"200": json_body("Rollouts", "The rollouts."),
                                  "503": err("Rollouts are not running in this controller.")}},
            "post": {"summary": "Start a rollout: a bundle to targets in cumulative waves, gated on health.",
                     "operationId": "createRollout", "requestBody": request("RolloutRequest"),
                     "responses": {"201": json_body("RolloutCreated", "The rollout, its first wave published, "
                                                                      "and warnings (a target that last reported "
                                                                      "too little free disk for the bundle)."),
                                   "400": err("A malformed request, target, wave, duration or threshold; or "
                                              "waves that do not increase, do not end at 100%, or ask for "
                                              "more devices than the targets have; or a wave timeout not "
                                              "longer than the soak."),
                                   "404": err("An unknown bundle, device or tag."),
                                   "409": err("A device is already in a live rollout."),
                                   "503": err("Rollouts are not running in this controller.")}}},
        "/api/rollouts/{rollout_id}": {"get": {
            "summary": "A rollout: each wave and each device's phase.", "operationId": "getRollout",
            "parameters": [rollout],
            "responses": {"200": json_body("Rollout", "The rollout."), "404": err("No such rollout."),
                          "503": err("Rollouts are not running in this controller.")}}},
        "/api/rollouts/{rollout_id}/{action}": {"post": {
            "summary": "Pause, resume, abort or roll back a rollout.", "operationId": "actOnRollout",
            "parameters": [rollout, _param("action", "path", "What to do.",
                                           {"type": "string", "enum": ["pause", "resume", "abort", "rollback"]})],
            "responses": {"200": json_body("Rollout", "The rollout after the action."),
                          "400": err("An unknown action."), "404": err("No such rollout."),
                          "409": err("The rollout's status does not allow that action."),
                          "503": err("Rollouts are not running in this controller.")}}},
        "/api/tokens": {
            "get": {"summary": "Every API token, active and revoked (never their secrets).", "operationId": "listTokens",
                    "responses": {"200": json_body("Tokens", "The tokens, oldest first.")}},
            "post": {"summary": "Create a token; its secret is in this answer only.", "operationId": "createToken",
                     "requestBody": request("TokenRequest"),
                     "responses": {"201": json_body("TokenCreated", "The token, with its secret."),
                                   "400": err("A malformed request, role or name."),
                                   "409": err("An active token has that name.")}}},
        "/api/tokens/{name}": {"delete": {
            "summary": "Revoke a token: it stops working at once, and so do the dashboard sessions it opened.",
            "operationId": "revokeToken",
            "parameters": [_param("name", "path", "The token's name.", {"type": "string", "pattern": s.TOKEN_NAME})],
            "responses": {"200": json_body("Token", "The token, revoked."), "404": err("No active token has that name.")}}},
        "/api/audit": {"get": {
            "summary": "The audit trail: every write, sign-in, token creation and revocation, newest first.",
            "operationId": "audit",
            "parameters": [_param("limit", "query", "How many entries (default 100).",
                                  {"type": "integer", "minimum": 1, "maximum": 1000}),
                           _param("before", "query", "Entries older than this id (the previous page's `next`).",
                                  {"type": "integer", "minimum": 1, "maximum": 2**62})],
            "responses": {"200": json_body("AuditPage", "A page of entries."),
                          "400": err("A limit or before out of range, or an unknown query parameter.")}}},
        "/enroll/ca.pem": {"get": {
            "summary": "The fleet CA (public: a device checks its sha256 against the fingerprint it was given).",
            "operationId": "getCa",
            "responses": {"200": {"description": "The CA certificate.",
                                  "content": {"application/x-pem-file": {"schema": {"type": "string"}}}}}}},
        "/enroll": {"post": {
            "summary": "Enroll a device: a CSR for the key it made, with an enrollment token.",
            "operationId": "enroll", "requestBody": request("EnrollRequest"),
            "responses": {"200": json_body("Enrolled", "Its certificate (CN = device id), the CA, the broker."),
                          "400": err("A malformed request, CSR or device id."),
                          "401": err("An unknown, expired, revoked or used-up token."),
                          "403": err("The token does not allow this device id, or the id was revoked."),
                          "409": err("The id is already enrolled by another device.")}}},
        "/enroll/renew": {"post": {
            "summary": "Renew a device's certificate; the device proves who it is with its current one (mutual "
                       "TLS).", "operationId": "renew", "requestBody": request("RenewRequest"),
            "responses": {"200": json_body("Enrolled", "The new certificate."),
                          "400": err("A malformed request or CSR."),
                          "401": err("No valid, unrevoked client certificate from this fleet.")}}},
        "/api/enrollments": {
            "post": {"summary": "Make a one-time enrollment token for one device id.",
                     "operationId": "createEnrollment", "requestBody": request("EnrollmentCreate"),
                     "responses": {"201": json_body("EnrollmentToken", "The token (shown once)."),
                                   "400": err("A malformed request.")}},
            "get": {"summary": "The enrollment tokens (never their secrets).", "operationId": "listEnrollments",
                    "responses": {"200": json_body("Enrollments", "Newest first.")}}},
        "/api/provisioning": {"post": {
            "summary": "Make a provisioning token: devices flashed from one image enroll with it at first boot.",
            "operationId": "createProvisioning", "requestBody": request("ProvisioningCreate"),
            "responses": {"201": json_body("EnrollmentToken", "The token (shown once)."),
                          "400": err("A malformed request.")}}},
        "/api/enrollments/{token_id}/revoke": {"post": {
            "summary": "Revoke an enrollment token.", "operationId": "revokeEnrollment",
            "parameters": [_param("token_id", "path", "The token's id.")],
            "responses": {"200": json_body("EnrollmentRevoked", "Revoked."),
                          "404": err("No open token with this id.")}}},
        "/api/devices/{device_id}/revoke": {"post": {
            "summary": "Revoke a device's identity: CRL, ACL deny, its connection dropped.",
            "operationId": "revokeDevice", "parameters": [device],
            "responses": {"200": json_body("Revoked", "The certificates revoked."),
                          "400": err("A malformed device id."),
                          "404": err("The device has no certificate from this fleet.")}}},
        "/api/certificates": {"get": {
            "summary": "The device certificates the fleet CA issued, newest first.",
            "operationId": "listCertificates",
            "parameters": [_param("device", "query", "Only this device's.")],
            "responses": {"200": json_body("Certificates", "The certificates.")}}},
        "/metrics": {"get": {
            "summary": "The fleet in Prometheus' text exposition format 0.0.4.", "operationId": "metrics",
            "responses": {"200": {"description": "The fleet's aggregates: devices by state, by model and version "
                                                 "and by tag; rates, error ratios, p95 mean and max by model. "
                                                 "Per-device series only under `fleet serve --metrics-per-device`.",
                                  "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}}}}}},
        OPENAPI_PATH: {"get": {
            "summary": "This document.", "operationId": "openapi",
            "responses": {"200": {"description": "OpenAPI 3.1.",
                                  "content": {"application/json": {"schema": {"type": "object"}}}}}}},
    }
    for ops in paths.values():  # an operation whose request Struct is missing has no requestBody
        for op in ops.values():
            if op.get("requestBody") == {}:
                del op["requestBody"]
            if "requestBody" in op:
                op["responses"]["413"] = err("The body is bigger than this endpoint takes.")
                op["responses"]["415"] = err("The body's Content-Type is not one this endpoint takes.")
    return paths, components


def _secure(op: dict, role: str | None, err: dict) -> None:
    """Say who may call ``op``: its security, its 401/403 answers and the role in its description."""
    if role in (None, PUBLIC):
        op["security"] = []
        return
    op["security"] = [{"bearer": []}, {"deviceCertificate": []}] if role == DEVICE else [{"bearer": []}]
    needs = "an operator token or a device's client certificate" if role == DEVICE else f"a {role} token"
    op["description"] = (op.get("description", "") + f" Needs {needs}.").strip()
    op["responses"]["401"] = {**err, "description": "No token, or one that is not valid (or was revoked)."}
    op["responses"]["403"] = {**err, "description": f"The token's role is not enough: this needs {needs}."}


def document(mounted: set[tuple[str, str]] | None = None, roles: dict[tuple[str, str], str] | None = None
             ) -> dict[str, Any]:
    """The OpenAPI document; with ``mounted`` ({(path, method)}), only the operations the app has; with
    ``roles`` ({(path, method): role}), who may call each."""
    paths, components = operations()
    if mounted is not None:
        paths = {p: kept for p, ops in paths.items() if (kept := {m: o for m, o in ops.items() if (p, m) in mounted})}
    error = {"description": "", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for p, ops in paths.items():
        for m, op in ops.items():
            _secure(op, (roles or {}).get((p, m)), error)
    return {
        "openapi": "3.1.0",
        "info": {"title": "edgefleet fleet controller", "version": _version(),
                 "description": "The JSON API the `edgefleet fleet` CLI and the dashboard speak, and the bundle "
                                "downloads devices make. Every error is `{\"error\": \"...\"}` with a 4xx/5xx "
                                "status."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": SECURITY},
        "security": [{"bearer": []}],
    }


def mounted_operations(routes: list) -> set[tuple[str, str]]:
    """{(path, method)} of an app's routes (HEAD aside)."""
    return {(r.path, m.lower()) for r in routes if isinstance(r, Route) for m in (r.methods or ()) if m != "HEAD"}


def route_roles(routes: list) -> dict[tuple[str, str], str]:
    """{(path, method): the role it needs} of an app's routes (``fleet.auth.allow``)."""
    return {(r.path, m.lower()): a.role(m) for r in routes if isinstance(r, Route) and (a := access(r))
            for m in (r.methods or ()) if m != "HEAD"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "0"


def routes() -> list[Route]:
    cache: dict[int, dict] = {}

    def openapi(request: Request) -> Response:
        app = request.scope["app"]
        if id(app) not in cache:
            cache[id(app)] = document(mounted_operations(app.routes), route_roles(app.routes))
        return JSONResponse(cache[id(app)])

    return [Route(OPENAPI_PATH, openapi, methods=["GET"])]
