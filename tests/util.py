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


def admin_token(fleet) -> str:
    """A controller's first admin token, where `fleet serve` keeps it (DATA/admin.token)."""
    return (fleet.data_dir / "admin.token").read_text().strip()


def bearer(fleet, token: str | None = None) -> dict[str, str]:
    """The Authorization header of ``token`` (default: the controller's admin token)."""
    return {"Authorization": f"Bearer {token or admin_token(fleet)}"}


def fleet_client(fleet, token: str | None = None):
    """A FleetClient of a started ``fleet.app.Fleet`` with ``token`` (default: its admin token)."""
    from fleet.client import FleetClient

    return FleetClient(fleet.http_url, token=token or admin_token(fleet))
