"""Rolls in the store (a real SQLite index) and the roll report's points, computed by hand here."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from knitwatch.config.settings import RollConfig
from knitwatch.pipeline.decision.grading import largest_box, points_for_length, report_csv, roll_report
from knitwatch.pipeline.store.database import Store
from knitwatch.pipeline.store.rolls import parse_roll_id

DATA = Path(__file__).parent / "data"
CFG = RollConfig(fabric_width_m=1.8, metres_per_revolution=0.1, pixels_per_mm=2.0, four_point_severities=["hole"])


def _store(root: Path) -> Store:
    return Store(root, retention_days=3650, max_gb=1, fsync=False)


def _event(eid: int, severity: str, bbox: list[int], rev: int, tube_x: float, *, fp: bool = False,
           recurrence: dict[str, Any] | None = None, circ: float = 1000.0) -> dict[str, Any]:
    """An event as the store hands it out, with the record fields the report reads."""
    rec: dict[str, Any] = {"regions": [{"bbox": [0, 0, 5, 5], "area": 25, "peak": 2.0}],
                           "best": {"regions": [{"bbox": bbox, "area": 100, "peak": 3.0}]},
                           "track": {"revolution": rev, "tube_x": tube_x, "circumference_px": circ}}
    if recurrence:
        rec["recurrence"] = recurrence
    return {"id": eid, "camera": "c", "time": "2026-12-04T10:00:00.000Z", "severity": severity, "action": "stop",
            "image_score": 2.0, "false_positive": fp, "acknowledged": True, "record": rec,
            "pictures": {"overlay": f"events/2026-12-04/{eid:08d}/overlay.jpg"}}


ROLL = {"id": 7, "started": "2026-12-04T09:00:00.000Z", "ended": None, "reason": "command", "by": "op",
        "note": "", "machine": "M1", "start_pos": {"c": 10.0}, "end_pos": {"c": 510.0}}
# the roll: 500 revolutions x 0.1 m = 50 m of fabric 1.8 m wide (90 m²); 2 px per mm
EVENTS = [
    _event(1, "minor", [0, 0, 100, 40], 20, 250.0),  # 100 px = 50 mm: 1 point; at 10.25 rev = 1.025 m: yard 1
    _event(2, "major", [0, 0, 60, 300], 110, 0.0),  # 300 px = 150 mm: 2 points; 10.0 m: yard 10
    _event(3, "hole", [0, 0, 10, 10], 110, 500.0),  # a hole: 4 points; 10.05 m: yard 10 (6 there: capped to 4)
    _event(4, "major", [0, 0, 10, 900], 200, 0.0, fp=True),  # a false alarm: no points
    # a needle line in 3 revolutions, 200 px = 100 mm: 2 points each; 29.01, 29.11, 29.21 m: yard 31 (6 -> 4)
    _event(5, "recurring", [0, 0, 20, 200], 300, 100.0,
           recurrence={"revolutions": 3, "streak": 3, "passes": [300, 301, 302]}),
    _event(6, "minor", [0, 0, 200, 10], 400, 900.0),  # 100 mm: 2 points; 39.09 m: yard 42
]


def test_points_by_length_follow_the_4_point_limits() -> None:
    assert [points_for_length(mm) for mm in (1, 76.2, 76.3, 152.4, 152.5, 228.6, 228.7, 2000)] == [
        1, 1, 2, 2, 3, 3, 4, 4]
    rec = {"regions": [{"bbox": [0, 0, 30, 20]}], "best": {"regions": [{"bbox": [5, 5, 15, 60]}]},
           "escalated": {"regions": [{"bbox": [0, 0, 40, 40]}]}}
    assert largest_box(rec) == [5, 5, 15, 60]  # the longest side: 55 rows


def test_roll_report_numbers_on_hand_made_events() -> None:
    rep = roll_report(ROLL, EVENTS, CFG)
    assert rep["problems"] == []
    assert rep["length_m"] == 50.0 and rep["length_source"] == "fabric position"
    assert rep["area_m2"] == 90.0
    by_id = {d["event_id"]: d for d in rep["defects"]}
    assert [by_id[i]["points"] for i in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, None, 6, 2]
    assert by_id[1]["length_mm"] == 50.0 and by_id[1]["angle_deg"] == 90.0
    assert by_id[1]["metres_from_start"] == 1.025
    assert by_id[3]["metres_from_start"] == 10.05 and by_id[3]["angle_deg"] == 180.0
    assert by_id[5]["revolutions"] == 3
    points = 1 + 4 + 4 + 2  # yard 1, yard 10 (2 + 4 capped), yard 31 (3 x 2 capped), yard 42
    assert rep["points"]["total"] == points == 11
    assert rep["points"]["before_yard_cap"] == 1 + 2 + 4 + 6 + 2
    assert rep["points"]["per_100_m2"] == round(points * 100 / (50 * 1.8), 2) == 12.22
    yards, width_in = 50 / 0.9144, 1.8 / 0.0254
    assert rep["points"]["per_100_yd2"] == round(points * 3600 / (yards * width_in), 2)
    assert rep["points"]["grade"] == "A"
    assert rep["counts"]["defects"] == 5 and rep["counts"]["false_positives"] == 1
    assert rep["counts"]["by_severity"] == {"hole": 1, "major": 1, "minor": 2, "recurring": 1}


@pytest.mark.parametrize(("length_m", "per_100", "grade"), [(25.0, 24.44, "B"), (10.0, 61.11, "C"), (46.0, 13.29, "A")])
def test_grade_thresholds_with_a_given_length(length_m: float, per_100: float, grade: str) -> None:
    # the places in metres (and so the cap) do not change; only the area does
    rep = roll_report(ROLL, EVENTS, CFG, length_m=length_m)
    assert rep["length_source"] == "given"
    assert rep["points"]["per_100_m2"] == round(11 * 100 / (length_m * 1.8), 2) == per_100
    assert rep["points"]["grade"] == grade


def test_report_says_what_is_not_configured_instead_of_guessing() -> None:
    rep = roll_report(ROLL, EVENTS, RollConfig(four_point_severities=["hole"]))
    text = " ".join(rep["problems"])
    assert "pixels_per_mm" in text and "fabric_width_m" in text and "metres_per_revolution" in text
    assert rep["points"]["total"] is None and rep["points"]["grade"] is None and rep["length_m"] is None
    by_id = {d["event_id"]: d for d in rep["defects"]}
    assert by_id[3]["points"] == 4  # a hole needs no length
    assert by_id[1]["points"] is None and by_id[1]["length_mm"] is None and by_id[1]["metres_from_start"] is None
    # only the width missing: points known, no grade
    rep = roll_report(ROLL, EVENTS, RollConfig(metres_per_revolution=0.1, pixels_per_mm=2.0,
                                               four_point_severities=["hole"]))
    assert rep["points"]["total"] == 11 and rep["points"]["per_100_m2"] is None and rep["points"]["grade"] is None
    csv_text = report_csv(rep)
    assert "# [roll] fabric_width_m not configured" in csv_text
    assert "grade -" in csv_text


def test_report_csv_rows() -> None:
    lines = report_csv(roll_report(ROLL, EVENTS, CFG)).splitlines()
    assert lines[1].startswith("# length_m 50.0 area_m2 90.0 points 11 per_100_m2 12.22")
    assert lines[2].startswith("event_id,camera,time,severity")
    assert lines[3].split(",")[:5] == ["1", "c", "2026-12-04T10:00:00.000Z", "minor", "stop"]
    assert lines[3].endswith("events/2026-12-04/00000001/overlay.jpg,")
    assert len(lines) == 3 + len(EVENTS)


def test_events_get_the_open_roll_and_a_new_roll_closes_it(tmp_path: Path) -> None:
    store = _store(tmp_path)
    t = time.time_ns()

    def add(seq: int) -> int:
        return store.add_event({}, camera="c", t_wall_ns=t + seq, seq=seq, severity="major", action="stop",
                               image_score=1.0, max_area_px=10)

    assert store.current_roll() is None
    e1 = add(1)  # the first event opens a roll
    first = store.current_roll()
    assert first is not None and first["reason"] == "first event" and first["events"] == 1
    r2 = store.new_roll("command", "anna", note="style 42", machine="M7", cameras=["c"])
    e2, e3 = add(2), add(3)
    assert store.get_event(e1)["record"]["roll_id"] == first["id"]
    assert store.get_event(e2)["record"]["roll_id"] == r2
    assert [e["id"] for e in store.roll_events(r2)] == [e2, e3]
    old = store.get_roll(first["id"])
    assert old is not None and not old["open"] and old["ended_ns"] is not None
    cur = store.current_roll()
    assert cur is not None and cur["id"] == r2 and cur["machine"] == "M7" and cur["by"] == "anna"
    assert [r["id"] for r in store.pending_rolls()] == [first["id"], r2]
    store.roll_handled(r2, {"c": 12.5}, previous_end_pos={"c": 12.5})
    store.update_roll_position(r2, {"c": 40.25})
    store.set_roll_start(r2, "c", 99.0)  # already known: kept
    cur = store.get_roll(r2)
    assert cur is not None and cur["start_pos"] == {"c": 12.5} and cur["end_pos"] == {"c": 40.25}
    assert store.get_roll(first["id"])["end_pos"] == {"c": 12.5}
    r3 = store.new_roll("doff", "plc")
    assert store.get_roll(r3)["machine"] == "M7" and store.get_roll(r3)["cameras"] == ["c"]  # the previous roll's
    assert [r["id"] for r in store.list_rolls()["items"]] == [r3, r2, first["id"]]
    with pytest.raises(ValueError, match="reason"):
        store.new_roll("whim", "me")
    store.close()


def test_roll_ids_from_user_input() -> None:
    assert parse_roll_id("12") == 12 and parse_roll_id(3) == 3
    for bad in ("0", "-1", "x", "1e3", True, "9" * 30, 0):
        with pytest.raises(ValueError):
            parse_roll_id(bad)


def test_migration_of_a_schema_1_store(tmp_path: Path) -> None:
    """An index written by the store before rolls existed (tests/unit/pipeline/data/store_schema1.sql)."""
    db = sqlite3.connect(tmp_path / "events.sqlite3")
    db.executescript((DATA / "store_schema1.sql").read_text())
    db.close()
    store = _store(tmp_path)
    rolls = store.list_rolls()["items"]
    assert len(rolls) == 1
    roll = rolls[0]
    assert roll["reason"] == "migration" and roll["open"] and roll["events"] == 3
    assert roll["started_ns"] == 1_780_000_000_000_000_000  # the oldest event
    old = store.roll_events(roll["id"])
    assert [e["seq"] for e in old] == [10, 11, 12] and all(e["acknowledged"] for e in old)
    new = store.add_event({}, camera="cam0", t_wall_ns=time.time_ns(), seq=99, severity="minor", action="alarm",
                          image_score=1.0, max_area_px=5)
    assert new == 4 and store.get_event(new)["record"]["roll_id"] == roll["id"]
    assert store.get_ack(1)["events_acked"] == 3  # the rest is untouched
    store.close()
    raw = sqlite3.connect(tmp_path / "events.sqlite3")
    assert raw.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0] == "2"
    raw.close()
    again = _store(tmp_path)  # opening again migrates nothing twice
    assert again.list_rolls()["total"] == 1
    again.close()


def test_report_from_a_real_store(tmp_path: Path) -> None:
    """Events written through the store, a roll handled as the alert stage does, the report over them."""
    store = _store(tmp_path)
    rid = store.new_roll("api", "web", cameras=["c"])
    store.roll_handled(rid, {"c": 10.0})
    for e in EVENTS:
        eid = store.add_event(json.loads(json.dumps(e["record"])), camera="c", t_wall_ns=time.time_ns(),
                              seq=e["id"], severity=e["severity"], action="stop", image_score=2.0, max_area_px=100)
        if e["false_positive"]:
            store.mark_false_positive(eid, True, by="qa")
    store.update_roll_position(rid, {"c": 510.0})
    roll = store.get_roll(rid)
    rep = roll_report(roll, store.roll_events(rid), CFG)
    assert rep["points"]["total"] == 11 and rep["points"]["grade"] == "A" and rep["counts"]["false_positives"] == 1
    store.close()


def test_kind_from_the_simulators_truth_is_counted() -> None:
    ev = _event(9, "major", [0, 0, 30, 30], 20, 0.0)
    ev["record"]["truth"] = {"frame": 55, "defects": [{"id": 1, "kind": "oil_stain", "box": [0, 0, 9, 9]}]}
    plain = _event(10, "minor", [0, 0, 30, 30], 20, 10.0)
    rep = roll_report(ROLL, [ev, plain], CFG)
    assert [d["kind"] for d in rep["defects"]] == ["oil_stain", None]
    assert rep["counts"]["by_kind"] == {"oil_stain": 1}


def test_roll_and_doff_settings_are_checked() -> None:
    from pydantic import ValidationError

    from knitwatch.config.settings import PlcConfig

    with pytest.raises(ValidationError, match="grade_b_max"):
        RollConfig(grade_a_max=30, grade_b_max=20)
    with pytest.raises(ValidationError, match="fabric_width_m"):
        RollConfig(fabric_width_m=0)
    with pytest.raises(ValidationError, match="doff_address must differ"):
        PlcConfig(driver="modbus", stop_address=0, heartbeat_address=1, doff_address=1)
    ok = PlcConfig(driver="modbus", stop_address=0, heartbeat_address=1, doff_address=1, doff_table="discrete_input")
    assert ok.doff_address == 1  # another table: no clash
    with pytest.raises(ValidationError, match="doff_table"):
        PlcConfig(doff_address=3, doff_table="register")
