"""Whether the state dir takes writes, and how much room it has: what the outbox, the store and the updater ask.

The state dir is either "ok", "full" (ENOSPC, EDQUOT) or "read_only" (EROFS: a read-only mount, or a
filesystem the kernel remounted read-only after an I/O error, which ``statvfs`` does not show) — the values of
``protocol.StorageState``. A failed write says which, by its errno; SQLite does not pass the errno on, so after
an I/O error the directory itself is probed with a small write (``probe``).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

FULL = "full"
READ_ONLY = "read_only"
_KINDS = {errno.ENOSPC: FULL, errno.EDQUOT: FULL, errno.EROFS: READ_ONLY}
PROBE_BYTES = 4096  # a page: what a full filesystem refuses even when it still has an inode


def kind_of(e: BaseException) -> str | None:
    """"full" or "read_only" when ``e`` is an OSError saying the filesystem takes no writes; else None."""
    return _KINDS.get(getattr(e, "errno", None)) if isinstance(e, OSError) else None


def free_bytes(directory: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on ``directory``'s filesystem (the agent runs as its own user)."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def mounted_read_only(directory: str | os.PathLike) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the filesystem ``path`` is on (``/`` at worst)."""
    p = Path(os.path.realpath(path))
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def probe(directory: str | os.PathLike) -> tuple[str | None, str]:
    """Write, fsync and remove a page-sized file in ``directory``: (None, "") when that works, else ("full" or
    "read_only", the error). Another error (EIO, EACCES...) is not a storage condition this module names:
    (None, the error)."""
    path = Path(directory) / f".storage-probe-{os.getpid()}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        return kind_of(e), e.strerror or str(e)
    finally:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
    return None, ""


def human(n: float) -> str:
    """Bytes in binary units with one decimal: 512 B, 14.0 MiB, 2.5 GiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")
