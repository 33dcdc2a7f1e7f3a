"""Helpers the tests share (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", every: float = 0.05):
    """Poll ``predicate`` until it returns something truthy (and return that); generous by default,
    since these machines are shared: a bound on waiting, never a timing assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
