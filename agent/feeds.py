"""An inference request's body decoded into the model's inputs, checked against them BEFORE anything is decoded.

An ``.npz`` is a zip of ``.npy`` members that may be deflated ~1000:1, and an ``.npy`` header declares its
array's dtype and shape. So the zip directory and each member's ``.npy`` header are read first (a bounded
number of bytes, nothing else decompressed), the names, dtypes and shapes are checked against the active
model's inputs (``agent.engine.check_declared``: dynamic dims allowed), object (pickled) and structured
dtypes are refused, and the declared total is checked against the byte limit; only then is each array read,
never more bytes than it declared. A JSON body (``{"inputs": {name: nested lists}}``, for small inputs) is
capped at ``JSON_MAX_BYTES`` and each array's shape is read off its nesting and checked the same way before
it becomes an array.

Refusals raise ``FeedError`` with the HTTP status to answer (400, or 413 for a size) and one line naming the
input.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zipfile
import zlib
from collections.abc import Sequence

import numpy as np
from numpy.lib import format as npy_format

from agent.bundle import TensorSpec
from agent.engine import InferenceError, check_declared

JSON_MAX_BYTES = 8 << 20  # JSON takes 10-30x its size once parsed into Python lists: use .npz beyond this
_NPY_HEADER_MAX = 10_000  # what numpy's own reader accepts (numpy.lib.format's max_header_size)
_CD_BYTES_PER_MEMBER = 4096  # a generous zip central-directory entry (name + extra fields)
_CHUNK = 1 << 20


class FeedError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def size_text(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


# --- .npz ------------------------------------------------------------------------------------------------------
class _View(io.RawIOBase):
    """A read-only, seekable file over a buffer, without copying it (zipfile wants a file)."""

    def __init__(self, buf) -> None:
        self._m = memoryview(buf).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._m)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def take(self, n: int) -> memoryview:
        data = self._m[self._pos:self._pos + n]
        self._pos += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        end = len(self._m) if n is None or n < 0 else min(len(self._m), self._pos + n)
        data = self._m[self._pos:end].tobytes()
        self._pos = max(self._pos, end)
        return data


def _zip_directory(m: memoryview) -> tuple[int, int]:
    """(member count, central directory bytes) from the end-of-central-directory record (zip64 too), read
    before zipfile parses the directory: zipfile would build an object per entry, however many there are."""
    tail = m[max(0, len(m) - 22 - 0xFFFF):].tobytes()
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or len(tail) - i < 22:
        raise FeedError(400, "body is not an .npz: no zip directory (send np.savez output, or JSON with "
                             "Content-Type: application/json)")
    count, cd_size, cd_offset = struct.unpack("<6xHII", tail[i + 4:i + 20])
    if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:  # zip64: its locator is just before
        j = len(m) - len(tail) + i - 20
        if j < 0 or m[j:j + 4].tobytes() != b"PK\x06\x07":
            raise FeedError(400, "body is not an .npz: a broken zip64 directory")
        (rec,) = struct.unpack("<Q", m[j + 8:j + 16].tobytes())
        if rec > len(m) - 56 or m[rec:rec + 4].tobytes() != b"PK\x06\x06":
            raise FeedError(400, "body is not an .npz: a broken zip64 directory")
        count, cd_size = struct.unpack("<QQ", m[rec + 32:rec + 48].tobytes())
    return count, cd_size


def _npy_header(f, name: str) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, header bytes) of one member, reading only its header: the header's
    length is checked before its bytes are read (numpy's reader reads them first), then numpy parses it."""
    magic = f.read(8)
    try:
        major, minor = npy_format.read_magic(io.BytesIO(magic))
    except ValueError:
        raise FeedError(400, f"input {name!r} is not an .npy array (bad magic)") from None
    if (major, minor) not in ((1, 0), (2, 0)):
        raise FeedError(400, f"input {name!r}: .npy format {major}.{minor} is not accepted (1.0 and 2.0 are)")
    size_fmt = "<H" if major == 1 else "<I"
    raw = f.read(struct.calcsize(size_fmt))
    if len(raw) != struct.calcsize(size_fmt):
        raise FeedError(400, f"input {name!r}: its .npy header is truncated")
    (hlen,) = struct.unpack(size_fmt, raw)
    if hlen > _NPY_HEADER_MAX:
        raise FeedError(400, f"input {name!r}: its .npy header declares {hlen} bytes (at most {_NPY_HEADER_MAX})")
    header = f.read(hlen)
    if len(header) != hlen:
        raise FeedError(400, f"input {name!r}: its .npy header is truncated")
    read = npy_format.read_array_header_1_0 if major == 1 else npy_format.read_array_header_2_0
    try:
        shape, fortran, dtype = read(io.BytesIO(raw + header))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
        raise FeedError(400, f"input {name!r}: bad .npy header: {str(e).splitlines()[0]}") from None
    if dtype.hasobject:
        raise FeedError(400, f"input {name!r} is an object array (Python pickle): refused; send numeric arrays")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise FeedError(400, f"input {name!r} has a structured dtype {dtype.descr}: send plain numeric arrays")
    if any(d < 0 for d in shape):
        raise FeedError(400, f"input {name!r} declares a negative dimension {list(shape)}")
    return dtype, tuple(shape), bool(fortran), 8 + len(raw) + hlen


def _declared_bytes(dtype: np.dtype, shape: Sequence[int]) -> int:
    return dtype.itemsize * math.prod(shape)  # Python ints: no overflow for absurd shapes


def _check_total(declared: dict[str, tuple[np.dtype, tuple[int, ...]]], max_bytes: int, limit_name: str) -> None:
    sizes = {name: _declared_bytes(dtype, shape) for name, (dtype, shape) in declared.items()}
    total = sum(sizes.values())
    if total > max_bytes:
        name = max(sizes, key=sizes.get)
        dtype, shape = declared[name]
        raise FeedError(413, f"input {name!r} declares {dtype}{list(shape)} ({size_text(sizes[name])}"
                             f"{'' if len(sizes) == 1 else f'; all inputs {size_text(total)}'}): over the "
                             f"{size_text(max_bytes)} limit ({limit_name})")


def from_npz(body, specs: list[TensorSpec], max_bytes: int, limit_name: str = "api_max_body_bytes"
             ) -> dict[str, np.ndarray]:
    """The arrays of an .npz body, checked against ``specs`` and ``max_bytes`` before any is decoded."""
    m = memoryview(body).cast("B")
    count, cd_size = _zip_directory(m)
    expected = sorted(s.name for s in specs)
    if count > len(specs) or cd_size > _CD_BYTES_PER_MEMBER * max(1, len(specs)):
        raise FeedError(400, f".npz has {count} members ({size_text(cd_size)} of zip directory); the model "
                             f"takes {len(specs)} inputs {expected}")
    try:
        z = zipfile.ZipFile(_View(m))
        members = z.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, struct.error, NotImplementedError) as e:
        raise FeedError(400, f"body is not an .npz: {e}") from None
    opened: dict[str, tuple[zipfile.ZipInfo, object, np.dtype, tuple[int, ...], bool, int]] = {}
    try:
        for info in members:
            name = info.filename.removesuffix(".npy")
            if name == info.filename or name in opened:
                raise FeedError(400, f".npz member {info.filename[:100]!r}: expected one NAME.npy per model "
                                     f"input {expected}")
            if info.flag_bits & 0x1:
                raise FeedError(400, f"input {name!r} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise FeedError(400, f"input {name!r}: zip compression {info.compress_type} is not accepted "
                                     f"(stored or deflated: np.savez or np.savez_compressed)")
            f = _stored(m, info, name) or z.open(info)
            opened[name] = (info, f, *_npy_header(f, name))
        declared = {name: (dtype, shape) for name, (_, _, dtype, shape, _, _) in opened.items()}
        try:
            check_declared(specs, declared)
        except InferenceError as e:
            raise FeedError(400, str(e)) from None
        _check_total(declared, max_bytes, limit_name)
        for name, (info, _, dtype, shape, _, header_len) in opened.items():
            nbytes = _declared_bytes(dtype, shape)
            if info.file_size != header_len + nbytes:
                raise FeedError(400, f"input {name!r}: its zip member holds {info.file_size - header_len} bytes "
                                     f"of data, its .npy header declares {dtype}{list(shape)} ({nbytes} bytes)")
        return {name: _read_array(f, name, dtype, shape, fortran)
                for name, (_, f, dtype, shape, fortran, _) in opened.items()}
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, struct.error, NotImplementedError,
            RuntimeError) as e:
        raise FeedError(400, f"body is not an .npz: {e}") from None
    finally:
        for entry in opened.values():
            entry[1].close()
        z.close()


def _stored(m: memoryview, info: zipfile.ZipInfo, name: str) -> _View | None:
    """An uncompressed member (np.savez), read straight from the body; None for a deflated one."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    at = info.header_offset
    local = m[at:at + 30].tobytes()
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise FeedError(400, f"input {name!r}: a broken zip member")
    start = at + 30 + sum(struct.unpack("<HH", local[26:30]))
    member = m[start:start + info.file_size]
    if len(member) != info.file_size or info.compress_size != info.file_size:
        raise FeedError(400, f"input {name!r}: its zip member is truncated")
    if zlib.crc32(member) != info.CRC:
        raise FeedError(400, f"input {name!r}: its zip member fails its CRC-32 check")
    return _View(member)


def _read_array(f, name: str, dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> np.ndarray:
    """Exactly the declared bytes, in chunks, into an array allocated at the declared (checked) size."""
    order = "F" if fortran else "C"
    if isinstance(f, _View):  # stored: already checked to hold exactly these bytes
        data = f.take(_declared_bytes(dtype, shape))
        return np.frombuffer(data, dtype=dtype).reshape(shape, order=order).copy(order="C")
    arr = np.empty(shape, dtype=dtype, order=order)
    flat = memoryview(arr.reshape(-1, order="A")).cast("B") if arr.size else memoryview(b"")
    pos = 0
    while pos < len(flat):
        chunk = f.read(min(_CHUNK, len(flat) - pos))
        if not chunk:
            raise FeedError(400, f"input {name!r} is truncated: {pos} of {len(flat)} declared bytes")
        flat[pos:pos + len(chunk)] = chunk
        pos += len(chunk)
    f.read(1)  # at the member's end: zipfile checks its CRC-32 here
    return np.ascontiguousarray(arr)


# --- JSON ------------------------------------------------------------------------------------------------------
def from_json(body, specs: list[TensorSpec], max_bytes: int, limit_name: str = "api_max_body_bytes"
              ) -> dict[str, np.ndarray]:
    """``{"inputs": {name: nested lists}}``: the shapes read off the nesting and checked before any array
    is built; the body itself is capped at ``JSON_MAX_BYTES``."""
    if len(body) > JSON_MAX_BYTES:
        raise FeedError(413, f"a JSON body of {size_text(len(body))} is over the {size_text(JSON_MAX_BYTES)} "
                             f"limit for JSON: send an .npz (Content-Type: application/x-npz)")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise FeedError(400, f'body is not JSON {{"inputs": {{name: array}}}}: {str(e)[:200]}') from None
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(inputs, dict):
        raise FeedError(400, 'body is not JSON {"inputs": {name: array}}: no "inputs" object')
    dtypes = {s.name: np.dtype(s.dtype) for s in specs}
    declared = {name: (dtypes.get(name, np.dtype("float64")), _nested_shape(value)) for name, value in inputs.items()}
    try:
        check_declared(specs, declared)
    except InferenceError as e:
        raise FeedError(400, str(e)) from None
    _check_total(declared, max_bytes, limit_name)
    feeds = {}
    for name, value in inputs.items():
        try:
            feeds[name] = np.asarray(value, dtype=dtypes[name])
        except (ValueError, TypeError, OverflowError) as e:
            raise FeedError(400, f"input {name!r} is not a {dtypes[name]} array: {str(e)[:200]}") from None
        if feeds[name].shape != declared[name][1]:
            raise FeedError(400, f"input {name!r} is ragged: its rows differ in length")
    return feeds


def _nested_shape(value) -> tuple[int, ...]:
    """The shape nested lists would have, read along their first elements (np.asarray checks the rest)."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(shape)
