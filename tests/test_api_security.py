"""Attacks on the controller's HTTP side, each against a real controller over real HTTP (a real mosquitto and
SQLite behind it): no token, too small a role, a dashboard cookie driven from another site, a foreign Host
(DNS rebinding), a foreign Origin, oversized bodies, markup in every string a device controls, revoked
tokens. Each test fails if the defence it names is taken away."""

from __future__ import annotations

import http.client
import json
import re
import time
from html import escape
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest
from test_fleet import Device, bundle  # noqa: F401  (bundle is a fixture)
from util import admin_token, fleet_client, issue_tls, wait_for, release_key, release_pub

from agent import protocol
from agent.bundle import Manifest, TensorSpec, write_bundle
from agent.errors import EdgefleetError
from fleet.app import Fleet
from fleet.auth import PUBLIC, no_device
from fleet.openapi import route_roles

WRITES = ("POST", "PUT", "PATCH", "DELETE")
SAMPLE = {"device_id": "cam-1", "token_id": "0123456789ab", "rollout_id": "ro-20260101-000000-abcdef", "action": "pause", "name": "nobody",
          "sha256": "0" * 64, "deployment_id": "dep-20260101-000000-abcdef",
          "keyid": "0123456789abcdef"}
XSS = "<img src=x onerror=alert(1)>"
NOT_SHOWN = {"cpu_flags"}  # stored, but on no page


def send(fleet, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         chunks: list[bytes] | None = None, send_body: bool = True) -> tuple[int, dict, bytes]:
    """One request over a fresh connection, exactly as given (Host included): (status, headers, body).
    ``chunks``: a chunked body; ``send_body=False``: headers only (the answer must not need the body)."""
    from util import ssl_context

    conn = http.client.HTTPSConnection(fleet.http_host, fleet.http_port, timeout=60, context=ssl_context(fleet))
    h = {"Host": f"{fleet.http_host}:{fleet.http_port}", **(headers or {})}
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    if chunks is not None:
        h["Transfer-Encoding"] = "chunked"
    elif body is not None:
        h.setdefault("Content-Length", str(len(body)))
    for k, v in h.items():
        conn.putheader(k, v)
    conn.endheaders()
    try:
        if chunks is not None:
            for c in chunks:
                conn.send(b"%x\r\n%s\r\n" % (len(c), c))
            conn.send(b"0\r\n\r\n")
        elif body is not None and send_body:
            conn.send(body)
    except (BrokenPipeError, ConnectionResetError):
        pass  # it answered (and closed) before taking the whole body
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A controller with no device identities (as for a client without a certificate), reached as
    "fleet.example" too and published as controller.example, with a token of each role:
    (fleet, {"admin": ..., "operator": ..., "read": ...})."""
    fleet = Fleet(tmp_path_factory.mktemp("sec") / "data", release_keys=[release_pub()],
                  http_port=0, mqtt_listen="127.0.0.1:0",
                  device_identity=no_device, hostnames=["fleet.example"],
                  public_url="https://controller.example:9999").start_background()
    try:
        client = fleet_client(fleet)
        tokens = {"admin": admin_token(fleet)}
        for role in ("operator", "read"):
            tokens[role] = client.create_token(role, f"the-{role}")["token"]
        yield fleet, tokens
    finally:
        fleet.stop()


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: quote(SAMPLE[m[1]], safe=""), path)


def write_routes(fleet) -> list[tuple[str, str, str]]:
    """(method, path template, role) of every write the app has, but the public ones."""
    return sorted((m.upper(), p, role) for (p, m), role in route_roles(fleet.app.routes).items()
                  if m.upper() in WRITES and role != PUBLIC)


# -- credentials and roles -------------------------------------------------------------------------------------


def test_every_write_needs_a_token_of_its_role(site):
    fleet, tokens = site
    writes = write_routes(fleet)
    assert {p for _, p, _ in writes} >= {"/api/bundles", "/api/deployments", "/api/rollouts", "/api/tokens",
                                         "/api/rollouts/{rollout_id}/{action}", "/api/devices/{device_id}/tags",
                                         "/api/tokens/{name}"}
    for method, path, role in writes:
        kind = {"Content-Type": "application/x-tar"} if path == "/api/bundles" else JSON
        status, headers, body = send(fleet, method, concrete(path), b"{}", kind)
        assert status == 401 and headers["www-authenticate"].startswith("Bearer"), (method, path, status, body)
        status, _, body = send(fleet, method, concrete(path), b"{}", {**kind, **bearer(tokens["read"])})
        assert status == 403 and "needs the" in json.loads(body)["error"], (method, path, status, body)
        status, _, body = send(fleet, method, concrete(path), b"{}", {**kind, **bearer("eft_" + "x" * 43)})
        assert status == 401 and "not valid" in json.loads(body)["error"], (method, path, status, body)
        if role == "admin":
            status, _, body = send(fleet, method, concrete(path), b"{}", {**kind, **bearer(tokens["operator"])})
            assert status == 403, (method, path, status, body)
    assert fleet_client(fleet).tokens()[-1]["name"] == "the-read", "no refused request made a token"


def test_bundles_need_an_operator_token_or_a_device(site, bundle):  # noqa: F811
    fleet, tokens = site
    sha = fleet_client(fleet, tokens["operator"]).upload_bundle(bundle)["sha256"]
    for method in ("GET", "HEAD"):
        status, headers, _ = send(fleet, method, f"/bundles/{sha}")
        assert status == 401 and headers["www-authenticate"].startswith("Bearer"), method
        assert send(fleet, method, f"/bundles/{sha}", headers=bearer(tokens["read"]))[0] == 403, method
    status, _, body = send(fleet, "GET", f"/bundles/{sha}", headers=bearer(tokens["operator"]))
    assert status == 200 and body == bundle.read_bytes()


def test_reads_need_a_token_and_the_pages_send_you_to_sign_in(site):
    fleet, tokens = site
    for path in ("/api/status", "/api/health", "/api/devices", "/api/rollouts", "/metrics", "/api/openapi.json"):
        assert send(fleet, "GET", path)[0] == 401, path
        assert send(fleet, "GET", path, headers=bearer(tokens["read"]))[0] == 200, path
    for path in ("/api/tokens", "/api/audit"):
        assert send(fleet, "GET", path, headers=bearer(tokens["operator"]))[0] == 403, path
    status, headers, _ = send(fleet, "GET", "/devices/cam-1?since=900")
    assert status == 303 and headers["location"] == "/login?next=%2Fdevices%2Fcam-1%3Fsince%3D900"
    status, headers, _ = send(fleet, "GET", "/", headers=bearer(tokens["read"]))
    csp = {d.split()[0]: d.split()[1:] for d in headers["content-security-policy"].split("; ")}
    assert status == 200 and csp["default-src"] == ["'self'"] and csp["script-src"] == ["'self'"]
    assert csp["style-src"] == ["'self'"] and csp["frame-ancestors"] == ["'none'"] and csp["object-src"] == ["'none'"]
    assert csp["base-uri"] == ["'none'"] and csp["form-action"] == ["'self'"]
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "same-origin"
    assert send(fleet, "GET", "/static/edgefleet.css")[0] == 200 and send(fleet, "GET", "/login")[0] == 200


def test_a_route_that_declares_no_role_is_refused_to_everybody(site):
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    fleet, tokens = site
    forgot = Route("/api/forgotten", lambda request: PlainTextResponse("secret"))
    fleet.app.router.routes.insert(0, forgot)
    try:
        status, _, body = send(fleet, "GET", "/api/forgotten", headers=bearer(tokens["admin"]))
        assert status == 403 and "declares no role" in json.loads(body)["error"]
    finally:
        fleet.app.router.routes.remove(forgot)


# -- the dashboard's cookie cannot write -------------------------------------------------------------------------


def sign_in(fleet, token: str) -> str:
    """POST the sign-in form as a browser would; returns the Cookie header to send back."""
    origin = f"https://{fleet.http_host}:{fleet.http_port}"
    status, headers, body = send(fleet, "POST", "/login", f"token={quote(token)}&next=%2F".encode(),
                                 {"Content-Type": "application/x-www-form-urlencoded", "Origin": origin})
    assert status == 303 and headers["location"] == "/", body
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" in cookie  # https
    assert cookie.startswith("__Host-")
    return cookie.split(";")[0]


def test_a_cross_site_form_post_with_the_cookie_cannot_write(site):
    fleet, tokens = site
    cookie = sign_in(fleet, tokens["admin"])
    assert send(fleet, "GET", "/api/status", headers={"Cookie": cookie})[0] == 200  # the cookie reads
    odd = 'other="{\\"a\\": 1}"; ' + cookie + "; x=="  # another app's cookies on the same host
    assert send(fleet, "GET", "/api/status", headers={"Cookie": odd})[0] == 200
    before = len(fleet_client(fleet).tokens())
    # what a page elsewhere can make a browser send: a "simple" text/plain POST, with the cookie
    status, _, body = send(fleet, "POST", "/api/tokens", b'{"role": "admin", "name": "csrf"}',
                           {"Content-Type": "text/plain", "Cookie": cookie})
    assert status in (401, 403, 415), body
    # the same as JSON: the cookie of an admin's session still only reads
    status, _, body = send(fleet, "POST", "/api/tokens", b'{"role": "admin", "name": "csrf"}',
                           {**JSON, "Cookie": cookie})
    assert status == 403 and "only reads" in json.loads(body)["error"]
    assert send(fleet, "GET", "/api/tokens", headers={"Cookie": cookie})[0] == 403
    # and a text/plain body is refused even with a token that may write
    status, _, body = send(fleet, "POST", "/api/tokens", b'{"role": "admin", "name": "csrf"}',
                           {"Content-Type": "text/plain", **bearer(tokens["admin"])})
    assert status == 415 and "application/json" in json.loads(body)["error"]
    assert len(fleet_client(fleet).tokens()) == before


def test_a_foreign_host_is_refused(site):
    fleet, tokens = site
    for host in ("evil.example", f"evil.example:{fleet.http_port}", "localhost.evil.example"):  # DNS rebinding
        status, _, body = send(fleet, "GET", "/api/status", headers={"Host": host, **bearer(tokens["admin"])})
        assert status == 400 and "does not answer to the host" in json.loads(body)["error"], host
        assert send(fleet, "GET", "/login", headers={"Host": host})[0] == 400, host
    for host in ("localhost", f"fleet.example:{fleet.http_port}", "controller.example:9999", "127.0.0.1",
                 "[::1]:80", "10.1.2.3"):
        assert send(fleet, "GET", "/api/status", headers={"Host": host, **bearer(tokens["read"])})[0] == 200, host


def test_a_write_from_another_origin_is_refused(site):
    fleet, tokens = site
    own = f"https://{fleet.http_host}:{fleet.http_port}"
    for origin in ("https://evil.example", "null", f"http://{fleet.http_host}:{fleet.http_port}",
                   f"https://{fleet.http_host}:{fleet.http_port + 1}"):
        status, _, body = send(fleet, "POST", "/api/tokens", b'{"role": "read", "name": "from-afar"}',
                               {**JSON, "Origin": origin, **bearer(tokens["admin"])})
        assert status == 403 and "is refused" in json.loads(body)["error"], origin
        status, _, _ = send(fleet, "POST", "/login", f"token={tokens['admin']}".encode(),
                            {"Content-Type": "application/x-www-form-urlencoded", "Origin": origin})
        assert status == 403, origin
    assert "from-afar" not in {t["name"] for t in fleet_client(fleet).tokens()}
    for name, origin in (("from-here", own), ("from-public", "https://controller.example:9999")):
        status, _, _ = send(fleet, "POST", "/api/tokens", f'{{"role": "read", "name": "{name}"}}'.encode(),
                            {**JSON, "Origin": origin, **bearer(tokens["admin"])})
        assert status == 201, origin


# -- bodies over their caps -----------------------------------------------------------------------------------


def test_an_upload_one_byte_over_the_cap_is_413_and_leaves_nothing(tmp_path, bundle):  # noqa: F811
    data = bundle.read_bytes()
    fleet = Fleet(tmp_path / "data", release_keys=[release_pub()], http_port=0, mqtt_listen="127.0.0.1:0",
                  max_bundle_bytes=len(data)).start_background()
    try:
        auth = {"Content-Type": "application/x-tar", **bearer(admin_token(fleet))}
        bundles = fleet.data_dir / "bundles"
        over = data + b"\0"
        status, _, body = send(fleet, "POST", "/api/bundles", over, auth)  # Content-Length says so
        assert status == 413 and f"at most {len(data)} bytes" in json.loads(body)["error"]
        status, _, body = send(fleet, "POST", "/api/bundles", b"",  # it says so before sending a byte
                               {**auth, "Content-Length": str(10 << 30)}, send_body=False)
        assert status == 413
        chunks = [over[i:i + 4096] for i in range(0, len(over), 4096)]
        status, _, body = send(fleet, "POST", "/api/bundles", headers=auth, chunks=chunks)  # no length: counted
        assert status == 413 and f"at most {len(data)} bytes" in json.loads(body)["error"]
        assert not bundles.exists() or list(bundles.iterdir()) == []
        status, _, body = send(fleet, "POST", "/api/bundles", headers=auth,  # at the cap: taken
                               chunks=[data[i:i + 4096] for i in range(0, len(data), 4096)])
        assert status == 200, body
        assert [p.name for p in bundles.iterdir()] == [f"{json.loads(body)['sha256']}.tar"]
    finally:
        fleet.stop()


def test_a_json_body_over_its_cap_is_413(site):
    from fleet.auth import MAX_JSON_BYTES

    fleet, tokens = site
    auth = {**JSON, **bearer(tokens["operator"])}
    big = b'{"bundle": "' + b"a" * (MAX_JSON_BYTES - 30) + b'", "targets": ["cam-1"]}' + b" " * 10
    assert len(big) > MAX_JSON_BYTES
    status, _, body = send(fleet, "POST", "/api/rollouts", big, auth, send_body=False)
    assert status == 413 and "at most" in json.loads(body)["error"]
    status, _, body = send(fleet, "POST", "/api/rollouts", headers=auth,
                           chunks=[big[i:i + 65536] for i in range(0, len(big), 65536)])
    assert status == 413 and "at most" in json.loads(body)["error"]


# -- markup in what devices say ------------------------------------------------------------------------------


class Elements(HTMLParser):
    """Every element's tag and attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, list]] = []

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, attrs))

    handle_startendtag = handle_starttag


def handlers(page: str) -> list[tuple[str, str]]:
    """(tag, attribute) of every on* attribute on any element of ``page``."""
    parser = Elements()
    parser.feed(page)
    return [(tag, k) for tag, attrs in parser.found for k, _ in attrs if k.lower().startswith("on")]


def report_bundle(tmp: Path, name: str, report: dict) -> Path:
    model = tmp / f"{name}.onnx"
    model.write_bytes(b"\0" * 512)
    (tmp / "sample.npz").write_bytes(b"\0" * 64)  # the smoke test's input must be one of the files
    m = Manifest(name=name, version="1.0", target="cpu", runtime="onnxruntime", precision="int8",
                 model="model.onnx", files=[], inputs=[TensorSpec(name="x", shape=[1, 4], dtype="float32")],
                 outputs=[TensorSpec(name="y", shape=[1, 2], dtype="float32")], report=report)
    path = tmp / f"{name}.tar"
    write_bundle(path, m, {"model.onnx": model, "sample.npz": tmp / "sample.npz"}, sign_key=release_key()[0])
    return path


def test_markup_from_devices_never_becomes_an_element(site, tmp_path):
    fleet, tokens = site
    client = fleet_client(fleet)
    attack = {}  # what was sent where -> the string (each one distinct, to find it on the page)

    def payload(where: str) -> str:
        attack[where] = f"<img src=x onerror=alert({len(attack)})>"
        return attack[where]

    # two bundles whose converter reports carry markup: one well typed, one not ("report unreadable")
    typed = client.upload_bundle(report_bundle(tmp_path, "typed", {
        "target": payload("report.target"), "variant": payload("report.variant"), "size_bytes": 100,
        "latency_ms": {"p50": 1.0, "p95": 2.0, "batch": 1, "settings": {"intra_op_threads": 2}},
        "gate": {"passed": True, "reason": payload("report.gate.reason")},
        "host": {"cpu": payload("report.host.cpu"), "cpus": 4, "machine": payload("report.host.machine")}}))
    untyped = client.upload_bundle(report_bundle(tmp_path, "untyped", {  # a number where markup is
        "target": "cpu", "latency_ms": {"p50": 1.0, "p95": 2.0, "settings": {"intra_op_threads": XSS}}}))

    def active(sha: str, **kw) -> protocol.ActiveModel:
        return protocol.ActiveModel(**{"name": "typed", "version": "1.0", "sha256": sha, "runtime": "onnxruntime",
                                       "precision": "int8", **kw})

    # one device a string (a state message replaces the last one's strings), each as its agent could send it
    sends = {
        "agent_version": lambda d: d.state(agent_version=payload("agent_version"), active=active(typed["sha256"])),
        "arch": lambda d: d.state(arch=payload("arch")),
        "cpu_flags": lambda d: d.state(cpu_flags=[payload("cpu_flags")]),
        "runtimes": lambda d: d.state(runtimes=[payload("runtimes")]),
        "active.name": lambda d: d.state(active=active(typed["sha256"], name=payload("active.name"))),
        "active.version": lambda d: d.state(active=active(typed["sha256"], version=payload("active.version"))),
        "active.runtime": lambda d: d.state(active=active(untyped["sha256"], runtime=payload("active.runtime"))),
        "active.precision": lambda d: d.state(active=active(untyped["sha256"], precision=payload("active.precision"))),
        "errors": lambda d: d.telemetry(1, errors={payload("errors"): 3}),
        "event.reason": lambda d: d.event(1, "error", reason=payload("event.reason")),
        "event.version": lambda d: d.event(1, "error", version=payload("event.version")),
        # and two devices that run the two bundles (the contract refuses markup in the fields above but for the
        # event reason: their states never reached a page; these show the converter reports)
        "report": lambda d: d.state(active=active(typed["sha256"])),
        "report-untyped": lambda d: d.state(active=active(untyped["sha256"])),
    }
    def taken() -> int:  # messages the controller stored or refused
        s = client.status()
        return s["received"] + sum(s["invalid"].values())

    devices, before = {}, taken()
    for i, (where, do) in enumerate(sends.items()):
        d = devices[where] = Device(fleet.broker_url, f"xss-{i}",
                                    issue_tls(fleet.pki, f"xss-{i}", tmp_path / "certs", fleet.store))
        d.state()
        do(d)
    try:
        wait_for(lambda: taken() - before >= 2 * len(sends), what="every device's messages")
        # a rollout whose device fails with markup for a reason: the rollout page shows it
        ro = client.create_rollout(typed["sha256"], ["xss-1"])
        devices["arch"].event(2, "failed", deployment_id=ro["waves"][0]["deployment_id"], sha256=typed["sha256"],
                              reason=payload("rollout.reason"))
        wait_for(lambda: [e["reason"] for e in client.health("xss-1")["events"][:1]] == [attack["rollout.reason"]],
                 what="the failure")
        with pytest.raises(EdgefleetError, match="must be a tag"):  # tags: refused by the API's contract
            client.tag("xss-1", [XSS])

        def page(path: str) -> str:
            status, _, body = send(fleet, "GET", path, headers=bearer(tokens["read"]))
            assert status == 200, (path, status)
            return body.decode()

        pages = {"/": page("/"), f"/rollouts/{ro['id']}": page(f"/rollouts/{ro['id']}")}
        pages |= {f"/devices/xss-{i}": page(f"/devices/xss-{i}") for i in range(len(sends))}
        everything = "".join(pages.values())
        shown = {where for where, text in attack.items() if escape(text, quote=False) in everything
                 or escape(text) in everything}
        # what the contract lets through reaches a page (shown as text), so each attack was made
        stored = json.dumps([client.devices(), [client.health(f"xss-{i}") for i in range(len(sends))]])
        assert {w for w, text in attack.items() if (text in stored and w not in NOT_SHOWN) or
                w.startswith("report.") or w == "rollout.reason"} <= shown, set(attack) - shown
        assert "report.gate.reason" in shown and "rollout.reason" in shown and "event.reason" in shown
        assert "Converter report unreadable" in pages[f"/devices/xss-{list(sends).index('report-untyped')}"]
        # what the wire contract refuses (a pattern without < or spaces) was never stored at all
        refused = {"agent_version", "arch", "cpu_flags", "runtimes", "active.name", "active.version",
                   "active.runtime", "active.precision", "errors", "event.version"}
        assert not [w for w in refused if attack[w] in stored], "the contract let markup through"
        for path, text in pages.items():
            assert handlers(text) == [], (path, handlers(text))
    finally:
        for d in devices.values():
            d.close()


# -- revocation -----------------------------------------------------------------------------------------------


def test_a_revoked_token_stops_at_once_and_ends_its_sessions(site):
    fleet, tokens = site
    admin = fleet_client(fleet)
    secret = admin.create_token("operator", "leaving")["token"]
    cookie = sign_in(fleet, secret)
    assert send(fleet, "GET", "/api/status", headers=bearer(secret))[0] == 200
    assert send(fleet, "GET", "/", headers={"Cookie": cookie})[0] == 200
    assert admin.revoke_token("leaving")["revoked"] is not None
    status, _, body = send(fleet, "GET", "/api/status", headers=bearer(secret))
    assert status == 401 and "not valid" in json.loads(body)["error"]
    status, headers, _ = send(fleet, "GET", "/", headers={"Cookie": cookie})
    assert status == 303 and headers["location"].startswith("/login")
    assert send(fleet, "GET", "/api/status", headers={"Cookie": cookie})[0] == 401
    status, _, _ = send(fleet, "POST", "/login", f"token={secret}".encode(),
                        {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 401  # nor can it sign in again
    entries = admin.audit(limit=20)["entries"]
    assert any(e["action"] == "DELETE /api/tokens/{name}" and e["target"] == "leaving" and e["status"] == 200
               and e["actor"] == "admin" for e in entries)
    assert any(e["action"] == "login" and e["actor"] == "leaving" for e in entries)
    assert time.time() - entries[0]["time"] < 3600
