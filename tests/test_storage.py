"""Storage that fails under a running device: a state dir on a real small tmpfs filled by a deployment and by
another process, a loop-mounted ext4 the kernel turns read-only under the agent (as it does on an I/O error),
and the agent SIGKILLed while the disk is full. Real agent processes, a real controller and mosquitto (mutual
TLS), real models. Each ends with the device online, serving, telling the controller what happened, and
nothing lost that the outbox had accepted; each fails without its defence (see the report of the change).

Also, on a plain directory: the garbage collection of the state dir (``ModelStore.collect``) and the updater
removing a superseded partial download before anything else.

Needs root (mount); every wait is bounded generously, nothing asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from conftest import OUTPUT
from util import agent_config, fleet_client, release_key, release_pub, wait_for

from agent import bundle as bundle_mod
from agent.api import AgentClient
from agent.config import dumps
from agent.store import ModelStore

REPO = Path(__file__).resolve().parents[1]
DEVICE = "edge-1"
MiB = 1 << 20

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs and a loop-mounted ext4: needs root")


# --- real filesystems -------------------------------------------------------------------------------------

def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=True)


def _unmount(d: Path) -> None:
    if subprocess.run(["umount", str(d)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@contextlib.contextmanager
def tmpfs(d: Path, size: str = "8m"):
    d.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d))
    try:
        yield d
    finally:
        _unmount(d)


def loop_device(d: Path) -> str:
    """The block device mounted at ``d`` (loopN)."""
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, where = line.split()[:2]
        if where == str(d):
            return dev
    raise AssertionError(f"nothing is mounted at {d}")


@contextlib.contextmanager
def ext4(image: Path, d: Path):
    """A 16 MiB ext4 image loop-mounted at ``d`` with errors=remount-ro (what a device's SD card usually has)."""
    d.mkdir(parents=True, exist_ok=True)
    _run("truncate", "-s", "16M", str(image))
    _run("mkfs.ext4", "-q", "-F", str(image))
    _run("mount", "-o", "loop,errors=remount-ro", str(image), str(d))
    loops: list[str] = []
    try:
        yield loops  # loop devices attached by hand (check_and_mount_again), detached at the end
    finally:
        _unmount(d)
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)


def make_read_only(d: Path) -> None:
    """What the kernel does on an I/O error under errors=remount-ro: the filesystem turns read-only at once, open
    files and all (a plain `mount -o remount,ro` is refused while files are open for writing)."""
    dev = Path(loop_device(d)).name
    Path(f"/sys/fs/ext4/{dev}/trigger_fs_error").write_text("edgefleet storage test\n")


def check_and_mount_again(image: Path, d: Path, loops: list[str]) -> None:
    """What an operator does after detaching the broken mount (`umount -l`): check the filesystem, mount it again at
    the same place (on a new loop device: the old one stays with the files the agent still has open)."""
    r = subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stdout + r.stderr  # 1: errors corrected
    dev = _run("losetup", "-f", "--show", str(image)).stdout.strip()
    loops.append(dev)
    _run("mount", "-o", "errors=remount-ro", dev, str(d))


def fill(d: Path) -> None:
    """Another process fills the filesystem to its last byte."""
    r = subprocess.run(["dd", "if=/dev/zero", f"of={d / 'filler'}", "bs=64k"], capture_output=True, text=True)
    assert "No space left on device" in r.stderr, r.stderr


def free(d: Path) -> int:
    st = os.statvfs(d)
    return st.f_bavail * st.f_frsize


# --- the controller, the broker, the agent ----------------------------------------------------------------

@pytest.fixture
def broker(tmp_path, free_port):
    """A mosquitto on a fixed port, so that it can be stopped and started again at the same URL."""
    from fleet.broker import Mosquitto
    from fleet.pki import PKI

    pki = PKI(tmp_path / "pki").ensure(["localhost", "127.0.0.1"])
    b = Mosquitto(tmp_path / "mosquitto", port=free_port, pki=pki).start()
    yield b
    b.stop()


@pytest.fixture
def fleet(tmp_path, broker):
    from fleet.app import Fleet

    f = Fleet(tmp_path / "fleet", release_keys=[release_pub()],
              broker_url=broker.url, http_port=0, pki_dir=broker.pki.root).start_background()
    yield f
    f.stop()


class Device:
    """A real agent process on ``state`` (already mounted), enrolled with ``fleet``; its log in ``log``."""

    def __init__(self, tmp_path: Path, fleet, state: Path, **cfg) -> None:
        from fleet.broker import free_port

        self.fleet, self.state = fleet, state
        self.api = f"127.0.0.1:{free_port('127.0.0.1')}"
        cfg = {"telemetry_interval_s": 0.3, "keepalive_s": 5, "rollback_window_s": 0,
               "outbox_max_bytes": 512 * 1024, "min_free_bytes": MiB, **cfg}
        self.config = tmp_path / "agent.toml"
        self.config.write_text(dumps(agent_config(fleet, state, DEVICE, api=self.api, **cfg)))
        self.log = tmp_path / "agent.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Device":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgefleet.cli", "agent", "run", "--config", str(self.config)], cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT)
        return self

    def alive(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-4000:]
        return True

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(timeout=60) == 0, self.log.read_text()[-4000:]

    def infer(self, crops) -> np.ndarray:
        return AgentClient(self.api).infer({"x": crops[0][:1]})[OUTPUT]


def client(fleet):
    return fleet_client(fleet)


def deploy(fleet, path: Path) -> str:
    sha = client(fleet).upload_bundle(path)["sha256"]
    client(fleet).deploy(sha, [DEVICE])
    return sha


def serving(fleet, dev: Device, bundles) -> str:
    """v1 deployed and active, as the controller sees it."""
    v1 = deploy(fleet, bundles["v1"])
    wait_for(lambda: dev.alive() and (h := client(fleet).health()) and h[0]["model"]
             and h[0]["model"]["sha256"] == v1, timeout=90, what="v1 active")
    return v1


def _db(fleet):
    return closing(sqlite3.connect(fleet.data_dir / "fleet.db", timeout=30))


def telemetry(fleet) -> list[dict]:
    """Every telemetry payload the controller stored for the device, in seq order."""
    with _db(fleet) as db:
        return [json.loads(p) for (p,) in db.execute(
            "SELECT payload FROM telemetry WHERE device_id = ? ORDER BY seq", (DEVICE,))]


def storage_said(fleet, state: str, boot: str | None = None) -> list[int]:
    """Seqs of the telemetry windows that reported ``state``."""
    return [t["seq"] for t in telemetry(fleet) if t.get("storage") == state and (boot is None or t["boot_id"] == boot)]


def events(fleet, kind: str | None = None) -> list[dict]:
    with _db(fleet) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM events WHERE device_id = ? ORDER BY seq", (DEVICE,))
                if kind is None or r["kind"] == kind]


def storage_events(fleet) -> list[str]:
    return [e["reason"] for e in events(fleet, "error") if e["reason"].startswith("storage ")]


def received(fleet) -> Counter:
    with _db(fleet) as db:
        return Counter(s for (s,) in db.execute(
            "SELECT seq FROM telemetry WHERE device_id = ?1 UNION ALL SELECT seq FROM events WHERE device_id = ?1",
            (DEVICE,)))


def outbox_on_disk(state: Path) -> tuple[int, list[int]]:
    with closing(sqlite3.connect(state / "outbox.db", timeout=30)) as db:
        last = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]
        return last, [r[0] for r in db.execute("SELECT seq FROM messages ORDER BY seq")]


def assert_all_arrived(fleet, state: Path, missing_ok: set[int] = frozenset()) -> None:
    """Every seq the agent handed out (its outbox's meta, after a clean stop) arrived once or is still queued;
    nothing missing but ``missing_ok``, and the device reported no drop it did not account for."""
    produced, queued = outbox_on_disk(state)
    counts = received(fleet)
    assert max(counts) <= produced
    assert not {s: n for s, n in counts.items() if n > 1}, "stored twice"
    missing = [s for s in range(1, produced + 1) if not counts[s] and s not in queued and s not in missing_ok]
    dropped = telemetry(fleet)[-1]["outbox_dropped"]
    assert len(missing) <= dropped, f"never arrived, not queued, not counted as dropped: {missing}"


def no_tracebacks(dev: Device) -> None:
    text = dev.log.read_text()
    assert "Traceback" not in text, text[text.index("Traceback") - 500:][:4000]


# --- (a) a deployment too big for the disk -----------------------------------------------------------------

@root_only
def test_a_bundle_that_would_not_fit_is_refused_before_a_byte_is_written(tmp_path, fleet, bundles, crops):
    with tmpfs(tmp_path / "dev") as state:
        dev = Device(tmp_path, fleet, state).start()
        try:
            v1 = serving(fleet, dev, bundles)
            # the download alone would fit; download + unpack + the reserve would not
            room = free(state)
            big = bigger_bundle(tmp_path, bundles, crops, size=int(room * 0.6))
            size = big.stat().st_size
            assert size < room < 2 * size + MiB
            sha = deploy(fleet, big)
            failed = wait_for(lambda: [e for e in events(fleet, "failed") if e["sha256"] == sha], what="the refusal")
            reason = failed[0]["reason"]
            m = re.fullmatch(r"refused: needs ([\d.]+) MiB \(bundle ([\d.]+) MiB, unpacked ~([\d.]+) MiB, reserve "
                             r"1\.0 MiB\) but ([\d.]+) MiB is free on (.+)", reason)
            assert m, reason
            assert float(m[2]) == float(m[3]) == round(size / MiB, 1) and m[5] == str(state)
            assert float(m[1]) == pytest.approx(2 * size / MiB + 1, abs=0.1)
            assert float(m[4]) * MiB == pytest.approx(room, abs=MiB)
            # before a byte was written: no download began, nothing of it is on disk
            assert [e["kind"] for e in events(fleet) if e["sha256"] == sha] == ["failed"]
            assert list((state / "downloads").iterdir()) == []
            assert [p.name for p in (state / "models").iterdir()] == [v1]
            assert free(state) == pytest.approx(room, abs=2 * MiB)  # the outbox's log may have grown a little
            # the previous model serves, the controller says so, the disk is "ok"
            assert dev.infer(crops).shape == (1, 2)
            assert (state / "current").resolve().name == v1
            assert client(fleet).health(DEVICE)["model"]["sha256"] == v1
            assert telemetry(fleet)[-1]["storage"] == "ok" and not storage_events(fleet)
            dev.stop()
            no_tracebacks(dev)
        finally:
            dev.kill()


def bigger_bundle(tmp_path: Path, bundles, crops, size: int) -> Path:
    """A loadable bundle of about ``size`` bytes: the model, its sample, and incompressible padding."""
    import msgspec

    from edgefleet.models import model_path

    d = tmp_path / "big"
    d.mkdir()
    np.savez(d / "sample.npz", x=crops[0][:1])
    pad = max(0, size - bundles["v1"].stat().st_size - 4096)
    (d / "padding.bin").write_bytes(np.random.default_rng(7).bytes(pad))
    manifest = msgspec.structs.replace(bundle_mod.read_manifest(bundles["v1"]), version="big", files=[])
    out = d / "ocr-big.tar"
    bundle_mod.write_bundle(out, manifest, {"model.onnx": model_path("ocr-cls"), "sample.npz": d / "sample.npz",
                                            "padding.bin": d / "padding.bin"}, sign_key=release_key()[0])
    return out


# --- (b) a disk filled by another process ----------------------------------------------------------------

@root_only
def test_a_disk_filled_by_another_process_keeps_the_device_talking_and_serving(tmp_path, fleet, bundles, crops):
    with tmpfs(tmp_path / "dev") as state:
        dev = Device(tmp_path, fleet, state).start()
        try:
            v1 = serving(fleet, dev, bundles)
            fill(state)
            full = wait_for(lambda: storage_said(fleet, "full"), what="telemetry saying the disk is full")
            # still online and serving; telemetry keeps coming while full
            assert dev.infer(crops).shape == (1, 2)
            wait_for(lambda: len(storage_said(fleet, "full")) >= len(full) + 5, what="more telemetry while full")
            assert client(fleet).health(DEVICE)["online"]
            assert dev.infer(crops).shape == (1, 2)
            start = wait_for(lambda: storage_events(fleet), what="the error event")
            assert len(start) == 1 and start[0].startswith(f"storage full: the state dir {state} takes no writes")
            # an update meanwhile is refused with the figures; v1 serves on
            v2 = deploy(fleet, bundles["v2"])
            failed = wait_for(lambda: [e for e in events(fleet, "failed") if e["sha256"] == v2], what="the refusal")
            assert re.fullmatch(rf"refused: needs .* but [\d.]+ \w+ is free on {state}", failed[0]["reason"])
            assert [e["kind"] for e in events(fleet) if e["sha256"] == v2] == ["failed"]
            assert dev.infer(crops).shape == (1, 2) and (state / "current").resolve().name == v1

            (state / "filler").unlink()
            wait_for(lambda: telemetry(fleet)[-1]["storage"] == "ok", what="telemetry saying ok again")
            wait_for(lambda: len(storage_events(fleet)) == 2, what="the event at the end")
            end = storage_events(fleet)[1]
            assert end.startswith(f"storage ok: the state dir {state} takes writes again after")
            assert client(fleet).health(DEVICE)["online"] and dev.infer(crops).shape == (1, 2)
            dev.stop()
            assert_all_arrived(fleet, state)
            assert len(storage_events(fleet)) == 2  # one when it started, one when it ended: not one a message
            no_tracebacks(dev)
        finally:
            dev.kill()


# --- (c) a filesystem turned read-only under the agent -----------------------------------------------------

@root_only
@pytest.mark.slow
def test_a_filesystem_turned_read_only_under_the_agent(tmp_path, fleet, bundles, crops):
    image, mount = tmp_path / "sd.img", tmp_path / "dev"
    with ext4(image, mount) as loops:
        dev = Device(tmp_path, fleet, mount).start()
        try:
            serving(fleet, dev, bundles)
            make_read_only(mount)
            wait_for(lambda: storage_said(fleet, "read_only"), what="telemetry saying read-only")
            wait_for(lambda: len(storage_said(fleet, "read_only")) >= 5, what="more telemetry while read-only")
            assert client(fleet).health(DEVICE)["online"] and dev.infer(crops).shape == (1, 2)
            start = wait_for(lambda: storage_events(fleet), what="the error event")
            assert len(start) == 1 and start[0].startswith(f"storage read_only: the state dir {mount}")
            # an update meanwhile is refused before anything is fetched; v1 serves on
            v2 = deploy(fleet, bundles["v2"])
            failed = wait_for(lambda: [e for e in events(fleet, "failed") if e["sha256"] == v2], what="the refusal")
            assert failed[0]["reason"] == f"refused: the state dir {mount} takes no writes: Read-only file system"
            assert [e["kind"] for e in events(fleet) if e["sha256"] == v2] == ["failed"]
            assert dev.infer(crops).shape == (1, 2) and dev.alive()
            assert client(fleet).health(DEVICE)["outbox_dropped"] == 0  # sent from memory, none dropped

            _run("umount", "-l", str(mount))  # detached to be checked: the agent must not write beneath it
            seen = len(storage_said(fleet, "read_only"))
            # ten windows (3 s) outlast the outbox's probe period (RECOVER_S, 2 s): it has looked meanwhile
            wait_for(lambda: len(storage_said(fleet, "read_only")) >= seen + 10, what="telemetry while unmounted")
            assert telemetry(fleet)[-1]["storage"] == "read_only" and list(mount.iterdir()) == []
            check_and_mount_again(image, mount, loops)
            wait_for(lambda: telemetry(fleet)[-1]["storage"] == "ok", what="telemetry saying ok again")
            wait_for(lambda: len(storage_events(fleet)) == 2, what="the event at the end")
            assert storage_events(fleet)[1].startswith(f"storage ok: the state dir {mount} takes writes again")
            assert dev.infer(crops).shape == (1, 2)
            dev.stop()
            assert_all_arrived(fleet, mount)
            no_tracebacks(dev)
        finally:
            dev.kill()
    assert list(mount.iterdir()) == []  # nothing was ever written in the bare mount point


# --- (d) killed while the disk is full ----------------------------------------------------------------------

@root_only
@pytest.mark.slow
def test_killed_while_the_disk_is_full_nothing_the_outbox_accepted_is_lost(tmp_path, broker, fleet, bundles, crops):
    with tmpfs(tmp_path / "dev") as state:
        dev = Device(tmp_path, fleet, state).start()
        try:
            serving(fleet, dev, bundles)
            first_boot = wait_for(lambda: telemetry(fleet), what="telemetry")[-1]["boot_id"]
            broker.stop()  # so that messages pile up: on disk first, then in memory
            wait_for(lambda: len(outbox_on_disk(state)[1]) >= 5, what="messages queued on disk")
            fill(state)
            status = wait_for(lambda: (st := AgentClient(dev.api).status())["outbox"]["in_memory"] and
                              st["outbox"]["last_seq"] >= outbox_on_disk(state)[0] + 3 and st,
                              what="messages held in memory")
            assert status["storage"] == "full" and dev.infer(crops).shape == (1, 2)
            dev.kill()  # SIGKILL while full: what memory held is gone
            durable, queued = outbox_on_disk(state)
            assert queued and queued[-1] == durable < status["outbox"]["last_seq"]

            (state / "filler").unlink()
            broker.start()
            dev.start()
            wait_for(lambda: dev.alive() and all(received(fleet)[s] for s in queued), timeout=90,
                     what="everything the outbox had on disk to arrive")
            later = wait_for(lambda: [t for t in telemetry(fleet) if t["boot_id"] != first_boot],
                             what="telemetry of the new run")
            assert min(t["seq"] for t in later) > status["outbox"]["last_seq"]  # no seq memory held is used again
            report = wait_for(lambda: [e for e in events(fleet, "error") if "held in memory only" in e["reason"]],
                              what="the report of what memory held")
            m = re.search(r"seqs (\d+)\.\.(\d+) were held in memory only", report[0]["reason"])
            assert m and int(m[1]) == durable + 1 and int(m[2]) >= status["outbox"]["last_seq"]
            held = int(m[2])
            assert min(t["seq"] for t in later) > held
            assert later[-1]["storage"] == "ok" and client(fleet).health(DEVICE)["online"]
            assert dev.infer(crops).shape == (1, 2)
            dev.stop()
            # lost, and said so: only seqs that memory held when the kill came
            assert_all_arrived(fleet, state, missing_ok=set(range(durable + 1, held + 1)))
            assert all(n == 1 for s, n in received(fleet).items() if s <= durable)
        finally:
            dev.kill()


# --- leave nothing behind: the state dir's garbage collection ---------------------------------------------

def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_collect_keeps_current_previous_and_the_desired_download_only(tmp_path, bundles):
    store = ModelStore(tmp_path / "state")
    store.open()
    v1, v2, nan = (_sha(bundles[k]) for k in ("v1", "v2", "nan"))
    for sha, key in ((v1, "v1"), (v2, "v2"), (nan, "nan")):
        store.unpack(sha, bundles[key])
    store.switch(v1)
    store.switch(v2)  # current v2, previous v1; models/<nan> is neither
    (store.models / ".x.part").mkdir()  # an unpack a crash cut short
    stale, wanted = "a" * 64, "b" * 64
    for name in (f"{v1}.tar", f"{v2}.tar", f"{stale}.part", f"{wanted}.part", f"{wanted}.tar"):
        (store.downloads / name).write_bytes(b"x" * 100)
    (store.models / wanted).mkdir()  # unpacked before a crash, not switched to yet

    # at start: models but current and previous go; downloads of other bundles wait for the desired state
    assert sorted(store.collect(downloads=False)) == sorted(
        [f"models/{nan}", "models/.x.part", f"downloads/{v1}.tar", f"downloads/{v2}.tar"])
    assert sorted(p.name for p in store.models.iterdir()) == sorted([v1, v2, wanted])
    # a desired model arrives: another bundle's partial download goes before anything else, its own stays
    assert store.collect(keep=wanted) == [f"downloads/{stale}.part"]
    assert sorted(p.name for p in store.downloads.iterdir()) == [f"{wanted}.part", f"{wanted}.tar"]
    # after the update: only the two models
    assert sorted(store.collect()) == [f"downloads/{wanted}.part", f"downloads/{wanted}.tar", f"models/{wanted}"]
    assert list(store.downloads.iterdir()) == [] and store.current()[0] == v2 and store.previous()[0] == v1
    assert sorted(p.name for p in store.models.iterdir()) == sorted([v1, v2])
    store.manifest(store.current()[1])  # untouched


def test_a_new_desired_removes_the_old_partial_download_first_and_an_update_leaves_two_models(tmp_path, bundles):
    """Through the updater, on a real HTTP server: a partial download of an older desired bundle (a cut network)
    and a stale unpack are gone once a desired model for another bundle has been applied; the bundle's own tar
    is gone after it is unpacked."""
    from test_decode_attacks import Server

    from agent.config import AgentConfig, validate
    from agent.daemon import Agent
    from agent.protocol import Desired

    root = tmp_path / "srv"
    (root / "bundles").mkdir(parents=True)
    v1, v2 = _sha(bundles["v1"]), _sha(bundles["v2"])
    for sha, key in ((v1, "v1"), (v2, "v2")):
        shutil.copy(bundles[key], root / "bundles" / sha)
    server = Server(root)
    agent = Agent(validate(AgentConfig(device_id="cam-1", broker="mqtt://127.0.0.1:1", controller=server.url,
                                       state_dir=str(tmp_path / "state"), rollback_window_s=0, insecure=True,
                                       trust_dir=str(release_key()[1]))))
    agent.store.open()
    agent.outbox.open()
    try:
        def desired(sha, key):
            return Desired(deployment_id=f"dep-{key}", name="ocr-cls", version=key, url=f"{server.url}/bundles/{sha}",
                           sha256=sha, size=bundles[key].stat().st_size)

        agent.updater.apply(desired(v1, "v1"))
        assert agent.engine.current.sha == v1
        older = "c" * 64
        (agent.store.downloads / f"{older}.part").write_bytes(b"half a bundle")
        (agent.store.models / older).mkdir()
        agent.updater.apply(desired(v2, "v2"))
        assert agent.engine.current.sha == v2
        assert list(agent.store.downloads.iterdir()) == []
        assert sorted(p.name for p in agent.store.models.iterdir()) == sorted([v1, v2])
    finally:
        agent.outbox.close()
        server.close()


@root_only
def test_a_disk_that_fills_during_a_download_fails_the_update_once_and_leaves_nothing(tmp_path, bundles):
    """The room was there when the update was checked; another process takes it while the bundle downloads (the
    server's handler fills the disk as the request arrives). One `failed` event naming the disk, the partial
    download removed, not retried as if the network had failed; the model keeps serving."""
    import http.server
    import threading

    from agent import protocol
    from agent.config import AgentConfig, validate
    from agent.daemon import Agent
    from agent.protocol import Desired

    with tmpfs(tmp_path / "dev") as state:
        v1, v2 = _sha(bundles["v1"]), _sha(bundles["v2"])
        served = {f"/bundles/{v1}": bundles["v1"], f"/bundles/{v2}": bundles["v2"]}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                data = served[self.path].read_bytes()
                if self.path.endswith(v2):
                    fill(state)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        agent = Agent(validate(AgentConfig(device_id="cam-1", broker="mqtt://127.0.0.1:1", controller=url,
                                           state_dir=str(state), rollback_window_s=0, insecure=True,
                                           min_free_bytes=0, trust_dir=str(release_key()[1]))))
        agent.store.open()
        agent.outbox.open()
        try:
            def desired(sha, key):
                return Desired(deployment_id=f"dep-{key}", name="ocr-cls", version=key, url=f"{url}/bundles/{sha}",
                               sha256=sha, size=bundles[key].stat().st_size)

            agent.updater.apply(desired(v1, "v1"))
            assert agent.engine.current.sha == v1
            agent.updater.apply(desired(v2, "v2"))  # returns: a DownloadError (the network) would raise, to retry
            queued = [protocol.decode(m.kind, m.payload) for m in agent.outbox.pending(1000)]
            about_v2 = [(e.kind, e.reason) for e in queued if isinstance(e, protocol.Event) and e.sha256 == v2]
            assert [k for k, _ in about_v2] == ["downloading", "failed"]
            assert about_v2[1][1].startswith("downloading: No space left on device (")
            assert list((state / "downloads").iterdir()) == []
            assert [p.name for p in (state / "models").iterdir()] == [v1] and agent.engine.current.sha == v1
        finally:
            agent.outbox.close()
            httpd.shutdown()
            httpd.server_close()
