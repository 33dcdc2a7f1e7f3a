"""Root's side of the device's trust store: putting release keys into ``trust_dir`` and taking them out
(``agent trust add|remove``, ``agent enroll --trust``, ``agent install --trust``). The agent only reads the
directory (agent/trust.py); under systemd it cannot write it (root-owned, 0755/0644, ProtectSystem=strict).

Each key is written as ``trust_dir/NAME.pub`` (its PEM as agent/signing.py writes it), atomically and never over
another key's file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from agent import signing
from agent.errors import EdgefleetError
from agent.files import write_new

DIR_MODE, FILE_MODE = 0o755, 0o644


class TrustDirError(EdgefleetError):
    pass


def read_keys(paths: Iterable[str | os.PathLike]) -> list[signing.PublicKey]:
    """Each file as an ed25519 public key (SigningError, one line, for one that is not); two different keys
    under one name are refused here, before anything is written."""
    keys: list[signing.PublicKey] = []
    for p in paths:
        key = signing.load_public(p)
        same = next((k for k in keys if k.name == key.name), None)
        if same is not None and same.keyid != key.keyid:
            raise TrustDirError(f"two different keys are both named {key.name} ({same.keyid}, {key.keyid}): rename "
                                f"one file")
        if same is None:
            keys.append(key)
    return keys


def trusted_files(trust_dir: Path) -> dict[Path, signing.PublicKey]:
    """The readable keys in trust_dir (a file that is not one is left out: `agent trust list` names it)."""
    out = {}
    try:
        files = sorted(p for p in trust_dir.iterdir() if p.suffix == ".pub")
    except FileNotFoundError:
        return out
    except OSError as e:
        raise TrustDirError(f"cannot read {trust_dir}: {e.strerror or e}") from None
    for p in files:
        try:
            out[p] = signing.load_public(p)
        except signing.SigningError:
            continue
    return out


def add(trust_dir: str | os.PathLike, key: signing.PublicKey) -> tuple[Path, bool]:
    """Put ``key`` into trust_dir as NAME.pub (0644; the directory made 0755 if missing). Returns (its file, True)
    when written, (the file that has it, False) when it is there already. A different key under NAME is refused."""
    trust_dir = Path(trust_dir)
    for path, have in trusted_files(trust_dir).items():
        if have.keyid == key.keyid:
            return path, False
    path = trust_dir / f"{key.name}.pub"
    if path.exists():
        raise TrustDirError(f"{path} holds another key: remove it first (edgefleet agent trust remove {key.name}) or "
                            f"name this one differently")
    try:
        if not trust_dir.is_dir():
            trust_dir.mkdir(parents=True, mode=DIR_MODE)
            os.chmod(trust_dir, DIR_MODE)  # whatever the umask
        write_new(path, key.pem.encode(), FILE_MODE)
    except OSError as e:
        raise TrustDirError(f"cannot write {path}: {e.strerror or e}"
                            f"{' (run as root)' if e.errno in (1, 13) and os.geteuid() else ''}") from None
    return path, True


def remove(trust_dir: str | os.PathLike, which: str) -> list[tuple[Path, signing.PublicKey]]:
    """Delete the files in trust_dir holding the key whose id (or name) is ``which``; returns what was removed,
    [] if no file holds it."""
    gone = []
    for path, key in trusted_files(Path(trust_dir)).items():
        if which in (key.keyid, key.name):
            try:
                path.unlink()
            except OSError as e:
                raise TrustDirError(f"cannot remove {path}: {e.strerror or e}"
                                    f"{' (run as root)' if e.errno in (1, 13) and os.geteuid() else ''}") from None
            gone.append((path, key))
    return gone
