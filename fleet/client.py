"""A small client of the controller's JSON API (urllib only), used by the CLI and the tests."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from agent.errors import EdgefleetError

DEFAULT_SERVER = "https://127.0.0.1:8080"


class FleetClient:
    def __init__(self, server_url: str = DEFAULT_SERVER, timeout: float = 60.0, *, ca: str | None = None) -> None:
        self.server_url = server_url.rstrip("/")
        self.timeout = timeout
        self.ca = ca  # the fleet CA (DATA/pki/ca.crt) an https:// controller's certificate must chain to
        self._context = None
        if ca is not None:
            import ssl

            self._context = ssl.create_default_context(cafile=ca)

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

    def deploy(self, sha256: str, devices: list[str]) -> dict[str, Any]:
        body = json.dumps({"bundle": sha256, "devices": list(devices)}).encode()
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

    def devices(self, targets: list[str] | None = None) -> list[dict[str, Any]]:
        """Every device, or those the targets (device ids, tag:NAME, all) name."""
        query = urllib.parse.urlencode([("target", t) for t in targets or ()])
        return self._call("GET", "/api/devices" + (f"?{query}" if query else ""))

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

    def health(self, device: str | None = None, *, tag: str | None = None, status: str | None = None,
               sort: str | None = None, order: str | None = None) -> Any:
        """All devices' health (a list; filtered by tag/status, sorted), or one device's report (a dict)."""
        if device is None:
            query = urllib.parse.urlencode({k: v for k, v in (("tag", tag), ("status", status), ("sort", sort),
                                                              ("order", order)) if v is not None})
            return self._call("GET", "/api/health" + (f"?{query}" if query else ""))
        return self._call("GET", f"/api/health/{urllib.parse.quote(device, safe='')}")

    # enrollment and revocation (fleet/api_enroll.py)
    def create_enrollment(self, device_id: str | None = None, ttl_s: float = 3600.0, count: int = 1,
                          prefix: str = "") -> dict[str, Any]:
        """A one-time token for ``device_id``, or a provisioning token for ``count`` devices (ids with ``prefix``)."""
        body = {"ttl_s": ttl_s, **({"device_id": device_id} if device_id else {"count": count, "prefix": prefix})}
        return self._call("POST", "/api/enrollments", json.dumps(body).encode(), {"Content-Type": "application/json"})

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
        url = self.server_url + path
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._context) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise EdgefleetError(_server_error(e)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
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
