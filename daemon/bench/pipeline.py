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
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from knitwatch.config import Settings
from knitwatch.config.settings import CameraConfig, SimulatorConfig
from knitwatch.daemon.cli.common import add_device_option, checkpoint_summary, load_config, write_report
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
    settings = load_config(args)  # --config and KNITWATCH_* checked as by every command: a bad value exits 2
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
    write_report(result, args.json, 38)
    return 0


def bench_demo_model(path: Path, steps: int) -> Path:
    """``path`` when it exists, else the demo's model trained there (``steps`` steps), as the benches that run
    the daemon on the demo's simulated camera need it."""
    if not path.is_file():
        from knitwatch.daemon.cli.demo import DEMO_H, DEMO_REV, DEMO_SPEED, DEMO_TILE, DEMO_W
        from knitwatch.pipeline.offline.demo import train_simulator_model

        sys.stderr.write(f"training the demo model ({steps} steps) into {path} ...\n")
        train_simulator_model(path, width=DEMO_W, height=DEMO_H, speed_px=DEMO_SPEED, revolution_frames=DEMO_REV,
                              tile=DEMO_TILE, frames=40, steps=steps, distill_steps=steps // 2)
    return path


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of a benchmark that runs the daemon: device, work folder, JSON output."""
    add_device_option(p)
    p.add_argument("--workdir", type=Path, default=Path("knitwatch-bench"))
    p.add_argument("--json", action="store_true")


def register(bsub: argparse._SubParsersAction) -> None:
    """Add ``pipeline`` to the ``knitwatch bench`` subcommands."""
    p = bsub.add_parser("pipeline", help="bare model vs daemon throughput, and latency at 50%% load",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, metavar="CKPT")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--seconds", type=float, default=30.0, help="duration of each daemon run (default 30)")
    p.add_argument("--max-batch-tiles", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=20.0)
    add_run_options(p)
    p.set_defaults(func=cmd_bench_pipeline)
