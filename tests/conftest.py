"""Shared fixtures: real objects only (a real mosquitto, real files), never fakes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

import pytest

from agent import bundle


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (free a moment ago)."""
    from fleet.broker import free_port as pick

    return pick("127.0.0.1")


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator["fleet.broker.Mosquitto"]:  # noqa: F821
    """A started mosquitto with the embedded broker's secure config (TLS, client certificates from a fleet CA,
    the ACL) on a free port; ``.url`` is mqtts://127.0.0.1:PORT and ``.pki`` the CA (``fleet.pki.PKI``): give a
    Fleet on this broker ``pki_dir=mosquitto.pki.root`` so that both trust the same CA."""
    from fleet.broker import Mosquitto
    from fleet.pki import PKI

    pki = PKI(tmp_path_factory.mktemp("pki")).ensure(["localhost", "127.0.0.1"])
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"), port=0, pki=pki).start()
    try:
        yield broker
    finally:
        broker.stop()


OUTPUT = "save_infer_model/scale_0.tmp_1"  # the PP-OCR classifier's output


@pytest.fixture(scope="session")
def crops():
    from edgefleet.data import text_direction

    return text_direction(40)


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, crops):
    """Real fp32 bundles of the PP-OCR classifier, built directly with the bundle writer and signed with the
    tests' release key: serial 1 for v1, 2 for the others (which a device may go between either way)."""
    from edgefleet.models import model_path
    from util import release_key

    key, _ = release_key()

    d = tmp_path_factory.mktemp("bundles")
    x, _ = crops
    np.savez(d / "sample.npz", x=x[:1])

    def make(version, **kw):
        m = bundle.Manifest(
            name="ocr-cls", version=version, target="cpu", runtime="onnxruntime", precision="fp32",
            model="model.onnx", files=[], latency_budget_ms=kw.pop("budget", 10_000.0),
            inputs=[bundle.TensorSpec(name="x", shape=[-1, 3, 48, 192], dtype="float32")],
            outputs=[bundle.TensorSpec(name=OUTPUT, shape=kw.pop("out_shape", [-1, 2]), dtype="float32")],
        )
        path = d / f"ocr-{version}.tar"
        bundle.write_bundle(path, m, {"model.onnx": model_path("ocr-cls"), "sample.npz": d / "sample.npz"},
                            sign_key=key, serial=1 if version == "1" else 2)
        return path

    def make_nan():
        """A model that loads and runs but answers NaN."""
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        graph = helper.make_graph(
            [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Mul", ["m", "nan"], [OUTPUT])], "nan",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 48, 192])],
            [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", 3])],
            [numpy_helper.from_array(np.array(np.nan, np.float32), "nan")])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(d / "nan.onnx"))
        m = bundle.Manifest(
            name="ocr-cls", version="nan", target="cpu", runtime="onnxruntime", precision="fp32",
            model="model.onnx", files=[], latency_budget_ms=10_000.0,
            inputs=[bundle.TensorSpec(name="x", shape=[-1, 3, 48, 192], dtype="float32")],
            outputs=[bundle.TensorSpec(name=OUTPUT, shape=[-1, 3], dtype="float32")])
        path = d / "ocr-nan.tar"
        bundle.write_bundle(path, m, {"model.onnx": d / "nan.onnx", "sample.npz": d / "sample.npz"},
                            sign_key=key, serial=2)
        return path

    return {"v1": make("1"), "v2": make("2"), "slow": make("slow", budget=0.001),
            "badshape": make("badshape", out_shape=[-1, 7]), "nan": make_nan()}


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator["pgcluster.Cluster"]:  # noqa: F821
    """A throwaway PostgreSQL server for one test module (tests/pgcluster.py); ``.new_database()`` gives a URL."""
    from pgcluster import Cluster

    with Cluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """A fresh, empty fleet database's URL, once per backend: a SQLite file, or a new database on the module's
    throwaway PostgreSQL cluster (``pg_cluster``); tests that take it run on both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/fleet.db"
    return request.getfixturevalue("pg_cluster").new_database()
