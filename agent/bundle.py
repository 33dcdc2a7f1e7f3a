"""The bundle: a tar of ``manifest.json`` and model files, addressed by the sha256 of the tar.

The converter writes bundles with :func:`write_bundle`; the agent and the fleet check them with
:func:`read_manifest`, :func:`verify_file` and :func:`safe_unpack`. Nothing here imports a runtime.

What a bundle may hold, checked from the tar headers and the manifest before a byte is written:

- at most ``MAX_MEMBERS`` (1000) members, each a plain regular file (tar type ``0`` or NUL): no
  directory, link, device, FIFO, contiguous or sparse (GNU or PAX) entries; names relative, without
  ``..``, ``\\`` or control characters, at most 255 characters;
- ``manifest.json`` (at most ``MAX_MANIFEST_BYTES``), optionally ``manifest.sig`` (at most ``MAX_SIG_BYTES``:
  agent/signing.py, checked against the device's trust store by agent/trust.py), and exactly the files the
  manifest lists, each once, each
  with the header size its manifest entry declares; the declared sizes together no more than the
  bundle file itself (an uncompressed tar holds its contents) and than ``max_bytes`` when given;
- a manifest whose strings and lists are bounded (the same bounds as the wire contract for name,
  version, runtime and precision, see agent/protocol.py), whose ``model`` and ``sample`` are among
  its files. ``report`` is free-form, bounded only by ``MAX_MANIFEST_BYTES``.

Unpacking then streams exactly each member's declared size and compares its sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from agent.errors import EdgefleetError
from agent.protocol import MAX_SIZE, Name, Sha256, Token, Version

FORMAT = 1
MANIFEST = "manifest.json"
SIG = "manifest.sig"  # ed25519 over the exact bytes of manifest.json (agent/signing.py)
MAX_SIG_BYTES = 4096
SAMPLE = "sample.npz"
MAX_MANIFEST_BYTES = 4 << 20
MAX_MEMBERS = 1000  # tar members, manifest.json included
MAX_PATH = 255
MAX_TENSORS = 64  # inputs, and outputs
MAX_DIMS = 32
MAX_HEADER_BYTES = 64 << 10  # a pax extended header or GNU long name, read into memory by tarfile

_PATH = r"[A-Za-z0-9._+-]+(?:/[A-Za-z0-9._+-]+)*"


class BundleError(EdgefleetError, ValueError):
    """A bundle that is not well-formed or does not match what it claims; the message says why."""


class _S(msgspec.Struct, forbid_unknown_fields=True):
    pass


MemberPath = Annotated[str, msgspec.Meta(pattern=f"^(?:{_PATH})$(?!\\n)", max_length=MAX_PATH)]


class FileEntry(_S):
    path: MemberPath
    sha256: Sha256
    size: Annotated[int, msgspec.Meta(ge=0, le=MAX_SIZE)]


class TensorSpec(_S):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    shape: Annotated[list[Annotated[int, msgspec.Meta(ge=-1)]], msgspec.Meta(max_length=MAX_DIMS)]  # -1: dynamic
    dtype: Token  # numpy dtype name: float32, int32, uint8, ...


class Manifest(_S):
    name: Name
    version: Version
    target: Literal["cpu", "intel", "arm"]
    runtime: Token  # the agent's runtime plugin: onnxruntime | openvino | tflite
    precision: Token  # fp32 | fp16 | int8 | ...
    model: MemberPath  # path of the main model file inside the bundle
    files: Annotated[list[FileEntry], msgspec.Meta(max_length=MAX_MEMBERS - 1)]
    inputs: Annotated[list[TensorSpec], msgspec.Meta(max_length=MAX_TENSORS)]
    outputs: Annotated[list[TensorSpec], msgspec.Meta(max_length=MAX_TENSORS)]
    sample: MemberPath = SAMPLE  # npz with one array per input, for the smoke test
    latency_budget_ms: Annotated[float, msgspec.Meta(gt=0)] | None = None  # smoke inference must finish within this
    # runtime settings, e.g. {"intra_op_threads": 1}
    settings: Annotated[dict[Annotated[str, msgspec.Meta(min_length=1, max_length=64)], Any],
                        msgspec.Meta(max_length=64)] = {}
    report: dict[str, Any] = {}  # the converter's measurements of this variant
    source_sha256: Annotated[str, msgspec.Meta(pattern="^(?:[0-9a-f]{64})?$(?!\\n)", max_length=64)] = ""
    created: Annotated[str, msgspec.Meta(max_length=64)] = ""
    # set when it is signed: grows with every release of a model name; a device refuses a lower one than it ran
    serial: Annotated[int, msgspec.Meta(ge=0, le=2**53)] = 0
    format: int = FORMAT


_manifest_decoder = msgspec.json.Decoder(Manifest)

_KINDS = {tarfile.DIRTYPE: "a directory", tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link",
          tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO",
          tarfile.CONTTYPE: "a contiguous file", tarfile.GNUTYPE_SPARSE: "a sparse file"}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def encode_manifest(manifest: Manifest) -> bytes:
    return msgspec.json.format(msgspec.json.encode(manifest), indent=2)


def decode_manifest(data: bytes) -> Manifest:
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"manifest is {len(data)} bytes, more than {MAX_MANIFEST_BYTES}")
    try:
        m = _manifest_decoder.decode(data)
    except msgspec.ValidationError as e:
        raise BundleError(f"invalid manifest: {e}") from None
    except msgspec.DecodeError as e:
        raise BundleError(f"manifest is not JSON: {e}") from None
    except RecursionError:
        raise BundleError("invalid manifest: it nests too deeply") from None
    if m.format != FORMAT:
        raise BundleError(f"manifest format {m.format} is not supported (expected {FORMAT})")
    paths = [f.path for f in m.files]
    for i, p in enumerate(paths):
        _check_member_name(p, f"manifest.files[{i}].path")
    _check_member_name(m.model, "manifest.model")
    _check_member_name(m.sample, "manifest.sample")
    if len(set(paths)) != len(paths):
        raise BundleError("manifest lists a file twice")
    if MANIFEST in paths:
        raise BundleError(f"manifest lists {MANIFEST} among its files")
    if m.model not in paths:
        raise BundleError(f"manifest model {m.model!r} is not among its files")
    if m.sample not in paths:
        raise BundleError(f"manifest sample {m.sample!r} is not among its files")
    return m


def write_bundle(out: str | os.PathLike, manifest: Manifest, files: dict[str, str | os.PathLike],
                 sign_key=None, serial: int | None = None) -> str:
    """Write a bundle of ``files`` (name in bundle -> path on disk) and return its sha256.

    The manifest's ``files`` list is filled in here from the files themselves. With ``sign_key`` (an ed25519
    private key, agent/signing.py) the manifest gets a ``serial`` (``serial``, else the manifest's, else the
    time in seconds) and the bundle a ``manifest.sig``. The tar is written to a temporary file beside ``out``
    and renamed into place, so a crash leaves no half bundle.
    """
    entries = []
    for name, path in sorted(files.items()):
        _check_member_name(name, "bundle")
        entries.append(FileEntry(path=name, sha256=sha256_file(path), size=os.path.getsize(path)))
    manifest = msgspec.structs.replace(
        manifest, files=entries, created=manifest.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    )
    if sign_key is not None:
        manifest = msgspec.structs.replace(manifest, serial=serial or manifest.serial or int(time.time()))
    data = encode_manifest(manifest)
    decode_manifest(data)  # the same checks a device will make

    def add_files(tar: tarfile.TarFile) -> None:
        for name, path in sorted(files.items()):
            with open(path, "rb") as f:
                info = tar.gettarinfo(arcname=name, fileobj=f)  # what was opened: a symlink's target
                if not info.isreg():
                    raise BundleError(f"{path} is not a regular file")
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o644
                tar.addfile(info, f)

    return _write_tar(Path(out), data, _signature(sign_key, data), add_files)


def sign_bundle(src: str | os.PathLike, key, out: str | os.PathLike | None = None,
                serial: int | None = None) -> tuple[str, Manifest]:
    """Sign an existing bundle with ``key``: check every file against its manifest, set the manifest's
    ``serial`` (``serial``, else the one it has, else the time in seconds), add or replace ``manifest.sig``,
    and write the result to ``out`` (default: over ``src``, atomically). Returns its sha256 and manifest."""
    src = Path(src)
    parsed = read_signed(src, check_files=True)
    manifest, data = parsed.manifest, parsed.manifest_bytes
    want = serial or manifest.serial or int(time.time())
    if want != manifest.serial:
        manifest = msgspec.structs.replace(manifest, serial=want)
        data = encode_manifest(manifest)
        decode_manifest(data)

    def add_files(tar: tarfile.TarFile) -> None:
        with tarfile.open(src, mode="r:", tarinfo=_Header) as old:
            for info in old:
                if info.name in (MANIFEST, SIG):
                    continue
                copy = tarfile.TarInfo(info.name)
                copy.size, copy.mtime, copy.mode = info.size, info.mtime, 0o644
                tar.addfile(copy, old.extractfile(info))

    return _write_tar(Path(out) if out else src, data, _signature(key, data), add_files), manifest


def _signature(key, manifest_bytes: bytes) -> bytes | None:
    if key is None:
        return None
    from agent.signing import sign_manifest

    return sign_manifest(key, manifest_bytes)


def _write_tar(out: Path, manifest_bytes: bytes, sig: bytes | None,
               add_files: Callable[[tarfile.TarFile], None]) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's file is private; a bundle is meant to be published
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in ((MANIFEST, manifest_bytes), (SIG, sig)):
                if data is None:
                    continue
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(data))
            add_files(tar)
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


def read_manifest(bundle: str | os.PathLike, max_bytes: int | None = None) -> Manifest:
    """Read and validate the manifest of a bundle file, and every member's header against it, without
    unpacking anything."""
    return read_signed(bundle, max_bytes).manifest


@contextlib.contextmanager
def _reading(bundle: str | os.PathLike, max_bytes: int | None) -> Iterator[tuple[tarfile.TarFile, _Parsed]]:
    """The open tar and its checked headers; what goes wrong reading it, as one BundleError."""
    try:
        with tarfile.open(bundle, mode="r:", tarinfo=_Header) as tar:
            yield tar, _check_headers(Path(bundle), tar, max_bytes)
    except BundleError:
        raise
    except (tarfile.TarError, EOFError, ValueError, OverflowError, UnicodeError) as e:
        raise BundleError(f"{bundle}: not a bundle ({e})") from None
    except OSError as e:
        raise BundleError(f"{bundle}: cannot read it ({e.strerror or e})") from None


def read_signed(bundle: str | os.PathLike, max_bytes: int | None = None, check_files: bool = False) -> _Parsed:
    """The manifest (decoded and as its exact bytes) and ``manifest.sig`` (None if absent) of a bundle file,
    every member's header checked against the manifest, without unpacking anything. With ``check_files``,
    also read every file and compare its sha256 with the manifest's (writing nothing)."""
    with _reading(bundle, max_bytes) as (tar, parsed):
        if check_files:
            expected = {f.path: f for f in parsed.manifest.files}
            for info in parsed.members:
                _copy_member(tar, info, expected[info.name], None)
        return parsed


def read_member(bundle: str | os.PathLike, name: str, max_bytes: int) -> bytes | None:
    """One file the manifest lists, read into memory (at most ``max_bytes``) and checked against its manifest
    entry, every header checked as ``read_signed`` does, nothing written; None when the manifest does not list
    ``name``. (The controller reads a bundle's profile.json this way.)"""
    with _reading(bundle, None) as (tar, parsed):
        entry = next((f for f in parsed.manifest.files if f.path == name), None)
        if entry is None:
            return None
        if entry.size > max_bytes:
            raise BundleError(f"bundle member {name!r} is {entry.size} bytes, more than {max_bytes}")
        out = io.BytesIO()
        _copy_member(tar, next(m for m in parsed.members if m.name == name), entry, out)
        return out.getvalue()


def safe_unpack(bundle: str | os.PathLike, dest: str | os.PathLike,
                on_member: Callable[[str], None] | None = None, max_bytes: int | None = None) -> Manifest:
    """Unpack a bundle into ``dest`` (which must not exist) and verify every file.

    Every header is checked against the manifest first (see the module's docstring): nothing is written
    for a bundle that fails. Unpacks into a temporary sibling directory and renames it into place only
    when every file matched its sha256, so ``dest`` is either complete and verified or absent.
    """
    bundle, dest = Path(bundle), Path(dest)
    if dest.exists():
        raise BundleError(f"{dest} already exists")
    try:
        with tarfile.open(bundle, mode="r:", tarinfo=_Header) as tar:
            parsed = _check_headers(bundle, tar, max_bytes)
            manifest = parsed.manifest
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
            try:
                _unpack_into(tar, parsed, tmp, on_member)
                os.replace(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except BundleError:
        raise
    except (tarfile.TarError, EOFError, ValueError, OverflowError, UnicodeError) as e:
        raise BundleError(f"{bundle}: not a bundle ({e})") from None
    return manifest


class _Parsed(msgspec.Struct):
    manifest: Manifest
    manifest_bytes: bytes
    sig: bytes | None  # manifest.sig, if the bundle has one
    members: list  # the tar members holding the manifest's files, in tar order


def _check_headers(bundle: Path, tar: tarfile.TarFile, max_bytes: int | None) -> _Parsed:
    """Read every header (at most MAX_MEMBERS), the manifest and its signature; check each member against
    the manifest. Reads no member's data but the manifest's and the signature's."""
    members: list[tarfile.TarInfo] = []
    for info in tar:
        if len(members) >= MAX_MEMBERS:
            raise BundleError(f"bundle has more than {MAX_MEMBERS} members")
        _check_member(info)
        members.append(info)
    found = [m for m in members if m.name == MANIFEST]
    if not found:
        raise BundleError(f"{bundle}: not a bundle (no {MANIFEST})")
    if len(found) > 1:
        raise BundleError(f"bundle member {MANIFEST!r} appears twice")
    if found[0].size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{bundle}: {MANIFEST} is {found[0].size} bytes, more than {MAX_MANIFEST_BYTES}")
    manifest_bytes = _read_exactly(tar, found[0])
    manifest = decode_manifest(manifest_bytes)
    sigs = [m for m in members if m.name == SIG]
    if len(sigs) > 1:
        raise BundleError(f"bundle member {SIG!r} appears twice")
    if sigs and sigs[0].size > MAX_SIG_BYTES:
        raise BundleError(f"{bundle}: {SIG} is {sigs[0].size} bytes, more than {MAX_SIG_BYTES}")
    sig = _read_exactly(tar, sigs[0]) if sigs else None
    expected = {f.path: f for f in manifest.files}
    if SIG in expected:
        raise BundleError(f"manifest lists {SIG} among its files")
    seen: set[str] = set()
    files = []
    for info in members:
        if info.name in (MANIFEST, SIG):
            continue
        files.append(info)
        entry = expected.get(info.name)
        if entry is None:
            raise BundleError(f"bundle member {info.name!r} is not listed in the manifest")
        if info.name in seen:
            raise BundleError(f"bundle member {info.name!r} appears twice")
        seen.add(info.name)
        if info.size != entry.size:
            raise BundleError(f"bundle member {info.name!r} is {info.size} bytes in the tar but "
                              f"{entry.size} in the manifest")
    missing = set(expected) - seen
    if missing:
        raise BundleError(f"bundle is missing {sorted(missing)}")
    declared = sum(f.size for f in manifest.files) + found[0].size
    have = bundle.stat().st_size
    if declared > have:
        raise BundleError(f"bundle declares {declared} bytes of files, more than the {have} bytes it has")
    if max_bytes is not None and declared > max_bytes:
        raise BundleError(f"bundle declares {declared} bytes of files, more than the limit of {max_bytes}")
    return _Parsed(manifest, manifest_bytes, sig, files)


def _unpack_into(tar: tarfile.TarFile, parsed: _Parsed, tmp: Path,
                 on_member: Callable[[str], None] | None = None) -> None:
    expected = {f.path: f for f in parsed.manifest.files}
    for info in parsed.members:
        target = tmp / info.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as out:
            _copy_member(tar, info, expected[info.name], out)
        if on_member:
            on_member(info.name)
    (tmp / MANIFEST).write_bytes(parsed.manifest_bytes)  # the exact bytes, which the signature covers
    if parsed.sig is not None:
        (tmp / SIG).write_bytes(parsed.sig)


def _copy_member(tar: tarfile.TarFile, info: tarfile.TarInfo, entry: FileEntry, out) -> None:
    """Stream exactly the member's declared size (to ``out`` if given) and compare its sha256."""
    h = hashlib.sha256()
    src = tar.extractfile(info)
    left = entry.size  # == info.size (checked): never more than the header and the manifest declare
    while left:
        block = src.read(min(1 << 20, left))
        if not block:
            raise BundleError(f"bundle member {info.name!r} is cut short")
        left -= len(block)
        h.update(block)
        if out is not None:
            out.write(block)
    if h.hexdigest() != entry.sha256:
        raise BundleError(f"bundle member {info.name!r} does not match its manifest entry")


def _read_exactly(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    data = tar.extractfile(info).read(info.size)
    if len(data) != info.size:
        raise BundleError(f"bundle member {info.name!r} is cut short")
    return data


def _check_member(info: tarfile.TarInfo) -> None:
    """A member must be a plain regular file with a safe name. ``isfile()``/``isreg()`` are not enough:
    they also accept contiguous and GNU sparse entries."""
    _check_member_name(info.name)
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.issparse():
        kind = "a sparse file" if info.issparse() else _KINDS.get(info.type, f"of tar type {info.type!r}")
        raise BundleError(f"bundle member {info.name!r} is not a regular file: it is {kind}")


def _check_member_name(name: str, where: str = "bundle") -> None:
    p = Path(name)
    if (not name or len(name) > MAX_PATH or p.is_absolute() or name.startswith(("/", "\\")) or ".." in p.parts
            or "\\" in name or re.search(r"[\x00-\x1f\x7f]", name)):
        raise BundleError(f"unsafe path in {where}: {name!r}")


class _Header(tarfile.TarInfo):
    """Refuses, while tarfile parses a header, what would make it read or allocate without bound: an
    extended (pax) header or GNU long name larger than MAX_HEADER_BYTES, and sparse maps (GNU and PAX),
    before tarfile reads them. These hook tarfile's per-header methods; ``_check_member`` refuses sparse
    entries again from the parsed header, whatever tarfile's internals become."""

    def _proc_member(self, tarfile_):
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                         tarfile.GNUTYPE_LONGLINK) and self.size > MAX_HEADER_BYTES:
            raise BundleError(f"bundle has an extended tar header of {self.size} bytes, more than "
                              f"{MAX_HEADER_BYTES}")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise BundleError(f"bundle member {self.name!r} is not a regular file: it is a sparse file")
        return super()._proc_member(tarfile_)

    def _sparse(self, next_, pax_headers, *_):
        name = pax_headers.get("GNU.sparse.name") or next_.name
        raise BundleError(f"bundle member {name!r} is not a regular file: it is a sparse file")

    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _sparse
