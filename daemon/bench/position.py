"""``knitwatch bench position``: the fabric position estimated from the images, against the simulator's truth.

A simulated stream (several revolutions, with the simulator's lighting drift, sensor noise, a cutline
every revolution, a broken needle's line from ``--needle-line`` on and random defects) runs through
the ``image`` position estimator frame by frame, without pacing. For every frame the estimate
(revolution + offset / circumference) is compared with the truth (the simulator's tube column of the
frame's left edge; the estimator's origin, the first frame's column 0, is the simulator's tube
column 0): the error, in pixels of the true circumference and in degrees of tube angle, counts a
wrong revolution as a whole turn. Before the circumference is learned (the cutline's second pass)
the unwrapped distance is compared. ``--blackout N`` blacks out N frames in the middle of the run (a
covered lens): the estimator must carry on and recover at the next cutline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import cv2
import numpy as np

from knitwatch.config.settings import PositionConfig
from knitwatch.daemon.cli.common import CliError, write_report


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p99": None, "max": None}
    a = np.abs(np.asarray(values, dtype=np.float64))
    return {"mean": round(float(a.mean()), 3), "p99": round(float(np.percentile(a, 99)), 3),
            "max": round(float(a.max()), 3)}


def run_position_bench(*, width: int, height: int, speed: float, revolution_frames: int, frames: int,
                       texture: str, pitch: float, seed: int, noise: float, lighting_drift: float,
                       needle_line: int | None, random_defects: float, blackout: int,
                       cfg: PositionConfig, progress: bool = False) -> dict[str, Any]:
    """Run the image estimator over a simulated stream; the report (see the module's description)."""
    from knitwatch.pipeline.position import ImagePosition
    from knitwatch.pipeline.sources.knitsim import FabricSpec, KnitStream, ScheduledDefect

    defects = [ScheduledDefect("needle_line", needle_line, every_revolution=True, size=1.5, intensity=1.5)] \
        if needle_line is not None else []
    stream = KnitStream(width, height, FabricSpec(texture=texture, pitch_px=pitch, noise_sigma=noise), seed=seed,
                        speed_px=speed, revolution_frames=revolution_frames, defects=defects,
                        random_defect_rate=random_defects, lighting_drift=lighting_drift)
    est = ImagePosition(cfg)
    c_true = float(stream.circumference)
    black = set(range(frames // 2, frames // 2 + blackout))
    err_px: list[float] = []
    err_ok: list[float] = []
    err_deg: list[float] = []
    err_before: list[float] = []
    wrong_rev = 0
    learned_at: int | None = None
    true_passes = 0
    was_visible = False
    sim_ms: list[float] = []
    est_ms: list[float] = []
    est_cpu_ms: list[float] = []
    not_ok = 0
    pos: dict[str, Any] = {}
    truth_rev = 0
    step = max(1, frames // 10)
    for i in range(frames):
        t0 = time.perf_counter()
        img, truth = stream.frame(i)
        sim_ms.append((time.perf_counter() - t0) * 1000.0)
        if i in black:
            img = np.zeros_like(img)
        t0, c0 = time.perf_counter(), time.process_time()
        pos = est.update(img, None)
        est_ms.append((time.perf_counter() - t0) * 1000.0)
        est_cpu_ms.append((time.process_time() - c0) * 1000.0)
        if truth.cutline_visible and not was_visible:
            true_passes += 1
        was_visible = truth.cutline_visible
        truth_rev = truth.revolution
        true_u = truth.revolution * c_true + truth.offset_px
        not_ok += not pos["ok"]
        circ = pos["circumference_px"]
        if progress and (i + 1) % step == 0:
            sys.stderr.write(f"  frame {i + 1}/{frames}: revolution {pos['rev']} (true {truth.revolution}), "
                             f"offset {pos['offset_px']:.1f} px (true {truth.offset_px})\n")
        if circ is None:
            err_before.append(pos["offset_px"] - true_u)
            continue
        if learned_at is None:
            learned_at = i
        turns = (pos["rev"] + pos["offset_px"] / circ) - true_u / c_true
        wrong_rev += abs(turns) >= 0.5
        err_px.append(turns * c_true)
        if pos["ok"]:
            err_ok.append(turns * c_true)
        err_deg.append(turns * 360.0)
    st = est.stats()
    return {
        "stream": f"{width}x{height} {texture}, pitch {pitch:g} px, {speed:g} px/frame, "
                  f"{revolution_frames} frames/revolution, noise {noise:g}, lighting drift {lighting_drift:g}",
        "frames": frames,
        "circumference_px_true": c_true,
        "circumference_px_est": st["circumference_px"],
        "circumference_learned_at_frame": learned_at,
        "offset_error_px": _stats(err_px),
        "angle_error_deg": _stats(err_deg),
        "offset_error_px_ok_frames": _stats(err_ok),
        "distance_error_px_before_circumference": _stats(err_before),
        "revolution_last_frame": {"est": pos.get("rev"), "true": truth_rev},
        "frames_wrong_revolution": wrong_rev,
        "cutline_passes": {"est": st["cutline_passes"], "true": true_passes},
        "cutline_rejected": st["cutline_rejected"],
        "frames_not_ok": not_ok,
        "blackout_frames": blackout,
        "pitch_px_measured": st["pitch_px"],
        "estimator_ms_per_frame": {"mean": round(float(np.mean(est_ms)), 3),
                                   "p50": round(float(np.percentile(est_ms, 50)), 3),
                                   "p99": round(float(np.percentile(est_ms, 99)), 3),
                                   "cpu_mean": round(float(np.mean(est_cpu_ms)), 3)},
        "simulator_ms_per_frame": round(float(np.mean(sim_ms)), 2),
    }


def cmd_bench_position(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    if args.revolutions < 1:
        raise CliError(f"--revolutions {args.revolutions}: at least 1")
    if args.frames is None:
        args.frames = args.revolutions * args.revolution_frames
    for name in ("width", "height", "revolution_frames", "frames"):
        if getattr(args, name) < (16 if name in ("width", "height") else 2):
            raise CliError(f"--{name.replace('_', '-')} {getattr(args, name)}: too small")
    if not 0 < args.speed < args.width / 2:
        raise CliError(f"--speed {args.speed}: must be above 0 and below half the width ({args.width / 2:g})")
    if args.needle_line < -1:
        raise CliError(f"--needle-line {args.needle_line}: a frame number >= 0, or -1 for none")
    needle_line = None if args.needle_line == -1 else args.needle_line
    if args.blackout < 0 or args.random_defects < 0 or args.noise < 0 or args.lighting_drift < 0:
        raise CliError("--blackout, --random-defects, --noise and --lighting-drift must not be negative")
    if not 2.0 <= args.pitch <= 64.0:
        raise CliError(f"--pitch {args.pitch}: must be within 2 .. 64")
    try:
        cfg = PositionConfig(source="image", min_peak=args.min_peak)
    except ValidationError as e:
        raise CliError(f"--min-peak {args.min_peak}: {e.errors()[0]['msg']}") from None
    sys.stderr.write(f"position bench: {args.frames} frames ({args.frames / args.revolution_frames:g} revolutions) "
                     f"of {args.width}x{args.height} simulated fabric...\n")
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # the cost on one core (as the camera's process would see it on a busy machine)
    try:
        report = run_position_bench(width=args.width, height=args.height, speed=args.speed,
                                    revolution_frames=args.revolution_frames, frames=args.frames,
                                    texture=args.texture, pitch=args.pitch, seed=args.seed, noise=args.noise,
                                    lighting_drift=args.lighting_drift, needle_line=needle_line,
                                    random_defects=args.random_defects,
                                    blackout=args.blackout, cfg=cfg, progress=not args.json)
    finally:
        cv2.setNumThreads(threads)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        flat = {k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in report.items()}
        write_report(flat, False, 40)
    return 0


def register(bsub: argparse._SubParsersAction) -> None:
    """Add ``position`` to the ``knitwatch bench`` subcommands."""
    p = bsub.add_parser(
        "position", help="fabric position from the images against the simulator's truth",
        description="Run the image position estimator (phase correlation of consecutive frames, the cutline "
        "as the once-per-revolution mark) over a simulated stream with lighting drift, noise, a recurring "
        "needle line and random defects; print the offset/angle error against the simulator's truth (mean, "
        "p99, max in px and degrees), revolutions and cutline passes counted vs true, and ms per frame.")
    p.add_argument("--width", type=int, default=512, help="frame width (default 512, the demo's)")
    p.add_argument("--height", type=int, default=256, help="frame height (default 256)")
    p.add_argument("--speed", type=float, default=32.0, help="fabric movement per frame, px (default 32)")
    p.add_argument("--revolution-frames", type=int, default=80, help="frames per revolution (default 80)")
    p.add_argument("--revolutions", type=int, default=10, help="revolutions to stream (default 10)")
    p.add_argument("--frames", type=int, default=None, help="frames to stream (overrides --revolutions)")
    p.add_argument("--texture", choices=["jersey", "pique"], default="jersey")
    p.add_argument("--pitch", type=float, default=6.0, help="loop pitch, px (default 6)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--noise", type=float, default=3.0, help="sensor noise sigma, gray levels (default 3)")
    p.add_argument("--lighting-drift", type=float, default=0.05,
                   help="the simulator's lighting drift (gain, gradient, vignette; default 0.05)")
    p.add_argument("--needle-line", type=int, default=40, metavar="FRAME",
                   help="a broken needle's line from this frame on, every revolution (default 40; -1: none)")
    p.add_argument("--random-defects", type=float, default=0.02, help="random defects per frame (default 0.02)")
    p.add_argument("--blackout", type=int, default=0, metavar="N",
                   help="black frames in the middle of the run (a covered lens; default 0)")
    p.add_argument("--min-peak", type=float, default=PositionConfig().min_peak,
                   help="correlation peak below which a frame is not measured (default: the setting's)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_bench_position)
