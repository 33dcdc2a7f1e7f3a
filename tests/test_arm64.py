"""The emulated aarch64 (converter/arm64.py) the arm target's numerics and the aarch64 agent test run in: it is an
aarch64, it runs this checkout's code, and its runtimes are the host's versions."""

from __future__ import annotations

import json

import pytest

from converter import arm64

pytestmark = pytest.mark.skipif(arm64.unavailable() is not None or not arm64.ready(),
                                reason=f"no emulated aarch64 here: {arm64.unavailable() or 'not made'}")


def test_it_is_an_aarch64_running_this_checkout_with_the_hosts_runtime_versions():
    import onnxruntime

    code = ("import json, platform, onnxruntime, agent; "
            "print(json.dumps([platform.machine(), onnxruntime.__version__, agent.__file__]))")
    proc = arm64.run(["python", "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    machine, ort, where = json.loads(proc.stdout.strip().splitlines()[-1])
    assert machine == "aarch64" and ort == onnxruntime.__version__
    assert where == f"{arm64.SRC}/agent/__init__.py"


def test_a_missing_tree_is_not_ready_and_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setenv(arm64.ENV, str(tmp_path / "none"))
    assert not arm64.ready()
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / arm64.STAMP).write_text("bookworm\nother pins\n")  # made for other pins: half made
    assert not arm64.ready()
