"""A schemathesis check for tests/test_api_fuzz.py, loaded by `schemathesis run` (SCHEMATHESIS_HOOKS=fuzz_checks).

``positive_data_acceptance`` fails on any schema-valid request the server refuses. A few refusals depend on
more than one field, or on what a field's bytes are, which JSON Schema cannot say (the operations'
descriptions do); this check is the built-in one but for exactly those, each matched by its message and, where
it can be, by the request itself. Any other refusal of a schema-valid request still fails.
"""

from __future__ import annotations

import re

import schemathesis
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.checks import positive_data_acceptance


def _step_over_since(case, message: str) -> bool:
    q = case.query or {}
    return ("must be seconds in [1, since]" in message and "step" in q
            and float(q["step"]) > float(q.get("since", 3600)))


def _quality_window(case, message: str) -> bool:
    """The quality API's window: since before until (until defaults to now, since to an hour before it), at most
    400 days long; a series' step at most until - since."""
    q = case.query or {}
    return (bool({"since", "until"} & set(q)) and ("must be before until" in message
                                                   or message.startswith("the window [since, until) is"))
            or "step" in q and "must be seconds in [1, until - since]" in message)


# operation -> whether a 400's message (and the request) is one of the refusals JSON Schema cannot express
UNSAYABLE = {
    # waves that do not increase or end at 100%, or ask for more devices than the targets have; a wave
    # timeout not longer than the soak
    "POST /api/rollouts": lambda case, message: bool(re.search(
        r"must be longer than the soak|must increase|must end at 100%|asks for \d+ devices", message)),
    "GET /api/devices/{device_id}/series": _step_over_since,  # step is at most since
    "POST /api/bundles": lambda case, message: "not a bundle" in message,  # a tar with a manifest
    "GET /api/devices/{device_id}/quality": _quality_window,
    "GET /api/devices/{device_id}/quality/series": _quality_window,
    "GET /api/quality": _quality_window,
    # a certificate signing request whose bytes are not one (its PEM armour is all a pattern can ask for)
    "POST /enroll": lambda case, message: message.startswith("csr:"),
    "POST /enroll/renew": lambda case, message: message.startswith("csr:"),
    # a public key whose PEM bytes are not an ed25519 key; a statement that is not a signed trust statement
    "POST /api/keys": lambda case, message: message.startswith(("the key is", "the statement")),
    # a cursor is opaque: only the `next` of a previous page (of the same sort) is one
    "GET /api/health": lambda case, message: "cursor" in (case.query or {}) and message.startswith("invalid cursor"),
    "GET /api/devices": lambda case, message: "cursor" in (case.query or {}) and message.startswith("invalid cursor"),
}


@schemathesis.check
def positive_data_acceptance_but_unsayable(ctx, response, case):
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        allowed = UNSAYABLE.get(case.operation.label)
        try:
            message = response.json().get("error", "")
        except ValueError:
            message = ""
        if response.status_code == 400 and allowed is not None and allowed(case, message):
            return None
        raise
