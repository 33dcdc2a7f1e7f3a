"""What `make demo` does, end to end, as separate processes on real parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgefleet.demo import DEVICES, Demo


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    demo = Demo(tmp_path / "demo", requests=40, telemetry_interval_s=1.0)
    try:
        result = demo.run()
        cli = subprocess.run([sys.executable, "-m", "edgefleet.cli", "fleet", "health", "--json"], env=demo.env,
                             capture_output=True, text=True, timeout=60)
    finally:
        demo.stop_all()
    assert all(p.poll() is not None for p in demo.procs), "the demo left a process running"

    # the bad update was halted at its first wave, on the error rate the device saw, and rolled back
    assert demo.rollout["status"] in ("halted", "rolled_back")
    touched = {d["device_id"] for w in demo.rollout["waves"] for d in w["devices"] if w["status"] != "waiting"}
    assert touched == {"cam-1"}

    # secure by default: the cameras were enrolled (each with its own key and certificate) and spoke mutual TLS
    certs = demo.fleet_certificates
    assert sorted(c["device_id"] for c in certs if c["kind"] == "enroll" and not c["revoked"]) == sorted(DEVICES)
    assert demo.server.startswith("https://") and all(
        (tmp_path / "demo" / "devices" / d / "identity").stat().st_mode & 0o777 == 0o700 for d in DEVICES)

    # signed releases: every bundle deployed was signed by the demo's release key and verified on the devices;
    # a tampered upload and a forged (unsigned) desired were refused, the device kept serving 1.0
    from agent import signing

    release = signing.load_public(tmp_path / "demo" / "keys" / "release.pub").keyid
    for d in DEVICES:
        ran = {(m / "manifest.sig").is_file() and signing.decode_manifest_sig((m / "manifest.sig").read_bytes()).keyid
               for m in (tmp_path / "demo" / "devices" / d / "models").iterdir() if m.is_dir()}
        assert ran == {release}, (d, ran)
    # cam-1 ran 1.1 (a higher serial) and is back on 1.0 (a lower one): by the rollout's auto-rollback, which the
    # controller signs as a rollback, or by its own probation, whichever came first (test_signed_updates.py and
    # test_release_keys.py check each path on its own)
    ledger = json.loads((tmp_path / "demo" / "devices" / "cam-1" / "ledger.json").read_text())
    running = json.loads((tmp_path / "demo" / "devices" / "cam-1" / "models" /
                          os.readlink(tmp_path / "demo" / "devices" / "cam-1" / "current").split("/")[-1] /
                          "manifest.json").read_text())
    assert running["version"] == "1.0" and ledger["serials"]["ocr-cls"] > running["serial"]
    assert "does not match its manifest entry" in demo.attacks["upload"]
    assert "desired is not signed by the controller" in demo.attacks["forged"]

    # model quality: cam-3's scene changed (text in poor light): the controller called its drift significant while
    # the others stayed stable, and its applications' labels show its accuracy falling while the others hold
    q = result["quality"]
    assert q["drift"] == {"cam-1": "stable", "cam-2": "stable", "cam-3": "significant"}, q
    assert q["windows_to_flag"] >= 1 and q["psi"] > 0.25
    assert q["accuracy"]["cam-3"] < 0.7 < 0.85 < min(q["accuracy"]["cam-1"], q["accuracy"]["cam-2"]), q
    health = {h["device_id"]: h for h in json.loads(cli.stdout)}
    assert health["cam-3"]["quality"]["band_ref"] == "significant" and health["cam-2"]["quality"]["labels"] >= 100

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
        assert dev["model"]["signed_by"] == release and dev["model"]["serial"] > 0
        assert dev["inferences"] >= 40
        # only the first wave's device ever ran 1.1, and its applications' requests failed there
        assert (dev["errors"] > 0) == (dev["device_id"] == "cam-1")
        lat = dev["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
        assert dev["rss_bytes"] > 10 << 20 and dev["cpu_percent"] is not None
        assert dev["memory_percent"] > 0
