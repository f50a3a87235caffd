"""``knitwatch defects list|show|export``: the stored defect events, read from the store directly
(``[store] path``; the daemon need not run)."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import structlog

from knitwatch.daemon.cli.common import (
    EXIT_FAIL,
    EXIT_OK,
    CliError,
    add_config_option,
    add_group,
    load_config,
    local_time,
    table,
)
from knitwatch.pipeline.store.queries import iter_events, parse_time

log = structlog.get_logger(__name__)


def _open_store(args: argparse.Namespace) -> Any:  # noqa: ANN401 - a Store
    from knitwatch.pipeline.store.database import Store, StoreError

    settings = load_config(args)
    try:
        return settings, Store.from_config(settings.store, create=False)
    except StoreError as e:
        raise CliError(f"{e}; is [store] path right, and did the daemon run once?", EXIT_FAIL) from None


def _filters(args: argparse.Namespace, settings: Any) -> dict[str, Any]:  # noqa: ANN401
    cams = [c.id for c in settings.cameras]
    if args.camera is not None and args.camera not in cams:
        log.warning("camera is not in the configuration (listing its stored events anyway)", camera=args.camera,
                    configured=cams)
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as e:
        raise CliError(str(e)) from None
    out: dict[str, Any] = {"camera": args.camera, "since_ns": since, "until_ns": until, "severity": args.severity,
                           "action": args.action}
    if getattr(args, "kept", False):
        out["keep"] = True
    if getattr(args, "false_positive", False):
        out["false_positive"] = True
    if getattr(args, "unacknowledged", False):
        out["acknowledged"] = False
    return out


def _flags(e: dict[str, Any]) -> str:
    f = []
    if e["action"] in ("stop", "alarm"):
        f.append("acked" if e["acknowledged"] else "LATCHED")
    if e["keep"]:
        f.append("keep")
    if e["false_positive"]:
        f.append("false-positive")
    if e["state"] != "complete":
        f.append(e["state"])
    return ",".join(f)


def cmd_defects_list(args: argparse.Namespace) -> int:
    settings, store = _open_store(args)
    try:
        filters = _filters(args, settings)
        page = store.list_events(**filters, limit=args.limit, offset=args.offset)
    finally:
        store.close()
    if args.json:
        sys.stdout.write(json.dumps(page, indent=2) + "\n")
        return EXIT_OK
    rows = [[str(e["id"]), local_time(e["t_wall_ns"]), e["camera"], e["severity"], e["action"],
             f"{e['image_score']:.3f}", str(e["max_area_px"]), _flags(e)] for e in page["items"]]
    if rows:
        sys.stdout.write(table(rows, ["ID", "TIME", "CAMERA", "SEVERITY", "ACTION", "SCORE", "AREA_PX", "FLAGS"]))
    shown = len(rows)
    more = f" (--offset {page['offset'] + shown} for more)" if page["offset"] + shown < page["total"] else ""
    sys.stdout.write(f"{shown} of {page['total']} event(s){more}\n")
    return EXIT_OK


def cmd_defects_show(args: argparse.Namespace) -> int:
    settings, store = _open_store(args)
    try:
        try:
            e = store.get_event(args.id)
        except ValueError as err:
            raise CliError(f"{args.id!r}: {err}") from None
        if e is None:
            raise CliError(f"no event {args.id} in {settings.store.path}", EXIT_FAIL)
        paths = {k: store.file_path(e["id"], k) for k in e["files"]}
    finally:
        store.close()
    if args.json:
        e["paths"] = {k: str(p) if p else None for k, p in paths.items()}
        sys.stdout.write(json.dumps(e, indent=2) + "\n")
        return EXIT_OK
    rec = e.get("record", {})
    out = [
        f"event {e['id']}  {local_time(e['t_wall_ns'])} ({e['time']})",
        f"  camera      {e['camera']}, frame {e['seq']}",
        f"  severity    {e['severity']} -> action {e['action']} ({e['action_state']})",
        f"  score       {e['image_score']:.4f} (image threshold {rec.get('thresholds', {}).get('image', '?')})",
        f"  largest     {e['max_area_px']} px, {rec.get('n_regions', '?')} region(s)",
        f"  flags       {_flags(e) or '-'}",
    ]
    if e["acknowledged"]:
        out.append(f"  acknowledged {local_time(e['acked_ns'])} (ack #{e['ack_id']})")
    if e["false_positive"]:
        out.append(f"  false positive: by {e['fp_by'] or '?'}: {e['fp_note'] or ''}")
    for r in rec.get("regions", [])[:10]:
        out.append(f"  region      area {r.get('area')} px, bbox {r.get('bbox')}, peak {r.get('peak', 0):.3f}")
    for a in rec.get("actions", [])[:10]:
        out.append(f"  action      {json.dumps(a)}")
    if rec.get("model"):
        out.append(f"  model       {rec['model'].get('kind')} {rec['model'].get('id')}")
    for k, p in paths.items():
        out.append(f"  {k:<11} {p if p else '(missing)'}")
    sys.stdout.write("\n".join(out) + "\n")
    return EXIT_OK


INDEX_FIELDS = ["id", "time", "camera", "seq", "severity", "action", "image_score", "max_area_px", "acknowledged",
                "keep", "false_positive", "fp_by", "fp_note", "state", "files"]


def cmd_defects_export(args: argparse.Namespace) -> int:
    from knitwatch.pipeline.store.database import FILE_KINDS

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FILE_KINDS]
    if bad:
        raise CliError(f"unknown picture kind(s) {', '.join(bad)}; known: {', '.join(FILE_KINDS)}")
    out = Path(args.out)
    as_zip = out.suffix.lower() == ".zip"
    if as_zip and out.exists() and not args.force:
        raise CliError(f"{out} exists (--force to replace it)")
    if not as_zip and out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise CliError(f"{out} exists and is not an empty folder (--force to write into it)")
    settings, store = _open_store(args)
    try:
        events = iter_events(store, _filters(args, settings), args.limit)
        files: list[tuple[str, Path | bytes]] = []  # (name in the export, source path or content)
        index = []
        for e in events:
            full = store.get_event(e["id"])
            if full is None:  # deleted by retention meanwhile
                continue
            names = {}
            for k in kinds:
                p = store.file_path(e["id"], k)
                if p is not None:
                    name = f"events/{e['id']:08d}/{p.name}"
                    files.append((name, p))
                    names[k] = name
            rec_name = f"events/{e['id']:08d}/event.json"
            full["exported_files"] = names
            index.append(full)
            files.append((rec_name, json.dumps(full.get("record", {}), indent=2).encode()))
    finally:
        store.close()
    csv_buf = io.StringIO()
    w = csv.writer(csv_buf)
    w.writerow([*INDEX_FIELDS, *kinds])
    for e in index:
        row = [e.get(f) if f != "files" else ";".join(k for k, ok in e["files"].items() if ok) for f in INDEX_FIELDS]
        w.writerow([*("" if v is None else v for v in row), *(e["exported_files"].get(k, "") for k in kinds)])
    meta = {"exported": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "store": str(settings.store.path),
            "filters": {k: v for k, v in vars(args).items() if k in ("since", "until", "camera", "severity", "action",
                                                                     "kept", "false_positive") and v},
            "kinds": kinds, "count": len(index), "events": index}
    extra = {"index.csv": csv_buf.getvalue().encode(), "index.json": json.dumps(meta, indent=2).encode()}
    if as_zip:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w") as z:
                for name, src in files:
                    if isinstance(src, bytes):
                        z.writestr(name, src, compress_type=zipfile.ZIP_DEFLATED)
                    else:  # PNG/JPEG are compressed already
                        z.write(src, name, compress_type=zipfile.ZIP_STORED)
                for name, data in extra.items():
                    z.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    else:
        for name, src in files:
            dst = out / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, bytes):
                dst.write_bytes(src)
            else:
                shutil.copy2(src, dst)
        for name, data in extra.items():
            (out / name).write_bytes(data)
    n_pics = sum(1 for _, s in files if not isinstance(s, bytes))
    sys.stdout.write(f"exported {len(index)} event(s), {n_pics} picture(s) to {out}\n")
    log.info("defects exported", out=str(out), events=len(index), pictures=n_pics)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- parser


def _filter_args(p: argparse.ArgumentParser) -> None:
    """``--config`` and the event filters (what :func:`_filters` reads)."""
    add_config_option(p)
    p.add_argument("--since", metavar="WHEN", help="from this time: an age (30m, 2h, 7d), today, ISO time, epoch s")
    p.add_argument("--until", metavar="WHEN", help="before this time (same forms)")
    p.add_argument("--camera", metavar="ID", help="only this camera")
    p.add_argument("--severity", metavar="NAME", help="only this severity class")
    p.add_argument("--action", choices=["stop", "alarm", "log"], help="only events with this action")
    p.add_argument("--kept", action="store_true", help="only events marked keep")
    p.add_argument("--false-positive", action="store_true", help="only events marked as false alarms")


def register(sub: argparse._SubParsersAction) -> None:
    dsub = add_group(sub, "defects", "look up stored defect events (reads the store; no daemon needed)",
                     "defects_command")

    ls = dsub.add_parser("list", help="list events, newest first",
                         description="List stored defect events, newest first, from the store at [store] path.")
    _filter_args(ls)
    ls.add_argument("--unacknowledged", action="store_true", help="only stops/alarms not yet acknowledged")
    ls.add_argument("--limit", type=int, default=50, help="at most this many (default 50, max 500)")
    ls.add_argument("--offset", type=int, default=0, help="skip this many (paging)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_defects_list)

    sh = dsub.add_parser("show", help="one event: record, regions, actions, picture paths")
    add_config_option(sh)
    sh.add_argument("id", metavar="ID", help="event id")
    sh.add_argument("--json", action="store_true", help="print JSON")
    sh.set_defaults(func=cmd_defects_show)

    ex = dsub.add_parser("export", help="copy events' pictures and an index (CSV + JSON) to a folder or a .zip",
                         description="Export events (filtered) to OUT: events/<id>/{frame.png,overlay.jpg,mask.png,"
                         "event.json} plus index.csv and index.json. OUT ending in .zip writes one zip file. "
                         "Events marked false positive (--false-positive) are normal fabric for retraining.")
    _filter_args(ex)
    ex.add_argument("--out", type=Path, required=True, metavar="DIR|FILE.zip", help="where to write")
    ex.add_argument("--kinds", default="frame,overlay,mask", help="pictures: frame,overlay,mask,thumb "
                    "(default frame,overlay,mask)")
    ex.add_argument("--limit", type=int, default=None, help="at most this many events (newest first)")
    ex.add_argument("--force", action="store_true", help="replace an existing zip / write into a non-empty folder")
    ex.set_defaults(func=cmd_defects_export)
