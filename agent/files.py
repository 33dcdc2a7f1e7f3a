"""Files written whole or not at all: a temporary file beside the target, fsynced, then renamed over it, so a
crash or a full disk leaves the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (mode ``mode`` from the first byte on: a key is never readable by others)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_new(path: str | os.PathLike, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path``, which must not exist (FileExistsError if it does, even if it appears
    meanwhile): written whole beside it, fsynced, then hard-linked into place. For keys: never over another."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
