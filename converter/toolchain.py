"""The onnx2tf toolchain: a virtual environment of its own, made on demand, run as a subprocess.

onnx2tf cannot share a venv with the runtime side (it pins numpy 1.26, onnx 1.19, onnxruntime 1.23,
TensorFlow 2.19, ...: about 2.6 GB), so it lives at ``$EDGEFLEET_ONNX2TF_VENV`` or
``cache_dir()/toolchains/onnx2tf``. ``onnx2tf_venv()`` builds it with ``python -m venv`` + ``pip install``
of the exact set below (a pip freeze of a venv that converted the PP-OCR classifier here), verifies it
with a real conversion of a tiny model, then writes a stamp. A venv without a matching stamp is half
made (interrupted, or made for other pins): it is removed and rebuilt.

``run_onnx2tf(args, cwd)`` runs ``<venv>/bin/onnx2tf`` with the venv's ``bin/`` first on PATH (onnx2tf
shells out to ``onnxsim``), with a timeout; a failure is a ``ConvertError`` naming onnx2tf's own
last meaningful line. It needs no network once the venv exists (see ``place_calibration_dummy``).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from converter import ConvertError

ENV = "EDGEFLEET_ONNX2TF_VENV"
ONNX2TF = "onnx2tf==1.29.24"  # the last release for Python < 3.12; 2.x needs 3.12 and TensorFlow 2.21
# Everything pip installed for ONNX2TF on Python 3.11 (`pip check` clean), pinned so that a venv built
# later is the one that was verified.
PINS = """
absl-py==2.5.1 ai-edge-litert==2.1.0 astunparse==1.6.3 backports.strenum==1.2.8 certifi==2026.10.19.post1
charset-normalizer==3.5.2 coloredlogs==15.0.1 flatbuffers==25.12.19 gast==0.7.0 google-pasta==0.2.0
grpcio==1.85.3 h5py==3.11.0 humanfriendly==10.0 idna==3.20 json2onnx==2.0.3 keras==3.15.1 libclang==18.1.1
Markdown==3.11.3 markdown-it-py==4.3.0 MarkupSafe==3.0.4 mdurl==0.1.2 ml_dtypes==0.5.1 mpmath==1.3.0
namex==0.1.0 numpy==1.26.4 onnx==1.19.1 onnx2json==2.0.4 onnx2tf==1.29.24 onnx_graphsurgeon==0.5.8
onnxoptimizer==0.4.2 onnxruntime==1.23.0 onnxsim==0.4.36 opencv-python==4.11.0.86 opt_einsum==3.4.0
optree==0.20.0 packaging==26.3 protobuf==4.25.5 psutil==5.9.5 Pygments==2.21.0 requests==2.32.5 rich==15.0.0
sam4onnx==2.0.0 sbi4onnx==1.0.7 scc4onnx==1.0.7 scs4onnx==1.0.18 sde4onnx==1.0.0 sed4onnx==1.0.5
simple_onnx_processing_tools==1.1.32 sio4onnx==1.0.3 sit4onnx==1.0.10 six==1.17.0 sna4onnx==1.0.6
snc4onnx==1.0.14 snd4onnx==1.1.7 sne4onnx==2.0.1 sng4onnx==2.0.1 soa4onnx==1.0.5 soc4onnx==1.0.2
sod4onnx==1.0.0 sog4onnx==1.0.17 sor4onnx==1.0.7 spo4onnx==1.0.5 ssc4onnx==1.0.8 ssi4onnx==1.0.4
svs4onnx==1.0.0 sympy==1.14.0 tensorboard==2.19.0 tensorboard-data-server==0.7.2 tensorflow==2.19.0
tensorflow-io-gcs-filesystem==0.37.1 termcolor==3.3.0 tf_keras==2.19.0 tqdm==4.70.1 typing_extensions==4.16.0
urllib3==2.8.0 Werkzeug==3.1.9 wrapt==2.5.2
""".split()
PYTHONS = ((3, 10), (3, 11), (3, 12))  # TensorFlow 2.19 ships wheels for these
STAMP = ".edgefleet-toolchain"
SETUP_HINT = ".venv/bin/python -c 'from converter.toolchain import onnx2tf_venv; onnx2tf_venv()'"
DEFAULT_TIMEOUT = 3600.0
# onnx2tf downloads 20 MS-COCO images to calibrate RGB inputs of <= 20xHxWx3 unless this file is in its cwd.
CALIBRATION_DUMMY = "calibration_image_sample_data_20x128x128x3_float32.npy"


def venv_path() -> Path:
    from edgefleet.models import cache_dir

    return Path(os.environ.get(ENV) or cache_dir() / "toolchains" / "onnx2tf")


def stamp_text() -> str:
    """What a verified venv's stamp holds: the pins it was built from."""
    return f"{ONNX2TF}\n{hashlib.sha256(' '.join(sorted(PINS)).encode()).hexdigest()}\n"


def ready() -> bool:
    """Whether the toolchain venv exists and was verified for the current pins (no side effects)."""
    venv = venv_path()
    try:
        return (venv / STAMP).read_text() == stamp_text() and (venv / "bin" / "onnx2tf").exists()
    except OSError:
        return False


def onnx2tf_venv(create: bool = True) -> Path:
    """The path of a verified onnx2tf venv, building it first if needed (unless ``create`` is false)."""
    venv = venv_path()
    if ready():
        return venv
    if not create:
        raise ConvertError(f"the onnx2tf toolchain is not set up at {venv}: run `{SETUP_HINT}` "
                           f"(about 2.6 GB from PyPI)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    with _lock(venv.parent / f".{venv.name}.lock"):
        if ready():  # another process built it while we waited
            return venv
        _build(venv)
    return venv


def run_onnx2tf(args: list[str], cwd: Path, *, timeout: float = DEFAULT_TIMEOUT) -> subprocess.CompletedProcess:
    """Run onnx2tf in ``cwd``; its combined output is also kept in ``cwd/onnx2tf.log``."""
    venv = onnx2tf_venv(create=False)
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    place_calibration_dummy(cwd)
    try:
        proc = _invoke(venv, args, cwd, timeout)
    except subprocess.TimeoutExpired as e:
        _keep_log(cwd, e.stdout)
        raise ConvertError(f"onnx2tf did not finish within {timeout:.0f} s") from None
    _keep_log(cwd, proc.stdout)
    if proc.returncode != 0:
        raise ConvertError(f"onnx2tf failed: {last_meaningful_line(proc.stdout)} (log: {cwd / 'onnx2tf.log'})")
    return proc


def _invoke(venv: Path, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "VIRTUAL_ENV": str(venv), "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1",
           "PYTHONNOUSERSITE": "1", "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("PYTHONPATH", None)  # the host's packages (numpy 2, onnx 1.2x) must not shadow the venv's
    return subprocess.run([str(venv / "bin" / "onnx2tf"), *map(str, args)], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", timeout=timeout)


def place_calibration_dummy(cwd: Path) -> None:
    """Stop onnx2tf's download of its sample calibration images (FINDINGS: it tries even with -cind)."""
    path = Path(cwd) / CALIBRATION_DUMMY
    if not path.exists():
        import numpy as np

        np.save(path, np.zeros((20, 128, 128, 3), np.float32))


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit))\b:?")
_GENERIC = ("Read this and deal with it", "Alternatively, if the input OP", "If the input OP of ONNX",
            "Also, for models that include", "input_onnx_file_path:", "The trace log is below",
            "Conversion failed. Automatic JSON")


def last_meaningful_line(output: str | bytes | None) -> str:
    """The line of onnx2tf's output that says what went wrong (its Python exception, with the ONNX op)."""
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    lines = [_ANSI.sub("", line).strip() for line in (output or "").splitlines()]
    lines = [line for line in lines if line]
    op = next((line.split(":", 2)[2].strip() for line in reversed(lines)
               if line.startswith("ERROR: onnx_op_name:")), None)
    found = None
    for i in range(len(lines) - 1, -1, -1):
        if _EXCEPTION.match(lines[i]):
            found = lines[i]
            # Keras wraps the real message: "ValueError: Exception encountered when calling layer ..."
            if "Exception encountered when calling layer" in found and i + 1 < len(lines):
                found = lines[i + 1]
            break
    if found is None:
        errors = [line for line in lines if line.startswith("ERROR:") and not any(g in line for g in _GENERIC)]
        found = errors[-1] if errors else (lines[-1] if lines else "no output")
    found = found[:300]
    return f"{found} (at ONNX op {op})" if op and op not in found else found


# ---- building the venv ---------------------------------------------------------------------------


def _build(venv: Path) -> None:
    t0 = time.monotonic()
    python = _python()
    if venv.exists():
        _say(f"removing the half-made toolchain at {venv}")
        shutil.rmtree(venv)
    _say(f"creating the onnx2tf toolchain at {venv} ({ONNX2TF}, TensorFlow 2.19: about 2.6 GB; "
         f"this takes minutes, once)")
    try:
        _run([python, "-m", "venv", str(venv)], "python -m venv")
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        requirements = venv / "requirements.txt"
        requirements.write_text("\n".join(PINS) + "\n")
        _pip_install([*pip, "install", "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
                      "-r", str(requirements)])
        _run([*pip, "check"], "pip check")
        _say("verifying the toolchain with a real conversion of a tiny model")
        _verify(venv)
    except BaseException:
        shutil.rmtree(venv, ignore_errors=True)
        raise
    (venv / STAMP).write_text(stamp_text())
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    _say(f"onnx2tf toolchain ready ({size / 1e9:.1f} GB, {time.monotonic() - t0:.0f} s)")


def _python() -> str:
    """A Python that TensorFlow 2.19 has wheels for: this one, else python3.12/3.11/3.10 on PATH."""
    if sys.version_info[:2] in PYTHONS:
        return getattr(sys, "_base_executable", None) or sys.executable
    for major, minor in reversed(PYTHONS):
        if found := shutil.which(f"python{major}.{minor}"):
            return found
    raise ConvertError(f"the onnx2tf toolchain needs Python 3.10-3.12 (TensorFlow 2.19); this is "
                       f"{sys.version_info.major}.{sys.version_info.minor} and none of python3.10-3.12 is on PATH")


def _pip_install(cmd: list[str]) -> None:
    """pip install, with one progress line per package on stderr."""
    total = len(PINS)
    seen = 0
    tail: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env={**os.environ, "PYTHONNOUSERSITE": "1"})
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-20:]
        if line.startswith(("Collecting ", "Processing ")):
            seen += 1
            _say(f"  [{min(seen, total)}/{total}] {Path(line.split()[1]).name}")
        elif line.startswith("Installing collected packages"):
            _say(f"  installing {total} packages ...")
    if proc.wait() != 0:
        meaningful = [t for t in tail if t.startswith("ERROR")] or tail or ["no output"]
        raise ConvertError(f"cannot install the onnx2tf toolchain: {meaningful[-1]}")


_TINY = r"""
import numpy as np, onnx
from onnx import TensorProto, helper, numpy_helper
w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
graph = helper.make_graph(
    [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
    "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), "tiny.onnx")
"""


def _verify(venv: Path) -> None:
    work = venv / ".verify"
    work.mkdir()
    try:
        _run([str(venv / "bin" / "python"), "-c", _TINY], "building the tiny test model", cwd=work)
        place_calibration_dummy(work)
        proc = _invoke(venv, ["-i", "tiny.onnx", "-o", "out", "-n"], work, 600)
        if proc.returncode != 0 or not (work / "out" / "tiny_float32.tflite").exists():
            raise ConvertError(f"the new onnx2tf toolchain cannot convert a tiny model: "
                               f"{last_meaningful_line(proc.stdout)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(cmd: list[str], what: str, *, cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                          env={**os.environ, "PYTHONNOUSERSITE": "1"})
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        raise ConvertError(f"onnx2tf toolchain: {what} failed: {lines[-1]}")


def _keep_log(cwd: Path, output: str | bytes | None) -> None:
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    try:
        (cwd / "onnx2tf.log").write_text(_ANSI.sub("", output or ""))
    except OSError:
        pass


@contextmanager
def _lock(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _say(line: str) -> None:
    print(f"edgefleet: {line}", file=sys.stderr, flush=True)
