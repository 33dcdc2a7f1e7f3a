"""The controller's database: the one package that speaks SQL (``fleet.store.core.Store`` and its backends).

``open_store(url)`` / ``Store(url)``: ``sqlite:///ABS/PATH`` (or a plain path; the default, a file in the data
dir) or ``postgresql://USER@HOST:PORT/DB``. Everything else in ``fleet`` calls the store's methods and works on
what they return.
"""

from __future__ import annotations

from typing import Any

from fleet.store.core import (CLOCK_CACHE, CLONE_BOOTS, DEFAULT_INTERVAL_S, MAX_CLOCK_OFFSET_S,
                              OFFLINE_AFTER_INTERVALS, PHASES, Store)
from fleet.store.schema import SCHEMA_VERSION, SEQ_TABLES


__all__ = ["CLOCK_CACHE", "CLONE_BOOTS", "DEFAULT_INTERVAL_S", "MAX_CLOCK_OFFSET_S", "OFFLINE_AFTER_INTERVALS",
           "PHASES", "SCHEMA_VERSION", "SEQ_TABLES", "Store", "open_store"]


def open_store(url: Any, **opts: Any) -> Store:
    """A Store at ``url``, opened (schema made or migrated); EdgefleetError with one line for a bad URL, an
    unreachable database, refused credentials or a missing database."""
    return Store(url, **opts).open()
