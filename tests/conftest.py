"""Shared fixtures: real objects only (a real mosquitto, real files), never fakes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (free a moment ago)."""
    from fleet.broker import free_port as pick

    return pick("127.0.0.1")


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator["fleet.broker.Mosquitto"]:  # noqa: F821
    """A started mosquitto (the embedded broker's config) on a free port; ``.url`` is mqtt://127.0.0.1:PORT."""
    from fleet.broker import Mosquitto

    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"), port=0).start()
    try:
        yield broker
    finally:
        broker.stop()
