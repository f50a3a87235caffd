"""``knitwatch bench detection``: per defect and overall - recall of stops, duplicates, false stops, delay.

Simulated fabric with one scheduled defect of every kind (the needle line a broken needle that comes
back every revolution; a cutline every revolution) streams through the whole daemon; the alert
stage's per-frame decisions (its decisions log: regions, tracks and events, with the simulator's truth)
tell, for each defect, in how many frames it was seen, flagged and confirmed, which events were made
for it, whether and how soon the machine stopped, and which stops were false.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from knitwatch.config.settings import CameraConfig, PositionConfig, SimulatorConfig
from knitwatch.daemon.bench.pipeline import add_run_options, run_daemon
from knitwatch.daemon.cli.common import EXIT_FAIL, CliError, checkpoint_summary, load_config, table, write_report
from knitwatch.daemon.cli.demo import DEMO_H, DEMO_REV, DEMO_SPEED, DEMO_W
from knitwatch.daemon.logs import setup_logging

DETECTION_DEFECTS = ("hole", "ladder", "needle_line", "tension_stripe", "oil_stain", "slub", "fly")


def _overlap(a: Sequence[float], b: Sequence[float], margin: float) -> bool:
    """Boxes (x0, y0, x1, y1) overlap, ``a`` grown by ``margin`` pixels on each side."""
    return (a[0] - margin < b[2] and b[0] < a[2] + margin and a[1] - margin < b[3] and b[1] < a[3] + margin)


def _area(box: Sequence[float]) -> float:
    return float((box[2] - box[0]) * (box[3] - box[1]))


def _is_stop(view: dict) -> bool:
    """A track view (decisions log) that stopped the machine in its frame: a new stop event, or an
    event escalated to stop."""
    return view.get("action") == "stop" and bool(view.get("new_event") or view.get("escalated"))


def detection_report(rows: list[dict], *, fps: float, min_area_px: int, after: int = 3, margin_px: float = 16.0,
                     pass_gap: int = 10) -> dict[str, Any]:
    """Per scheduled defect and overall: recall of stops, duplicates, false stops, delay - from the alert
    stage's per-frame decisions (the decisions log) with the simulator's truth.

    A defect (the simulator's id: a recurring one - a needle line - is one defect over its revolutions)
    is *seen* in the inspected frames that show at least ``min_area_px`` of it; ``passes`` counts its
    runs of frames (a gap of more than ``pass_gap`` frames starts another: a new revolution).

    With tracks in the log (the tracking alert stage): a track region that overlaps a defect's box
    (within ``margin_px``) in a frame *flags* it there, and *confirms* it when the track is confirmed;
    each event belongs to the defect its tracks overlapped most often (none: a *false event*); a defect
    is *stopped* when one of its events was created as, or escalated to, a stop; its *duplicates* are its
    events beyond the first. A stop of a false event is a *false stop*.

    Without tracks (an older log): a defect counts as stopped when a ``stop`` event fires while it is
    visible or within ``after`` frames after it left; a stop on a frame that shows no defect and follows
    no visible defect within 10 frames is false.
    """
    rows = sorted(rows, key=lambda r: r["seq"])
    tracked = any("tracks" in r for r in rows)
    seen: dict[Any, list[int]] = {}
    kinds: dict[Any, str] = {}
    flagged: dict[Any, set[int]] = {}
    confirmed: dict[Any, set[int]] = {}
    overlaps: dict[int, Counter[Any]] = {}  # event id -> defect -> frames its tracks overlapped it
    stops: list[tuple[int, int | None, float | None]] = []  # (seq, event id, latency ms)
    revolutions: dict[int, int] = {}  # event id -> revolutions counted by the alert stage
    last_defect_seq = -(10**9)
    legacy_false = 0
    for r in rows:
        seq = r["seq"]
        truth = r["truth"]["defects"]
        for d in truth:
            key = d.get("id")
            kinds[key] = d["kind"]
            if _area(d["box"]) >= min_area_px:
                seen.setdefault(key, []).append(seq)
        lat = r["latency_ms"]["capture_to_decision"] if isinstance(r.get("latency_ms"), dict) else r.get("latency_ms")
        if tracked:
            for t in r.get("tracks") or []:
                hits = [d.get("id") for d in truth if _overlap(t["bbox"], d["box"], margin_px)]
                for key in hits:
                    flagged.setdefault(key, set()).add(seq)
                    if t.get("confirmed"):
                        confirmed.setdefault(key, set()).add(seq)
                eid = t.get("event_id")
                if eid is not None:
                    c = overlaps.setdefault(eid, Counter())
                    c.update(hits)
                    revolutions[eid] = max(revolutions.get(eid, 1), int(t.get("revolutions") or 1))
                    if _is_stop(t):
                        stops.append((seq, eid, lat))
        else:
            visible = [d.get("id") for d in truth if _area(d["box"]) >= min_area_px]
            for key in visible:
                if r.get("defect"):
                    flagged.setdefault(key, set()).add(seq)
                if r.get("confirmed"):
                    confirmed.setdefault(key, set()).add(seq)
            if r.get("event") and r.get("action") == "stop":
                stops.append((seq, r.get("event_id"), lat))
            if truth:
                last_defect_seq = seq
            elif r.get("event") and r.get("action") == "stop" and seq - last_defect_seq > 10:
                legacy_false += 1

    owner: dict[int, Any] = {}  # event id -> the defect it is about
    for eid, c in overlaps.items():
        if c:
            owner[eid] = c.most_common(1)[0][0]
    per_defect = []
    delays: list[int] = []
    stop_lat: list[float] = []
    for key in sorted(seen, key=lambda k: seen[k][0]):
        seqs = seen[key]
        passes = 1 + sum(1 for a, b in zip(seqs, seqs[1:], strict=False) if b - a > pass_gap)
        if tracked:
            events = sorted(e for e, k in owner.items() if k == key)
            hit = sorted((s, lat) for s, e, lat in stops if e in events)
        else:
            events = sorted({e for s, e, _ in stops if seqs[0] <= s <= seqs[-1] + after and e is not None})
            hit = sorted((s, lat) for s, _e, lat in stops if seqs[0] <= s <= seqs[-1] + after)
        delay = hit[0][0] - seqs[0] if hit else None
        if delay is not None:
            delays.append(delay)
            if hit[0][1]:
                stop_lat.append(float(hit[0][1]))
        per_defect.append({
            "id": key, "kind": kinds[key], "first_seq": seqs[0], "passes": passes, "frames_seen": len(seqs),
            "frames_flagged": len(flagged.get(key, ())), "frames_confirmed": len(confirmed.get(key, ())),
            "confirmed": bool(confirmed.get(key)), "events": len(events), "event_ids": events,
            "revolutions": max((revolutions.get(e, 1) for e in events), default=0),
            "stopped": delay is not None, "delay_frames": delay,
        })
    n = len(per_defect)
    n_conf = sum(d["confirmed"] for d in per_defect)
    n_stop = sum(d["stopped"] for d in per_defect)
    n_conf_stop = sum(d["stopped"] and d["confirmed"] for d in per_defect)
    if tracked:
        false_events = sorted(e for e in overlaps if e not in owner)
        false_stops = sum(1 for _s, e, _ in stops if e not in owner)
    else:
        false_events, false_stops = [], legacy_false
    clean = sum(1 for r in rows if not r["truth"]["defects"])
    hours = clean / fps / 3600.0
    by_kind: dict[str, list[int]] = {}
    for d in per_defect:
        k = by_kind.setdefault(d["kind"], [0, 0])
        k[0] += 1
        k[1] += d["stopped"]
    return {
        "frames_inspected": len(rows),
        "defect_free_frames": clean,
        "defects": n,
        "defects_confirmed": n_conf,
        "defects_stopped": n_stop,
        "recall": round(n_stop / n, 3) if n else None,
        "recall_confirmed": round(n_conf_stop / n_conf, 3) if n_conf else None,
        "recall_by_kind": {k: f"{v[1]}/{v[0]}" for k, v in sorted(by_kind.items())},
        "events": sum(d["events"] for d in per_defect) + len(false_events),
        "duplicates": sum(max(0, d["events"] - 1) for d in per_defect),
        "false_events": len(false_events),
        "false_stops": false_stops,
        "defect_free_hours": round(hours, 4),
        "false_stops_per_hour": round(false_stops / hours, 2) if hours > 0 else None,
        "delay_frames_p50": float(np.median(delays)) if delays else None,
        "delay_frames_max": max(delays) if delays else None,
        "delay_ms_p50": round(float(np.median(delays)) * 1000 / fps + float(np.median(stop_lat)), 1)
        if delays and stop_lat else None,
        "stop_events": len(stops),
        "tracked": tracked,
        "per_defect": per_defect,
    }


def per_defect_table(report: dict[str, Any]) -> str:
    """The report's defects, one line each."""
    rows = [[str(d["id"]), d["kind"], str(d["first_seq"]), str(d["passes"]), str(d["frames_seen"]),
             str(d["frames_flagged"]), str(d["frames_confirmed"]), str(d["events"]), str(d["revolutions"]),
             "yes" if d["stopped"] else "no", "-" if d["delay_frames"] is None else str(d["delay_frames"])]
            for d in report["per_defect"]]
    return table(rows, ["id", "kind", "frame", "passes", "seen", "flagged", "confirmed", "events", "revs",
                        "stopped", "delay"])


def detection_schedule(frames: int) -> list[dict[str, Any]]:
    """One defect of each kind, evenly spread over the first half of the run; the needle line is a broken
    needle (``every_revolution``: it comes back every revolution until the end)."""
    every = max(20, frames // (2 * len(DETECTION_DEFECTS)))
    return [{"kind": k, "frame": 10 + i * every, "size": 2.0, "intensity": 1.5,
             "every_revolution": k == "needle_line"}
            for i, k in enumerate(DETECTION_DEFECTS) if 10 + i * every < frames - 20]


def _print_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        write_report(report, True, 24)
    else:
        write_report({k: v for k, v in report.items() if k != "per_defect"}, False, 24)
        sys.stdout.write("\n" + per_defect_table(report))


def cmd_bench_detection(args: argparse.Namespace) -> int:
    if args.replay is not None and args.record is not None:
        raise CliError("--record DIR and --replay DIR: one at a time (record first, then replay)")
    if args.replay is not None:
        return _cmd_replay(args)
    if args.record is not None:
        return _cmd_record(args)
    if args.set or args.decisions_log is not None or args.reposition:
        raise CliError("--set, --reposition and --decisions-log belong to --replay DIR")
    if args.hours is not None or args.defect_free:
        raise CliError("--hours and --defect-free belong to --record DIR (the live run streams --frames)")
    return _cmd_live(args)


def _cmd_record(args: argparse.Namespace) -> int:
    from knitwatch.daemon.bench.replay import cmd_record

    args.width, args.height = args.size
    if not 0 < args.fps <= 240:
        raise CliError(f"--fps must be above 0 and at most 240 (got {args.fps})")
    setup_logging("bench", level="WARNING", fmt=args.log_format or "auto")
    manifest = cmd_record(args)
    summary = {k: manifest.get(k) for k in ("frames", "simulated_hours", "fps", "defect_free", "map_floor",
                                            "map_pixels_kept", "seconds")}
    summary.update(model=manifest["model"]["id"], backend=manifest["model"]["backend"],
                   device=manifest["model"]["device"], folder=str(args.record),
                   frames_per_s=round(manifest["frames"] / max(manifest["seconds"], 1e-9), 2),
                   size_mb=round(sum(f.stat().st_size for f in args.record.iterdir()) / 1e6, 1))
    write_report(summary, bool(args.json), 24)
    if not args.json:
        sys.stdout.write(f"\nreplay it: knitwatch bench detection --replay {args.record} [--set alert.KEY=VALUE ...]\n")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from knitwatch.daemon.bench.replay import cmd_replay

    setup_logging("bench", level="WARNING", fmt=args.log_format or "auto")
    rows, used, manifest = cmd_replay(args)
    cam = manifest["camera"]
    alert_min_area = int(used["min_area_px"])
    confirm_n = int(used["confirm"].split(" of ")[1])
    report = detection_report(rows, fps=float(manifest["fps"]), min_area_px=alert_min_area, after=confirm_n,
                              pass_gap=int(cam["simulator"]["revolution_frames"]) // 2)
    report.update(mode="replay", recording=str(args.replay), complete=bool(manifest.get("complete")),
                  simulated_hours=manifest.get("simulated_hours"), fps=manifest["fps"],
                  position=cam.get("position", {}).get("source"), model=manifest["model"]["id"],
                  recorded_with=f"{manifest['model'].get('backend')} on {manifest['model'].get('device')}",
                  positioned_frames=used["position"], **{k: v for k, v in used.items() if k != "position"})
    _print_report(report, bool(args.json))
    return 0


def _cmd_live(args: argparse.Namespace) -> int:
    from knitwatch.daemon.bench.pipeline import bench_demo_model
    from knitwatch.daemon.bench.replay import writable_folder

    if args.frames < 60:
        raise CliError(f"--frames must be at least 60 (got {args.frames}): the defects are spread over the run")
    if not 0 < args.fps <= 240:
        raise CliError(f"--fps must be above 0 and at most 240 (got {args.fps})")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise CliError(f"checkpoint not found: {args.checkpoint}")
    settings = load_config(args)  # --config and KNITWATCH_* checked first, as by every command: a bad value exits 2
    work = args.workdir
    writable_folder(work, "--workdir")  # the store, the decisions and the model go there
    setup_logging("bench", level="WARNING", fmt=args.log_format or "auto")
    ckpt_path = bench_demo_model(args.checkpoint or work / "model.ckpt", args.steps)
    ckpt = checkpoint_summary(ckpt_path)
    defects = detection_schedule(args.frames)
    settings.cameras = [CameraConfig(id="bench", source="simulator", fps=args.fps, width=DEMO_W, height=DEMO_H,
                                     simulator=SimulatorConfig(pitch_px=6.0, speed_px=DEMO_SPEED,
                                                               revolution_frames=DEMO_REV, seed=5, defects=defects),
                                     position=PositionConfig(source=args.position))]
    settings.inference.device = args.device  # type: ignore[assignment]
    settings.store.path = work / "store"
    decisions = work / "detection-decisions.jsonl"
    decisions.unlink(missing_ok=True)
    settings.alert.decisions_log = decisions
    settings.alert.severity = [{"name": "defect", "action": "stop"}]  # every confirmed defect is a stop
    settings.daemon.stats_interval_s = 5.0
    seconds = args.frames / args.fps + 15
    sys.stderr.write(f"streaming {args.frames} frames at {args.fps:g} fps through the daemon (~{seconds:.0f} s), "
                     f"{len(defects)} scheduled defects, position source {args.position} ...\n")
    snap = run_daemon(settings, ckpt, seconds, "json")
    rows = [json.loads(line) for line in decisions.read_text().splitlines() if line.strip()]
    if not rows:
        raise CliError("the daemon inspected no frames (see its log above)", EXIT_FAIL)
    report = detection_report(rows, fps=args.fps, min_area_px=settings.alert.min_area_px,
                              after=settings.alert.confirm_n, pass_gap=DEMO_REV // 2)
    cam = snap["cameras"]["bench"]
    alert_cam = (snap.get("stages", {}).get("alert", {}).get("cameras") or {}).get("bench", {})
    report.update(coverage=cam.get("coverage"), fps=args.fps, position=args.position,
                  positioned_frames=sum(1 for r in rows if "pos" in r),
                  confirm=f"{settings.alert.confirm_k} of {settings.alert.confirm_n}",
                  recurring_defects=alert_cam.get("recurring_defects"),
                  latency_ms=cam.get("latency_ms"), model=ckpt["id"])
    _print_report(report, bool(args.json))
    return 0


def _size(text: str) -> tuple[int, int]:
    w, x, h = text.lower().partition("x")
    try:
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 512x256") from None


def register(bsub: argparse._SubParsersAction) -> None:
    """Add ``detection`` to the ``knitwatch bench`` subcommands."""
    d = bsub.add_parser("detection", help="per defect: seen, flagged, confirmed, events, stopped; recall, "
                        "duplicates, false stops per hour, delay (simulated machine)",
                        description="Stream simulated fabric with one scheduled defect of every kind (the needle "
                        "line a broken needle that comes back every revolution; a cutline every revolution) "
                        "through the whole daemon. Per defect: frames seen, flagged, confirmed, events, "
                        "revolutions counted, stopped and the delay from its first frame to the stop; overall: "
                        "recall of stops over all defects and over the confirmed ones, duplicates (more than one "
                        "event for one defect), false stops per hour of defect-free fabric.\n\n"
                        "Replay mode, for many simulated hours on a CPU and for tuning the decisions without "
                        "running the model again: 'bench detection CKPT --record DIR [--hours H] [--defect-free]' "
                        "runs the simulated fabric through the daemon's capture, tiling and inference code in "
                        "batch (no real-time waiting) and stores per frame what the inference stage gives the "
                        "alert stage (scores, the anomaly map, the fabric position) and the simulator's truth; "
                        "'bench detection --replay DIR [--set alert.KEY=VALUE ...]' runs the alert stage's "
                        "decision layer (the same function) over it with the [alert] settings (of --config, else "
                        "their defaults), changed by --set, and prints the same report.",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("checkpoint", type=Path, nargs="?", metavar="CKPT",
                   help="the model (live: default trains the demo model; --record: required; --replay: optional, "
                   "checked to be the recording's model)")
    d.add_argument("--frames", type=int, default=400, help="frames to stream or record (default 400, at least 60 "
                   "with defects)")
    d.add_argument("--fps", type=float, default=2.0, help="camera frame rate (default 2: a 2-core CPU keeps up)")
    d.add_argument("--steps", type=int, default=200, help="training steps when no CKPT is given")
    d.add_argument("--position", choices=("image", "simulator", "none"), default="image",
                   help="the camera's fabric position source (default image: estimated from the frames)")
    rec = d.add_argument_group("record and replay")
    rec.add_argument("--record", type=Path, metavar="DIR", help="record the model's outputs into DIR (a new or "
                     "empty folder) instead of running the daemon")
    rec.add_argument("--hours", type=float, default=None, help="--record: simulated hours at --fps (overrides "
                     "--frames; 5 h at 2 fps = 36000 frames)")
    rec.add_argument("--defect-free", action="store_true", help="--record: fabric without scheduled defects "
                     "(cutlines, lighting drift and the web's motion stay)")
    rec.add_argument("--size", type=_size, default=(DEMO_W, DEMO_H), metavar="WxH", dest="size",
                     help=f"--record: the simulated camera's frame size (default {DEMO_W}x{DEMO_H}, the demo's)")
    rec.add_argument("--texture", choices=("jersey", "pique"), default="jersey",
                     help="--record: the simulated fabric (default jersey, the demo's; pique: another article)")
    rec.add_argument("--pitch", type=float, default=6.0, help="--record: its loop pitch in px (default 6, the demo's)")
    rec.add_argument("--brightness", type=float, default=128.0,
                     help="--record: its mean gray level (default 128, the demo's; another yarn: e.g. 100)")
    rec.add_argument("--seed", type=int, default=5, help="--record: the simulator's seed (default 5, the live run's)")
    rec.add_argument("--backend", choices=("auto", "torch", "onnxruntime"), default="auto",
                     help="--record: the inference backend (default auto, as [inference] backend)")
    rec.add_argument("--batch-frames", type=int, default=16, help="--record: frames per forward pass (default 16)")
    rec.add_argument("--map-floor", type=float, default=None, help="--record: keep anomaly-map pixels at or above "
                     "this (default half the lower of the checkpoint's thresholds; replay needs thresholds at or "
                     "above it; 0 keeps every pixel)")
    rec.add_argument("--replay", type=Path, metavar="DIR", help="run the decision layer over the recording in DIR")
    rec.add_argument("--set", action="append", metavar="alert.KEY=VALUE", help="--replay: change a decision setting "
                     "of [alert] (repeatable; VALUE as JSON, e.g. --set alert.confirm_k=3 --set "
                     "'alert.severity=[{\"name\": \"defect\", \"action\": \"stop\"}]')")
    rec.add_argument("--reposition", action="store_true",
                     help="--replay: compute each frame's fabric position again with this version's estimator "
                     "(the simulator's frames are rendered again; for a recording made before the position changed)")
    rec.add_argument("--decisions-log", type=Path, default=None, metavar="FILE",
                     help="--replay: write the per-frame decisions (the alert stage's decisions log) to FILE")
    add_run_options(d)
    d.set_defaults(func=cmd_bench_detection)
