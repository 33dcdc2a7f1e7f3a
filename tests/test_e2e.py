"""What `make demo` does, end to end, as separate processes on real parts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgefleet.demo import DEVICES, Demo


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    demo = Demo(tmp_path / "demo", requests=40, telemetry_interval_s=1.0)
    try:
        result = demo.run()
        cli = subprocess.run([sys.executable, "-m", "edgefleet.cli", "fleet", "health", "--json",
                              "--data", str(demo.data)], capture_output=True, text=True, timeout=60)
    finally:
        demo.stop_all()
    assert all(p.poll() is not None for p in demo.procs), "the demo left a process running"

    # the bad update was halted at its first wave, on the error rate the device saw, and rolled back
    assert demo.rollout["status"] in ("halted", "rolled_back")
    touched = {d["device_id"] for w in demo.rollout["waves"] for d in w["devices"] if w["status"] != "waiting"}
    assert touched == {"cam-1"}

    # the converter's gate: int8 agrees with fp32 on the held-out real inputs
    int8 = result["variants"]["int8"]
    assert int8["agreement"]["top1"] >= 0.9

    assert cli.returncode == 0, cli.stderr
    health = json.loads(cli.stdout)
    assert sorted(d["device_id"] for d in health) == sorted(DEVICES)
    for dev in health:
        assert dev["online"] is True
        assert dev["model"]["precision"] == "int8" and dev["model"]["name"] == "ocr-cls"
        assert dev["model"]["version"] == "1.0"  # the bad 1.1 was stopped and sent back
        assert dev["inferences"] >= 40
        # only the first wave's device ever ran 1.1, and its applications' requests failed there
        assert (dev["errors"] > 0) == (dev["device_id"] == "cam-1")
        lat = dev["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
        assert dev["rss_bytes"] > 10 << 20 and dev["cpu_percent"] is not None
        assert dev["memory_percent"] > 0
