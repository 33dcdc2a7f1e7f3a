"""Files written whole or not at all: a temporary file beside the target, fsynced, then renamed over it, so a
crash or a full disk leaves the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (mode ``mode`` from the first byte on: a key is never readable by others)."""
    _place(Path(path), data, mode, os.replace)


def write_new(path: str | os.PathLike, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path``, which must not exist (FileExistsError if it does, even if it appears
    meanwhile): written whole beside it, fsynced, then hard-linked into place. For keys: never over another."""
    _place(Path(path), data, mode, os.link)


def _place(path: Path, data: bytes, mode: int, put) -> None:
    """Write ``data`` to a temporary file beside ``path`` (``mode`` from the start), fsync it, then
    ``put(tmp, path)`` (rename over it, or link it in); the temporary name never stays behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        put(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # after a rename: already gone
