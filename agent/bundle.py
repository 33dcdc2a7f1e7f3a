"""The bundle: a tar of ``manifest.json`` and model files, addressed by the sha256 of the tar.

The converter writes bundles with :func:`write_bundle`; the agent and the fleet check them with
:func:`read_manifest`, :func:`verify_file` and :func:`safe_unpack`. Nothing here imports a runtime.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import msgspec

from agent.errors import EdgefleetError

FORMAT = 1
MANIFEST = "manifest.json"
SAMPLE = "sample.npz"
MAX_MANIFEST_BYTES = 4 << 20


class BundleError(EdgefleetError, ValueError):
    """A bundle that is not well-formed or does not match what it claims; the message says why."""


class _S(msgspec.Struct, forbid_unknown_fields=True):
    pass


class FileEntry(_S):
    path: str
    sha256: str
    size: int


class TensorSpec(_S):
    name: str
    shape: list[int]  # -1 where a dimension is dynamic
    dtype: str  # numpy dtype name: float32, int32, uint8, ...


class Manifest(_S):
    name: str
    version: str
    target: Literal["cpu", "intel", "arm"]
    runtime: str  # the agent's runtime plugin: onnxruntime | openvino | tflite
    precision: str  # fp32 | fp16 | int8 | ...
    model: str  # path of the main model file inside the bundle
    files: list[FileEntry]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    sample: str = SAMPLE  # npz with one array per input, for the smoke test
    latency_budget_ms: float | None = None  # smoke inference must finish within this
    settings: dict[str, Any] = {}  # runtime settings, e.g. {"intra_op_threads": 1}
    report: dict[str, Any] = {}  # the converter's measurements of this variant
    source_sha256: str = ""
    created: str = ""
    format: int = FORMAT


_manifest_decoder = msgspec.json.Decoder(Manifest)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def encode_manifest(manifest: Manifest) -> bytes:
    return msgspec.json.format(msgspec.json.encode(manifest), indent=2)


def decode_manifest(data: bytes) -> Manifest:
    try:
        m = _manifest_decoder.decode(data)
    except msgspec.ValidationError as e:
        raise BundleError(f"invalid manifest: {e}") from None
    except msgspec.DecodeError as e:
        raise BundleError(f"manifest is not JSON: {e}") from None
    if m.format != FORMAT:
        raise BundleError(f"manifest format {m.format} is not supported (expected {FORMAT})")
    paths = [f.path for f in m.files]
    for p in paths + [m.model]:
        _check_member_name(p)
    if m.model not in paths:
        raise BundleError(f"manifest model {m.model!r} is not among its files")
    return m


def write_bundle(out: str | os.PathLike, manifest: Manifest, files: dict[str, str | os.PathLike]) -> str:
    """Write a bundle of ``files`` (name in bundle -> path on disk) and return its sha256.

    The manifest's ``files`` list is filled in here from the files themselves. The tar is written
    to a temporary file beside ``out`` and renamed into place, so a crash leaves no half bundle.
    """
    entries = []
    for name, path in sorted(files.items()):
        _check_member_name(name)
        entries.append(FileEntry(path=name, sha256=sha256_file(path), size=os.path.getsize(path)))
    manifest = msgspec.structs.replace(
        manifest, files=entries, created=manifest.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    )
    decode_manifest(encode_manifest(manifest))  # the same checks a device will make
    data = encode_manifest(manifest)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's file is private; a bundle is meant to be published
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))
            for name, path in sorted(files.items()):
                info = tar.gettarinfo(str(path), arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o644
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sha256_file(out)


def verify_file(path: str | os.PathLike, size: int, sha256: str) -> None:
    """Raise BundleError unless the file has exactly this size and sha256."""
    actual = os.path.getsize(path)
    if actual != size:
        raise BundleError(f"size mismatch: expected {size} bytes, got {actual}")
    digest = sha256_file(path)
    if digest != sha256:
        raise BundleError(f"sha256 mismatch: expected {sha256[:16]}…, got {digest[:16]}…")


def read_manifest(bundle: str | os.PathLike) -> Manifest:
    """Read and validate the manifest of a bundle file without unpacking it."""
    try:
        with tarfile.open(bundle, mode="r:") as tar:
            try:
                info = tar.getmember(MANIFEST)
            except KeyError:
                raise BundleError(f"{bundle}: not a bundle (no {MANIFEST})") from None
            if not info.isfile() or info.size > MAX_MANIFEST_BYTES:
                raise BundleError(f"{bundle}: {MANIFEST} is not a regular file of sane size")
            data = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError) as e:
        raise BundleError(f"{bundle}: not a bundle ({e})") from None
    return decode_manifest(data)


def safe_unpack(bundle: str | os.PathLike, dest: str | os.PathLike,
                on_member: Callable[[str], None] | None = None) -> Manifest:
    """Unpack a bundle into ``dest`` (which must not exist) and verify every file.

    Refuses absolute paths, ``..``, links, devices and files the manifest does not list.
    Unpacks into a temporary sibling directory and renames it into place only when every
    file matched its sha256, so ``dest`` is either complete and verified or absent.
    """
    dest = Path(dest)
    if dest.exists():
        raise BundleError(f"{dest} already exists")
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
    try:
        manifest = _unpack_into(Path(bundle), tmp, on_member)
        os.replace(tmp, dest)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _unpack_into(bundle: Path, tmp: Path, on_member: Callable[[str], None] | None = None) -> Manifest:
    manifest = read_manifest(bundle)
    expected = {f.path: f for f in manifest.files}
    seen = set()
    try:
        with tarfile.open(bundle, mode="r:") as tar:
            for info in tar:
                _check_member_name(info.name)
                if not info.isfile():
                    raise BundleError(f"bundle member {info.name!r} is not a regular file")
                if info.name == MANIFEST:
                    continue
                entry = expected.get(info.name)
                if entry is None:
                    raise BundleError(f"bundle member {info.name!r} is not listed in the manifest")
                if info.name in seen:
                    raise BundleError(f"bundle member {info.name!r} appears twice")
                seen.add(info.name)
                target = tmp / info.name
                target.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                size = 0
                src = tar.extractfile(info)
                with open(target, "xb") as out:
                    while block := src.read(1 << 20):
                        h.update(block)
                        size += len(block)
                        out.write(block)
                if size != entry.size or h.hexdigest() != entry.sha256:
                    raise BundleError(f"bundle member {info.name!r} does not match its manifest entry")
                if on_member:
                    on_member(info.name)
    except (tarfile.TarError, EOFError) as e:
        raise BundleError(f"{bundle}: not a bundle ({e})") from None
    missing = set(expected) - seen
    if missing:
        raise BundleError(f"bundle is missing {sorted(missing)}")
    (tmp / MANIFEST).write_bytes(encode_manifest(manifest))
    return manifest


def _check_member_name(name: str) -> None:
    p = Path(name)
    if not name or p.is_absolute() or name.startswith(("/", "\\")) or ".." in p.parts or "\\" in name:
        raise BundleError(f"unsafe path in bundle: {name!r}")
