"""``knitwatch bench detection``: recall, false stops per hour and delay on a simulated machine.

Simulated fabric with scheduled defects of every kind (and a cutline every revolution) streams through
the whole daemon; the alert stage's per-frame decisions, with the simulator's truth, tell which defects
led to a stop, which stops were false and how long a defect was visible before its stop.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from knitwatch.config import Settings
from knitwatch.config.settings import CameraConfig, SimulatorConfig
from knitwatch.daemon.bench.pipeline import add_run_options, run_daemon
from knitwatch.daemon.cli.common import checkpoint_summary, write_report
from knitwatch.daemon.cli.demo import DEMO_H, DEMO_REV, DEMO_SPEED, DEMO_TILE, DEMO_W
from knitwatch.daemon.logs import setup_logging

DETECTION_DEFECTS = ("hole", "ladder", "needle_line", "tension_stripe", "oil_stain", "slub", "fly")


def detection_report(rows: list[dict], *, fps: float, min_area_px: int, after: int = 3) -> dict[str, Any]:
    """Recall, false stops and delay from the alert stage's per-frame decisions (with simulator truth).

    A defect counts from the first inspected frame that shows at least ``min_area_px`` of it; it is
    *caught* when a ``stop`` event fires while it is visible or within ``after`` frames after it left.
    A stop on a frame that shows no defect and follows no visible defect within 10 frames is *false*.
    """
    rows = sorted(rows, key=lambda r: r["seq"])
    first_seen: dict[Any, int] = {}
    last_seen: dict[Any, int] = {}
    kinds: dict[Any, str] = {}
    last_defect_seq = -(10**9)
    stops = [r for r in rows if r.get("event") and r.get("action") == "stop"]
    false_stops = 0
    for r in rows:
        visible = [d for d in r["truth"]["defects"]
                   if (d["box"][2] - d["box"][0]) * (d["box"][3] - d["box"][1]) >= min_area_px]
        for d in visible:
            key = (d.get("id"), r["truth"]["revolution"] if d["kind"] == "needle_line" else 0)
            first_seen.setdefault(key, r["seq"])
            last_seen[key] = r["seq"]
            kinds[key] = d["kind"]
        if r["truth"]["defects"]:
            last_defect_seq = r["seq"]
        elif r.get("event") and r.get("action") == "stop" and r["seq"] - last_defect_seq > 10:
            false_stops += 1
    caught: dict[Any, int] = {}
    for key, seq0 in first_seen.items():
        hit = [s["seq"] for s in stops if seq0 <= s["seq"] <= last_seen[key] + after]
        if hit:
            caught[key] = hit[0] - seq0
    clean = sum(1 for r in rows if not r["truth"]["defects"])
    hours = clean / fps / 3600.0
    delays = list(caught.values())
    lat = [r["latency_ms"]["capture_to_decision"] if isinstance(r.get("latency_ms"), dict) else r.get("latency_ms")
           for r in stops]
    by_kind: dict[str, list[int]] = {}
    for key, kind in kinds.items():
        by_kind.setdefault(kind, [0, 0])
        by_kind[kind][0] += 1
        by_kind[kind][1] += key in caught
    return {
        "frames_inspected": len(rows),
        "defect_free_frames": clean,
        "defects": len(first_seen),
        "defects_stopped": len(caught),
        "recall": round(len(caught) / len(first_seen), 3) if first_seen else None,
        "recall_by_kind": {k: f"{v[1]}/{v[0]}" for k, v in sorted(by_kind.items())},
        "false_stops": false_stops,
        "defect_free_hours": round(hours, 4),
        "false_stops_per_hour": round(false_stops / hours, 2) if hours > 0 else None,
        "delay_frames_p50": float(np.median(delays)) if delays else None,
        "delay_frames_max": max(delays) if delays else None,
        "delay_ms_p50": round(float(np.median(delays)) * 1000 / fps + float(np.median([x for x in lat if x])), 1)
        if delays and any(lat) else None,
        "stop_events": len(stops),
    }


def cmd_bench_detection(args: argparse.Namespace) -> int:
    from knitwatch.pipeline.offline.demo import train_simulator_model

    setup_logging("bench", level="WARNING", fmt=args.log_format or "auto")
    work = args.workdir
    ckpt_path = args.checkpoint or work / "model.ckpt"
    if not ckpt_path.is_file():
        train_simulator_model(ckpt_path, width=DEMO_W, height=DEMO_H, speed_px=DEMO_SPEED, revolution_frames=DEMO_REV,
                              tile=DEMO_TILE, frames=40, steps=args.steps, distill_steps=args.steps // 2)
    ckpt = checkpoint_summary(ckpt_path)
    every = max(20, args.frames // (2 * len(DETECTION_DEFECTS)))
    defects = [{"kind": k, "frame": 10 + i * every, "size": 2.0, "intensity": 1.5}
               for i, k in enumerate(DETECTION_DEFECTS) if 10 + i * every < args.frames - 20]
    settings = Settings()
    settings.cameras = [CameraConfig(id="bench", source="simulator", fps=args.fps, width=DEMO_W, height=DEMO_H,
                                     simulator=SimulatorConfig(pitch_px=6.0, speed_px=DEMO_SPEED,
                                                               revolution_frames=DEMO_REV, seed=5, defects=defects))]
    settings.inference.device = args.device  # type: ignore[assignment]
    settings.store.path = work / "store"
    decisions = work / "detection-decisions.jsonl"
    decisions.unlink(missing_ok=True)
    settings.alert.decisions_log = decisions
    settings.alert.severity = [{"name": "defect", "action": "stop"}]  # every confirmed defect is a stop
    settings.daemon.stats_interval_s = 5.0
    snap = run_daemon(settings, ckpt, args.frames / args.fps + 15, "json")
    rows = [json.loads(line) for line in decisions.read_text().splitlines() if line.strip()]
    report = detection_report(rows, fps=args.fps, min_area_px=settings.alert.min_area_px,
                              after=settings.alert.confirm_n)
    report.update(coverage=snap["cameras"]["bench"].get("coverage"), fps=args.fps,
                  confirm=f"{settings.alert.confirm_k} of {settings.alert.confirm_n}",
                  latency_ms=snap["cameras"]["bench"].get("latency_ms"), model=ckpt["id"])
    write_report(report, args.json, 24)
    return 0


def register(bsub: argparse._SubParsersAction) -> None:
    """Add ``detection`` to the ``knitwatch bench`` subcommands."""
    d = bsub.add_parser("detection", help="recall, false stops per hour and delay on a simulated machine",
                        description="Stream simulated fabric with scheduled defects of every kind (and a cutline "
                        "every revolution) through the whole daemon; report recall (defects that led to a stop), "
                        "false stops per hour of defect-free fabric and the delay from the first frame showing "
                        "a defect to the stop.")
    d.add_argument("checkpoint", type=Path, nargs="?", metavar="CKPT", help="default: train the demo model")
    d.add_argument("--frames", type=int, default=400, help="frames to stream (default 400)")
    d.add_argument("--fps", type=float, default=2.0, help="camera frame rate (default 2: a 2-core CPU keeps up)")
    d.add_argument("--steps", type=int, default=200, help="training steps when no CKPT is given")
    add_run_options(d)
    d.set_defaults(func=cmd_bench_detection)
