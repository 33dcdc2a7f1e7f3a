"""The device's trust store, its ledger of what it accepted, and the checks on a signed desired/cmd, on real
keys and files (agent/trust.py, agent/ledger.py, agent/updater.check_signed). The same attacks through a
real controller, broker and agent: tests/test_signed_updates.py."""

from __future__ import annotations

import time

import msgspec
import pytest

from agent import bundle, protocol, signing
from agent.ledger import Ledger
from agent.trust import TrustStore, Untrusted
from agent.updater import check_signed


def make_key(d, name):
    key, pub = signing.generate(d, name)
    return signing.load_private(key), signing.load_public(pub), pub


@pytest.fixture
def keys(tmp_path):
    trust = tmp_path / "trust"
    return {"trust": trust, "root": make_key(trust, "root"), "new": make_key(tmp_path / "new", "new"),
            "stranger": make_key(tmp_path / "stranger", "stranger"),
            "controller": make_key(tmp_path / "ctl", "controller")}


def signed(key, manifest=b'{"name": "m"}'):
    return manifest, signing.sign_manifest(key, manifest)


def test_a_manifest_is_trusted_only_when_a_trusted_key_signed_these_exact_bytes(tmp_path, keys):
    store = TrustStore(keys["trust"], tmp_path)
    root_key, root_pub, _ = keys["root"]
    data, sig = signed(root_key)
    assert store.verify_manifest(data, sig).keyid == root_pub.keyid
    with pytest.raises(Untrusted, match="not signed"):
        store.verify_manifest(data, None)
    with pytest.raises(Untrusted, match="does not verify"):
        store.verify_manifest(data + b" ", sig)
    with pytest.raises(Untrusted, match="does not verify"):
        store.verify_manifest(data, signed(root_key, b'{"name": "other"}')[1])
    with pytest.raises(Untrusted, match="does not trust"):
        store.verify_manifest(*signed(keys["stranger"][0]))
    with pytest.raises(Untrusted, match="not valid"):
        store.verify_manifest(data, b'{"keyid": "zz", "sig": "x"}')
    (keys["trust"] / "root.pub").unlink()  # removed by root on the device: refused from the next check on
    with pytest.raises(Untrusted, match="trusts no release key"):
        store.verify_manifest(data, sig)


def test_a_file_in_the_trust_dir_that_is_not_a_key_is_skipped_and_named(tmp_path, keys):
    (keys["trust"] / "junk.pub").write_text("not a key")
    store = TrustStore(keys["trust"], tmp_path)
    assert [r["name"] for r in store.listing()] == ["root"]
    assert any("junk.pub" in p for p in store.problems)


def test_rotation_remove_and_forged_statements(tmp_path, keys):
    ctl_key, ctl_pub, _ = keys["controller"]
    store = TrustStore(keys["trust"], tmp_path, controller=lambda: ctl_pub)
    root_key, root_pub, _ = keys["root"]
    new_key, new_pub, _ = keys["new"]
    now = time.time()
    # forged: the new key vouching for itself, a stranger vouching for it, a statement edited after signing,
    # and the controller adding a key (it may only remove)
    forged = [signing.add_statement(new_key, new_pub, now),
              signing.add_statement(keys["stranger"][0], new_pub, now),
              msgspec.structs.replace(signing.add_statement(root_key, keys["stranger"][1], now),
                                      key=new_pub.pem, keyid=new_pub.keyid),
              signing.add_statement(ctl_key, new_pub, now)]
    assert store.update(forged) == []
    with pytest.raises(Untrusted, match="does not trust"):
        store.verify_manifest(*signed(new_key))
    assert not (tmp_path / "trust.json").exists()
    # the old key vouches for the new one: both trusted, and it survives a restart (trust.json)
    changes = store.update([signing.add_statement(root_key, new_pub, now)])
    assert changes == [f"trusts release key new ({new_pub.keyid}), vouched for by {root_pub.keyid}"]
    assert TrustStore(keys["trust"], tmp_path).verify_manifest(*signed(new_key)).name == "new"  # a restart
    # the controller removes the old key: its bundles are refused, the new one's accepted
    changes = store.update([signing.remove_statement(ctl_key, root_pub.keyid, now + 1)])
    assert changes == [f"no longer trusts release key {root_pub.keyid}"]
    with pytest.raises(Untrusted, match="was removed"):
        store.verify_manifest(*signed(root_key))
    assert store.verify_manifest(*signed(new_key)).name == "new"
    # another controller key cannot remove anything
    other = make_key(tmp_path / "other", "other")
    assert store.update([signing.remove_statement(other[0], new_pub.keyid, now + 2)]) == []
    assert store.verify_manifest(*signed(new_key)).name == "new"
    listing = {r["keyid"]: r for r in store.listing()}
    assert listing[new_pub.keyid]["trusted"] and not listing[root_pub.keyid]["trusted"]


def test_the_ledger_keeps_counters_and_serials_across_restarts(tmp_path):
    ledger = Ledger(tmp_path).open()
    ledger.accept("desired", 10)
    ledger.accept("cmd", 7)
    ledger.accept("desired", 5)  # never goes back
    ledger.record_run("m", 3, "a" * 64)
    ledger.record_run("m", 2, "b" * 64)
    again = Ledger(tmp_path).open()
    assert (again.desired_counter, again.cmd_counter, again.highest_serial("m")) == (10, 7, 3)
    assert again.downgrade("m", 3, "c" * 64, rollback=False) == ""
    assert "a downgrade" in again.downgrade("m", 1, "c" * 64, rollback=False)
    assert "not one it ran before" in again.downgrade("m", 1, "c" * 64, rollback=True)
    assert again.downgrade("m", 2, "b" * 64, rollback=True) == ""
    assert "a downgrade" in again.downgrade("m", 2, "b" * 64, rollback=False)
    assert again.downgrade("other", 1, "c" * 64, rollback=False) == ""
    (tmp_path / "ledger.json").write_text("{torn")
    assert Ledger(tmp_path).open().desired_counter == 0  # a torn file: a new ledger, not a crash


def test_check_signed_names_each_reason(tmp_path, keys):
    ctl_key, ctl_pub, _ = keys["controller"]
    now = time.time()
    base = protocol.Desired(deployment_id="dep-1", name="m", version="1", url="https://c/bundles/x",
                            sha256="a" * 64, size=1, time=now, device_id="cam-1", expires=now + 60, counter=100)
    good = signing.sign_message(ctl_key, base)
    assert check_signed(good, ctl_pub, "cam-1", 99, now, True) == ""
    assert check_signed(good, ctl_pub, "cam-1", 100, now, True) == ""  # the same one again
    wire = protocol.decode(protocol.DESIRED, protocol.encode(good))  # as received
    assert check_signed(wire, ctl_pub, "cam-1", 0, now, True) == ""
    cases = [
        (good, None, "cam-1", 0, now, True, "no controller key"),
        (msgspec.structs.replace(good, sig=""), ctl_pub, "cam-1", 0, now, True, "not signed"),
        (signing.sign_message(keys["stranger"][0], base), ctl_pub, "cam-1", 0, now, True, "not the controller's"),
        (msgspec.structs.replace(good, counter=101), ctl_pub, "cam-1", 0, now, True, "does not verify"),
        (msgspec.structs.replace(good, url="https://evil/x"), ctl_pub, "cam-1", 0, now, True, "does not verify"),
        (good, ctl_pub, "cam-2", 0, now, True, "for device cam-1, not this one (cam-2)"),
        (good, ctl_pub, "cam-1", 0, now + 61, True, "expired"),
        (good, ctl_pub, "cam-1", 0, now + 61, None, "expired"),
        (good, ctl_pub, "cam-1", 101, now, True, "replayed"),
        (signing.sign_message(ctl_key, msgspec.structs.replace(base, expires=0)), ctl_pub, "cam-1", 0, now, True,
         "no expiry"),
    ]
    for msg, key, device, last, at, synced, reason in cases:
        assert reason in check_signed(msg, key, device, last, at, synced), reason
    # a clock the OS says is not synchronised (here: far ahead) does not expire what is fresh; the controller's
    # latest signed time does, whatever the clock; the counter still refuses a replay
    assert check_signed(good, ctl_pub, "cam-1", 0, now + 10**8, False, known=now) == ""
    assert "the controller's latest signed time" in check_signed(good, ctl_pub, "cam-1", 0, now - 10**8, False,
                                                                 known=now + 61)
    assert "the controller's latest signed time" in check_signed(good, ctl_pub, "cam-1", 0, now - 10**8, True,
                                                                 known=now + 61)
    assert "replayed" in check_signed(good, ctl_pub, "cam-1", 101, now + 10**8, False)
    cmd = signing.sign_message(ctl_key, protocol.Cmd(id="c1", kind="rollback", time=now, device_id="cam-1",
                                                     expires=now + 60, counter=5))
    assert check_signed(cmd, ctl_pub, "cam-1", 4, now, True) == ""
    as_desired_bytes = signing.message_bytes(good)
    assert not ctl_pub.verify(cmd.sig, as_desired_bytes)  # one context cannot pass for the other


def test_sign_bundle_checks_files_and_keeps_the_exact_manifest_bytes(tmp_path, bundles, keys):
    root_key, root_pub, _ = keys["root"]
    sha, manifest = bundle.sign_bundle(bundles["v1"], root_key, tmp_path / "v1.tar")
    parsed = bundle.read_signed(tmp_path / "v1.tar", check_files=True)
    assert manifest.serial == parsed.manifest.serial == 1  # the serial it had
    assert TrustStore(keys["trust"]).verify_manifest(parsed.manifest_bytes, parsed.sig).keyid == root_pub.keyid
    assert bundle.sha256_file(tmp_path / "v1.tar") == sha
    _, m = bundle.sign_bundle(tmp_path / "v1.tar", root_key, serial=9)
    assert m.serial == 9 and bundle.read_signed(tmp_path / "v1.tar").manifest.serial == 9
