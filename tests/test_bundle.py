"""The bundle: written atomically, verified, and unpacked only when it is safe and whole."""

import io
import tarfile

import pytest

from agent import bundle as b


def _manifest(**kw):
    fields = dict(name="m", version="1", target="cpu", runtime="onnxruntime", precision="fp32",
                  model="model.onnx", files=[], inputs=[b.TensorSpec(name="x", shape=[-1, 3], dtype="float32")],
                  outputs=[b.TensorSpec(name="y", shape=[-1, 2], dtype="float32")])
    fields.update(kw)
    return b.Manifest(**fields)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"not really onnx, but bytes with a sha256" * 100)
    (tmp_path / "sample.npz").write_bytes(b"sample")
    return {"model.onnx": tmp_path / "model.onnx", "sample.npz": tmp_path / "sample.npz"}


def test_write_read_unpack_round_trip(tmp_path, files):
    out = tmp_path / "out" / "m.tar"
    sha = b.write_bundle(out, _manifest(), files)
    assert sha == b.sha256_file(out)
    assert [p.name for p in out.parent.iterdir()] == ["m.tar"]  # no temp file left
    m = b.read_manifest(out)
    assert {f.path for f in m.files} == {"model.onnx", "sample.npz"}
    assert m.created
    dest = tmp_path / "unpacked"
    b.safe_unpack(out, dest)
    assert (dest / "model.onnx").read_bytes() == files["model.onnx"].read_bytes()
    assert b.decode_manifest((dest / b.MANIFEST).read_bytes()) == m


def test_verify_file_names_size_and_sha_mismatch(tmp_path, files):
    out = tmp_path / "m.tar"
    sha = b.write_bundle(out, _manifest(), files)
    size = out.stat().st_size
    b.verify_file(out, size, sha)
    with pytest.raises(b.BundleError, match="size mismatch"):
        b.verify_file(out, size + 1, sha)
    data = bytearray(out.read_bytes())
    data[-1000] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(b.BundleError, match="sha256 mismatch"):
        b.verify_file(out, size, sha)


def _evil_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _file(name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


@pytest.mark.parametrize("evil", ["../escape", "/etc/evil", "a/../../escape"])
def test_unsafe_paths_are_refused(tmp_path, evil):
    m = _manifest(files=[b.FileEntry(path="model.onnx", sha256="0" * 64, size=1)])
    bad = tmp_path / "bad.tar"
    _evil_tar(bad, [_file(b.MANIFEST, b.encode_manifest(m)), _file(evil, b"x")])
    with pytest.raises(b.BundleError, match="unsafe path"):
        b.safe_unpack(bad, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert not (tmp_path.parent / "escape").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.tar"]  # no half-unpacked dir


def test_links_are_refused(tmp_path, files):
    good = tmp_path / "good.tar"
    b.write_bundle(good, _manifest(), files)
    m = b.read_manifest(good)
    link = tarfile.TarInfo("model.onnx")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    bad = tmp_path / "bad.tar"
    _evil_tar(bad, [_file(b.MANIFEST, b.encode_manifest(m)), (link, None)])
    with pytest.raises(b.BundleError, match="not a regular file"):
        b.safe_unpack(bad, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_a_member_that_does_not_match_the_manifest_is_refused(tmp_path, files):
    good = tmp_path / "good.tar"
    b.write_bundle(good, _manifest(), files)
    m = b.read_manifest(good)
    bad = tmp_path / "bad.tar"
    _evil_tar(bad, [_file(b.MANIFEST, b.encode_manifest(m)),
                    _file("model.onnx", b"tampered"), _file("sample.npz", b"sample")])
    with pytest.raises(b.BundleError, match="does not match"):
        b.safe_unpack(bad, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_not_a_bundle(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_text("hello")
    with pytest.raises(b.BundleError, match="not a bundle"):
        b.read_manifest(junk)
    plain = tmp_path / "plain.tar"
    _evil_tar(plain, [_file("readme.txt", b"hi")])
    with pytest.raises(b.BundleError, match="no manifest.json"):
        b.read_manifest(plain)


def test_manifest_must_name_its_model_among_its_files(tmp_path, files):
    with pytest.raises(b.BundleError, match="not among its files"):
        b.write_bundle(tmp_path / "m.tar", _manifest(model="other.onnx"), files)
    assert not list(tmp_path.glob("*.tar"))
