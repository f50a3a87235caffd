"""``knitwatch roll new|list|report``: rolls of fabric and the roll report (defects, points, grade).

``roll new`` writes the new roll into the store as ``knitwatch ack`` writes an acknowledge; a running
daemon's alert stage takes it within about half a second (it records where the fabric is) - the command
waits for that (``--wait``). ``list`` and ``report`` read the store directly (the daemon need not run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from knitwatch.daemon.cli.common import EXIT_FAIL, EXIT_OK, CliError, add_config_option, add_group, load_config, table

log = structlog.get_logger(__name__)


def _open_store(args: argparse.Namespace) -> Any:  # noqa: ANN401 - (Settings, Store)
    from knitwatch.pipeline.store.database import Store, StoreError

    settings = load_config(args)
    try:
        return settings, Store.from_config(settings.store, create=False)
    except StoreError as e:
        raise CliError(f"{e}; is [store] path right, and did the daemon run once?") from None


def cmd_roll_new(args: argparse.Namespace) -> int:
    import getpass

    from knitwatch.pipeline.store.database import StoreError

    if args.wait < 0:
        raise CliError(f"--wait must be 0 or more seconds, not {args.wait:g}")
    settings, store = _open_store(args)
    try:
        by = args.by or getpass.getuser()
    except (KeyError, OSError):
        by = "unknown"
    try:
        rid = store.new_roll("command", by, note=args.note or "", machine=settings.roll.machine or None,
                             cameras=[c.id for c in settings.cameras])
        log.info("new roll requested", roll_id=rid, by=by, note=args.note or "")
        sys.stdout.write(f"roll {rid} started by {by}" + (f" ({args.note})" if args.note else "") + "\n")
        if args.wait == 0:
            return EXIT_OK
        deadline = time.monotonic() + args.wait
        roll = store.get_roll(rid)
        while time.monotonic() < deadline and roll is not None and roll["handled"] is None:
            time.sleep(0.1)
            roll = store.get_roll(rid)
    except StoreError as e:
        raise CliError(str(e), EXIT_FAIL) from None
    finally:
        store.close()
    if roll is None or roll["handled"] is None:
        sys.stderr.write(f"knitwatch: the daemon did not take roll {rid} within {args.wait:g} s (is it running?); "
                         "events go into it all the same, and its start position is recorded when the daemon runs\n")
        return EXIT_OK
    where = ", ".join(f"{c} revolution {v:.2f}" for c, v in sorted(roll["start_pos"].items())) or "no fabric position"
    sys.stdout.write(f"taken by the daemon at {roll['handled']} ({where})\n")
    return EXIT_OK


def cmd_roll_list(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise CliError(f"--limit must be at least 1, not {args.limit}")
    _settings, store = _open_store(args)
    try:
        res = store.list_rolls(limit=args.limit)
    finally:
        store.close()
    if args.json:
        sys.stdout.write(json.dumps(res, indent=2) + "\n")
        return EXIT_OK
    rows = [[str(r["id"]), r["started"], r["ended"] or "open", r["reason"], r["by"], str(r["events"]), r["note"]]
            for r in res["items"]]
    sys.stdout.write(table(rows, ["roll", "started", "ended", "reason", "by", "events", "note"]))
    sys.stdout.write(f"{len(rows)} of {res['total']} roll(s)\n")
    return EXIT_OK


def _roll_arg(store: Any, value: str | None) -> dict[str, Any]:  # noqa: ANN401
    from knitwatch.pipeline.store.rolls import parse_roll_id

    if value in (None, "current"):
        roll = store.current_roll()
        if roll is None:
            raise CliError("there is no roll yet (it starts with 'knitwatch roll new', a doff or the first event)")
        return roll
    try:
        rid = parse_roll_id(value)
    except ValueError as e:
        raise CliError(f"ROLL {value!r}: {e} (or 'current')") from None
    roll = store.get_roll(rid)
    if roll is None:
        raise CliError(f"no roll {rid} (see 'knitwatch roll list')")
    return roll


def _text(rep: dict[str, Any]) -> str:
    r, p, c = rep["roll"], rep["points"], rep["counts"]

    def t(v: object) -> str:
        return "-" if v is None else str(v)

    lines = [f"roll {r['id']}{' (' + r['machine'] + ')' if r.get('machine') else ''}: started {r['started']} "
             f"({r['reason']}, by {r['by']}), ended {r['ended'] or 'open'}",
             f"length {t(rep['length_m'])} m, area {t(rep['area_m2'])} m2",
             f"defects {c['defects']} (false alarms {c['false_positives']}); by severity: "
             + (", ".join(f"{k} {v}" for k, v in c["by_severity"].items()) or "none"),
             f"points {t(p['total'])}"
             + (f" ({p['before_yard_cap']} before the 4-per-yard cap)" if p["before_yard_cap"] != p["total"] else "")
             + f", per 100 m2 {t(p['per_100_m2'])}, per 100 yd2 {t(p['per_100_yd2'])}, grade {t(p['grade'])}"]
    lines += [f"note: {x}" for x in rep["problems"]]
    rows = [[str(d["event_id"]), d["camera"], d["time"], d["severity"], t(d["revolution"]), t(d["angle_deg"]),
             t(d["metres_from_start"]), t(d["length_mm"]), t(d["points"]) + (" (false alarm)" if d["false_positive"]
                                                                              else ""),
             d["pictures"].get("overlay", "-")] for d in rep["defects"]]
    out = "\n".join(lines) + "\n"
    if rows:
        out += "\n" + table(rows, ["event", "camera", "time", "severity", "rev", "angle", "m", "length mm", "points",
                                   "picture (in the store folder)"])
    return out


def _write_out(path: Path, text: str) -> None:
    """Write the report whole or not at all (a temporary file renamed into place)."""
    if path.is_dir():
        raise CliError(f"--out {path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise CliError(f"--out {path}: the folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CliError(f"--out {path}: cannot write it: {e.strerror or e}") from None


def cmd_roll_report(args: argparse.Namespace) -> int:
    from knitwatch.pipeline.decision.grading import report_csv, report_html, roll_report

    if args.length_m is not None and not 0 < args.length_m < 1e6:
        raise CliError(f"--length-m must be a positive number of metres, not {args.length_m:g}")
    if args.out is not None and not (args.html or args.csv or args.json):
        raise CliError("--out needs a format: --json, --csv or --html")
    settings, store = _open_store(args)
    try:
        roll = _roll_arg(store, args.roll)
        events = store.roll_events(roll["id"])
    finally:
        store.close()
    rep = roll_report(roll, events, settings.roll, length_m=args.length_m)
    if args.json:
        text = json.dumps(rep, indent=2) + "\n"
    elif args.csv:
        text = report_csv(rep)
    elif args.html:
        root = Path(settings.store.path).resolve()
        base = args.out.resolve().parent if args.out is not None else None

        def href(d: dict[str, Any], kind: str) -> str | None:
            rel = d["pictures"].get(kind)
            if rel is None:
                return None
            path = root / rel
            return Path(os.path.relpath(path, base)).as_posix() if base is not None else path.as_uri()

        text = report_html(rep, href)
    else:
        text = _text(rep)
    if args.out is not None:
        _write_out(args.out, text)
        log.info("roll report written", roll_id=roll["id"], out=str(args.out), defects=len(rep["defects"]))
    else:
        sys.stdout.write(text)
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    group = add_group(sub, "roll", "rolls of fabric: start a new one, list them, the roll report with its grade",
                      "roll_command")
    new = group.add_parser("new", help="start a new roll (the open one ends); a running daemon takes it at once",
                           description="Start a new roll: the open roll ends now and every later defect belongs to "
                           "the new one. A running daemon records where the fabric is (for places in metres).")
    add_config_option(new)
    new.add_argument("--note", metavar="TEXT", default="", help="kept with the roll (article, lot, operator's note)")
    new.add_argument("--by", metavar="NAME", help="who starts it (default: the login name)")
    new.add_argument("--wait", type=float, metavar="S", default=5.0,
                     help="seconds to wait for the daemon to take it (0: do not wait; default 5)")
    new.set_defaults(func=cmd_roll_new)
    lst = group.add_parser("list", help="the rolls, newest first", description="The rolls, newest first.")
    add_config_option(lst)
    lst.add_argument("--limit", type=int, default=50, metavar="N", help="at most N rolls (default 50)")
    lst.add_argument("--json", action="store_true", help="JSON instead of a table")
    lst.set_defaults(func=cmd_roll_list)
    rep = group.add_parser(
        "report", help="a roll's defects, places, counts, points and grade (text, --json, --csv or --html)",
        description="The roll report: every defect with its place (revolution, angle, metres from the roll's "
        "start), severity, length and points, the pictures (paths in the store folder), counts, and the points "
        "grade of the 4-point system (ASTM D5430 style) from the [roll] settings. What is not configured is "
        "said, not guessed.")
    add_config_option(rep)
    rep.add_argument("roll", nargs="?", metavar="ROLL", help="roll id, or 'current' (default: the open roll)")
    fmt = rep.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="the whole report as JSON")
    fmt.add_argument("--csv", action="store_true", help="one line per defect, totals as # comments first")
    fmt.add_argument("--html", action="store_true", help="a page with the pictures (use with --out)")
    rep.add_argument("--out", type=Path, metavar="FILE", help="write to FILE (whole or not at all) instead of stdout")
    rep.add_argument("--length-m", type=float, metavar="M",
                     help="the roll's length in metres, when the fabric position did not give it")
    rep.set_defaults(func=cmd_roll_report)
