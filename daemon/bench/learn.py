"""``knitwatch bench learn``: the machine changes article, and knitwatch learns the new fabric while it inspects.

The real daemon inspects the demo's simulated camera with the demo's (jersey) model. At ``--change-frame``
the machine changes article: from then on the fabric is ``--texture`` at ``--pitch`` and ``--brightness``
(default pique, coarser and of a darker yarn: 9 px, 100). Once the first frames of the new fabric are
decided, a learn job starts - the job ``POST /api/learn`` and the web page's "Learn this fabric" start:
``knitwatch learn record --via-daemon`` (the alert stage records the new fabric over whole revolutions),
then ``knitwatch learn train --use`` (the host's default model in a low-priority process, validated,
installed, selected for the camera) - and the daemon switches to the new model without a restart. A
defect of every kind passes the camera in turn from ``--defects-from`` frames after the change on
(after the recording: no defect is learned as normal).

It reports per phase - the old model on the old fabric, the old model on the new fabric before the
job, recording, training, after the switch - the frames, coverage, latency and stops (false ones: on a
frame without a defect), and the time from the start of the recording to the first frame inspected by
the new model, with the scheduled defects stopped after the switch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from knitwatch.config.settings import CameraConfig, PositionConfig, ScheduledDefectConfig, SimulatorConfig
from knitwatch.daemon.bench.phases import DecisionsTail, frame_time, phase, run_daemon_logged
from knitwatch.daemon.bench.pipeline import add_run_options, bench_demo_model
from knitwatch.daemon.cli.common import EXIT_FAIL, CliError, add_config_option, checkpoint_summary, load_config, table
from knitwatch.daemon.cli.demo import CPU_FPS, DEMO_H, DEMO_REV, DEMO_SPEED, DEMO_W

CAMERA = "machine"
KINDS = ("hole", "oil_stain", "ladder", "slub", "tension_stripe", "needle_line", "fly")


def defect_schedule(first: int, every: int, until: int) -> list[ScheduledDefectConfig]:
    """One-shot defects of every kind in turn from frame ``first`` on, one every ``every`` frames."""
    return [ScheduledDefectConfig(kind=KINDS[i % len(KINDS)], frame=f, size=2.0, intensity=1.5)  # type: ignore[arg-type]
            for i, f in enumerate(range(first, until, every))]


def stops(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Stops (new events whose action is stop) among decided frames, and the false ones (no defect in view)."""
    s = [r for r in rows if r.get("event") and r.get("action") == "stop"]
    return {"stops": len(s), "false_stops": sum(1 for r in s if not (r.get("truth") or {}).get("defects"))}


def cmd_bench_learn(args: argparse.Namespace) -> int:
    from knitwatch.daemon.api.learnjobs import LearnJobs, LearnRequest

    if not 0 < args.fps <= 60:
        raise CliError(f"--fps must be above 0 and at most 60 (got {args.fps})")
    if args.change_frame < 1 or args.defects_from < 1:
        raise CliError("--change-frame and --defects-from must be at least 1")
    if not 10 <= args.after_s <= 36000:
        raise CliError(f"--after-s must be within 10 .. 36000 (got {args.after_s:g})")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise CliError(f"checkpoint not found: {args.checkpoint}")
    settings = load_config(args)
    work: Path = args.workdir
    ckpt_path = bench_demo_model(args.checkpoint or work / "model.ckpt", args.steps)
    ckpt = checkpoint_summary(ckpt_path)
    bench_dir = work / "learn"
    if bench_dir.exists():
        shutil.rmtree(bench_dir)
    bench_dir.mkdir(parents=True)
    change = args.change_frame
    sim = SimulatorConfig(pitch_px=6.0, speed_px=DEMO_SPEED, revolution_frames=DEMO_REV, seed=7, change_frame=change,
                          change_texture=args.texture, change_pitch_px=args.pitch, change_brightness=args.brightness,
                          defects=defect_schedule(change + args.defects_from, args.defect_every, change + 100_000))
    settings.cameras = [CameraConfig(id=CAMERA, source="simulator", fps=args.fps, width=DEMO_W, height=DEMO_H,
                                     simulator=sim, position=PositionConfig(source=args.position))]  # type: ignore[arg-type]
    settings.inference.device = args.device  # type: ignore[assignment]
    settings.store.path = bench_dir / "store"
    settings.store.fsync = False
    settings.learn.library_dir = bench_dir / "library"
    settings.learn.min_revolutions = args.revolutions
    decisions = bench_dir / "decisions.jsonl"
    settings.alert.decisions_log = decisions
    settings.daemon.stats_interval_s = 1.0
    settings.api.port = 0
    jobs = LearnJobs(settings.learn.library_dir, settings)
    out = sys.stdout
    out.write(f"learn: the daemon on the simulated machine ({DEMO_W}x{DEMO_H} at {args.fps:g} fps) with {ckpt['id']}; "
              f"at frame {change} the machine changes to {args.texture} (pitch {args.pitch:g} px, brightness "
              f"{args.brightness:g}); then learn record ({args.revolutions} revolutions) + learn train "
              f"({args.model or settings.learn.model}) + use; defects from frame {change + args.defects_from} on; "
              f"{args.after_s:g} s after the switch\n")
    out.flush()

    tail = DecisionsTail(decisions)
    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    marks: dict[str, float] = {}
    job_box: list[Any] = []

    def mark(name: str, t: float | None = None) -> None:
        if name not in marks:
            marks[name] = t if t is not None else time.time()
            out.write(f"[{marks[name] - marks.get('ready', marks[name]):7.1f} s] {name}\n")
            out.flush()

    def on_report(sup: Any) -> bool:  # noqa: ANN401 - the Supervisor
        now = time.time()
        mark("ready", now)
        for r in tail.rows():
            r["t"] = frame_time(r) or now
            rows.append(r)
            if (r.get("truth") or {}).get("texture") == args.texture:
                mark("new fabric", r["t"])
        cam = (sup.snapshot.get("cameras") or {}).get(CAMERA, {})
        samples.append({"t": now, "captured": cam.get("captured", 0), "dropped": cam.get("dropped", 0)})
        if "new fabric" in marks and not job_box and now - marks["new fabric"] >= args.wait_s:
            mark("learn job started", now)
            job_box.append(jobs.start(LearnRequest(camera=CAMERA, article=args.texture, frames=args.frames,
                                                   model=args.model, steps=args.train_steps, use=True,
                                                   by="bench learn")))
        if job_box:
            job = job_box[0]
            if job.state in ("training", "validating", "done", "refused", "failed"):
                mark("recording done", now)
            if not job.running:
                mark(f"job {job.state}", now)
                if job.state != "done":
                    return True
        if job_box and job_box[0].model:
            new = job_box[0].model
            first = next((r for r in rows if r.get("model") == new), None)
            if first is not None:
                mark("first frame of the new model", first["t"])
                return now - marks["first frame of the new model"] >= args.after_s
        return False

    log_path = bench_dir / "daemon.log"
    try:
        rc = run_daemon_logged(settings, ckpt, log_path, on_report=on_report, duration_s=args.max_minutes * 60,
                               bench_log_format=args.log_format or "auto")
    finally:
        jobs.close()
    job = job_box[0] if job_box else None
    result: dict[str, Any] = {"fps": args.fps, "model": ckpt["id"], "exit_code": rc, "marks": {
        k: round(v - marks.get("ready", v), 1) for k, v in marks.items()}, "daemon_log": str(log_path)}
    if job is not None:
        result["job"] = job.to_dict()
    end = samples[-1]["t"] if samples else time.time()
    bounds = [("old model, old fabric", marks.get("ready"), marks.get("new fabric")),
              ("old model, new fabric", marks.get("new fabric"), marks.get("learn job started")),
              ("recording", marks.get("learn job started"), marks.get("recording done")),
              ("training + validation", marks.get("recording done"), marks.get("first frame of the new model")),
              ("new model", marks.get("first frame of the new model"), end)]
    phases = []
    for name, t0, t1 in bounds:
        if t0 is None or t1 is None or t1 <= t0:
            continue
        p = phase(name, rows, samples, t0, t1)
        part = [r for r in rows if t0 <= r["t"] < t1]
        p.update(stops(part), hours=round(len(part) / args.fps / 3600, 3))
        p["false_stops_per_hour"] = round(p["false_stops"] / p["hours"], 1) if p["hours"] else None
        phases.append(p)
    result["phases"] = phases
    if "learn job started" in marks and "first frame of the new model" in marks:
        result["record_to_new_model_s"] = round(marks["first frame of the new model"] - marks["learn job started"], 1)
    new_rows = [r for r in rows if job is not None and r.get("model") == job.model]
    passed = {d["id"] for r in new_rows for d in (r.get("truth") or {}).get("defects", []) if d.get("id") is not None}
    stopped = {d["id"] for r in new_rows if r.get("event") and r.get("action") == "stop"
               for d in (r.get("truth") or {}).get("defects", [])}
    result["defects_after_switch"] = {"passed": len(passed), "stopped": len(passed & stopped)}
    (bench_dir / "learn-report.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.json:
        out.write(json.dumps(result, indent=2) + "\n")
    else:
        cols = ["window", "seconds", "captured", "inspected", "dropped_at_capture", "coverage", "latency_ms_p50",
                "latency_ms_p99", "stops", "false_stops", "false_stops_per_hour"]
        out.write(table([[w.get(k) if w.get(k) is not None else "-" for k in cols] for w in phases],
                        ["phase", "s", "captured", "inspected", "dropped", "coverage", "p50 ms", "p99 ms", "stops",
                         "false", "false/h"]) + "\n")
        out.write(f"learn job: {result.get('job', {}).get('state')} {result.get('job', {}).get('model') or ''}; "
                  f"from the start of the recording to the first frame of the new model: "
                  f"{result.get('record_to_new_model_s', '-')} s; defects passed after the switch "
                  f"{result['defects_after_switch']['passed']}, stopped {result['defects_after_switch']['stopped']}\n")
    if rc != 0:
        raise CliError(f"the daemon ended with exit code {rc} (see {log_path})", EXIT_FAIL)
    if job is None or job.state != "done":
        raise CliError(f"the learn job did not finish: {job.to_dict() if job else 'never started'}", EXIT_FAIL)
    return 0


def register(bsub: argparse._SubParsersAction) -> None:
    """Add ``learn`` to the ``knitwatch bench`` subcommands."""
    p = bsub.add_parser("learn", help="the machine changes article; learn the new fabric while inspecting: coverage, "
                        "stops and the time to the new model", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, nargs="?", metavar="CKPT",
                   help="the old article's model (default: WORKDIR/model.ckpt, the demo model, trained when missing)")
    p.add_argument("--fps", type=float, default=CPU_FPS, help=f"camera frame rate (default {CPU_FPS:g}: the demo's "
                   "on a CPU)")
    p.add_argument("--change-frame", type=int, default=40, help="the frame at which the machine changes article "
                   "(default 40)")
    p.add_argument("--texture", choices=("jersey", "pique"), default="pique", help="the new article (default pique)")
    p.add_argument("--pitch", type=float, default=9.0, help="its loop pitch in px (default 9)")
    p.add_argument("--brightness", type=float, default=100.0, help="its mean gray level (default 100)")
    p.add_argument("--wait-s", type=float, default=30.0, help="seconds on the new fabric before learning starts "
                   "(default 30: the old model's false stops)")
    p.add_argument("--revolutions", type=int, default=3, help="whole revolutions to record (default 3)")
    p.add_argument("--frames", type=int, default=None, help="frames to record at least (default: the revolutions')")
    p.add_argument("--model", default=None, help="model kind to train (default: [learn] model)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps (default: learn train's)")
    p.add_argument("--defects-from", type=int, default=600, metavar="FRAMES",
                   help="scheduled defects from this many frames after the change on (default 600: after the "
                   "recording)")
    p.add_argument("--defect-every", type=int, default=37, metavar="FRAMES",
                   help="a defect every FRAMES frames (default 37: not a fraction of the demo's 80-frame revolution, "
                   "so no defect lands where one was a revolution before - that would be the same defect recurring)")
    p.add_argument("--position", choices=("image", "simulator"), default="image",
                   help="the camera's fabric position (default image, as a real camera)")
    p.add_argument("--after-s", type=float, default=300.0, help="seconds of the new model (default 300)")
    p.add_argument("--max-minutes", type=float, default=90.0, help="give up after this long (default 90)")
    p.add_argument("--steps", type=int, default=200, help="training steps when the demo model must be trained")
    add_config_option(p)
    add_run_options(p)
    p.set_defaults(func=cmd_bench_learn)
