"""``knitwatch bench pipeline``: how much of the model's speed the daemon delivers, and its latency.

One run on one machine, one model:

1. bare model throughput: batches of ``max_batch_tiles`` tiles through ``Detector.predict`` (tiles/s);
2. the daemon at saturation: the simulated camera asks for far more frames than can be inspected;
   inspected frames x tiles per frame / time = the pipeline's throughput (capture drops the rest);
3. the daemon at 50% load: the camera at half the saturated frame rate; latency capture -> decision
   (p50/p99) from the alert stage.

Targets (issue 6): (2) >= 90% of (1); at 50% load p99 <= one frame period + 2 x model time of one batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from knitwatch.config import Settings
from knitwatch.config.settings import CameraConfig, SimulatorConfig
from knitwatch.daemon.cli.main import checkpoint_summary
from knitwatch.daemon.logs import setup_logging

log = structlog.get_logger(__name__)


def bare_throughput(ckpt: Path, device: str, batch: int, seconds: float, backend: str) -> dict[str, Any]:
    from knitwatch.pipeline.detector import load_detector

    det = load_detector(ckpt, device, backend)
    t = int(det.preprocess["tile"])
    tiles = np.random.default_rng(0).integers(60, 200, (batch, t, t), dtype=np.uint8)
    det.predict(tiles)  # warm-up
    times = []
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        det.predict(tiles)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {"tiles_per_s": batch / med, "batch_ms_p50": med * 1000, "batches": len(times), "backend": det.backend}


def run_daemon(settings: Settings, ckpt: dict, seconds: float, log_format: str) -> dict[str, Any]:
    from knitwatch.daemon.supervisor import Supervisor

    sup = Supervisor(settings, checkpoint=ckpt, log_level="WARNING", log_format=log_format)
    sup.run(duration_s=seconds)
    return sup.snapshot


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from knitwatch.pipeline.detector import resolve_device
    from knitwatch.pipeline.preprocess import PreprocessConfig, Preprocessor

    setup_logging("bench", level="WARNING", fmt=args.log_format or "auto")
    settings = Settings()
    ckpt = checkpoint_summary(args.checkpoint)
    device = resolve_device(args.device)
    batch = args.max_batch_tiles
    # the bare model runs on the backend the daemon's workers will pick (``[inference] backend``)
    bare = bare_throughput(args.checkpoint, device, batch, args.seconds / 3, settings.inference.backend)
    settings.inference.backend = bare["backend"]  # type: ignore[assignment]
    frame = np.zeros((args.height, args.width), np.uint8)
    tiles_per_frame = len(Preprocessor(PreprocessConfig.from_dict(ckpt["preprocess"]))(frame)[1])
    settings.inference.device = device  # type: ignore[assignment]
    settings.inference.max_batch_tiles = batch
    settings.inference.max_wait_ms = args.max_wait_ms
    settings.store.path = args.workdir / "store"
    settings.daemon.stats_interval_s = 1.0

    def camera(fps: float) -> CameraConfig:
        return CameraConfig(id="bench", source="simulator", fps=fps, width=args.width, height=args.height,
                            simulator=SimulatorConfig(pitch_px=6.0, speed_px=32.0, revolution_frames=100))

    # saturation: half again as many frames as the bare model could inspect (more would only make the
    # simulated camera eat the CPU the model needs on a small machine)
    settings.cameras = [camera(1.5 * bare["tiles_per_s"] / tiles_per_frame)]
    sat = run_daemon(settings, ckpt, args.seconds, "json")["cameras"]["bench"]
    sat_fps = sat["inspected"] / max(1e-9, sat.get("inspected_s") or args.seconds)
    settings.cameras = [camera(max(0.2, sat_fps / 2))]
    half = run_daemon(settings, ckpt, args.seconds, "json")["cameras"]["bench"]
    model_ms = bare["batch_ms_p50"]
    period_ms = 1000.0 / max(0.2, sat_fps / 2)
    result = {
        "device": device,
        "backend": bare["backend"],
        "tile": int(ckpt["preprocess"]["tile"]),
        "frame": f"{args.width}x{args.height}",
        "tiles_per_frame": tiles_per_frame,
        "max_batch_tiles": batch,
        "bare_model_tiles_per_s": round(bare["tiles_per_s"], 1),
        "model_ms_per_batch": round(model_ms, 1),
        "pipeline_tiles_per_s_at_saturation": round(sat_fps * tiles_per_frame, 1),
        "pipeline_fraction_of_bare": round(sat_fps * tiles_per_frame / bare["tiles_per_s"], 3),
        "saturation_coverage": sat.get("coverage"),
        "half_load_fps": round(sat_fps / 2, 2),
        "half_load_latency_ms": half.get("latency_ms"),
        "latency_budget_ms": round(period_ms + 2 * model_ms, 1),
        "half_load_coverage": half.get("coverage"),
    }
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        for k, v in result.items():
            sys.stdout.write(f"{k:38s} {v}\n")
    return 0


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
    from knitwatch.daemon.cli.demo import DEMO_H, DEMO_REV, DEMO_SPEED, DEMO_TILE, DEMO_W
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
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        for k, v in report.items():
            sys.stdout.write(f"{k:24s} {v}\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="benchmarks that print numbers (not tests)")
    bsub = b.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")
    bsub.required = True
    p = bsub.add_parser("pipeline", help="bare model vs daemon throughput, and latency at 50% load",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, metavar="CKPT")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--seconds", type=float, default=30.0, help="duration of each daemon run (default 30)")
    p.add_argument("--max-batch-tiles", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=20.0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--workdir", type=Path, default=Path("knitwatch-bench"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_pipeline)

    from knitwatch.daemon.bench import accuracy as bench_accuracy
    from knitwatch.daemon.bench import model as bench_model

    bench_model.register(bsub)
    bench_accuracy.register_accuracy(bsub)

    d = bsub.add_parser("detection", help="recall, false stops per hour and delay on a simulated machine",
                        description="Stream simulated fabric with scheduled defects of every kind (and a cutline "
                        "every revolution) through the whole daemon; report recall (defects that led to a stop), "
                        "false stops per hour of defect-free fabric and the delay from the first frame showing "
                        "a defect to the stop.")
    d.add_argument("checkpoint", type=Path, nargs="?", metavar="CKPT", help="default: train the demo model")
    d.add_argument("--frames", type=int, default=400, help="frames to stream (default 400)")
    d.add_argument("--fps", type=float, default=2.0, help="camera frame rate (default 2: a 2-core CPU keeps up)")
    d.add_argument("--steps", type=int, default=200, help="training steps when no CKPT is given")
    d.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    d.add_argument("--workdir", type=Path, default=Path("knitwatch-bench"))
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_bench_detection)
