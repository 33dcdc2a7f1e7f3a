"""The release-key commands as a user runs them: `edgefleet keys`, `edgefleet sign`, `edgefleet convert --sign-key`
and `edgefleet agent trust`, on real files, through the CLI's main() or a real process. Each refusal is one line,
a non-zero exit, and leaves every file as it was."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import msgspec
import pytest

from agent import bundle, protocol, signing
from agent.trust import TrustStore, Untrusted
from edgefleet.cli import main

ROOT = Path(__file__).resolve().parent.parent
PASSPHRASE_ENV = signing.PASSPHRASE_ENV


@pytest.fixture(autouse=True)
def _no_passphrase_env(monkeypatch):
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


def run(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`edgefleet ARGS` in a real process, stdin not a terminal, $EDGEFLEET_KEY_PASSPHRASE only from ``env``."""
    env = {**{k: v for k, v in os.environ.items() if k != PASSPHRASE_ENV}, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgefleet.cli", *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=120)


def one_line_error(capsys, needle: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert "Traceback" not in err
    return err


def generate(d: Path, name: str = "release", *extra) -> tuple[Path, Path]:
    assert main(["keys", "generate", "--out", str(d), "--name", name, *map(str, extra)]) == 0
    return d / f"{name}.key", d / f"{name}.pub"


def files_of(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


# --- keys -----------------------------------------------------------------------------------------------------
def test_generate_makes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, capsys):
    key, pub = generate(tmp_path / "keys")
    out = capsys.readouterr().out
    kid = signing.load_public(pub).keyid
    assert str(key) in out and str(pub) in out and kid in out
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert signing.keyid(signing.load_private(key).public_key()) == kid
    before = key.read_bytes(), pub.read_bytes()
    assert main(["keys", "generate", "--out", str(tmp_path / "keys")]) == 2
    one_line_error(capsys, "already exists")
    assert (key.read_bytes(), pub.read_bytes()) == before
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["release.key", "release.pub"]

    assert main(["keys", "show", str(pub), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["name"], shown["keyid"]) == ("release", kid)
    assert main(["keys", "show", str(pub)]) == 0
    assert capsys.readouterr().out.split() == ["release", kid]
    assert main(["keys", "show", str(key)]) == 2
    one_line_error(capsys, "not a PEM public key")


def test_an_encrypted_key_needs_its_passphrase_and_never_prompts_without_a_terminal(tmp_path, capsys):
    pw = tmp_path / "pw"
    pw.write_text("correct horse\n")
    key, pub = generate(tmp_path, "enc", "--passphrase-file", pw)
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    new_key, new_pub = generate(tmp_path, "new")
    capsys.readouterr()
    statement = tmp_path / "st.json"
    args = ["keys", "rotate", "--key", key, "--new", new_pub, "--out", statement]

    none = run(*args)  # stdin is /dev/null: refused at once, not a prompt waiting for ever
    assert none.returncode == 2 and len(none.stderr.splitlines()) == 1, none.stderr
    assert "is encrypted: give its passphrase" in none.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("battery staple\n")
    bad = run(*args, "--passphrase-file", wrong)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "wrong passphrase" in bad.stderr, bad.stderr
    assert not statement.exists()

    env = run(*args, env={PASSPHRASE_ENV: "correct horse"})
    assert env.returncode == 0, env.stderr
    st = msgspec.json.decode(statement.read_bytes(), type=protocol.TrustStatement)
    assert st.by == signing.load_public(pub).keyid
    statement.unlink()
    assert main([*map(str, args), "--passphrase-file", str(pw)]) == 0
    assert statement.exists()


def test_a_rotate_statement_makes_devices_trust_the_new_key(tmp_path, capsys):
    old_key, old_pub = generate(tmp_path / "keys", "old")
    _, new_pub = generate(tmp_path / "keys", "new")
    statement = tmp_path / "rotate.json"
    assert main(["keys", "rotate", "--key", str(old_key), "--new", str(new_pub), "--out", str(statement)]) == 0
    assert "fleet keys add" in capsys.readouterr().out
    st = msgspec.json.decode(statement.read_bytes(), type=protocol.TrustStatement)
    new_id, old_id = signing.load_public(new_pub).keyid, signing.load_public(old_pub).keyid
    assert (st.op, st.keyid, st.name, st.by) == ("add", new_id, "new", old_id)

    trust_dir, state = tmp_path / "trust", tmp_path / "state"
    trust_dir.mkdir()
    state.mkdir()
    shutil.copy(old_pub, trust_dir / "old.pub")
    store = TrustStore(trust_dir, state)
    assert store.update([st]) == [f"trusts release key new ({new_id}), vouched for by {old_id}"]
    assert {r["keyid"]: r["trusted"] for r in store.listing()} == {old_id: True, new_id: True}

    # a device that does not trust the old key does not take the new one from it
    other = TrustStore(tmp_path / "empty", tmp_path / "state2")
    (tmp_path / "state2").mkdir()
    assert other.update([st]) == [] and other.listing() == []

    assert main(["keys", "rotate", "--key", str(old_key), "--new", str(old_pub), "--out", str(tmp_path / "x")]) == 2
    one_line_error(capsys, "public half of")
    assert not (tmp_path / "x").exists()


# --- sign -----------------------------------------------------------------------------------------------------
@pytest.fixture
def unsigned(tmp_path) -> Path:
    """A real (tiny) bundle, written without a key."""
    import numpy as np

    d = tmp_path / "src"
    d.mkdir()
    (d / "model.onnx").write_bytes(os.urandom(4096))
    np.savez(d / "sample.npz", x=np.zeros((1, 3), np.float32))
    m = bundle.Manifest(name="m", version="1", target="cpu", runtime="onnxruntime", precision="fp32",
                        model="model.onnx", files=[], inputs=[bundle.TensorSpec(name="x", shape=[-1, 3],
                                                                                dtype="float32")], outputs=[])
    path = tmp_path / "m-1.tar"
    bundle.write_bundle(path, m, {"model.onnx": d / "model.onnx", "sample.npz": d / "sample.npz"})
    return path


def test_sign_in_place_verifies_on_a_device_that_trusts_the_key(tmp_path, unsigned, capsys):
    key, pub = generate(tmp_path / "keys")
    trust_dir = tmp_path / "keys"  # holds release.pub (and release.key, which is not a *.pub)
    store = TrustStore(trust_dir)
    with pytest.raises(Untrusted, match="not signed"):
        parsed = bundle.read_signed(unsigned)
        store.verify_manifest(parsed.manifest_bytes, parsed.sig)
    capsys.readouterr()
    assert main(["sign", str(unsigned), "--key", str(key), "--serial", "41", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    parsed = bundle.read_signed(unsigned, check_files=True)
    assert parsed.manifest.serial == 41 == doc["serial"]
    assert doc["sha256"] == bundle.sha256_file(unsigned) and doc["keyid"] == signing.load_public(pub).keyid
    assert store.verify_manifest(parsed.manifest_bytes, parsed.sig).keyid == doc["keyid"]

    # re-signed elsewhere, with another key: the serial is kept, the original untouched
    other_key, other_pub = generate(tmp_path / "other", "ci")
    capsys.readouterr()
    out = tmp_path / "out" / "m-1.tar"
    before = unsigned.read_bytes()
    assert main(["sign", str(unsigned), "--key", str(other_key), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"replacing the signature by {doc['keyid']}" in text and "serial 41" in text
    assert unsigned.read_bytes() == before
    again = bundle.read_signed(out)
    assert again.manifest.serial == 41
    with pytest.raises(Untrusted, match="does not trust"):
        store.verify_manifest(again.manifest_bytes, again.sig)
    assert TrustStore(tmp_path / "other").verify_manifest(again.manifest_bytes, again.sig).name == "ci"


def test_sign_a_fixture_bundle_with_a_new_serial(tmp_path, bundles, capsys):
    key, _ = generate(tmp_path / "keys")
    copy = tmp_path / "v2.tar"
    shutil.copy(bundles["v2"], copy)
    assert run("sign", copy, "--key", key, "--serial", 7).returncode == 0
    parsed = bundle.read_signed(copy, check_files=True)
    assert parsed.manifest.serial == 7
    assert TrustStore(tmp_path / "keys").verify_manifest(parsed.manifest_bytes, parsed.sig)
    assert files_of(copy)["model.onnx"] == files_of(bundles["v2"])["model.onnx"]


def _tampered(src: Path, dest: Path) -> None:
    """``src`` with one byte of model.onnx flipped (same size, so only its sha256 betrays it)."""
    with tarfile.open(src) as old, tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as new:
        for m in old:
            data = old.extractfile(m).read()
            if m.name == "model.onnx":
                data = bytes([data[0] ^ 1]) + data[1:]
            new.addfile(m, io.BytesIO(data))


@pytest.mark.parametrize("case", ["not a bundle", "tampered file", "public key as key", "wrong passphrase",
                                  "encrypted, no passphrase", "missing key", "bad serial"])
def test_sign_refuses_bad_input_in_one_line_and_leaves_the_bundle_as_it_was(tmp_path, unsigned, capsys, case):
    key, _ = generate(tmp_path / "keys")
    pw, wrong = tmp_path / "pw", tmp_path / "wrong"
    pw.write_text("secret\n")
    wrong.write_text("guess\n")
    enc, _ = generate(tmp_path / "keys", "enc", "--passphrase-file", pw)
    capsys.readouterr()
    target, args, needle = unsigned, ["--key", key], None
    if case == "not a bundle":
        target = tmp_path / "model.onnx"
        target.write_bytes(os.urandom(2048))
        needle = "not a bundle"
    elif case == "tampered file":
        target = tmp_path / "tampered.tar"
        _tampered(unsigned, target)
        needle = "'model.onnx' does not match its manifest"
    elif case == "public key as key":
        args, needle = ["--key", tmp_path / "keys" / "release.pub"], "not a PEM private key"
    elif case == "wrong passphrase":
        args, needle = ["--key", enc, "--passphrase-file", wrong], "wrong passphrase"
    elif case == "encrypted, no passphrase":
        args, needle = ["--key", enc], "is encrypted"
    elif case == "missing key":
        args, needle = ["--key", tmp_path / "nope.key"], "cannot read key"
    else:
        args, needle = ["--key", key, "--serial", "0"], "--serial"
    before = sorted(p.name for p in target.parent.iterdir()), target.read_bytes()
    r = run("sign", target, *args)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert len(r.stderr.splitlines()) == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (sorted(p.name for p in target.parent.iterdir()), target.read_bytes()) == before  # no .part left


# --- convert --sign-key -----------------------------------------------------------------------------------------
def test_convert_signs_every_bundle_it_writes(tmp_path, crops, capsys):
    pytest.importorskip("onnx")
    import numpy as np

    from edgefleet.models import model_path

    key, pub = generate(tmp_path / "keys")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=crops[0][:12])
    capsys.readouterr()
    out = tmp_path / "out"
    code = main(["convert", str(model_path("ocr-cls")), "--calib", str(calib), "--out", str(out), "--name", "ocr",
                 "--input-shape", "x=1x3x48x192", "--sign-key", str(key), "--serial", "12"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    kid = signing.load_public(pub).keyid
    assert f"signed every bundle with release key {kid}, serial 12" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["signed"] == {"keyid": kid, "serial": 12}
    tars = sorted(out.glob("*.tar"))
    assert [p.name for p in tars] == sorted(v["bundle"] for v in report["variants"]) and tars
    store = TrustStore(tmp_path / "keys")
    for tar in tars:
        parsed = bundle.read_signed(tar, check_files=True)
        assert parsed.manifest.serial == 12
        assert store.verify_manifest(parsed.manifest_bytes, parsed.sig).keyid == kid
        assert bundle.sha256_file(tar) == next(v["bundle_sha256"] for v in report["variants"] if v["bundle"] ==
                                                tar.name)


@pytest.mark.parametrize("case", ["wrong passphrase", "not a key", "serial without a key"])
def test_convert_refuses_a_bad_key_before_any_work(tmp_path, case):
    pw, wrong = tmp_path / "pw", tmp_path / "wrong"
    pw.write_text("secret\n")
    wrong.write_text("guess\n")
    enc, pub = generate(tmp_path / "keys", "enc", "--passphrase-file", pw)
    args, needle = {"wrong passphrase": (["--sign-key", enc, "--passphrase-file", wrong], "wrong passphrase"),
                    "not a key": (["--sign-key", pub], "not a PEM private key"),
                    "serial without a key": (["--serial", "3"], "--serial needs --sign-key")}[case]
    out = tmp_path / "out"
    # the model and calibration files do not even exist: the key is refused first
    r = run("convert", tmp_path / "model.onnx", "--calib", tmp_path / "calib.npz", "--out", out, *args)
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert len(r.stderr.splitlines()) == 1 and needle in r.stderr, r.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["keys", "pw", "wrong"]


# --- agent trust ------------------------------------------------------------------------------------------------
def test_agent_trust_add_list_remove(tmp_path, capsys):
    _, pub = generate(tmp_path / "keys")
    _, ci_pub = generate(tmp_path / "keys", "ci")
    trust_dir, state = tmp_path / "etc" / "trust", tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{state}"\ntrust_dir = "{trust_dir}"\n')
    conf = ["--config", str(cfg)]
    kid, ci_id = signing.load_public(pub).keyid, signing.load_public(ci_pub).keyid
    capsys.readouterr()

    assert main(["agent", "trust", "list", *conf]) == 0
    captured = capsys.readouterr()
    assert "no trusted release key" in captured.out and "refuse every bundle" in captured.err

    assert main(["agent", "trust", "add", str(pub), *conf]) == 0
    assert f"trusts release key release ({kid})" in capsys.readouterr().out
    assert stat.S_IMODE(trust_dir.stat().st_mode) == 0o755
    assert stat.S_IMODE((trust_dir / "release.pub").stat().st_mode) == 0o644
    assert main(["agent", "trust", "add", str(pub), *conf]) == 0  # again: nothing changes
    assert "trusted already" in capsys.readouterr().out
    assert main(["agent", "trust", "add", str(ci_pub), *conf, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(trust_dir / "ci.pub")
    for bad, needle in ((tmp_path / "keys" / "release.key", "not a PEM public key"),
                        (tmp_path / "nope.pub", "cannot read public key")):
        assert main(["agent", "trust", "add", str(bad), *conf]) == 2
        one_line_error(capsys, needle)
    rsa = tmp_path / "rsa.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-out", tmp_path / "rsa.key"], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", tmp_path / "rsa.key", "-pubout", "-out", rsa], check=True)
    assert main(["agent", "trust", "add", str(rsa), *conf]) == 2
    one_line_error(capsys, "not an ed25519 public key")
    assert sorted(p.name for p in trust_dir.iterdir()) == ["ci.pub", "release.pub"]

    (trust_dir / "junk.pub").write_text("junk\n")
    assert main(["agent", "trust", "list", *conf]) == 0
    captured = capsys.readouterr()
    rows = [line.split() for line in captured.out.splitlines()]
    assert rows[0] == ["KEYID", "NAME", "STATE", "SOURCE"]
    assert sorted(rows[1:]) == sorted([[ci_id, "ci", "trusted", str(trust_dir / "ci.pub")],
                                       [kid, "release", "trusted", str(trust_dir / "release.pub")]])
    assert "junk.pub is not a PEM public key" in captured.err  # problems on stderr

    assert main(["agent", "trust", "remove", ci_id, *conf]) == 0
    assert "refused from the next update on" in capsys.readouterr().out
    assert main(["agent", "trust", "remove", ci_id, *conf]) == 2
    one_line_error(capsys, f"no trusted release key {ci_id}")
    assert main(["agent", "trust", "list", *conf, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["keyid"], r["trusted"]) for r in listed["keys"]] == [(kid, True)] and len(listed["problems"]) == 1
    assert main(["agent", "trust", "remove", "release", *conf]) == 0  # by name too
    assert not (trust_dir / "release.pub").exists()


def test_agent_trust_remove_of_a_key_from_a_statement_points_at_the_fleet(tmp_path, capsys):
    old_key, old_pub = generate(tmp_path / "keys", "old")
    _, new_pub = generate(tmp_path / "keys", "new")
    trust_dir, state = tmp_path / "trust", tmp_path / "state"
    state.mkdir()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{state}"\ntrust_dir = "{trust_dir}"\n')
    assert main(["agent", "trust", "add", str(old_pub), "--config", str(cfg)]) == 0
    st = signing.add_statement(signing.load_private(old_key), signing.load_public(new_pub), 1.0)
    assert TrustStore(trust_dir, state).update([st])
    new_id = signing.load_public(new_pub).keyid
    capsys.readouterr()
    assert main(["agent", "trust", "list", "--config", str(cfg)]) == 0
    assert f"statement by {signing.load_public(old_pub).keyid}" in capsys.readouterr().out
    assert main(["agent", "trust", "remove", new_id, "--config", str(cfg)]) == 2
    one_line_error(capsys, f"edgefleet fleet keys remove {new_id}")
