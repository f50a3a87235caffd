from __future__ import annotations

from knitwatch.daemon.bench.detection import detection_report


def row(seq: int, defects: list[dict], event: bool = False, action: str | None = None) -> dict:
    r = {"seq": seq, "truth": {"revolution": 0, "defects": defects, "cutline": False}, "event": event,
         "latency_ms": {"capture_to_decision": 100.0}}
    if action:
        r["action"] = action
    return r


HOLE = {"id": 1, "kind": "hole", "box": [0, 0, 30, 30]}
STAIN = {"id": 2, "kind": "oil_stain", "box": [0, 0, 40, 40]}


def test_recall_delay_and_false_stops() -> None:
    rows = [row(i, []) for i in range(10)]
    rows += [row(10, [HOLE]), row(11, [HOLE]), row(12, [HOLE], True, "stop"), row(13, [HOLE])]
    rows += [row(i, []) for i in range(14, 40)]
    rows += [row(40, [STAIN]), row(41, [STAIN])]  # missed
    rows += [row(i, []) for i in range(42, 60)]
    rows[55] = row(55, [], True, "stop")  # a stop with no defect in sight: false
    rows[43] = row(43, [], True, "alarm")  # alarms are not stops
    rep = detection_report(rows, fps=2.0, min_area_px=20)
    assert rep["defects"] == 2 and rep["defects_stopped"] == 1 and rep["recall"] == 0.5
    assert rep["recall_by_kind"] == {"hole": "1/1", "oil_stain": "0/1"}
    assert rep["delay_frames_p50"] == 2.0
    assert rep["delay_ms_p50"] == 2 * 500 + 100
    assert rep["false_stops"] == 1
    clean = 60 - 6
    assert rep["defect_free_frames"] == clean
    assert rep["false_stops_per_hour"] == round(1 / (clean / 2 / 3600), 2)


def track(tid: int, bbox: list[int], *, confirmed: bool = True, event_id: int | None = None, action: str = "stop",
          new: bool = False, escalated: bool = False, revolutions: int = 1) -> dict:
    """A track as the alert stage writes it into the decisions log."""
    t: dict = {"id": tid, "bbox": bbox, "area": 100, "peak": 2.0, "confirmed": confirmed}
    if event_id is not None:
        t.update(event_id=event_id, severity="s", action=action, new_event=new, escalated=escalated,
                 revolutions=revolutions)
    return t


def test_per_defect_report_from_tracks() -> None:
    """Hand-made decisions with tracks: a hole stopped at once; an oil stain split into two events (a
    duplicate, alarms only); a needle line logged in its first revolution and escalated to a stop when it
    came back (one event, 2 revolutions); a slub flagged once, never confirmed; a stop on clean fabric."""
    hole = {"id": 1, "kind": "hole", "box": [100, 50, 130, 80]}
    stain = {"id": 2, "kind": "oil_stain", "box": [200, 100, 260, 160]}
    line = {"id": 3, "kind": "needle_line", "box": [300, 0, 306, 256]}
    slub = {"id": 4, "kind": "slub", "box": [400, 20, 440, 30]}
    rows = {i: row(i, []) for i in range(70)}
    for i in range(10, 16):
        rows[i] = row(i, [hole])
    rows[10]["tracks"] = [track(1, [98, 50, 128, 78], confirmed=False)]
    rows[11]["tracks"] = [track(1, [98, 50, 128, 78], event_id=5, new=True)]
    rows[12]["tracks"] = [track(1, [98, 50, 128, 78], event_id=5)]
    for i in range(20, 26):
        rows[i] = row(i, [stain])
        rows[i]["tracks"] = [track(2, [200, 100, 225, 160], event_id=6, action="alarm", new=i == 21),
                             track(3, [235, 100, 260, 160], event_id=7, action="alarm", new=i == 21)]
    for i in (*range(30, 33), *range(60, 63)):
        rows[i] = row(i, [line])
    rows[31]["tracks"] = [track(4, [300, 0, 306, 256], event_id=8, action="log", new=True)]
    rows[61]["tracks"] = [track(5, [300, 0, 306, 256], event_id=8, escalated=True, revolutions=2)]
    for i in range(40, 43):
        rows[i] = row(i, [slub])
    rows[41]["tracks"] = [track(6, [400, 20, 440, 30], confirmed=False)]
    rows[50]["tracks"] = [track(7, [10, 10, 40, 40], event_id=9, new=True)]  # nothing there: a false stop
    rep = detection_report(list(rows.values()), fps=2.0, min_area_px=20)
    assert rep["tracked"]
    per = {d["kind"]: d for d in rep["per_defect"]}
    assert per["hole"] == {"id": 1, "kind": "hole", "first_seq": 10, "passes": 1, "frames_seen": 6,
                           "frames_flagged": 3, "frames_confirmed": 2, "confirmed": True, "events": 1,
                           "event_ids": [5], "revolutions": 1, "stopped": True, "delay_frames": 1}
    assert per["oil_stain"]["events"] == 2 and not per["oil_stain"]["stopped"] and per["oil_stain"]["confirmed"]
    assert per["needle_line"]["passes"] == 2 and per["needle_line"]["events"] == 1
    assert per["needle_line"]["revolutions"] == 2 and per["needle_line"]["delay_frames"] == 61 - 30
    assert per["slub"]["frames_flagged"] == 1 and not per["slub"]["confirmed"] and per["slub"]["events"] == 0
    assert (rep["defects"], rep["defects_confirmed"], rep["defects_stopped"]) == (4, 3, 2)
    assert rep["recall"] == 0.5 and rep["recall_confirmed"] == round(2 / 3, 3)
    assert rep["recall_by_kind"] == {"hole": "1/1", "needle_line": "1/1", "oil_stain": "0/1", "slub": "0/1"}
    assert rep["duplicates"] == 1 and rep["events"] == 5
    assert rep["false_events"] == 1 and rep["false_stops"] == 1 and rep["stop_events"] == 3
    clean = 70 - 6 - 6 - 6 - 3
    assert rep["defect_free_frames"] == clean
    assert rep["false_stops_per_hour"] == round(1 / (clean / 2 / 3600), 2)
    assert rep["delay_frames_p50"] == (1 + 31) / 2 and rep["delay_frames_max"] == 31
