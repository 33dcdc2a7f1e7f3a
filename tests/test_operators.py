"""Operators: the first admin token, who may call each route, tokens and the audit trail from the CLI, 405s
that name their methods, and the client over https with the fleet's CA. A real controller (real mosquitto,
SQLite, HTTP) throughout; test_api_security.py has the attacks."""

from __future__ import annotations

import http.client
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_fleet import assert_one_error_line, run_cli
from util import admin_token, fleet_client, ssl_context, release_pub

from agent.errors import EdgefleetError
from fleet.app import Fleet
from fleet.auth import ADMIN, DEVICE, OPERATOR, PUBLIC, READ, access
from fleet.client import FleetClient

REPO = Path(__file__).resolve().parents[1]

# who may call each route: a route added without a line here fails test_every_route_declares_the_role_it_needs
ROLES = {
    ("/api/status", "GET"): READ,
    ("/api/bundles", "POST"): OPERATOR,
    ("/api/bundles", "GET"): READ,
    ("/api/keys", "GET"): ADMIN,
    ("/api/keys", "POST"): ADMIN,
    ("/api/keys/{keyid}", "DELETE"): ADMIN,
    ("/bundles/{sha256}", "GET"): DEVICE,
    ("/api/deployments", "POST"): OPERATOR,
    ("/api/deployments/{deployment_id}", "GET"): READ,
    ("/api/devices", "GET"): READ,
    ("/api/devices/{device_id}/tags", "PUT"): OPERATOR,
    ("/api/devices/{device_id}/tags", "POST"): OPERATOR,
    ("/api/health", "GET"): READ,
    ("/api/health/{device_id}", "GET"): READ,
    ("/api/devices/{device_id}/quality", "GET"): READ,
    ("/api/devices/{device_id}/quality/series", "GET"): READ,
    ("/api/quality", "GET"): READ,
    ("/api/rollouts", "GET"): READ,
    ("/api/rollouts", "POST"): OPERATOR,
    ("/api/rollouts/{rollout_id}", "GET"): READ,
    ("/api/rollouts/{rollout_id}/{action}", "POST"): OPERATOR,
    ("/api/tokens", "GET"): ADMIN,
    ("/api/tokens", "POST"): ADMIN,
    ("/api/tokens/{name}", "DELETE"): ADMIN,
    ("/api/audit", "GET"): ADMIN,
    ("/login", "GET"): PUBLIC,
    ("/login", "POST"): PUBLIC,
    ("/logout", "POST"): PUBLIC,
    ("/", "GET"): READ,
    ("/devices/{device_id}", "GET"): READ,
    ("/rollouts/{rollout_id}", "GET"): READ,
    ("/api/devices/{device_id}/series", "GET"): READ,
    ("/metrics", "GET"): READ,
    ("/api/openapi.json", "GET"): READ,
    ("/static", "*"): PUBLIC,
    # device identities (fleet/api_enroll.py): devices enroll with a token and renew with their certificate
    ("/enroll/ca.pem", "GET"): PUBLIC,
    ("/enroll", "POST"): PUBLIC,
    ("/enroll/renew", "POST"): PUBLIC,
    ("/api/enrollments", "GET"): ADMIN,
    ("/api/enrollments", "POST"): ADMIN,
    ("/api/provisioning", "POST"): ADMIN,
    ("/api/enrollments/{token_id}/revoke", "POST"): ADMIN,
    ("/api/devices/{device_id}/revoke", "POST"): ADMIN,
    ("/api/certificates", "GET"): READ,
}
PAGES = {"/", "/devices/{device_id}", "/rollouts/{rollout_id}"}


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    f = Fleet(tmp_path / "data", release_keys=[release_pub()],
              http_port=0, mqtt_listen="127.0.0.1:0").start_background()
    monkeypatch.delenv("EDGEFLEET_SERVER", raising=False)
    monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(f))
    monkeypatch.setenv("EDGEFLEET_CA", str(f.pki.ca_crt))  # the https controller's CA, for the CLI
    yield f
    f.stop()


def test_the_first_start_makes_one_admin_token_and_later_starts_keep_it(tmp_path):
    data = tmp_path / "data"
    with Fleet(data, release_keys=[release_pub()], http_port=0, mqtt_listen="127.0.0.1:0") as fleet:
        path = data / "admin.token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert fleet.new_admin_token == path.read_text().strip() and fleet.new_admin_token.startswith("eft_")
        [row] = fleet_client(fleet).tokens()
        assert (row["name"], row["role"], row["revoked"]) == ("admin", "admin", None)
        assert not list(data.glob(".admin.*")), "no temporary file left"
    first = path.read_text()
    with Fleet(data, release_keys=[release_pub()], http_port=0, mqtt_listen="127.0.0.1:0") as fleet:
        assert fleet.new_admin_token is None and path.read_text() == first
        assert fleet_client(fleet).status()["ok"] is True
        fleet_client(fleet).revoke_token("admin")  # no admin token left: the next start makes one again
    with Fleet(data, release_keys=[release_pub()], http_port=0, mqtt_listen="127.0.0.1:0") as fleet:
        assert fleet.new_admin_token and path.read_text().strip() == fleet.new_admin_token != first.strip()
        assert [t["name"] for t in fleet_client(fleet).tokens() if t["revoked"] is None] == ["admin"]


def test_serve_prints_the_first_admin_token_once(tmp_path):
    data = tmp_path / "data"

    def serve() -> list[str]:
        proc = subprocess.Popen([sys.executable, "-m", "edgefleet.cli", "fleet", "serve", "--data", str(data),
                                 "--http", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"], cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            lines = [proc.stdout.readline()]
            assert lines[0].startswith("edgefleet fleet: serving"), lines[0] + proc.stderr.read()
            lines.append(proc.stdout.readline())
            if "first admin token (kept" in lines[1]:
                lines.append(proc.stdout.readline())
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
            return lines
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()

    token = None
    first = serve()
    token = (data / "admin.token").read_text().strip()
    assert "first admin token" in first[1] and first[2].strip() == token
    again = serve()
    assert len(again) == 2 and again[1].strip() == f"edgefleet fleet: the first admin token is in {data / 'admin.token'}"
    assert token not in "".join(again)


def test_serve_options_of_the_api_are_checked(tmp_path, capsys):
    for argv, needle in ((["--max-bundle-size", "lots"], "invalid --max-bundle-size 'lots'"),
                         (["--max-bundle-size", "0"], "invalid --max-bundle-size '0'")):
        code, _, err = run_cli(capsys, "serve", "--data", str(tmp_path / "data"), *argv)
        assert code == 2
        assert_one_error_line(err, needle)
    from fleet.cli import parse_size

    assert [parse_size(t, "x") for t in ("2G", "512M", "2GiB", "100", "1k")] == [2 << 30, 512 << 20, 2 << 30, 100, 1024]


def test_every_route_declares_the_role_it_needs(fleet):
    from starlette.routing import Mount, Route

    declared = {}
    for route in fleet.app.routes:
        acc = access(route)
        assert acc is not None, f"{route.path} declares no role (fleet.auth.allow)"
        if isinstance(route, Mount):
            declared[(route.path, "*")] = acc.role("GET")
        else:
            assert isinstance(route, Route)
            declared |= {(route.path, m): acc.role(m) for m in route.methods - {"HEAD"}}
            assert acc.page == (route.path in PAGES), route.path
    assert declared == ROLES


def test_405_names_every_method_of_the_path(fleet):
    from starlette.routing import Route

    host, port = fleet.http_host, fleet.http_port
    for route in fleet.app.routes:
        if not isinstance(route, Route) or "{" in route.path and route.path.startswith("/bundles"):
            continue
        path = route.path.replace("{action}", "pause").replace("{", "x").replace("}", "")
        wrong = next(m for m in ("PATCH", "PUT", "DELETE", "POST") if m not in route.methods)
        conn = http.client.HTTPSConnection(host, port, timeout=30, context=ssl_context(fleet))
        conn.request(wrong, path, b"{}", {"Authorization": f"Bearer {admin_token(fleet)}",
                                          "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        assert resp.status == 405, (wrong, path, resp.status)
        assert set(resp.getheader("Allow").split(", ")) == route.methods, (path, resp.getheader("Allow"))


def test_tokens_and_the_audit_trail_from_the_cli(fleet, capsys, monkeypatch):
    code, out, err = run_cli(capsys, "token", "create", "--role", "operator", "--name", "ci", "--json",
                             "--server", fleet.http_url)
    assert code == 0, err
    made = json.loads(out)
    assert made["name"] == "ci" and made["role"] == "operator" and made["token"].startswith("eft_")
    code, out, _ = run_cli(capsys, "token", "create", "--role", "read", "--server", fleet.http_url)
    assert code == 0 and out.startswith("token read-") and out.splitlines()[1].startswith("eft_")
    code, _, err = run_cli(capsys, "token", "create", "--role", "read", "--name", "ci", "--server", fleet.http_url)
    assert code == 2
    assert_one_error_line(err, "a token called 'ci' exists")
    code, _, err = run_cli(capsys, "token", "create", "--role", "read", "--name", "Bad Name",
                           "--server", fleet.http_url)
    assert code == 2
    assert_one_error_line(err, "name must be a token name")

    # the new token works, with its role
    ci = FleetClient(fleet.http_url, token=made["token"], ca=fleet.pki.ca_crt)
    assert ci.status()["ok"] is True
    with pytest.raises(EdgefleetError, match="ci has the operator role: GET /api/tokens needs the admin role"):
        ci.tokens()

    code, out, _ = run_cli(capsys, "token", "list", "--server", fleet.http_url)
    rows = {line.split()[0]: line.split() for line in out.strip().splitlines()[1:]}
    assert set(rows) == {"admin", "ci", next(n for n in rows if n.startswith("read-"))}
    assert rows["ci"][1] == "operator" and rows["ci"][-1] == "active" and made["token"] not in out
    code, out, _ = run_cli(capsys, "token", "revoke", "ci", "--server", fleet.http_url)
    assert code == 0 and out.strip() == "token ci (operator) revoked"
    with pytest.raises(EdgefleetError, match="not valid"):
        ci.status()
    code, _, err = run_cli(capsys, "token", "revoke", "ci", "--server", fleet.http_url)
    assert code == 2
    assert_one_error_line(err, "no active token called 'ci'")
    code, out, _ = run_cli(capsys, "token", "list", "--json", "--server", fleet.http_url)
    assert [t["revoked"] is not None for t in json.loads(out) if t["name"] == "ci"] == [True]

    # what the lead's enrollment records goes in the same trail
    fleet.auth.audit("enrollment", "enroll", "cam-9", "certificate issued", remote="10.0.0.9")
    code, out, _ = run_cli(capsys, "audit", "--json", "--server", fleet.http_url)
    entries = json.loads(out)["entries"]
    assert entries[0]["actor"] == "enrollment" and entries[0]["target"] == "cam-9"
    assert entries[0]["status"] is None and entries[0]["remote"] == "10.0.0.9"
    made_rows = [e for e in entries if e["action"] == "POST /api/tokens" and e["status"] == 201]
    assert [e["target"] for e in made_rows][-1] == "ci" and made_rows[-1]["actor"] == "admin"
    assert made_rows[-1]["detail"] == "created, role operator" and made_rows[-1]["remote"] == "127.0.0.1"
    revoked = [e for e in entries if e["action"] == "DELETE /api/tokens/{name}"]
    assert [e["status"] for e in revoked] == [404, 200]  # newest first: the second try found none
    assert any(e["actor"] == "ci" and e["action"] == "GET /api/tokens" for e in entries) is False  # reads: no
    code, out, _ = run_cli(capsys, "audit", "--limit", "2", "--server", fleet.http_url)
    assert code == 0 and len(out.strip().splitlines()) == 3 and "enrollment" in out
    page = fleet_client(fleet).audit(limit=2)
    older = fleet_client(fleet).audit(limit=2, before=page["next"])
    assert [e["id"] for e in older["entries"]] == [page["next"] - 1, page["next"] - 2]


def test_the_cli_needs_a_token_and_reads_one_from_the_data_dir(fleet, capsys, monkeypatch):
    monkeypatch.delenv("EDGEFLEET_TOKEN")
    code, _, err = run_cli(capsys, "health", "--server", fleet.http_url)
    assert code == 2
    assert_one_error_line(err, "needs a token: set EDGEFLEET_TOKEN or --data DIR")
    code, out, err = run_cli(capsys, "devices", "--json", "--data", str(fleet.data_dir))  # URL and token
    assert code == 0 and json.loads(out) == [], err
    monkeypatch.setenv("EDGEFLEET_DATA", str(fleet.data_dir))
    code, out, err = run_cli(capsys, "token", "list")
    assert code == 0 and "admin" in out, err
    code, _, err = run_cli(capsys, "devices", "--token", "eft_nope")
    assert code == 2
    assert_one_error_line(err, "this token is not valid (or was revoked)")
    code, _, err = run_cli(capsys, "devices", "--data", str(fleet.data_dir / "nope"))
    assert code == 2
    assert_one_error_line(err, "no such controller data dir")


# -- https with the fleet's CA ---------------------------------------------------------------------------------


def test_the_client_over_https_with_the_fleet_ca(fleet, tmp_path, capsys, monkeypatch):
    url, ca = fleet.http_url, fleet.pki.ca_crt
    assert url.startswith("https://")
    assert FleetClient(url, token=admin_token(fleet), ca=ca).status()["ok"] is True
    with pytest.raises(EdgefleetError, match="does not trust .* give its CA with --ca FILE or EDGEFLEET_CA"):
        FleetClient(url, token=admin_token(fleet)).status()
    assert FleetClient.configured(data=fleet.data_dir, env={}).status()["ok"] is True  # URL, token and CA
    monkeypatch.delenv("EDGEFLEET_CA")
    code, out, err = run_cli(capsys, "token", "list", "--server", url, "--ca", str(ca))
    assert code == 0 and "admin" in out, err
    monkeypatch.setenv("EDGEFLEET_CA", str(ca))
    code, out, err = run_cli(capsys, "devices", "--server", f"https://localhost:{fleet.http_port}")
    assert code == 0, err
    # over https the session cookie is Secure, and __Host- prefixed
    conn = http.client.HTTPSConnection("127.0.0.1", fleet.http_port, context=ssl_context(fleet), timeout=30)
    conn.request("POST", "/login", f"token={admin_token(fleet)}",
                 {"Content-Type": "application/x-www-form-urlencoded", "Origin": url})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    cookie = resp.getheader("Set-Cookie")
    assert resp.status == 303 and cookie.startswith("__Host-edgefleet_session=") and "; Secure" in cookie
