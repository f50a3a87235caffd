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
