"""``knitwatch bench switch``: a model switch in the running daemon, under load - what does it cost?

The real daemon inspects the demo's simulated camera; the model library (in the work folder) holds the
model to switch to (``--to CKPT``, default a copy of the daemon's own checkpoint, installed as its own
article: the workers load a second model all the same). After ``--before-s`` seconds the camera is
switched to it (what ``knitwatch model use`` does), after ``--after-s`` more it is rolled back, and
after another ``--after-s`` the run ends. From the alert stage's decisions log and the capture stage's
counters (sampled every second) it reports, for the windows before (its second half: the first is the
daemon's warm-up), across (the switch request to
10 s after the first frame of the new model) and after each switch: frames captured, inspected and
dropped at capture, coverage, latency p50/p99; the time from the request to the first frame judged
by the new model; frames judged by the old model after the request; and the frames dropped *by* the
switch: gaps in the sequence numbers of the decided frames across the changeover beyond those the
camera's own drops explain (a frame lost at the switch would be a missing sequence number).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from knitwatch.config.settings import CameraConfig, SimulatorConfig
from knitwatch.daemon.bench.phases import DecisionsTail, frame_time, latency_ms, phase, run_daemon_logged
from knitwatch.daemon.bench.pipeline import add_run_options, bench_demo_model
from knitwatch.daemon.cli.common import CliError, add_config_option, checkpoint_summary, load_config, table
from knitwatch.daemon.cli.demo import CPU_FPS, DEMO_H, DEMO_REV, DEMO_SPEED, DEMO_W
from knitwatch.daemon.logs import setup_logging

CAMERA = "switch"
ACROSS_S = 10.0  # the "across" window ends this long after the first frame of the new model


def windows(rows: list[dict[str, Any]], samples: list[dict[str, Any]], events: list[dict[str, Any]],
            end_t: float, warmup_s: float = 0.0) -> list[dict[str, Any]]:
    """Per phase (before / across / after each switch) the frames, coverage, drops and latency.

    ``rows``: the decisions (``t``: the frame's capture time, ``seq``, ``model``, ``latency_ms``); ``samples``:
    ``{"t", "captured", "dropped"}`` every second; ``events``: ``{"t": request time, "to": model id}``; the
    first ``warmup_s`` seconds (the daemon warming up) are left out."""
    out = []
    t_prev = samples[0]["t"] + warmup_s if samples else 0.0
    for i, ev in enumerate(events):
        first = next((r for r in rows if r["t"] >= ev["t"] and r["model"] == ev["to"]), None)
        across_end = (first["t"] if first is not None else ev["t"]) + ACROSS_S
        out.append(phase(f"before switch {i + 1}" if i == 0 else f"after switch {i}", rows, samples, t_prev, ev["t"]))
        row = phase(f"across switch {i + 1}", rows, samples, ev["t"], across_end)
        part = [r for r in rows if ev["t"] <= r["t"] < across_end]
        row.update(to=ev["to"], switch_s=round(first["t"] - ev["t"], 2) if first else None,
                   old_model_frames_after_request=sum(1 for r in part if r["model"] != ev["to"] and
                                                      (first is None or r["seq"] < first["seq"])),
                   seq_gaps_at_changeover=seq_gaps(part, first["seq"]) if first else None)
        out.append(row)
        t_prev = across_end
    out.append(phase(f"after switch {len(events)}", rows, samples, t_prev, end_t))
    return out


def seq_gaps(rows: list[dict[str, Any]], changeover_seq: int, around: int = 3) -> int:
    """Sequence numbers missing among the decided frames within ``around`` frames of the changeover."""
    seqs = sorted(r["seq"] for r in rows if abs(r["seq"] - changeover_seq) <= around)
    if not seqs:
        return 0
    return (seqs[-1] - seqs[0] + 1) - len(seqs)


def cmd_bench_switch(args: argparse.Namespace) -> int:
    from knitwatch.models.articles import Library
    from knitwatch.models.checkpoint import load_checkpoint

    if not 0 < args.fps <= 240:
        raise CliError(f"--fps must be above 0 and at most 240 (got {args.fps})")
    for opt in ("before_s", "after_s"):
        if not 5 <= getattr(args, opt) <= 3600:
            raise CliError(f"--{opt.replace('_', '-')} must be within 5 .. 3600 s (got {getattr(args, opt):g})")
    for p in (args.checkpoint, args.to):
        if p is not None and not p.is_file():
            raise CliError(f"checkpoint not found: {p}")
    settings = load_config(args)
    work: Path = args.workdir
    setup_logging("bench", level="WARNING", fmt=args.log_format or "auto")
    ckpt_path = bench_demo_model(args.checkpoint or work / "model.ckpt", args.steps)
    ckpt = checkpoint_summary(ckpt_path)
    bench_dir = work / "switch"
    if bench_dir.exists():
        shutil.rmtree(bench_dir)
    bench_dir.mkdir(parents=True)
    lib = Library(bench_dir / "library")
    target = args.to or ckpt_path
    c = load_checkpoint(target)
    to_id = lib.add("switch-bench", target, {"kind": c.kind, "preprocess": c.preprocess,
                                             "thresholds": c.thresholds}).id
    settings.cameras = [CameraConfig(id=CAMERA, source="simulator", fps=args.fps, width=DEMO_W, height=DEMO_H,
                                     simulator=SimulatorConfig(pitch_px=6.0, speed_px=DEMO_SPEED,
                                                               revolution_frames=DEMO_REV, seed=7))]
    settings.inference.device = args.device  # type: ignore[assignment]
    settings.store.path = bench_dir / "store"
    settings.store.fsync = False
    settings.learn.library_dir = lib.root
    decisions = bench_dir / "decisions.jsonl"
    settings.alert.decisions_log = decisions
    settings.daemon.stats_interval_s = 1.0
    settings.api.port = 0
    out = sys.stdout
    out.write(f"switch: the daemon on the simulated camera ({DEMO_W}x{DEMO_H} at {args.fps:g} fps), model "
              f"{ckpt['id']}; after {args.before_s:g} s switch to {to_id} ({target}), after {args.after_s:g} s "
              f"roll back, end {args.after_s:g} s later\n")
    out.flush()

    samples: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    seen: list[dict[str, Any]] = []
    tail = DecisionsTail(decisions)
    plan = [(args.before_s, "use"), (args.before_s + args.after_s, "rollback"),
            (args.before_s + 2 * args.after_s, "end")]

    def read_decisions() -> None:
        now = time.time()
        for r in tail.rows():
            seen.append({"t": frame_time(r) or now, "seq": r.get("seq"), "model": r.get("model"),
                         "latency_ms": latency_ms(r)})

    t_ready: list[float] = []

    def on_report(sup: Any) -> bool:  # noqa: ANN401 - the Supervisor
        now = time.time()
        if not t_ready:
            t_ready.append(now)
        read_decisions()
        cam = (sup.snapshot.get("cameras") or {}).get(CAMERA, {})
        samples.append({"t": now, "captured": cam.get("captured", 0), "dropped": cam.get("dropped", 0)})
        while plan and now - t_ready[0] >= plan[0][0]:
            _, what = plan.pop(0)
            if what == "use":
                lib.use(CAMERA, "switch-bench", who="bench switch")
                events.append({"t": time.time(), "to": to_id})
            elif what == "rollback":
                lib.rollback(CAMERA, who="bench switch")
                events.append({"t": time.time(), "to": ckpt["id"]})
            out.write(f"[{now - t_ready[0]:6.1f} s] {what}\n")
            out.flush()
            if what == "end":
                return True
        return False

    log_path = bench_dir / "daemon.log"
    rc = run_daemon_logged(settings, ckpt, log_path, on_report=on_report, bench_log_format=args.log_format or "auto",
                           duration_s=args.before_s + 2 * args.after_s + settings.daemon.startup_grace_s + 60)
    read_decisions()
    rows = [r for r in seen if isinstance(r["seq"], int)]
    end_t = samples[-1]["t"] if samples else time.time()
    # a decision of the checkpoint names its id; frames before any switch are the checkpoint's
    result = {"fps": args.fps, "model": ckpt["id"], "to": to_id, "exit_code": rc,
              "windows": windows(rows, samples, events, end_t, warmup_s=args.before_s / 2),
              "daemon_log": str(log_path)}
    restarts = sum(1 for line in log_path.read_text(encoding="utf-8").splitlines()
                   if "stage failed, restarting" in line)
    result["stage_restarts"] = restarts
    (bench_dir / "switch-report.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.json:
        out.write(json.dumps(result, indent=2) + "\n")
    else:
        cols = ["window", "seconds", "captured", "inspected", "dropped_at_capture", "coverage", "latency_ms_p50",
                "latency_ms_p99", "switch_s", "old_model_frames_after_request", "seq_gaps_at_changeover"]
        out.write(table([[w.get(k, "") if w.get(k) is not None else "-" for k in cols] for w in result["windows"]],
                        ["window", "s", "captured", "inspected", "dropped", "coverage", "p50 ms", "p99 ms",
                         "switch s", "old after req", "seq gaps"]) + "\n")
        out.write(f"stage restarts: {restarts}\n")
    if rc != 0:
        raise CliError(f"the daemon ended with exit code {rc} (see {log_path})", 1)
    return 0


def register(bsub: argparse._SubParsersAction) -> None:
    """Add ``switch`` to the ``knitwatch bench`` subcommands."""
    p = bsub.add_parser("switch", help="a model switch and a rollback in the running daemon: coverage, latency "
                        "and frames lost across them", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, nargs="?", metavar="CKPT",
                   help="the daemon's model (default: WORKDIR/model.ckpt, the demo model, trained there when missing)")
    p.add_argument("--to", type=Path, default=None, metavar="CKPT",
                   help="the model to switch to (default: a copy of CKPT installed as its own article)")
    p.add_argument("--fps", type=float, default=CPU_FPS * 2,
                   help=f"camera frame rate (default {CPU_FPS * 2:g}: twice the demo's on a CPU)")
    p.add_argument("--before-s", type=float, default=60.0, help="seconds before the switch (default 60)")
    p.add_argument("--after-s", type=float, default=60.0, help="seconds after the switch and after the rollback "
                   "(default 60)")
    p.add_argument("--steps", type=int, default=200, help="training steps when the demo model must be trained")
    add_config_option(p)
    add_run_options(p)
    p.set_defaults(func=cmd_bench_switch)
