"""The API says what it enforces: schemathesis (`schemathesis run`) over `/api/openapi.json` of a live controller,
with an admin token, generating requests the document calls valid and ones it calls invalid.

It fails on any 5xx, any answer that does not match the document (status, content type, headers, body schema),
any schema-valid request the server refuses (but for the few refusals JSON Schema cannot express:
tests/fuzz_checks.py), any invalid one it takes, a 405 without `Allow`, and an operation that answers without
its token. Two registered devices and an uploaded bundle are offered to it as parameter values, so that it
reaches the answers of real resources too, not only 404s.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_fleet import Device, bundle  # noqa: F401  (bundle is a fixture)
from util import fleet_client, issue_tls, wait_for, release_pub

from fleet.app import Fleet
from fleet.auth import no_device

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
EXAMPLES = 25  # per operation and phase: about a thousand requests in all, well under a minute here
SEED = 8


def test_schemathesis_finds_nothing(tmp_path, bundle):  # noqa: F811
    fleet = Fleet(tmp_path / "data", release_keys=[release_pub()],
                  http_port=0, mqtt_listen="127.0.0.1:0", device_identity=no_device)
    fleet.start_background()
    devices = []
    try:
        admin = fleet_client(fleet)
        for name in ("cam-1", "cam-2"):
            devices.append(Device(fleet.broker_url, name, issue_tls(fleet.pki, name, tmp_path / "certs", fleet.store)))
            devices[-1].state()
        wait_for(lambda: len(admin.devices()) == 2, what="the devices")
        sha = admin.upload_bundle(bundle)["sha256"]
        # its own token; DELETE /api/tokens/{name} revokes "admin" or no token (it would revoke its own, whose
        # name it reads in GET /api/tokens, and go on with 401s)
        token = admin.create_token("admin", "fuzz-9c41d0e7b2a85f36")["token"]
        config = tmp_path / "schemathesis.toml"
        config.write_text(f"""
[dictionaries]
devices = {{ values = ["cam-1", "cam-2"] }}
bundles = {{ values = ["{sha}"] }}
revocable = {{ values = ["admin", "ghost"] }}

[parameters]
"path.device_id" = {{ dictionary = "devices", probability = 0.5 }}
"path.sha256" = {{ dictionary = "bundles", probability = 0.5 }}
"body.bundle" = {{ dictionary = "bundles", probability = 0.7 }}
"body.devices[*]" = {{ dictionary = "devices", probability = 0.5 }}
"body.targets[*]" = {{ dictionary = "devices", probability = 0.3 }}
"path.name" = {{ dictionary = "revocable", probability = 1.0 }}
""")
        argv = [str(SCHEMATHESIS), "--config-file", str(config), "--no-color", "run",
                f"{fleet.http_url}/api/openapi.json", "--header", f"Authorization: Bearer {token}",
                "--tls-verify", str(fleet.pki.ca_crt),
                "--mode", "all", "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--workers", "1",
                "--phases", "examples,coverage,fuzzing",  # not stateful: it would chain DELETE to our own token
                "--checks", "all", "--exclude-checks", "positive_data_acceptance",  # fuzz_checks' instead
                "--report-dir", str(tmp_path / "report")]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_checks",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        report = proc.stdout + proc.stderr
        assert proc.returncode == 0, report[-20000:]
        # its token still works: no 401 stood in for an answer
        assert fleet_client(fleet, token).status()["ok"] is True
    finally:
        for d in devices:
            d.close()
        fleet.stop()
