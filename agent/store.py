"""The agent's state directory: downloads, verified models, and the ``current``/``previous`` links.

    STATE_DIR/downloads/<sha>.part   a download in progress (resumed with HTTP Range)
    STATE_DIR/downloads/<sha>.tar    a complete, verified bundle
    STATE_DIR/models/<sha>/          an unpacked, verified bundle (manifest.json + files)
    STATE_DIR/current -> models/<sha>    switched atomically with os.replace
    STATE_DIR/previous -> models/<sha>
    STATE_DIR/active.json            which deployment made ``current`` active

Every method that puts a sha256 into a path refuses anything but 64 lowercase hex digits (whatever its
caller checked before), and nothing is ever removed outside ``models/`` and ``downloads/``.

The state dir holds the two models (``current`` and ``previous``), the outbox, and while an update runs its
download and unpack; ``collect`` removes everything else (at start, when a desired model arrives, after each
update), and ``check_room`` refuses an update that would not fit before a byte of it is written.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from agent import storage
from agent.bundle import MANIFEST, BundleError, Manifest, decode_manifest, safe_unpack, verify_file
from agent.errors import EdgefleetError
from agent.protocol import SHA256_RE, check_sha256


class DownloadError(EdgefleetError):
    """The network failed a download: tried again later (the partial download is kept to be resumed)."""


class StorageError(EdgefleetError):
    """The state dir took no more of an update (full or read-only): the update fails, and is not retried."""


class NoRoom(StorageError):
    """An update would not fit in the state dir's free space; the message names both figures."""


class ModelStore:
    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir)
        self.downloads = self.root / "downloads"
        self.models = self.root / "models"
        # HTTPS: the fleet CA to trust and this device's certificate to show (the agent sets it once enrolled)
        self.http_context: Callable[[], ssl.SSLContext | None] = lambda: None

    def open(self) -> None:
        """Create the layout and clear what a crash can leave half-done (temp dirs, stale links). On a state dir
        that takes no writes (full, read-only) what cannot be cleared stays, for the next start."""
        for d in (self.root, self.downloads, self.models):
            d.mkdir(parents=True, exist_ok=True)
        for tmp in self.models.glob(".*.part"):
            shutil.rmtree(tmp, ignore_errors=True)
        for tmp in self.root.glob(".*.link"):
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass

    # --- links -------------------------------------------------------------------------------
    def _link(self, name: str) -> tuple[str, Path] | None:
        link = self.root / name
        try:
            target = os.readlink(link)
        except OSError:
            return None
        path = (self.root / target).resolve()
        if path.parent != self.models.resolve() or not SHA256_RE.fullmatch(path.name):
            return None  # not one of ours: nothing the agent made points outside models/
        if not (path / MANIFEST).is_file():
            return None
        return path.name, path

    def current(self) -> tuple[str, Path] | None:
        """(sha256, model dir) of the active model, or None."""
        return self._link("current")

    def previous(self) -> tuple[str, Path] | None:
        return self._link("previous")

    def manifest(self, model_dir: Path) -> Manifest:
        return decode_manifest((model_dir / MANIFEST).read_bytes())

    def activate(self, sha: str, deployment_id: str | None, reported: bool = True) -> None:
        """Point ``current`` at models/<sha> atomically (the old current becomes ``previous``), then
        record which deployment made it current."""
        self.switch(sha)
        self.record_active(sha, deployment_id, reported)

    def switch(self, sha: str) -> None:
        """The atomic step: ``current`` -> models/<sha>; the old current becomes ``previous``."""
        old = self.current()
        if old and old[0] != sha:
            self._set_link("previous", old[0])
        self._set_link("current", sha)

    def record_active(self, sha: str, deployment_id: str | None, reported: bool) -> None:
        """Which deployment made <sha> current, and whether its ``active`` event was queued yet."""
        check_sha256(sha)
        self._write_json("active.json", {"sha256": sha, "deployment_id": deployment_id, "reported": reported})

    def active_info(self) -> dict:
        try:
            return json.loads((self.root / "active.json").read_text())
        except (OSError, ValueError):
            return {}

    def deployment_id(self) -> str | None:
        data = self.active_info()
        cur = self.current()
        return data.get("deployment_id") if cur and data.get("sha256") == cur[0] else None

    def _set_link(self, name: str, sha: str) -> None:
        check_sha256(sha)
        tmp = self.root / f".{name}.link"
        tmp.unlink(missing_ok=True)
        os.symlink(f"models/{sha}", tmp)
        os.replace(tmp, self.root / name)
        _fsync_dir(self.root)

    def _write_json(self, name: str, data: dict) -> None:
        tmp = self.root / f".{name}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / name)
        _fsync_dir(self.root)

    # --- downloads and unpacking --------------------------------------------------------------
    def download(self, url: str, sha: str, size: int, timeout: float = 30.0,
                 on_block: Callable[[int], None] | None = None,
                 check_redirect: Callable[[str], None] | None = None) -> Path:
        """Fetch a bundle to downloads/<sha>.part, resuming a partial download with HTTP Range.

        ``check_redirect(url)`` is called before a redirect is followed and may raise to refuse it."""
        check_sha256(sha)
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):  # urllib would open file:, data:, ftp:
            raise EdgefleetError(f"refusing to download {url[:200]!r}: not an http(s) URL")
        done = self.downloads / f"{sha}.tar"
        part = self.downloads / f"{sha}.part"
        if done.exists():
            return done
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        if have < size:
            req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
            try:
                with _opener(check_redirect, self.http_context()).open(req, timeout=timeout) as resp:
                    if have and resp.status != 206:  # the server ignored Range: start over
                        have = 0
                    with open(part, "ab" if have else "wb") as out:
                        while block := resp.read(1 << 16):
                            out.write(block)
                            out.flush()
                            if on_block:
                                on_block(out.tell())
                            if out.tell() > size:
                                break
                        os.fsync(out.fileno())
            except urllib.error.HTTPError as e:
                raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, OSError) as e:
                if storage.kind_of(e):  # our side: the disk, not the network (retrying will not help)
                    raise StorageError(self.describe(e, "downloading")) from None
                reason = getattr(e, "reason", e)
                raise DownloadError(f"download of {url} failed: {reason}") from None
        return part

    def verify_download(self, sha: str, size: int) -> Path:
        """Check downloads/<sha>.part against size and sha256 and make it downloads/<sha>.tar."""
        check_sha256(sha)
        done = self.downloads / f"{sha}.tar"
        if done.exists():
            return done
        part = self.downloads / f"{sha}.part"
        try:
            verify_file(part, size, sha)
        except BundleError:
            part.unlink(missing_ok=True)  # a wrong byte cannot be resumed away: start over next time
            raise
        os.replace(part, done)
        return done

    def unpack(self, sha: str, bundle: Path, on_member: Callable[[str], None] | None = None) -> Path:
        """Unpack a verified bundle to models/<sha> (reusing a complete earlier unpack)."""
        dest = self.models / check_sha256(sha)
        if (dest / MANIFEST).is_file() and not dest.is_symlink():
            return dest
        self._remove_model(sha)
        try:
            safe_unpack(bundle, dest, on_member=on_member)  # leaves nothing behind when it fails
        except OSError as e:
            if storage.kind_of(e):
                raise StorageError(self.describe(e, "unpacking")) from None
            raise
        return dest

    def describe(self, e: OSError, doing: str) -> str:
        """One line for a write the state dir refused: what, why, and the room left."""
        try:
            free = f"{storage.human(storage.free_bytes(self.root))} free on {self.root}"
        except OSError:
            free = str(self.root)
        return f"{doing}: {e.strerror or e} ({free})"

    def check_room(self, sha: str, size: int, reserve: int) -> None:
        """Raise NoRoom unless the rest of the download of bundle <sha> (``size`` bytes, less what a partial
        download already holds) and its unpack (an uncompressed tar unpacks to about its size), plus ``reserve``,
        fit in the free space; StorageError when the state dir takes no writes. Writes nothing but a probe."""
        check_sha256(sha)
        kind, why = storage.probe(self.root)  # a filesystem the kernel turned read-only is not mounted so
        if kind == storage.READ_ONLY or storage.mounted_read_only(self.root):
            raise StorageError(f"the state dir {self.root} takes no writes: {why or 'mounted read-only'}")
        done = (self.downloads / f"{sha}.tar").is_file()
        part = self.downloads / f"{sha}.part"
        have = size if done else min(part.stat().st_size if part.is_file() else 0, size)
        unpacked = (self.models / sha / MANIFEST).is_file()
        download, unpack = size - have, 0 if unpacked else size
        need = download + unpack + reserve
        free = storage.free_bytes(self.root)
        if need <= free and kind is None:
            return
        h = storage.human
        held = f", {h(have)} of it downloaded" if have and not done else (", downloaded" if done else "")
        unpack_text = "already unpacked" if unpacked else f"unpacked ~{h(unpack)}"
        raise NoRoom(f"needs {h(need)} (bundle {h(size)}{held}, {unpack_text}, reserve {h(reserve)}) but {h(free)} "
                     f"is free on {self.root}")

    def collect(self, keep: str | None = None, downloads: bool = True) -> list[str]:
        """Garbage-collect the state dir: remove every model but ``current``'s and ``previous``'s, every
        half-unpacked directory, and every download but ``keep``'s (the desired bundle, whose partial download
        may be resumed and whose unpack may be reused: its model is kept too). ``downloads=False`` (at start,
        before the desired model is known) leaves the downloads of other bundles (and their unpacks) alone but for
        those of current and previous, which are unpacked already. Returns the names removed; what the disk
        refuses to remove (read-only) stays."""
        if keep is not None:
            check_sha256(keep)
        linked = {x[0] for x in (self.current(), self.previous()) if x}
        keep_models = linked | ({keep} if keep else set())
        if not downloads:  # a download that waits for the desired state keeps its unpack too
            keep_models |= {e.name.rsplit(".", 1)[0] for e in self.downloads.glob("*.*")
                            if e.suffix in (".part", ".tar")} - linked
        removed: list[str] = []
        for entry in list(self.models.iterdir()) if self.models.is_dir() else []:
            if entry.name in keep_models and entry.is_dir() and not entry.is_symlink():
                continue
            if _remove(entry):
                removed.append(f"models/{entry.name}")
        for entry in list(self.downloads.iterdir()) if self.downloads.is_dir() else []:
            sha = entry.name.rsplit(".", 1)[0]
            if keep is not None and sha == keep and entry.suffix in (".part", ".tar") and entry.is_file():
                continue
            if not downloads and sha not in linked and entry.suffix in (".part", ".tar"):
                continue
            if _remove(entry):
                removed.append(f"downloads/{entry.name}")
        return removed

    def discard(self, sha: str) -> None:
        """Remove a bundle that failed, unless a link still points at it."""
        check_sha256(sha)
        keep = {x[0] for x in (self.current(), self.previous()) if x}
        if sha in keep:
            return
        try:
            self._remove_model(sha, ignore_errors=True)
        except OSError:
            pass
        for name in (f"{sha}.tar", f"{sha}.part"):
            _remove(self.downloads / name)  # a read-only disk keeps it: collect() takes it at a later start

    def _remove_model(self, sha: str, ignore_errors: bool = False) -> None:
        """Remove models/<sha>: only ever a directory right inside models/ (a link there is unlinked, never
        followed)."""
        path = self.models / check_sha256(sha)
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            if path.resolve().parent != self.models.resolve():
                raise EdgefleetError(f"refusing to remove {path}: it is not inside {self.models}")
            shutil.rmtree(path, ignore_errors=ignore_errors)


def _remove(path: Path) -> bool:
    """Remove a file, a link (never followed) or a directory tree; False when the disk refused."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)
    except OSError:
        return False
    return True


def _opener(check_redirect: Callable[[str], None] | None,
            context: ssl.SSLContext | None = None) -> urllib.request.OpenerDirector:
    """urllib that asks ``check_redirect`` before it follows a redirect, and speaks HTTPS with ``context`` (the
    fleet CA to trust, this device's certificate to show)."""
    class Redirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if check_redirect is not None:
                check_redirect(newurl)
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    handlers = [Redirect] + ([urllib.request.HTTPSHandler(context=context)] if context is not None else [])
    return urllib.request.build_opener(*handlers)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
