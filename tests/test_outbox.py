"""The agent's durable outbox on real SQLite files: order, acks, seq across reopen, bounds, corruption, threads."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent import outbox as outbox_mod
from agent.outbox import Outbox


def opened(path, max_bytes=1 << 20, max_age_s=3600.0) -> Outbox:
    box = Outbox(path, max_bytes, max_age_s)
    assert box.open() is None
    return box


def payload(seq: int, size: int = 10) -> bytes:
    return f"{seq}:".encode().ljust(size, b".")


def put(box: Outbox, kind: str = "telemetry", size: int = 10) -> int:
    return box.put(kind, lambda seq: payload(seq, size))


def test_order_ack_and_pending(tmp_path):
    box = opened(tmp_path / "outbox.db")
    seqs = [put(box, kind) for kind in ("telemetry", "events", "telemetry", "telemetry")]
    assert seqs == [1, 2, 3, 4]
    got = box.pending(10)
    assert [(m.seq, m.kind, m.payload) for m in got] == [
        (1, "telemetry", payload(1)), (2, "events", payload(2)), (3, "telemetry", payload(3)),
        (4, "telemetry", payload(4))]
    assert [m.seq for m in box.pending(2)] == [1, 2]
    assert [m.seq for m in box.pending(10, after=2)] == [3, 4]
    assert (box.pending_count, box.pending_bytes) == (4, 40)
    assert box.ack([2, 3, 99]) == 2  # an unknown (already acked or dropped) seq is ignored
    assert box.ack(2) == 0
    assert [m.seq for m in box.pending(10)] == [1, 4]
    assert (box.pending_count, box.pending_bytes, box.dropped) == (2, 20, 0)
    box.close()


def test_seq_keeps_increasing_across_reopen_and_what_is_pending_stays(tmp_path):
    path = tmp_path / "outbox.db"
    box = opened(path)
    for _ in range(5):
        put(box)
    box.ack([1, 2, 3, 4, 5])  # an empty queue must not forget the seq
    put(box)
    box.close()
    box = opened(path)
    assert box.last_seq == 6 and [m.seq for m in box.pending()] == [6]
    assert put(box) == 7
    box.close()
    # nor a process that dies without closing it (put returns after the commit)
    code = ("import os\nfrom agent.outbox import Outbox\n"
            f"b = Outbox({str(path)!r}, 1 << 20, 3600)\nb.open()\nb.put('events', lambda s: b'x')\nos._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    box = opened(path)
    assert [m.seq for m in box.pending()] == [6, 7, 8] and put(box) == 9
    box.close()


def test_bounded_by_bytes_drops_oldest_first_counted_and_persisted(tmp_path):
    path = tmp_path / "outbox.db"
    box = opened(path, max_bytes=100)
    for _ in range(10):  # 10 x 10 bytes: exactly full
        put(box)
    assert (box.pending_count, box.dropped) == (10, 0)
    put(box, size=25)  # 125 bytes: the three oldest go
    assert [m.seq for m in box.pending(100)] == list(range(4, 12))
    assert (box.pending_count, box.pending_bytes, box.dropped) == (8, 95, 3)
    box.close()
    box = opened(path, max_bytes=100)
    assert (box.dropped, box.pending_count, box.pending_bytes) == (3, 8, 95)
    put(box, size=200)  # larger than the whole bound: it cannot stay either
    assert (box.pending_count, box.dropped) == (0, 12)
    box.close()


def test_bounded_by_age_drops_oldest_first(tmp_path, monkeypatch):
    path = tmp_path / "outbox.db"
    box = opened(path, max_age_s=60.0)
    clock = {"mono": 1000.0}
    monkeypatch.setattr(outbox_mod, "_boottime", lambda: clock["mono"])  # a fake clock, nothing else
    put(box), put(box)
    clock["mono"] += 50
    put(box)
    clock["mono"] += 20  # the first two are 70 s old, the third 20 s
    assert [m.seq for m in box.pending()] == [3]
    assert box.dropped == 2
    clock["mono"] += 100
    assert box.expire() == 1 and box.pending_count == 0 and box.dropped == 3
    box.close()
    assert opened(path).dropped == 3


def test_age_across_a_reboot_uses_the_wall_clock(tmp_path, monkeypatch):
    path = tmp_path / "outbox.db"
    box = opened(path, max_age_s=60.0)
    put(box)
    box.close()
    with sqlite3.connect(path) as db:  # as if queued before a reboot, 2 minutes ago
        db.execute("UPDATE messages SET kboot = 'another-boot', created = created - 120")
    box = opened(path, max_age_s=60.0)
    assert box.pending() == [] and box.dropped == 1
    box.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not-an-outbox"])
def test_a_corrupt_file_is_moved_aside_reported_and_seq_continues(tmp_path, damage):
    path = tmp_path / "outbox.db"
    box = opened(path)
    for _ in range(5):
        put(box)
    box.close()
    original = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"this is not a database, it is garbage" * 100)
    elif damage == "truncated":  # a valid header, the rest cut off and overwritten
        path.write_bytes(original[:100] + os.urandom(len(original) - 100))
    else:
        path.unlink()
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE something_else (x)")
    broken = path.read_bytes()
    box = Outbox(path, 1 << 20, 3600)
    report = box.open()
    assert report is not None and "moved to outbox.db.corrupt-" in report
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("outbox.db.corrupt-") and "-wal" not in p.name
             and "-shm" not in p.name]
    assert len(aside) == 1 and aside[0].read_bytes() == broken  # kept as it was, never deleted
    assert aside[0].name in report
    # the ceiling file outlives the database: seq goes on above anything that was handed out
    seq = put(box)
    assert seq > 5
    assert "seq continues after" in report
    assert box.pending_count == 1
    box.close()
    assert opened(path).last_seq == seq  # the new file is a sound outbox


def test_a_deleted_file_is_reported_and_seq_continues_above_the_ceiling(tmp_path):
    path = tmp_path / "outbox.db"
    box = opened(path)
    put(box), put(box)
    box.close()
    for p in tmp_path.glob("outbox.db*"):
        if not p.name.endswith(".seq"):
            p.unlink()
    box = Outbox(path, 1 << 20, 3600)
    report = box.open()
    assert "was missing" in report and "seq continues after" in report
    assert put(box) > 2
    box.close()


def test_without_anything_to_learn_from_seq_starts_again_and_says_so(tmp_path):
    path = tmp_path / "outbox.db"
    path.write_bytes(b"\0garbage" * 64)
    box = Outbox(path, 1 << 20, 3600)
    report = box.open()
    assert "seq starts again at 1" in report
    assert put(box) == 1
    box.close()


def test_a_broken_file_found_later_is_replaced_and_reported(tmp_path):
    path = tmp_path / "outbox.db"
    box = opened(path)
    for _ in range(50):
        put(box, size=1000)
    box._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file
    with open(path, "r+b") as f:  # the storage goes bad under the running agent
        f.write(b"garbage!" * (path.stat().st_size // 8))
    box._db.execute("PRAGMA shrink_memory")  # nothing left in SQLite's page cache to hide it
    assert box.pending() == []  # replaced by an empty outbox, not an exception
    reports = box.take_reports()
    assert len(reports) == 1 and "moved to outbox.db.corrupt-" in reports[0] and "50 queued" not in reports[0]
    assert box.take_reports() == []
    assert put(box) > 50  # seq goes on above the old file's
    assert [p.name for p in tmp_path.iterdir() if "corrupt" in p.name]
    box.close()


def test_a_locked_file_is_not_treated_as_corrupt(tmp_path, monkeypatch):
    path = tmp_path / "outbox.db"
    opened(path).close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # as a second agent on the same state dir would hold it
    monkeypatch.setattr(outbox_mod, "BUSY_TIMEOUT_S", 0.2)
    try:
        box = Outbox(path, 1 << 20, 3600)
        assert box.open() is None  # reading is not blocked (WAL)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            put(box)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert not [p for p in tmp_path.iterdir() if "corrupt" in p.name]


def test_concurrent_puts_and_acks_are_safe(tmp_path):
    box = opened(tmp_path / "outbox.db")
    per_thread, threads = 200, 4
    got: list[list[int]] = [[] for _ in range(threads)]
    done = threading.Event()
    acked = []

    def producer(i):
        for _ in range(per_thread):
            got[i].append(put(box, kind=f"t{i}"))

    def consumer():  # like the link's publisher: read what is pending and ack it, while the others put
        after = 0
        while not done.is_set() or box.pending_count:
            batch = box.pending(16, after=after)
            if batch:
                after = batch[-1].seq
                box.ack([m.seq for m in batch])
                acked.extend(m.seq for m in batch)
            else:
                time.sleep(0.001)

    workers = [threading.Thread(target=producer, args=(i,)) for i in range(threads)]
    reader = threading.Thread(target=consumer)
    reader.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done.set()
    reader.join(timeout=60)
    everything = sorted(s for g in got for s in g)
    assert everything == list(range(1, per_thread * threads + 1))  # each seq exactly once
    assert all(g == sorted(g) for g in got)  # monotonic as each thread sees it
    assert sorted(acked) == everything and box.pending_count == 0 and box.pending_bytes == 0
    box.close()


# --- a state dir that takes no writes: real filesystems (a small tmpfs, filled; remounted read-only) --------

@pytest.fixture
def tmpfs(tmp_path):
    """A real 8 MiB tmpfs (root only: the outbox must meet a real ENOSPC and EROFS, not a stand-in)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "fs"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(d)], check=True)


def fill(d) -> None:
    """Fill the filesystem of ``d`` to the last byte, as another process would (a log, a core dump)."""
    with open(d / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(outbox_mod, "RECOVER_S", 0.0)  # probe at every call rather than every 2 s (a clock)


def fill_until_degraded(box: Outbox, d) -> list[int]:
    """Fill the disk, then queue until a commit fails; returns the seqs queued after the disk filled."""
    fill(d)
    seqs = []
    while not box.degraded:
        seqs.append(put(box, size=1000))
        assert len(seqs) < 500, "the outbox never found the disk full"
    return seqs


def on_disk(path) -> tuple[int, int, list[int]]:
    """(meta seq, meta dropped, queued seqs) as the file says, read by another connection."""
    with sqlite3.connect(path) as db:
        meta = dict(db.execute("SELECT key, value FROM meta"))
        return meta["seq"], meta["dropped"], [r[0] for r in db.execute("SELECT seq FROM messages ORDER BY seq")]


def test_a_full_disk_holds_new_messages_in_memory_and_writes_them_back(tmpfs, quick, caplog):
    path = tmpfs / "outbox.db"
    box = opened(path)
    before = [put(box, size=1000) for _ in range(5)]
    assert box.storage == "ok"
    after = fill_until_degraded(box, tmpfs)
    assert box.storage == "full" and "full" in box.storage_reason
    more = [put(box, size=1000) for _ in range(5)]  # no exception: held in memory, in seq order
    seqs = before + after + more
    assert seqs == list(range(1, len(seqs) + 1))
    assert [m.seq for m in box.pending(100)] == seqs  # on disk, then memory
    assert box.ack([1, 2, seqs[-1]]) == 3  # two on disk (remembered), one in memory
    assert [m.seq for m in box.pending(100)] == seqs[2:-1]
    assert [m.seq for m in box.pending(3, after=5)] == seqs[5:8]
    assert box.pending_count == len(seqs) - 3
    assert box.dropped == 0 and box.degraded
    assert on_disk(path)[2] == before + after[:-1]  # the disk still has what it took, no more
    assert len([r for r in caplog.records if "takes no writes" in r.getMessage()]) == 1  # logged once

    (tmpfs / "filler").unlink()
    assert box.refresh() == "ok" and not box.degraded
    assert on_disk(path) == (seqs[-1], 0, seqs[2:-1])  # written back with their seqs; the acks applied
    assert [m.seq for m in box.pending(100)] == seqs[2:-1]
    assert put(box) == seqs[-1] + 1
    box.close()
    box = opened(path)
    assert box.last_seq == seqs[-1] + 1 and box.pending_count == len(seqs) - 2
    box.close()


def test_memory_is_bounded_and_what_it_drops_is_counted_and_kept(tmpfs, quick):
    path = tmpfs / "outbox.db"
    box = opened(path, max_bytes=8000)  # memory_max is then 8000 bytes as well
    assert box.memory_max == 8000
    fill_until_degraded(box, tmpfs)
    disk_dropped = box.dropped  # the disk's own bound may have dropped some on the way
    for _ in range(20):
        put(box, size=1000)
    in_memory = [m.seq for m in box.pending(1000) if m.seq > on_disk(path)[0]]
    assert len(in_memory) == 8 and in_memory == list(range(box.last_seq - 7, box.last_seq + 1))  # the newest
    dropped = box.dropped - disk_dropped
    assert dropped > 0
    (tmpfs / "filler").unlink()
    assert box.refresh() == "ok"
    assert on_disk(path)[1] == box.dropped  # the count reaches the file
    box.close()
    assert opened(path, max_bytes=8000).dropped == box.dropped


def test_killed_while_full_the_next_start_goes_on_after_the_seqs_held_in_memory(tmpfs):
    path = tmpfs / "outbox.db"
    opened(path).close()
    code = ("import os, sys\nsys.path.insert(0, 'tests')\n"
            "from test_outbox import fill_until_degraded, put\nfrom agent.outbox import Outbox\n"
            f"b = Outbox({str(path)!r}, 1 << 20, 3600)\nb.open()\n"
            "for _ in range(3): put(b)\n"
            "from pathlib import Path\nfill_until_degraded(b, Path(" + repr(str(tmpfs)) + "))\n"
            "for _ in range(4): put(b)\nprint(b.last_seq)\nos._exit(9)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 9, r.stderr
    last = int(r.stdout.split()[-1])
    durable = on_disk(path)[0]
    assert durable < last - 3  # at least the last four were in memory only
    (tmpfs / "filler").unlink()
    box = Outbox(path, 1 << 20, 3600)
    assert box.open() is None
    reports = box.take_reports()
    assert len(reports) == 1 and f"seqs {durable + 1}..{last} were held in memory only" in reports[0]
    assert put(box) == last + 1  # never a seq that went out from memory before the kill
    box.close()


def test_a_read_only_state_dir_at_start_queues_in_memory_above_the_ceiling_and_recovers(tmpfs, quick):
    path = tmpfs / "outbox.db"
    box = opened(path)
    for _ in range(3):
        put(box)
    box.close()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        box = Outbox(path, 1 << 20, 3600)
        report = box.open()
        assert "read_only" in report and box.storage == "read_only" and box.degraded
        ceiling = int((tmpfs / "outbox.db.seq").read_text())
        assert put(box) == ceiling + 1  # nothing it may have handed out before is handed out again
        assert [m.seq for m in box.pending(10)] == [ceiling + 1]  # the disk could not be read without writing
        assert box.refresh() == "read_only"
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    assert box.refresh() == "ok"
    assert on_disk(path)[2] == [1, 2, 3, ceiling + 1]
    assert [m.seq for m in box.pending(10)] == [1, 2, 3, ceiling + 1]
    box.close()


def test_storage_says_full_from_the_free_space_before_a_write_fails_and_ok_from_twice_the_floor(tmpfs):
    box = opened(tmpfs / "outbox.db")
    put(box)
    fill(tmpfs)  # SQLite may still find room in pages it has: the state dir is full all the same
    assert box.refresh() == "full" and not box.degraded and "0 B free" in box.storage_reason
    filler = tmpfs / "filler"

    def leave(free: int) -> None:
        os.truncate(filler, filler.stat().st_size - (free - box_free(tmpfs)))

    leave(outbox_mod.FULL_BELOW * 3 // 2)
    assert box.refresh() == "full"  # between the floor and twice it: no flapping back and forth
    leave(outbox_mod.FULL_BELOW * 2 + 65536)
    assert box.refresh() == "ok" and box.storage_reason == ""
    leave(outbox_mod.FULL_BELOW * 3 // 2)
    assert box.refresh() == "ok"
    box.close()


def box_free(d) -> int:
    st = os.statvfs(d)
    return st.f_bavail * st.f_frsize
