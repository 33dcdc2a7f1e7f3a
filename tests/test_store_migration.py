"""A database made by the release before the store package (main at 002c90d, schema 8) opens with its data.

``tests/fixtures/fleet-schema8.db`` was written by that release's own Store (``tests/fixtures/make_schema8_db.py``
says how to make it again)."""

import shutil
from pathlib import Path

from agent import protocol
from fleet.rollouts import Rollouts
from fleet.store import SCHEMA_VERSION, Store

FIXTURE = Path(__file__).parent / "fixtures" / "fleet-schema8.db"
T0 = 1_700_000_000.0
SHA = "ab" * 32


def test_a_schema_8_database_made_by_the_previous_release_opens_with_its_data(tmp_path):
    path = tmp_path / "fleet.db"
    shutil.copy(FIXTURE, path)
    s = Store(path).open()
    try:
        assert s.query("SELECT version FROM schema_version")[0][0] == SCHEMA_VERSION == 10
        [d] = s.devices()
        assert (d["id"], d["active_name"], d["inferences"], d["errors"], d["seq_max"], d["seq_count"],
                d["duplicates"], d["tags"]) == ("cam-1", "digits", 515, 1, 6, 6, 1, ["lab"])
        assert s.query("SELECT count(*) FROM telemetry")[0][0] == 5
        report = s.device_detail("cam-1")
        assert report["errors_by_kind"]["decode"]["count"] == 1
        assert [e["kind"] for e in report["events"]] == ["active"]
        assert report["deployments"][0]["phase"] == "active"
        assert [p["inferences"] for p in s.series("cam-1", T0, T0 + 100)] == [101, 102, 103, 104, 105]
        assert [t["name"] for t in s.tokens()] == ["ci"] and s.active_token("h" * 64)["role"] == "admin"
        assert s.certificate(0xABC)["device_id"] == "cam-1"
        assert s.release_key("k1")["name"] == "release"
        assert s.bundle(SHA)["name"] == "digits"
        # the rollouts table the old driver made is kept, rows and all
        assert [r["id"] for r in Rollouts(s, link=None, public_url=lambda: "").store.query(
            "SELECT id FROM rollouts")] == ["ro-1"]
        # dedupe by (device, boot, seq) holds across the upgrade; a new window is stored
        old = protocol.Telemetry(device_id="cam-1", boot_id="b1", seq=3, time=T0 + 30, interval_s=10, inferences=1)
        new = protocol.Telemetry(device_id="cam-1", boot_id="b1", seq=7, time=T0 + 70, interval_s=10, inferences=1)
        assert s.record_many([(old, T0 + 80, False), (new, T0 + 80, False)]) == [False, True]
        [d] = s.devices()
        assert (d["seq_max"], d["seq_count"], d["duplicates"], d["inferences"]) == (7, 7, 2, 516)
    finally:
        s.close()
    s = Store(path).open()  # opening it again changes nothing
    try:
        assert s.query("SELECT version FROM schema_version")[0][0] == SCHEMA_VERSION
        assert s.query("SELECT count(*) FROM telemetry")[0][0] == 6
    finally:
        s.close()
