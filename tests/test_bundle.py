"""The bundle: written atomically, verified, and unpacked only when it is safe and whole."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile

import msgspec
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
    m = _manifest(files=[b.FileEntry(path="model.onnx", sha256="0" * 64, size=1),
                         b.FileEntry(path="sample.npz", sha256="0" * 64, size=1)])
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
    tampered = b"X" + files["model.onnx"].read_bytes()[1:]  # the same size, other bytes
    _evil_tar(bad, [_file(b.MANIFEST, b.encode_manifest(m)),
                    _file("model.onnx", tampered), _file("sample.npz", b"sample")])
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
    with pytest.raises(b.BundleError, match="cannot read it"):
        b.read_manifest(tmp_path / "missing.tar")


def test_manifest_must_name_its_model_among_its_files(tmp_path, files):
    with pytest.raises(b.BundleError, match="not among its files"):
        b.write_bundle(tmp_path / "m.tar", _manifest(model="other.onnx"), files)
    assert not list(tmp_path.glob("*.tar"))


# --- what a hostile bundle may try: each refused from its headers, before anything is written ---------------

def _du(path) -> int:
    """Bytes allocated under ``path`` (sparse files count what they really take)."""
    total = 0
    for root, dirs, names in os.walk(path):
        for n in dirs + names:
            total += os.lstat(os.path.join(root, n)).st_blocks * 512
    return total


@pytest.fixture
def state(tmp_path):
    """Where an agent would unpack (like STATE_DIR/models): must stay small and hold nothing afterwards."""
    d = tmp_path / "state" / "models"
    d.mkdir(parents=True)
    return d


def _assert_nothing_written(state):
    assert list(state.iterdir()) == []  # neither the destination nor a temporary directory
    assert _du(state.parent) < 1 << 20


def _refused(bundle, state, match):
    with pytest.raises(b.BundleError, match=match):
        b.read_manifest(bundle)  # what the controller checks on upload
    with pytest.raises(b.BundleError, match=match):
        b.safe_unpack(bundle, state / "dest")
    _assert_nothing_written(state)


def _entry(path, data):
    return b.FileEntry(path=path, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


SAMPLE = b"sample"


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to make sparse members")
@pytest.mark.parametrize("fmt", ["gnu", "pax-0.0", "pax-0.1", "pax-1.0"])
def test_a_sparse_member_is_refused_before_a_byte_is_written(tmp_path, state, fmt):
    """A 4 GiB sparse file in a tiny bundle: tarfile's isfile()/isreg() accept it; the unpack must not."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "model.onnx", "wb") as f:
        f.truncate(4 << 30)
    (src / "sample.npz").write_bytes(SAMPLE)
    m = _manifest(files=[b.FileEntry(path="model.onnx", sha256="0" * 64, size=4 << 30), _entry("sample.npz", SAMPLE)])
    (src / b.MANIFEST).write_bytes(b.encode_manifest(m))
    out = tmp_path / "sparse.tar"
    flags = ["--format=gnu"] if fmt == "gnu" else ["--format=pax", f"--sparse-version={fmt[4:]}"]
    subprocess.run(["tar", "--sparse", *flags, "-cf", str(out), "-C", str(src), b.MANIFEST, "model.onnx",
                    "sample.npz"], check=True)
    assert out.stat().st_size < 64 << 10  # tiny, and it claims 4 GiB
    _refused(out, state, r"'model.onnx' is not a regular file: it is a sparse file")


def test_a_member_larger_than_its_manifest_entry_is_refused_before_it_is_written(tmp_path, state):
    data = b"m" * 5000
    m = _manifest(files=[_entry("model.onnx", data[:4000]), _entry("sample.npz", SAMPLE)])
    bad = tmp_path / "bad.tar"
    _evil_tar(bad, [_file(b.MANIFEST, b.encode_manifest(m)), _file("model.onnx", data), _file("sample.npz", SAMPLE)])
    _refused(bad, state, r"'model.onnx' is 5000 bytes in the tar but 4000 in the manifest")


def test_too_many_members_are_refused(tmp_path, state):
    members = [_file(b.MANIFEST, b.encode_manifest(_manifest(files=[_entry("model.onnx", b"x"),
                                                                      _entry("sample.npz", SAMPLE)])))]
    members += [_file(f"f{i}", b"x") for i in range(b.MAX_MEMBERS)]  # 1001 in all
    bad = tmp_path / "bad.tar"
    _evil_tar(bad, members)
    _refused(bad, state, f"more than {b.MAX_MEMBERS} members")


def _special(name, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "/etc/passwd"
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3  # /dev/null
    if kind == tarfile.CONTTYPE:
        info.size = 1
        return info, b"x"
    return info, None


@pytest.mark.parametrize("kind, what", [(tarfile.FIFOTYPE, "a FIFO"), (tarfile.CHRTYPE, "a character device"),
                                        (tarfile.BLKTYPE, "a block device"), (tarfile.SYMTYPE, "a symbolic link"),
                                        (tarfile.LNKTYPE, "a hard link"), (tarfile.DIRTYPE, "a directory"),
                                        (tarfile.CONTTYPE, "a contiguous file")])
def test_members_that_are_not_plain_files_are_refused(tmp_path, state, kind, what):
    m = _manifest(files=[_entry("model.onnx", b"x"), _entry("sample.npz", SAMPLE)])
    bad = tmp_path / "bad.tar"
    _evil_tar(bad, [_file(b.MANIFEST, b.encode_manifest(m)), _special("model.onnx", kind),
                    _file("sample.npz", SAMPLE)])
    _refused(bad, state, f"'model.onnx' is not a regular file: it is {what}")


@pytest.mark.parametrize("evil", ["../escape", "/etc/evil", "a/../../escape"])
def test_unsafe_member_names_leave_nothing_behind(tmp_path, state, evil):
    m = _manifest(files=[_entry("model.onnx", b"x"), _entry("sample.npz", SAMPLE)])
    bad = tmp_path / "bad.tar"
    _evil_tar(bad, [_file(b.MANIFEST, b.encode_manifest(m)), _file("model.onnx", b"x"),
                    _file("sample.npz", SAMPLE), _file(evil, b"x")])
    _refused(bad, state, "unsafe path in bundle")
    assert not (tmp_path.parent / "escape").exists()


@pytest.mark.parametrize("sample, field", [("/etc/passwd", r"\$\.sample"),
                                           ("../x", r"unsafe path in manifest\.sample: '\.\./x'"),
                                           ("other.npz", "sample 'other.npz' is not among its files")])
def test_the_sample_must_be_one_of_the_bundles_files(tmp_path, state, files, sample, field):
    m = _manifest(sample=sample, files=[_entry("model.onnx", b"x"), _entry("sample.npz", SAMPLE)])
    bad = tmp_path / "bad.tar"
    _evil_tar(bad, [_file(b.MANIFEST, b.encode_manifest(m)), _file("model.onnx", b"x"), _file("sample.npz", SAMPLE)])
    _refused(bad, state, field)
    with pytest.raises(b.BundleError, match=field):
        b.write_bundle(tmp_path / "m.tar", _manifest(sample=sample), files)


def test_an_oversized_extended_header_is_refused_before_it_is_read(tmp_path, state):
    m = _manifest(files=[_entry("model.onnx", b"x"), _entry("sample.npz", SAMPLE)])
    info, data = _file("model.onnx", b"x")
    info.pax_headers = {"comment": "x" * (b.MAX_HEADER_BYTES + 1)}
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, d in [_file(b.MANIFEST, b.encode_manifest(m)), (info, data), _file("sample.npz", SAMPLE)]:
            tar.addfile(i, io.BytesIO(d))
    _refused(bad, state, "extended tar header")


def test_the_declared_sizes_are_capped_before_writing(tmp_path, state, files):
    good = tmp_path / "good.tar"
    b.write_bundle(good, _manifest(), files)
    declared = sum(f.size for f in b.read_manifest(good).files)
    with pytest.raises(b.BundleError, match="more than the limit of 100"):
        b.safe_unpack(good, state / "dest", max_bytes=100)
    _assert_nothing_written(state)
    b.safe_unpack(good, state / "dest", max_bytes=declared + 4096)


@pytest.mark.parametrize("field, value", [("name", "n" * 129), ("version", "1 (beta)"), ("runtime", "x" * 33),
                                          ("precision", "fp32\n"), ("settings", {f"k{i}": 1 for i in range(65)}),
                                          ("inputs", [{"name": "x", "shape": [1], "dtype": "float32"}] * 65)])
def test_manifest_fields_are_bounded(field, value):
    doc = msgspec.to_builtins(_manifest(files=[_entry("model.onnx", b"x"), _entry("sample.npz", SAMPLE)]))
    b.decode_manifest(json.dumps(doc).encode())
    doc[field] = value
    with pytest.raises(b.BundleError, match=rf"\$\.{field}"):
        b.decode_manifest(json.dumps(doc).encode())
