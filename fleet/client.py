"""A small client of the controller's JSON API (urllib only), used by the CLI and the tests.

Every call sends the token (``Authorization: Bearer ...``); over https the controller's certificate is
checked against ``ca`` (the fleet CA, ``DATA/pki/ca.crt``) or, without one, the system's CAs.
``FleetClient.configured()`` takes each setting from its argument, else its environment variable, else the
controller's data dir (``--data``/``EDGEFLEET_DATA``: ``controller.json``, ``admin.token``, ``pki/ca.crt``).
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.errors import EdgefleetError

DEFAULT_SERVER = "https://127.0.0.1:8080"
PAGE = 1000  # entries a listing request asks for (the API's most: fleet.paging.MAX_LIMIT)
NEEDS_TOKEN = ("needs a token: set EDGEFLEET_TOKEN or --data DIR (the controller's data dir, which holds "
               "admin.token), or give --token")


class FleetClient:
    def __init__(self, server_url: str = DEFAULT_SERVER, timeout: float = 60.0, *, token: str | None = None,
                 ca: str | os.PathLike | None = None) -> None:
        self.server_url = server_url.rstrip("/")
        self.timeout = timeout
        self.token = token.strip() if token else None
        self.ca = Path(ca) if ca else None
        self._context: ssl.SSLContext | None = None
        if self.ca is not None:
            if not self.ca.is_file():
                raise EdgefleetError(f"{self.ca}: no such CA certificate file")
            try:
                self._context = ssl.create_default_context(cafile=str(self.ca))
            except (ssl.SSLError, OSError) as e:
                raise EdgefleetError(f"{self.ca}: not a CA certificate in PEM ({e})") from None

    @classmethod
    def configured(cls, server: str | None = None, token: str | None = None, ca: str | os.PathLike | None = None,
                   data: str | os.PathLike | None = None, env: Mapping[str, str] = os.environ,
                   **kw: Any) -> "FleetClient":
        """A client from explicit settings, else EDGEFLEET_SERVER/TOKEN/CA, else the data dir
        (``data`` or EDGEFLEET_DATA), else the defaults (https://127.0.0.1:8080, no token, the system's CAs)."""
        data = data or env.get("EDGEFLEET_DATA")
        d = Path(data) if data else None
        if d is not None and not d.is_dir():
            raise EdgefleetError(f"{d}: no such controller data dir")
        server = server or env.get("EDGEFLEET_SERVER")
        if not server and d is not None and (d / "controller.json").is_file():
            try:
                server = json.loads((d / "controller.json").read_text())["http"]
            except (ValueError, KeyError, TypeError, OSError) as e:
                raise EdgefleetError(f"{d / 'controller.json'}: unreadable ({e})") from None
        token = token or env.get("EDGEFLEET_TOKEN")
        if not token and d is not None and (d / "admin.token").is_file():
            try:
                token = (d / "admin.token").read_text().strip()
            except OSError as e:
                raise EdgefleetError(f"{d / 'admin.token'}: {e.strerror or e}") from None
        ca = ca or env.get("EDGEFLEET_CA")
        if not ca and d is not None and (d / "pki" / "ca.crt").is_file():
            ca = d / "pki" / "ca.crt"
        return cls(server or DEFAULT_SERVER, token=token, ca=ca, **kw)

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/api/status")

    def upload_bundle(self, path: str | os.PathLike) -> dict[str, Any]:
        """Upload a bundle file; returns {"sha256", "size", "manifest"}."""
        path = Path(path)
        if not path.is_file():
            raise EdgefleetError(f"{path}: no such bundle file")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return self._call("POST", "/api/bundles", f,
                              {"Content-Type": "application/x-tar", "Content-Length": str(size)})

    def deploy(self, sha256: str, devices: list[str], rollback: bool = False) -> dict[str, Any]:
        """Deploy at once; ``rollback``: the devices are sent back to an older bundle on purpose (signed so)."""
        body = json.dumps({"bundle": sha256, "devices": list(devices), **({"rollback": True} if rollback else {})
                           }).encode()
        return self._call("POST", "/api/deployments", body, {"Content-Type": "application/json"})

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/deployments/{urllib.parse.quote(deployment_id, safe='')}")

    # rollouts (fleet/api_rollouts.py): options as in fleet.rollout.options()
    def create_rollout(self, sha256: str, targets: list[str], **options: Any) -> dict[str, Any]:
        body = json.dumps({"bundle": sha256, "targets": list(targets), **options}).encode()
        return self._call("POST", "/api/rollouts", body, {"Content-Type": "application/json"})

    def rollouts(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/rollouts")

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/rollouts/{urllib.parse.quote(rollout_id, safe='')}")

    def rollout_action(self, rollout_id: str, action: str) -> dict[str, Any]:
        """pause, resume, abort or rollback."""
        return self._call("POST", f"/api/rollouts/{urllib.parse.quote(rollout_id, safe='')}/"
                                  f"{urllib.parse.quote(action, safe='')}", b"")

    def devices(self, targets: list[str] | None = None, *, limit: int | None = None, **filters: str | None
                ) -> list[dict[str, Any]]:
        """Every device (or the first ``limit``), or those the targets (device ids, tag:NAME, all) name; ``filters``:
        status, tag, model, version, prefix (of the id). Follows the API's pages to the end."""
        return self._pages("/api/devices", [("target", t) for t in targets or ()], filters, limit)

    def tag(self, device: str, add: list[str] = (), remove: list[str] = ()) -> dict[str, Any]:
        """Add and remove a device's tags; returns {"device_id", "tags"}."""
        body = json.dumps({"add": list(add), "remove": list(remove)}).encode()
        return self._call("POST", f"/api/devices/{urllib.parse.quote(device, safe='')}/tags", body,
                          {"Content-Type": "application/json"})

    def set_tags(self, device: str, tags: list[str]) -> dict[str, Any]:
        """Replace a device's tags."""
        body = json.dumps({"tags": list(tags)}).encode()
        return self._call("PUT", f"/api/devices/{urllib.parse.quote(device, safe='')}/tags", body,
                          {"Content-Type": "application/json"})

    # model quality (fleet/api_quality.py, fleet/quality.py): times are unix seconds, the window [since, until)
    def device_quality(self, device: str, since: float | None = None, until: float | None = None,
                       sha256: str | None = None) -> dict[str, Any]:
        """One device's drift, canary and feedback figures on one bundle (its active one by default)."""
        query = urllib.parse.urlencode({k: v for k, v in (("since", since), ("until", until), ("sha256", sha256))
                                        if v is not None})
        return self._call("GET", f"/api/devices/{urllib.parse.quote(device, safe='')}/quality"
                                 + (f"?{query}" if query else ""))

    def quality(self, since: float | None = None, until: float | None = None, limit: int | None = None,
                offset: int | None = None) -> dict[str, Any]:
        """Every device's quality summary, worst first (a page)."""
        query = urllib.parse.urlencode({k: v for k, v in (("since", since), ("until", until), ("limit", limit),
                                                          ("offset", offset)) if v is not None})
        return self._call("GET", "/api/quality" + (f"?{query}" if query else ""))

    def health(self, device: str | None = None, *, tag: str | None = None, status: str | None = None,
               sort: str | None = None, order: str | None = None, limit: int | None = None,
               **filters: str | None) -> Any:
        """All devices' health (a list, or its first ``limit`` entries; filtered by tag/status/model/version/prefix,
        sorted; the API's pages followed to the end), or one device's report (a dict)."""
        if device is None:
            return self._pages("/api/health", [(k, v) for k, v in (("sort", sort), ("order", order)) if v is not None],
                               {"tag": tag, "status": status, **filters}, limit)
        return self._call("GET", f"/api/health/{urllib.parse.quote(device, safe='')}")

    def _pages(self, path: str, params: list[tuple[str, str]], filters: dict[str, str | None],
               limit: int | None) -> list[dict[str, Any]]:
        """A listing's entries (``fleet.paging``): page after page, following ``next``, until the end or ``limit``."""
        params = [*params, *((k, v) for k, v in filters.items() if v is not None)]
        out: list[dict[str, Any]] = []
        cursor = None
        while limit is None or len(out) < limit:
            size = PAGE if limit is None else min(PAGE, limit - len(out))
            query = [*params, ("limit", str(size)), *((("cursor", cursor),) if cursor else ())]
            doc = self._call("GET", f"{path}?{urllib.parse.urlencode(query)}")
            out += doc["devices"]
            cursor = doc["next"]
            if cursor is None:
                break
        return out

    def tokens(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/tokens")

    def create_token(self, role: str, name: str | None = None) -> dict[str, Any]:
        """A new token; its secret is the answer's ``token`` (shown this once)."""
        body = json.dumps({"role": role, **({"name": name} if name is not None else {})}).encode()
        return self._call("POST", "/api/tokens", body, {"Content-Type": "application/json"})

    def revoke_token(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/api/tokens/{urllib.parse.quote(name, safe='')}")

    def audit(self, limit: int | None = None, before: int | None = None) -> dict[str, Any]:
        """A page of the audit trail, newest first: {"entries": [...], "next": the next page's before}."""
        query = urllib.parse.urlencode({k: v for k, v in (("limit", limit), ("before", before)) if v is not None})
        return self._call("GET", "/api/audit" + (f"?{query}" if query else ""))
    # release keys (fleet/api_keys.py) and bundles
    def bundles(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/bundles")

    def keys(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/keys")

    def add_key(self, pem: str, name: str | None = None, statement: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"key": pem, **({"name": name} if name else {}),
                           **({"statement": statement} if statement is not None else {})}).encode()
        return self._call("POST", "/api/keys", body, {"Content-Type": "application/json"})

    def remove_key(self, keyid: str) -> dict[str, Any]:
        return self._call("DELETE", f"/api/keys/{urllib.parse.quote(keyid, safe='')}")

    # enrollment and revocation (fleet/api_enroll.py)
    def create_enrollment(self, device_id: str, ttl_s: float = 3600.0) -> dict[str, Any]:
        """A one-time token that enrolls ``device_id``; its secret is the answer's ``token`` (shown this once)."""
        body = json.dumps({"device_id": device_id, "ttl_s": ttl_s}).encode()
        return self._call("POST", "/api/enrollments", body, {"Content-Type": "application/json"})

    def create_provisioning(self, count: int, ttl_s: float = 7 * 86400.0, prefix: str = "") -> dict[str, Any]:
        """A token ``count`` devices flashed from one image enroll with, under ids starting with ``prefix``."""
        body = json.dumps({"count": count, "ttl_s": ttl_s, "prefix": prefix}).encode()
        return self._call("POST", "/api/provisioning", body, {"Content-Type": "application/json"})

    def enrollments(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/enrollments")

    def revoke_enrollment(self, token_id: str) -> dict[str, Any]:
        return self._call("POST", f"/api/enrollments/{urllib.parse.quote(token_id, safe='')}/revoke", b"{}",
                          {"Content-Type": "application/json"})

    def revoke(self, device: str) -> dict[str, Any]:
        """Revoke a device's identity: it is disconnected and can no longer connect, download or renew."""
        return self._call("POST", f"/api/devices/{urllib.parse.quote(device, safe='')}/revoke", b"{}",
                          {"Content-Type": "application/json"})

    def certificates(self, device: str | None = None) -> list[dict[str, Any]]:
        query = f"?{urllib.parse.urlencode({'device': device})}" if device else ""
        return self._call("GET", f"/api/certificates{query}")

    def _call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        if self.token is None:
            raise EdgefleetError(f"the controller's API at {self.server_url} {NEEDS_TOKEN}")
        url = self.server_url + path
        req = urllib.request.Request(url, data=body, method=method,
                                     headers={**(headers or {}), "Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._context) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise EdgefleetError(_server_error(e)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise EdgefleetError(
                    f"the controller at {self.server_url} has a certificate this client does not trust "
                    f"({reason.verify_message}): give its CA with --ca FILE or EDGEFLEET_CA (the controller's "
                    f"DATA/pki/ca.crt)") from None
            raise EdgefleetError(
                f"cannot reach the controller at {self.server_url} ({reason}; is `edgefleet fleet serve` "
                f"running? set --server or EDGEFLEET_SERVER)") from None
        except ValueError as e:
            raise EdgefleetError(f"{url} did not answer with JSON: {e}") from None


def _server_error(e: urllib.error.HTTPError) -> str:
    try:
        doc = json.loads(e.read())
        if isinstance(doc, dict) and doc.get("error"):
            return str(doc["error"])
    except (ValueError, OSError):
        pass
    return f"the controller answered {e.code} {e.reason} to {e.url}"
