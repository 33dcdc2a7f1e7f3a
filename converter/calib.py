"""Calibration data: a sequence of feeds, each one complete input of the model, in one of three formats.

- ``stacked``: one ``.npz`` with one array per model input, keyed by input name, samples along axis 0
  (``np.savez("calib.npz", x=batch)``); feed ``i`` is ``{name: array[i:i+1]}``. Every input needs a batch
  axis (axis 0).
- ``directory``: a directory of ``.npz`` files (in name order), each holding one complete feed exactly as
  the model takes it, keyed by input name: state inputs, scalars, the batch on any axis.
- ``indexed``: one ``.npz`` whose entries are named ``INPUT/INDEX`` (``input/0``, ``state/0``, ``sr/0``,
  ``input/1``, ...); each index is one complete feed (in index order).

The format is told from the path (a directory) or the entry names (``NAME/INDEX`` that is not itself an
input name). Every feed is checked against the model's inputs (names, dtypes, ranks, fixed dims, finite
values); each dynamic dim is taken from the data when every feed gives it the same size (axis 0 of the
stacked format stays dynamic: samples go along it). The last 20 % of the feeds (at least one) are held out
for evaluation, the rest calibrate the int8 variants.

``Feeds`` is the one place the quantizers, runtimes and measurements take data from: ``feeds[i]`` is
one feed, ``feeds.batches(n)`` runs of feeds (stacked feeds joined along axis 0), ``feeds.join(outputs)``
puts the outputs of those runs back together. Pure numpy: no toolchain is imported.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.bundle import TensorSpec, sha256_file
from converter import ConvertError

MIN_SAMPLES = 10  # fewer cannot calibrate int8 activation ranges, nor leave any held-out samples
HELD_OUT = 0.2
FORMATS = ("stacked", "directory", "indexed")
_INDEXED = re.compile(r"^(?P<name>.+)/(?P<index>[0-9]+)$")


class Feeds(Sequence):
    """Complete feeds of the model. ``stacked``: every input holds its samples along axis 0, so runs of
    feeds can be joined into one batch (and the outputs split along axis 0)."""

    def __init__(self, items: list[dict[str, np.ndarray]], stacked: bool):
        self._items = list(items)
        self.stacked = stacked

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Feeds:
        """Stacked arrays (samples along axis 0) as batch-1 feeds."""
        n = len(next(iter(arrays.values())))
        return cls([{k: v[i : i + 1] for k, v in arrays.items()} for i in range(n)], stacked=True)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Feeds(self._items[i], self.stacked)
        return self._items[i]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self._items)

    def batches(self, size: int, *, whole: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Runs of ``size`` feeds joined along axis 0 (stacked), else each feed as it is. ``whole``: leave
        out a last, shorter run (a fixed-batch model, or calibrators that stack equal batches)."""
        if not self.stacked:
            yield from self._items
            return
        end = len(self) - (len(self) % size if whole else 0)
        for i in range(0, end, size):
            run = self._items[i : i + size]
            yield {k: np.concatenate([f[k] for f in run]) for k in run[0]}

    def arrays(self) -> dict[str, np.ndarray]:
        """Every feed joined along axis 0 (stacked feeds, or feeds whose every input has axis 0 of size 1)."""
        return {k: np.concatenate([f[k] for f in self._items]) for k in self._items[0]}

    def axis0_stackable(self) -> str | None:
        """None if :meth:`arrays` gives one sample per feed along axis 0, else the first input that does not."""
        if self.stacked:
            return None
        for name, value in self._items[0].items():
            if any(f[name].ndim == 0 or f[name].shape[0] != 1 for f in self._items):
                return name
        return None

    def join(self, parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The outputs of :meth:`batches` as one array per output, one row per feed: joined along axis 0
        (stacked feeds, or outputs of equal shape with a batch of 1 on axis 0), else stacked on a new axis 0
        (outputs of equal shape) or flattened and zero-padded to the longest (shapes that vary with the feed)."""
        out = {}
        for name in parts[0]:
            values = [np.asarray(p[name]) for p in parts]
            same = len({v.shape for v in values}) == 1
            if self.stacked or (same and values[0].ndim and values[0].shape[0] == 1):
                out[name] = np.concatenate(values)
            elif same:
                out[name] = np.stack(values)
            else:
                width = max(v.size for v in values)
                rows = np.zeros((len(values), width), values[0].dtype)
                for row, v in zip(rows, values):
                    row[: v.size] = v.ravel()
                out[name] = rows
        return out


def as_feeds(data) -> Feeds:
    """``data`` as :class:`Feeds` (stacked arrays ``{name: [n, ...]}`` are taken as samples along axis 0)."""
    return data if isinstance(data, Feeds) else Feeds.from_arrays(data)


def run_feeds(run, feeds: Feeds, batch: int | None, default: int) -> list[dict[str, np.ndarray]]:
    """``run`` (a session's run) on every feed, in runs of ``batch`` (a fixed batch) or ``default`` stacked
    feeds; returns each run's outputs (:meth:`Feeds.join` puts them together)."""
    return [run(f) for f in feeds.batches(batch or default, whole=bool(batch))]


@dataclass(frozen=True)
class Calibration:
    path: Path
    sha256: str
    format: str  # stacked | directory | indexed
    feeds: Feeds
    specs: list[TensorSpec]  # the model's inputs, with the dims the data (or --input-shape) fixes

    @property
    def samples(self) -> int:
        return len(self.feeds)

    @property
    def n_eval(self) -> int:
        return max(1, int(self.samples * HELD_OUT))

    def calibration_split(self) -> Feeds:
        return self.feeds[: self.samples - self.n_eval]

    def held_out(self) -> Feeds:
        return self.feeds[self.samples - self.n_eval :]

    def describe(self) -> str:
        return {"stacked": "one .npz, samples stacked along axis 0",
                "directory": "a directory of .npz files, one complete feed each",
                "indexed": "one .npz of INPUT/INDEX entries, one complete feed per index"}[self.format]


def _fmt(shape) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def apply_input_shapes(specs: list[TensorSpec], shapes: dict[str, list[int]] | None) -> list[TensorSpec]:
    """Fix the dims given by ``--input-shape`` (all but the batch dim, axis 0, which stays as it was)."""
    shapes = dict(shapes or {})
    by_name = {s.name: s for s in specs}
    for name in shapes:
        if name not in by_name:
            raise ConvertError(f"--input-shape names {name!r}, which is not a model input "
                               f"(inputs: {', '.join(by_name)})")
    out = []
    for spec in specs:
        want = shapes.get(spec.name)
        if want is None:
            out.append(spec)
            continue
        if len(want) != len(spec.shape):
            raise ConvertError(f"--input-shape {spec.name}={'x'.join(map(str, want))} has rank {len(want)} "
                               f"but model input {spec.name!r} is {_fmt(spec.shape)} (rank {len(spec.shape)})")
        for axis, (have, new) in enumerate(zip(spec.shape, want)):
            if new <= 0:
                raise ConvertError(f"--input-shape {spec.name}: dimension {axis} must be positive, got {new}")
            if axis and have > 0 and have != new:
                raise ConvertError(f"--input-shape {spec.name}: dimension {axis} is fixed at {have} in the model, "
                                   f"not {new}")
        out.append(TensorSpec(spec.name, [spec.shape[0], *want[1:]], spec.dtype))
    return out


def load(path: str | Path, specs: list[TensorSpec]) -> Calibration:
    """Read the calibration data at ``path`` (format told from it), check every feed against ``specs``
    (shape -1 where a dimension is dynamic) and fix the dynamic dims the data fixes."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"calibration file not found: {path}")
    names = [s.name for s in specs]
    if path.is_dir():
        fmt, feeds, digest = "directory", *_read_directory(path)
    else:
        arrays = _read_npz(path)
        if arrays and not all(k in names for k in arrays) and any(_INDEXED.match(k) for k in arrays):
            fmt, feeds = "indexed", _split_indexed(path, arrays)
        else:
            fmt, feeds = "stacked", None
            _check_names(f"calibration file {path.name}", arrays, names, hint=" (or name entries INPUT/INDEX, one "
                         "complete feed per index)")
            for spec in specs:
                if not spec.shape:
                    raise ConvertError(f"model input {spec.name!r} is a scalar: a stacked .npz (samples along axis "
                                       f"0) cannot hold it; give one complete feed per file (a directory of .npz) "
                                       f"or per index (entries INPUT/INDEX)")
            for spec in specs:
                _check_array(f"calibration array {spec.name!r}", arrays[spec.name], spec, stacked=True)
            counts = sorted({len(arrays[n]) for n in names})
            if len(counts) > 1:
                raise ConvertError(f"calibration arrays disagree on the number of samples: {counts}")
            feeds = Feeds.from_arrays({n: arrays[n] for n in names})
        digest = sha256_file(path)
    if fmt != "stacked":
        for i, feed in enumerate(feeds):
            where = f"calibration feed {i}" + (f" ({feed.pop(_SOURCE)})" if _SOURCE in feed else "")
            _check_names(where, feed, names)
            for spec in specs:
                _check_array(f"{where}: input {spec.name!r}", feed[spec.name], spec, stacked=False)
        feeds = Feeds(feeds, stacked=False)
    if len(feeds) < MIN_SAMPLES:
        raise ConvertError(f"calibration data {path.name} has {len(feeds)} feed(s); need at least {MIN_SAMPLES} "
                           f"(the last 20 % are held out for evaluation)")
    return Calibration(path, digest, fmt, feeds, _fixed_by_data(specs, feeds))


_SOURCE = "\0file"  # a feed's file name, while it is checked (not an input name: ONNX names have no NUL)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file() or not zipfile.is_zipfile(path):
        raise ConvertError(f"calibration file {path} is not an .npz archive (expected numpy.savez output: one "
                           f"array per model input, or a directory of them)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as e:  # a damaged member, object arrays, ...
        raise ConvertError(f"calibration file {path} cannot be read as .npz: {_first_line(e)}") from None


def _read_directory(path: Path) -> tuple[list[dict], str]:
    files = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    other = [p.name for p in files if p.suffix != ".npz" or not p.is_file()]
    if other:
        raise ConvertError(f"calibration directory {path} holds {other[0]!r}, which is not an .npz file (one "
                           f"complete feed per .npz)")
    if not files:
        raise ConvertError(f"calibration directory {path} holds no .npz files")
    digest = hashlib.sha256()
    feeds = []
    for file in files:
        feed = _read_npz(file)
        feed[_SOURCE] = file.name
        feeds.append(feed)
        digest.update(f"{file.name}\0{sha256_file(file)}\n".encode())
    return feeds, digest.hexdigest()


def _split_indexed(path: Path, arrays: dict[str, np.ndarray]) -> list[dict]:
    by_index: dict[int, dict] = {}
    for key, value in arrays.items():
        m = _INDEXED.match(key)
        if m is None:
            raise ConvertError(f"calibration file {path.name} mixes entries named INPUT/INDEX with {key!r}; name "
                               f"every entry INPUT/INDEX (e.g. input/0)")
        by_index.setdefault(int(m["index"]), {})[m["name"]] = value
    feeds = []
    for index in sorted(by_index):
        feed = by_index[index]
        feed[_SOURCE] = f"entries */{index}"
        feeds.append(feed)
    return feeds


def _check_names(where: str, found: dict, names: list[str], hint: str = "") -> None:
    keys = [k for k in found if k != _SOURCE]
    missing = [n for n in names if n not in found]
    if missing:
        raise ConvertError(f"{where} has no array for model input {missing[0]!r} "
                           f"(it holds: {', '.join(map(repr, keys)) or 'nothing'}){hint}")
    extra = [k for k in keys if k not in names]
    if extra:
        raise ConvertError(f"{where} has array {extra[0]!r}, which is not a model input "
                           f"(inputs: {', '.join(map(repr, names))})")


def _check_array(where: str, a: np.ndarray, spec: TensorSpec, *, stacked: bool) -> None:
    if a.dtype.name != spec.dtype:
        raise ConvertError(f"{where} is {a.dtype.name} but the model input is {spec.dtype}")
    if a.ndim != len(spec.shape):
        raise ConvertError(f"{where} has shape {list(a.shape)} (rank {a.ndim}) but the model input is "
                           f"{_fmt(spec.shape)} (rank {len(spec.shape)}"
                           + ("; samples go along axis 0)" if stacked else "; each feed exactly as the model takes it)"))
    for axis in range(1 if stacked else 0, a.ndim):
        if spec.shape[axis] > 0 and a.shape[axis] != spec.shape[axis]:
            raise ConvertError(f"{where} has shape {list(a.shape)} but the model input is {_fmt(spec.shape)} "
                               f"(dimension {axis} differs)")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ConvertError(f"{where} holds NaN or infinite values")


def _fixed_by_data(specs: list[TensorSpec], feeds: Feeds) -> list[TensorSpec]:
    """Each dynamic dim set to its size in the data when every feed gives it the same size (axis 0 of
    stacked feeds stays dynamic: the samples go along it)."""
    out = []
    for spec in specs:
        shape = list(spec.shape)
        for axis, dim in enumerate(shape):
            if dim > 0 or (feeds.stacked and axis == 0):
                continue
            sizes = {f[spec.name].shape[axis] for f in feeds}
            if len(sizes) == 1:
                shape[axis] = sizes.pop()
        out.append(TensorSpec(spec.name, shape, spec.dtype))
    return out


def require_static(specs: list[TensorSpec], feeds: Feeds | None = None) -> None:
    """Every dim but the batch dim (axis 0) must be fixed (by the model, the data or --input-shape):
    compilers and quantizers need them, and a guess would silently pin a shape devices may not send."""
    for spec in specs:
        axis = next((a for a, d in enumerate(spec.shape) if a and d < 0), None)
        if axis is None:
            continue
        if feeds is not None:
            sizes = sorted({f[spec.name].shape[axis] for f in feeds})
            raise ConvertError(f"calibration feeds give model input {spec.name!r} {_fmt(spec.shape)} different "
                               f"sizes along dimension {axis} ({', '.join(map(str, sizes[:4]))}"
                               f"{', ...' if len(sizes) > 4 else ''}): make every feed the same shape (e.g. pad)")
        names = iter("HWDEFG")
        example = "x".join(["1"] + [next(names, "N") if d < 0 else str(d) for d in spec.shape[1:]])
        raise ConvertError(f"model input {spec.name!r} has dynamic dimensions {_fmt(spec.shape)}: give them with "
                           f"--input-shape {spec.name}={example}")


def load_labels(path: str | Path, calib: Calibration) -> np.ndarray:
    """Class labels (integers, one per calibration sample) from an .npy file."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"labels file not found: {path}")
    try:
        labels = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ConvertError(f"labels file {path} is not a numpy .npy array: {_first_line(e)}") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ConvertError(f"labels file {path.name} must hold one integer class per sample; it holds "
                           f"{labels.dtype.name}{list(labels.shape)}")
    if len(labels) != calib.samples:
        raise ConvertError(f"labels file {path.name} has {len(labels)} labels for {calib.samples} calibration samples")
    return labels


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
