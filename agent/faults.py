"""Named points in an update where the crash tests stop the agent to kill it.

A process started with ``EDGEFLEET_FAULT_PAUSE=<step>`` writes ``<state_dir>/paused-at-<step>`` when it
reaches that step and waits there until it is killed, so a test can SIGKILL it at exactly that point and
check what a restart makes of the state on disk. Without the variable (always, outside those tests) a
point costs one environment lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

STEPS = ("downloading", "verifying", "unpacking", "loading", "switching", "reporting")
ENV = "EDGEFLEET_FAULT_PAUSE"


def point(step: str, state_dir: str | os.PathLike) -> None:
    if os.environ.get(ENV) != step:
        return
    Path(state_dir, f"paused-at-{step}").write_text(str(os.getpid()))
    while True:
        time.sleep(3600)
