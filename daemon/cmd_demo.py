"""``knitwatch demo``: the whole daemon on its simulated camera, in one command.

First run: trains a small EfficientAD-S on the simulator's defect-free fabric (a few minutes on a
CPU; the model is kept for later runs). Then runs the real daemon - capture, tiler, inference,
alert as separate processes - on a simulated knitting machine whose fabric carries scheduled
defects (a hole, an oil stain, a broken needle's line that comes back every revolution) and a
cutline every revolution, until Ctrl-C or ``--seconds``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import structlog

from knitwatch.config import Settings
from knitwatch.config.settings import CameraConfig, SimulatorConfig
from knitwatch.daemon.cli import checkpoint_summary, load_config
from knitwatch.daemon.logs import setup_logging

log = structlog.get_logger(__name__)

DEMO_W, DEMO_H, DEMO_TILE = 512, 256, 64
DEMO_SPEED, DEMO_REV = 32.0, 80


def demo_camera(fps: float) -> CameraConfig:
    return CameraConfig(
        id="demo",
        source="simulator",
        fps=fps,
        width=DEMO_W,
        height=DEMO_H,
        simulator=SimulatorConfig(
            pitch_px=6.0, speed_px=DEMO_SPEED, revolution_frames=DEMO_REV, seed=3,
            defects=[
                {"kind": "hole", "frame": 25, "size": 2.5},
                {"kind": "oil_stain", "frame": 110, "size": 2.0},
                {"kind": "needle_line", "frame": 170, "every_revolution": True, "size": 1.5, "intensity": 1.5},
            ],
        ),
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from knitwatch.daemon.supervisor import Supervisor
    from knitwatch.pipeline.demo import train_simulator_model

    settings: Settings = load_config(args)
    level = args.log_level or settings.logging.level
    fmt = args.log_format or settings.logging.format
    setup_logging("demo", level=level, fmt=fmt)
    work = args.workdir
    model = args.model or work / "model.ckpt"
    if not model.is_file():
        log.info("no demo model yet: training one on simulated fabric (once; a few minutes on a CPU)",
                 path=str(model), steps=args.steps)
        train_simulator_model(model, width=DEMO_W, height=DEMO_H, speed_px=DEMO_SPEED, revolution_frames=DEMO_REV,
                              tile=DEMO_TILE, frames=40, steps=args.steps, distill_steps=args.steps // 2)
    settings.cameras = [demo_camera(args.fps)]
    settings.model.checkpoint = model
    settings.store.path = work / "store"
    settings.alert.decisions_log = work / "decisions.jsonl"
    settings.daemon.stats_interval_s = 5.0
    log.info("starting the daemon on the simulated camera", fps=args.fps, frame=f"{DEMO_W}x{DEMO_H}",
             revolution_frames=DEMO_REV, decisions=str(settings.alert.decisions_log))
    setup_logging("supervisor", level=level, fmt=fmt)
    sup = Supervisor(settings, checkpoint=checkpoint_summary(model), log_level=level,
                     log_format="json" if fmt == "auto" else fmt)
    return sup.run(duration_s=args.seconds)


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo",
        help="run the daemon on a simulated knitting machine (trains a small model on first use)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--config", type=Path, metavar="PATH", default=argparse.SUPPRESS,
                   help="TOML config (its cameras, model and store are replaced by the demo's)")
    d.add_argument("--workdir", type=Path, default=Path("knitwatch-demo"),
                   help="where the demo keeps its model, store and decisions (default ./knitwatch-demo)")
    d.add_argument("--model", type=Path, help="use this checkpoint instead of the demo model")
    d.add_argument("--steps", type=int, default=200, help="training steps of the demo model (default 200)")
    d.add_argument("--fps", type=float, default=2.0, help="simulated camera frame rate (default 2: a CPU keeps up)")
    d.add_argument("--seconds", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    d.set_defaults(func=cmd_demo)
