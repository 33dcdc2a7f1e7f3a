"""``python -m agent.runtimes``: print, as JSON, the devices each installed runtime can use here (what the agent
reports in its state message; run in a child so the agent does not keep every runtime imported)."""

import json
import sys

from agent.runtimes import devices

json.dump(devices(), sys.stdout)
sys.stdout.write("\n")
