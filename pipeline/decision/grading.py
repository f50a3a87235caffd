"""The roll report: every defect of a roll with its place on the fabric, counts, and a points grade.

Points follow the *4-point system* as ASTM D5430 ("Standard Test Methods for Visually Inspecting and
Grading Fabrics") publishes it, applied to what the cameras measure:

* a defect is given points by its length (the longer side of its largest box, frame pixels divided by
  ``[roll] pixels_per_mm``): up to 3 in (76.2 mm) 1 point, over 3 up to 6 in (152.4 mm) 2, over 6 up to
  9 in (228.6 mm) 3, over 9 in 4 points;
* holes and openings get 4 points: the severity classes listed in ``four_point_severities``;
* no linear yard of fabric gets more than 4 points (a recurring defect - a broken needle's line seen
  in every revolution - counts once per revolution, and its occurrences that fall into one yard are
  capped at 4 together with every other defect there); applied when the defects' places in metres are
  known (``metres_per_revolution``);
* points per 100 square yards = points x 3600 / (inspected yards x fabric width in inches), and the
  metric form per 100 m² = points x 100 / (inspected metres x fabric width in metres);
* the grade: A up to ``grade_a_max`` points per 100 m², B up to ``grade_b_max``, else C (the defaults
  24 and 48 are about 20 and 40 points per 100 square yards; 40 is the usual first-quality limit).

Defects marked as false alarms are listed but get no points. What is not configured (no pixel scale,
no fabric width, no metres per revolution, an unknown roll length) makes the report say so, and the
numbers that need it are ``None`` - never a guess.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from knitwatch.config.settings import RollConfig

INCH_MM = 25.4
YARD_M = 0.9144
LENGTH_LIMITS_MM = (76.2, 152.4, 228.6)  # 3, 6 and 9 in; 1, 2, 3 points up to these; 4 beyond
MAX_POINTS_PER_YARD = 4


def points_for_length(length_mm: float) -> int:
    """Points of a defect of this length (4-point system: <= 3 in 1, <= 6 in 2, <= 9 in 3, longer 4)."""
    for points, limit in enumerate(LENGTH_LIMITS_MM, start=1):
        if length_mm <= limit:
            return points
    return 4


def largest_box(record: dict[str, Any]) -> list[int] | None:
    """The event's largest region box (by its longer side) over its first, best and escalated frames."""
    regions = list(record.get("regions") or [])
    for key in ("best", "escalated"):
        part = record.get(key)
        if isinstance(part, dict):
            regions += list(part.get("regions") or [])
    boxes = [r["bbox"] for r in regions if isinstance(r, dict) and isinstance(r.get("bbox"), list | tuple)
             and len(r["bbox"]) == 4]
    if not boxes:
        return None
    return [int(v) for v in max(boxes, key=lambda b: (max(b[2] - b[0], b[3] - b[1]), (b[2] - b[0]) * (b[3] - b[1])))]


def _truth_kind(record: dict[str, Any]) -> str | None:
    """The defect kind the simulator put there (its ``truth``; tests and demos only), else None."""
    truth = record.get("truth")
    if not isinstance(truth, dict):
        return None
    if isinstance(truth.get("kind"), str):
        return str(truth["kind"])
    kinds = {str(d["kind"]) for d in truth.get("defects") or [] if isinstance(d, dict) and d.get("kind")}
    return "+".join(sorted(kinds)) or None


def grade_of(per_100_m2: float, cfg: RollConfig) -> str:
    if per_100_m2 <= cfg.grade_a_max:
        return "A"
    if per_100_m2 <= cfg.grade_b_max:
        return "B"
    return "C"


def _revs(rev: Any, tube_x: Any, circ: Any) -> float | None:  # noqa: ANN401
    """A place on the fabric in revolutions (the revolution plus the fraction of the circumference)."""
    if not isinstance(rev, int | float):
        return None
    if isinstance(tube_x, int | float) and isinstance(circ, int | float) and circ > 0:
        return float(rev) + (float(tube_x) % float(circ)) / float(circ)
    return float(rev)


def roll_length_m(roll: dict[str, Any], cfg: RollConfig) -> float | None:
    """Metres knitted in the roll: the longest of its cameras' (end - start) revolutions times metres per
    revolution; None when either is unknown."""
    if cfg.metres_per_revolution is None:
        return None
    start, end = roll.get("start_pos") or {}, roll.get("end_pos") or {}
    spans = [float(end[c]) - float(start[c]) for c in start if c in end]
    if not spans:
        return None
    return max(0.0, max(spans)) * cfg.metres_per_revolution


def roll_report(roll: dict[str, Any], events: list[dict[str, Any]], cfg: RollConfig,
                length_m: float | None = None) -> dict[str, Any]:
    """The report of ``roll`` (a store roll dict) over its ``events`` (store event dicts with ``record``
    and ``pictures``). ``length_m``: the roll's length when given by hand (else from the positions)."""
    problems: list[str] = []
    if cfg.pixels_per_mm is None:
        problems.append("[roll] pixels_per_mm not configured: defect lengths (and their points) unknown")
    if cfg.fabric_width_m is None:
        problems.append("[roll] fabric_width_m not configured: no points per area, no grade")
    if cfg.metres_per_revolution is None:
        problems.append("[roll] metres_per_revolution not configured: no places in metres, no 4-points-per-yard "
                        "cap" + ("" if length_m is not None else ", roll length unknown"))
    length_source = "given" if length_m is not None else None
    if length_m is None:
        length_m = roll_length_m(roll, cfg)
        if length_m is not None:
            length_source = "fabric position"
        elif cfg.metres_per_revolution is not None:
            problems.append("roll length unknown: no fabric position was recorded at its start and end")
    start_pos = roll.get("start_pos") or {}
    defects = []
    occurrences: list[tuple[float | None, int, int]] = []  # (metres, points, event id) of each counted occurrence
    unknown_points = False
    for e in events:
        rec = e.get("record") or {}
        track: dict[str, Any] = rec["track"] if isinstance(rec.get("track"), dict) else {}
        circ = track.get("circumference_px")
        place = _revs(track.get("revolution"), track.get("tube_x"), circ)
        cam_start = start_pos.get(e["camera"])
        rev_from_start = place - float(cam_start) if place is not None and cam_start is not None else None
        metres = (round(max(0.0, rev_from_start) * cfg.metres_per_revolution, 3)
                  if rev_from_start is not None and cfg.metres_per_revolution is not None else None)
        box = largest_box(rec)
        length_px = max(box[2] - box[0], box[3] - box[1]) if box else None
        length_mm = (round(length_px / cfg.pixels_per_mm, 1)
                     if length_px is not None and cfg.pixels_per_mm is not None else None)
        recur: dict[str, Any] = rec["recurrence"] if isinstance(rec.get("recurrence"), dict) else {}
        revolutions = max(1, int(recur.get("revolutions") or 1))
        four = e["severity"] in cfg.four_point_severities
        each = 4 if four else (points_for_length(length_mm) if length_mm is not None else None)
        fp = bool(e.get("false_positive"))
        d: dict[str, Any] = {
            "event_id": e["id"], "camera": e["camera"], "time": e["time"], "severity": e["severity"],
            "action": e["action"], "kind": _truth_kind(rec),
            "score": e["image_score"], "false_positive": fp, "acknowledged": e.get("acknowledged", False),
            "revolution": track.get("revolution"),
            "angle_deg": (round(float(track["tube_x"]) % float(circ) / float(circ) * 360.0, 1)
                          if isinstance(track.get("tube_x"), int | float) and isinstance(circ, int | float) and circ > 0
                          else None),
            "offset_px": track.get("tube_x"),
            "metres_from_start": metres,
            "revolutions": revolutions,
            "box": box, "length_px": length_px, "length_mm": length_mm,
            "points_each": each, "points": None if fp else (None if each is None else each * revolutions),
            "pictures": dict(e.get("pictures") or {}),
        }
        defects.append(d)
        if fp:
            continue
        if each is None:
            unknown_points = True
            continue
        passes = [int(p) for p in recur.get("passes") or [] if isinstance(p, int)]
        if passes and cfg.metres_per_revolution is not None and cam_start is not None and place is not None:
            frac = place - math.floor(place)
            passes = sorted(passes)
            passes = [passes[0] - k for k in range(revolutions - len(passes), 0, -1)] + passes
            for p in passes:
                occurrences.append((max(0.0, p + frac - float(cam_start)) * cfg.metres_per_revolution, each, e["id"]))
        else:
            occurrences += [(metres, each, e["id"])] * revolutions
    # the cap: at most 4 points per linear yard (only where the places are known)
    per_yard: dict[int, int] = {}
    loose = 0
    for metres, pts, _eid in occurrences:
        if metres is None:
            loose += pts
        else:
            yard = int(metres // YARD_M)
            per_yard[yard] = per_yard.get(yard, 0) + pts
    capped = sum(min(MAX_POINTS_PER_YARD, p) for p in per_yard.values())
    total: int | None = None if unknown_points else capped + loose
    uncapped = sum(p for _m, p, _e in occurrences)
    width = cfg.fabric_width_m
    per_m2 = per_yd2 = None
    grade = None
    if total is not None and width is not None and length_m is not None and length_m > 0:
        per_m2 = round(total * 100.0 / (length_m * width), 2)
        per_yd2 = round(total * 3600.0 / ((length_m / YARD_M) * (width / INCH_MM * 1000.0)), 2)
        grade = grade_of(per_m2, cfg)
    elif total is not None and length_m is not None and length_m <= 0:
        problems.append("roll length is 0: no points per area, no grade")
    counted = [d for d in defects if not d["false_positive"]]
    return {
        "roll": {k: v for k, v in roll.items() if k not in ("started_ns", "ended_ns")},
        "settings": {"fabric_width_m": width, "metres_per_revolution": cfg.metres_per_revolution,
                     "pixels_per_mm": cfg.pixels_per_mm, "four_point_severities": list(cfg.four_point_severities),
                     "grade_a_max": cfg.grade_a_max, "grade_b_max": cfg.grade_b_max},
        "length_m": None if length_m is None else round(length_m, 3),
        "length_source": length_source,
        "area_m2": None if length_m is None or width is None else round(length_m * width, 3),
        "counts": {"defects": len(counted), "false_positives": len(defects) - len(counted),
                   "by_severity": dict(sorted(Counter(d["severity"] for d in counted).items())),
                   "by_action": dict(sorted(Counter(d["action"] for d in counted).items())),
                   "by_kind": dict(sorted(Counter(d["kind"] for d in counted if d["kind"]).items()))},
        "points": {"total": total, "before_yard_cap": None if unknown_points else uncapped,
                   "per_100_m2": per_m2, "per_100_yd2": per_yd2, "grade": grade,
                   "rule": "4-point system (ASTM D5430 style): length <= 3 in 1, <= 6 in 2, <= 9 in 3, longer 4; "
                           "holes/openings 4; at most 4 per linear yard"},
        "problems": problems,
        "defects": defects,
    }


# ---------------------------------------------------------------------------------------------- output

CSV_COLUMNS = ("event_id", "camera", "time", "severity", "action", "kind", "false_positive", "revolution",
               "angle_deg", "metres_from_start", "revolutions", "length_px", "length_mm", "points", "overlay",
               "frame")


def report_csv(report: dict[str, Any]) -> str:
    """One line per defect (the columns of :data:`CSV_COLUMNS`; empty where unknown), with the roll's
    totals as ``#`` comment lines first."""
    out = io.StringIO()
    r, p = report["roll"], report["points"]
    out.write(f"# roll {r['id']} started {r['started']} ended {r['ended'] or 'open'} reason {r['reason']}\n")
    out.write(f"# length_m {_txt(report['length_m'])} area_m2 {_txt(report['area_m2'])} points {_txt(p['total'])} "
              f"per_100_m2 {_txt(p['per_100_m2'])} per_100_yd2 {_txt(p['per_100_yd2'])} grade {_txt(p['grade'])}\n")
    for problem in report["problems"]:
        out.write(f"# {problem}\n")
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for d in report["defects"]:
        row = {**d, "overlay": d["pictures"].get("overlay", ""), "frame": d["pictures"].get("frame", "")}
        w.writerow(["" if row.get(c) is None else row[c] for c in CSV_COLUMNS])
    return out.getvalue()


def _txt(v: object) -> str:
    return "-" if v is None else str(v)


def report_html(report: dict[str, Any], picture_href: Callable[[dict[str, Any], str], str | None]) -> str:
    """A self-contained HTML page (no scripts); ``picture_href(defect, kind)``: the link of a picture."""
    e = html.escape
    r, p, c = report["roll"], report["points"], report["counts"]
    rows = []
    for d in report["defects"]:
        thumb = picture_href(d, "thumb")
        overlay = picture_href(d, "overlay")
        pic = (f'<a href="{e(overlay or thumb or "")}"><img src="{e(thumb)}" alt="event {d["event_id"]}"></a>'
               if thumb else "-")
        cells = [d["event_id"], d["camera"], d["time"], d["severity"], d["action"], d["kind"] or "",
                 "yes" if d["false_positive"] else "", d["revolution"], d["angle_deg"], d["metres_from_start"],
                 d["revolutions"], d["length_mm"], d["points"]]
        rows.append("<tr>" + "".join(f"<td>{e(_txt(v))}</td>" for v in cells) + f"<td>{pic}</td></tr>")
    counts = "".join(f"<li>{e(k)}: {v}</li>" for k, v in c["by_severity"].items()) or "<li>none</li>"
    problems = "".join(f"<li>{e(x)}</li>" for x in report["problems"])
    head = ["event", "camera", "time", "severity", "action", "kind", "false alarm", "revolution", "angle °",
            "m from start", "revolutions", "length mm", "points", "picture"]
    title = f"Roll {r['id']}" + (f" - {r['machine']}" if r.get("machine") else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)} - knitwatch roll report</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #999;padding:.2em .5em;text-align:left}}img{{max-height:80px}}
.grade{{font-size:2em;font-weight:bold}}</style></head><body>
<h1>{e(title)}</h1>
<p>Started {e(_txt(r['started']))} ({e(r['reason'])}, by {e(r['by'])}), ended {e(r['ended'] or 'open')}.
{e(r.get('note') or '')}</p>
<p>Length {e(_txt(report['length_m']))} m, area {e(_txt(report['area_m2']))} m²;
points {e(_txt(p['total']))}, {e(_txt(p['per_100_m2']))} per 100 m², {e(_txt(p['per_100_yd2']))} per 100 yd².</p>
<p>Grade: <span class="grade" id="grade">{e(_txt(p['grade']))}</span></p>
<h2>Counts</h2><p>{c['defects']} defect(s), {c['false_positives']} false alarm(s).</p><ul>{counts}</ul>
{f'<h2>Not configured</h2><ul>{problems}</ul>' if problems else ''}
<h2>Defects</h2>
<table><thead><tr>{''.join(f'<th>{e(h)}</th>' for h in head)}</tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<p><small>{e(p['rule'])}</small></p>
</body></html>
"""
