"""Calibration data: one ``.npz`` array per model input, keyed by input name, samples along axis 0.

Loaded and checked against the model's inputs here (names, dtypes, ranks, fixed dims, sample count,
finite values), then split: the last 20 % of samples (at least one) are held out for evaluation,
the rest calibrate the int8 variant. Pure numpy: no toolchain is imported.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.bundle import TensorSpec, sha256_file
from converter import ConvertError

MIN_SAMPLES = 10  # fewer cannot calibrate int8 activation ranges, nor leave any held-out samples
HELD_OUT = 0.2


@dataclass(frozen=True)
class Calibration:
    path: Path
    sha256: str
    arrays: dict[str, np.ndarray]  # input name -> [n, ...]

    @property
    def samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    @property
    def n_eval(self) -> int:
        return max(1, int(self.samples * HELD_OUT))

    def calibration_split(self) -> dict[str, np.ndarray]:
        return {k: v[: self.samples - self.n_eval] for k, v in self.arrays.items()}

    def held_out(self) -> dict[str, np.ndarray]:
        return {k: v[self.samples - self.n_eval :] for k, v in self.arrays.items()}


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
    """Read the npz and check it against ``specs`` (shape -1 where a dimension is dynamic)."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"calibration file not found: {path}")
    if not path.is_file() or not zipfile.is_zipfile(path):
        raise ConvertError(f"calibration file {path} is not an .npz archive (expected numpy.savez output, "
                           f"one array per model input)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as e:  # a damaged member, object arrays, ...
        raise ConvertError(f"calibration file {path} cannot be read as .npz: {_first_line(e)}") from None
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ConvertError(f"calibration file {path.name} has no array for model input {missing[0]!r} "
                           f"(it holds: {', '.join(map(repr, arrays)) or 'nothing'})")
    extra = [k for k in arrays if k not in names]
    if extra:
        raise ConvertError(f"calibration file {path.name} has array {extra[0]!r}, which is not a model input "
                           f"(inputs: {', '.join(map(repr, names))})")
    counts = set()
    for spec in specs:
        a = arrays[spec.name]
        if a.dtype.name != spec.dtype:
            raise ConvertError(f"calibration array {spec.name!r} is {a.dtype.name} but the model input is "
                               f"{spec.dtype}")
        if a.ndim != len(spec.shape):
            raise ConvertError(f"calibration array {spec.name!r} has shape {list(a.shape)} (rank {a.ndim}) but the "
                               f"model input is {_fmt(spec.shape)} (rank {len(spec.shape)}; samples go along "
                               f"axis 0)")
        for axis in range(1, a.ndim):
            if spec.shape[axis] > 0 and a.shape[axis] != spec.shape[axis]:
                raise ConvertError(f"calibration array {spec.name!r} has shape {list(a.shape)} but the model "
                                   f"input is {_fmt(spec.shape)} (dimension {axis} differs)")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ConvertError(f"calibration array {spec.name!r} holds NaN or infinite values")
        counts.add(len(a))
    if len(counts) > 1:
        raise ConvertError(f"calibration arrays disagree on the number of samples: {sorted(counts)}")
    n = counts.pop()
    if n < MIN_SAMPLES:
        raise ConvertError(f"calibration file {path.name} has {n} sample(s); need at least {MIN_SAMPLES} "
                           f"(the last 20 % are held out for evaluation)")
    return Calibration(path, sha256_file(path), arrays)


def require_static(specs: list[TensorSpec]) -> None:
    """Every dim but the batch dim must be fixed (by the model or --input-shape): compilers and
    quantizers need them, and a guess from the data would silently pin a shape devices may not send."""
    for spec in specs:
        if any(d < 0 for d in spec.shape[1:]):
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
