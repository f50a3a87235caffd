"""``knitwatch bench soak --hours H``: the daemon on the simulated machine for hours - does it hold up?

The real daemon (capture, tiler, inference, alert processes; the HTTP API) inspects the demo's simulated
camera at the demo's frame rate, with defects scheduled all through the run, stops and alarms sent to a
simulated PLC (Modbus TCP on loopback), acknowledged periodically through the store's acknowledge
requests (the path of ``knitwatch ack``), and the store held to a small size cap by retention.

Every ``--interval-s`` a sample goes to ``WORKDIR/soak/soak-samples.jsonl`` (one JSON object a line, written
as it goes: a cut run keeps its data): resident memory (RSS) of every stage process and of this one
(the supervisor, which hosts the API), capture -> decision latency p50/p99 of the frames decided in the
interval (from the alert stage's decisions log), the store's size against its cap, stage restarts,
inspection coverage, events, stops and acknowledges.

At the end a table and a verdict against the bar of issue 15: RSS growth under 5% per stage from the
end of the warm-up to the end; p99 latency stable (the median of the last third of the intervals at
most 1.25 x the median of the first third after warm-up); the store never above its cap; no restart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from knitwatch.config import Settings
from knitwatch.config.settings import CameraConfig, PlcConfig, SimulatorConfig
from knitwatch.daemon.bench.phases import DecisionsTail, run_daemon_logged
from knitwatch.daemon.bench.pipeline import add_run_options, bench_demo_model
from knitwatch.daemon.cli.common import (
    EXIT_FAIL,
    CliError,
    add_config_option,
    checkpoint_summary,
    load_config,
    table,
)
from knitwatch.daemon.cli.demo import CPU_FPS, DEMO_H, DEMO_REV, DEMO_SPEED, DEMO_W
from knitwatch.daemon.logs import setup_logging

SOAK_DEFECTS = ("hole", "oil_stain", "slub", "ladder", "fly", "tension_stripe")
RSS_GROWTH_MAX = 0.05  # issue 15: RSS growth per stage after warm-up under 5 %
P99_DRIFT_MAX = 1.25  # p99 stable: median of the last third of the intervals <= 1.25 x the first third's


def soak_schedule(frames: int, every: int) -> list[dict[str, Any]]:
    """A defect every ``every`` frames all through the run, the kinds in turn (events all the time, so
    that acknowledges and retention have work until the end)."""
    return [{"kind": SOAK_DEFECTS[i % len(SOAK_DEFECTS)], "frame": f, "size": 2.0, "intensity": 1.5}
            for i, f in enumerate(range(every // 2, frames, every))]


def rss_bytes(pid: int | None) -> int | None:
    """Resident set size of a process from ``/proc`` (None when it is gone)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def folder_bytes(root: Path) -> int:
    """Bytes of the files under ``root`` (the store's pictures and index, as the disk sees them)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


class SoakMonitor:
    """Called by the supervisor's main loop at each stats report: polls the simulated PLC, acknowledges
    stops, and every ``interval_s`` appends a sample to the JSON lines file."""

    def __init__(self, sup: Any, plc: Any, settings: Settings, out: TextIO, *, interval_s: float,  # noqa: ANN401
                 ack_every_s: float, samples_path: Path, decisions: Path, camera: str, hours: float) -> None:
        self.sup, self.plc, self.settings, self.out = sup, plc, settings, out
        self.interval_s, self.ack_every_s = interval_s, ack_every_s
        self.samples_path = samples_path
        self.tail = DecisionsTail(decisions)
        self.camera = camera
        self.hours = hours
        self.cap_bytes = int(settings.store.max_gb * 1e9)
        self.t0 = self.next_sample = self.next_ack = 0.0  # set at the first tick: the daemon is ready
        self.started = False
        self.samples: list[dict[str, Any]] = []
        self.ack_ids: list[int] = []
        self.ack_errors = 0
        self._store: Any = None
        self._f = open(samples_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def close(self) -> None:
        self._f.close()
        if self._store is not None:
            self._store.close()
            self._store = None

    def store(self) -> Any:  # noqa: ANN401
        from knitwatch.pipeline.store.database import Store, StoreError

        if self._store is None:
            try:
                self._store = Store.from_config(self.settings.store, create=False)
            except StoreError:
                return None
        return self._store

    def tick(self) -> bool:
        """Poll, acknowledge, sample; True once the run's time (counted from the daemon's readiness) is up."""
        self.plc.poll()
        now = time.monotonic()
        if not self.started:
            self.started = True
            self.t0 = now
            self.next_sample = now + self.interval_s
            self.next_ack = now + self.ack_every_s
        if now >= self.next_ack:
            self.next_ack = now + self.ack_every_s
            self.acknowledge()
        if now >= self.next_sample:
            self.next_sample += self.interval_s
            self.sample(now)
        done = now - self.t0 >= self.hours * 3600 - 0.5
        if done and (not self.samples or now - self.t0 - self.samples[-1]["elapsed_s"] > 1.0):
            self.sample(now)  # the end of the run, the daemon still running
        return done

    def acknowledge(self) -> None:
        """The PLC holds a stop (or an alarm): acknowledge as an operator would - a request in the store,
        which the alert stage applies (resets the latch, clears the outputs)."""
        from knitwatch.pipeline.actions.simplc import ALARM_COIL

        if not (self.plc.stop_on or self.plc.coil(ALARM_COIL)):
            return
        store = self.store()
        if store is None:
            self.ack_errors += 1
            return
        try:
            self.ack_ids.append(store.request_ack("bench soak", note="periodic acknowledge of the soak benchmark"))
        except Exception:  # a busy or full store: counted, the next period tries again
            self.ack_errors += 1

    def acks_applied(self) -> int:
        store = self.store()
        if store is None:
            return 0
        n = 0
        for ack_id in self.ack_ids:
            try:
                a = store.get_ack(ack_id)
            except Exception:
                continue
            n += a is not None and a["handled_ns"] is not None
        return n

    def sample(self, now: float) -> dict[str, Any]:
        snap = self.sup.snapshot or {}
        rss = {name: rss_bytes(sp.pid) for name, sp in self.sup.procs.items()}
        rss["supervisor"] = rss_bytes(os.getpid())
        cam = (snap.get("cameras") or {}).get(self.camera, {})
        lat = self.tail.read()
        store = self.store()
        store_bytes = events = None
        if store is not None:
            try:
                store_bytes = store.total_bytes()
                events = store.list_events(limit=1)["total"]
            except Exception:
                store_bytes = None
        row = {
            "t": round(time.time(), 3),
            "elapsed_s": round(now - self.t0, 1),
            "rss_mb": {k: None if v is None else round(v / 2**20, 2) for k, v in rss.items()},
            "pids": {name: sp.pid for name, sp in self.sup.procs.items()},
            "frames": len(lat),
            "latency_ms_p50": _pct(lat, 50),
            "latency_ms_p99": _pct(lat, 99),
            "store_bytes": store_bytes,
            "store_disk_bytes": folder_bytes(Path(self.settings.store.path)),
            "store_cap_bytes": self.cap_bytes,
            "events_in_store": events,
            "events_total": cam.get("events"),
            "restarts": {name: sp.restart_count for name, sp in self.sup.procs.items()},
            "captured": cam.get("captured"),
            "inspected": cam.get("inspected"),
            "coverage": cam.get("coverage"),
            "plc_stops": self.plc.stops,
            "acks_requested": len(self.ack_ids),
            "acks_applied": self.acks_applied(),
            "healthy": snap.get("healthy"),
        }
        self.samples.append(row)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        total = self.hours * 3600
        self.out.write(f"[soak {row['elapsed_s'] / 60:6.1f}/{total / 60:.0f} min] frames {row['inspected']} "
                       f"p99 {row['latency_ms_p99']} ms  store {(store_bytes or 0) / 1e6:.1f}/"
                       f"{self.cap_bytes / 1e6:.1f} MB  events {row['events_total']}  "
                       f"acks {row['acks_applied']}/{row['acks_requested']}  "
                       f"restarts {sum(row['restarts'].values())}\n")
        self.out.flush()
        return row


def soak_report(samples: list[dict[str, Any]], *, warmup_s: float, cap_bytes: int) -> dict[str, Any]:
    """The soak's summary from its samples: per stage RSS after warm-up vs at the end, p99 per interval,
    store vs cap, restarts, coverage, acknowledges, and the verdict against issue 15's bar."""
    if not samples:
        return {"samples": 0, "verdict": "FAIL", "failed": ["no sample taken"]}
    after = [s for s in samples if s["elapsed_s"] >= warmup_s] or samples[-1:]
    base, last = after[0], samples[-1]
    stages = {}
    for name in last["rss_mb"]:
        a, b = base["rss_mb"].get(name), last["rss_mb"].get(name)
        same_pid = name == "supervisor" or base["pids"].get(name) == last["pids"].get(name)
        growth = round((b - a) / a * 100, 2) if a and b is not None and same_pid else None
        peak = max((s["rss_mb"].get(name) or 0.0) for s in after)
        stages[name] = {"rss_mb_after_warmup": a, "rss_mb_end": b, "rss_mb_max": peak, "growth_pct": growth}
    p99 = [s["latency_ms_p99"] for s in after if s["latency_ms_p99"] is not None]
    third = max(1, len(p99) // 3)
    early = float(np.median(p99[:third])) if p99 else None
    late = float(np.median(p99[-third:])) if p99 else None
    stable = bool(p99) and late is not None and early is not None and late <= P99_DRIFT_MAX * early
    store = [s["store_bytes"] for s in samples if s["store_bytes"] is not None]
    store_max = max(store) if store else None
    over = sum(1 for b in store if b > cap_bytes)
    restarts = sum(last["restarts"].values())
    cov = [s["coverage"] for s in after if s["coverage"] is not None]
    cap, ins = last.get("captured") or 0, last.get("inspected") or 0
    failed = []
    bad = [n for n, s in stages.items() if s["growth_pct"] is None or s["growth_pct"] >= RSS_GROWTH_MAX * 100]
    if bad:
        failed.append("RSS growth >= 5% (or unknown): " + ", ".join(bad))
    if not stable:
        failed.append(f"p99 not stable (first third {early} ms, last third {late} ms)")
    if store_max is None or over:
        failed.append(f"store above its cap in {over} sample(s)" if store else "store size unknown")
    if restarts:
        failed.append(f"{restarts} stage restart(s)")
    return {
        "samples": len(samples),
        "duration_s": last["elapsed_s"],
        "warmup_s": warmup_s,
        "stages": stages,
        "latency_ms_p99": {"intervals": len(p99), "min": min(p99) if p99 else None,
                           "median": float(np.median(p99)) if p99 else None, "max": max(p99) if p99 else None,
                           "first_third_median": early, "last_third_median": late, "stable": stable},
        "store": {"cap_bytes": cap_bytes, "max_bytes": store_max, "end_bytes": store[-1] if store else None,
                  "samples_over_cap": over, "max_disk_bytes": max(s["store_disk_bytes"] for s in samples),
                  "events_in_store_end": last.get("events_in_store"), "events_total": last.get("events_total")},
        "restarts": restarts,
        "coverage": {"total": round(ins / cap, 4) if cap else None, "captured": cap, "inspected": ins,
                     "interval_min": min(cov) if cov else None},
        "plc_stops": last["plc_stops"],
        "acks_requested": last["acks_requested"],
        "acks_applied": last["acks_applied"],
        "verdict": "FAIL" if failed else "PASS",
        "failed": failed,
    }


def report_text(rep: dict[str, Any]) -> str:
    if not rep.get("stages"):
        return f"verdict: {rep['verdict']} - {'; '.join(rep['failed'])}\n"
    rows = [[n, str(s["rss_mb_after_warmup"]), str(s["rss_mb_end"]), str(s["rss_mb_max"]),
             "-" if s["growth_pct"] is None else f"{s['growth_pct']:+.2f}%"] for n, s in rep["stages"].items()]
    out = table(rows, ["stage", "RSS MB after warm-up", "RSS MB end", "RSS MB max", "growth"])
    lat, st, cov = rep["latency_ms_p99"], rep["store"], rep["coverage"]
    out += (f"samples {rep['samples']} over {rep['duration_s'] / 60:.1f} min (warm-up {rep['warmup_s'] / 60:.1f} min)\n"
            f"p99 latency per interval (ms): min {lat['min']}  median {lat['median']}  max {lat['max']}  "
            f"(first third {lat['first_third_median']}, last third {lat['last_third_median']})\n"
            f"store: max {(st['max_bytes'] or 0) / 1e6:.2f} MB of cap {st['cap_bytes'] / 1e6:.2f} MB "
            f"(on disk max {st['max_disk_bytes'] / 1e6:.2f} MB), {st['events_in_store_end']} of "
            f"{st['events_total']} events kept at the end\n"
            f"restarts {rep['restarts']}   coverage {cov['total']} ({cov['inspected']} of {cov['captured']} frames; "
            f"lowest interval {cov['interval_min']})   PLC stops {rep['plc_stops']}   acknowledges applied "
            f"{rep['acks_applied']} of {rep['acks_requested']}\n")
    why = "" if not rep["failed"] else " - " + "; ".join(rep["failed"])
    out += (f"verdict: {rep['verdict']} (RSS growth < 5% per stage after warm-up, p99 stable, store under its cap, "
            f"no restart){why}\n")
    return out


def _writable_folder(folder: Path) -> None:
    """Make ``folder`` when missing and write a file in it; a named error (exit 2) when that fails."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".knitwatch-"):
            pass
    except OSError as e:
        raise CliError(f"--workdir {folder}: cannot create or write it ({e.strerror or e})") from None


def cmd_bench_soak(args: argparse.Namespace) -> int:
    from knitwatch.pipeline.actions.simplc import (
        ALARM_COIL,
        HEARTBEAT_COIL,
        STOP_COIL,
        SimulatedPlc,
        SimulatedPlcError,
    )

    if not 0 < args.hours <= 240:
        raise CliError(f"--hours must be above 0 and at most 240 (got {args.hours})")
    if not 0 < args.fps <= 60:
        raise CliError(f"--fps must be above 0 and at most 60 (got {args.fps})")
    if not 0 < args.store_cap_mb <= 1e6:
        raise CliError(f"--store-cap-mb must be above 0 (got {args.store_cap_mb})")
    if args.defect_every < 10:
        raise CliError(f"--defect-every must be at least 10 frames (got {args.defect_every})")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise CliError(f"checkpoint not found: {args.checkpoint}")
    settings = load_config(args)  # KNITWATCH_* and --config, checked: a bad value is a named error
    total_s = args.hours * 3600.0
    interval = args.interval_s if args.interval_s is not None else max(5.0, min(60.0, total_s / 40))
    if not 1 <= interval <= total_s:
        raise CliError(f"--interval-s must be at least 1 and at most the run ({total_s:g} s) (got {interval:g})")
    warmup = args.warmup_s if args.warmup_s is not None else min(600.0, 0.2 * total_s)
    if not 0 <= warmup < total_s:
        raise CliError(f"--warmup-s must be at least 0 and shorter than the run (got {warmup:g})")
    work: Path = args.workdir
    _writable_folder(work)
    setup_logging("bench", level="WARNING", fmt=args.log_format or "auto")
    ckpt_path = bench_demo_model(args.checkpoint or work / "model.ckpt", args.steps)
    ckpt = checkpoint_summary(ckpt_path)

    soak_dir = work / "soak"
    store_dir = soak_dir / "store"
    if store_dir.exists():  # a fresh store each run: the cap must be reached by this run's events
        import shutil

        shutil.rmtree(store_dir)
    soak_dir.mkdir(parents=True, exist_ok=True)
    frames = int(total_s * args.fps) + 100
    settings.cameras = [CameraConfig(id="soak", source="simulator", fps=args.fps, width=DEMO_W, height=DEMO_H,
                                     simulator=SimulatorConfig(pitch_px=6.0, speed_px=DEMO_SPEED,
                                                               revolution_frames=DEMO_REV, seed=7,
                                                               defects=soak_schedule(frames, args.defect_every)))]
    settings.inference.device = args.device  # type: ignore[assignment]
    settings.store.path = store_dir
    settings.store.max_gb = args.store_cap_mb / 1000.0
    settings.store.fsync = False
    decisions = soak_dir / "decisions.jsonl"
    decisions.unlink(missing_ok=True)
    settings.alert.decisions_log = decisions
    settings.daemon.stats_interval_s = min(2.0, interval)
    settings.api.port = 0  # any free port: never collides with a daemon or demo running here
    try:
        plc = SimulatedPlc().start()
    except SimulatedPlcError as e:
        raise CliError(str(e)) from None
    settings.plc = PlcConfig(driver="modbus", host=plc.host, port=plc.port, unit_id=1, output="coil",
                             stop_address=STOP_COIL, heartbeat_address=HEARTBEAT_COIL, alarm_address=ALARM_COIL,
                             heartbeat_s=1.0, timeout_s=1.0)
    samples_path = args.out or soak_dir / "soak-samples.jsonl"
    out = sys.stdout
    out.write(f"soak: {args.hours:g} h of the daemon on the simulated machine ({DEMO_W}x{DEMO_H} at {args.fps:g} fps, "
              f"a defect every {args.defect_every} frames), model {ckpt_path}, store cap {args.store_cap_mb:g} MB, "
              f"acknowledge every {args.ack_every_s:g} s, a sample every {interval:g} s to {samples_path}, "
              f"warm-up {warmup:g} s, a stage silent for {settings.daemon.stall_s:g} s is restarted "
              "([daemon] stall_s)\n")
    out.flush()

    monitor: SoakMonitor | None = None

    def on_report(sup: Any) -> bool:  # noqa: ANN401 - the Supervisor; True: the run's time is up
        nonlocal monitor
        if monitor is None:  # the run's hours count from the daemon's readiness
            monitor = SoakMonitor(sup, plc, settings, out, interval_s=interval, ack_every_s=args.ack_every_s,
                                  samples_path=samples_path, decisions=decisions, camera="soak", hours=args.hours)
        return monitor.tick()

    log_path = soak_dir / "daemon.log"
    try:
        rc = run_daemon_logged(settings, ckpt, log_path, on_report=on_report, log_level="WARNING",
                               bench_log_format=args.log_format or "auto",  # the monitor stops it; this is a backstop
                               duration_s=total_s + settings.daemon.startup_grace_s + 120.0)
    finally:
        plc.stop()
        if monitor is not None:
            monitor.close()
    if monitor is None:
        raise CliError(f"the daemon never became ready (see {log_path})", EXIT_FAIL)
    rep = soak_report(monitor.samples, warmup_s=warmup, cap_bytes=monitor.cap_bytes)
    rep.update(exit_code=rc, samples_file=str(samples_path), daemon_log=str(log_path), model=ckpt.get("id"),
               fps=args.fps, store_cap_mb=args.store_cap_mb, defect_every=args.defect_every,
               stall_s=settings.daemon.stall_s)
    (soak_dir / "soak-report.json").write_text(json.dumps(rep, indent=2) + "\n", encoding="utf-8")
    if args.json:
        out.write(json.dumps(rep, indent=2) + "\n")
    else:
        out.write(report_text(rep))
    if rc != 0:
        raise CliError(f"the daemon ended with exit code {rc} (see {log_path})", EXIT_FAIL)
    return 0


def register(bsub: argparse._SubParsersAction) -> None:
    """Add ``soak`` to the ``knitwatch bench`` subcommands."""
    p = bsub.add_parser("soak", help="hours of the daemon on the simulated machine: RSS per stage, p99 latency, "
                        "store vs cap, restarts, coverage", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, nargs="?", metavar="CKPT",
                   help="the model (default: WORKDIR/model.ckpt, the demo model, trained there when missing)")
    p.add_argument("--hours", type=float, default=2.0, help="duration (default 2)")
    p.add_argument("--fps", type=float, default=CPU_FPS, help=f"camera frame rate (default {CPU_FPS:g}: the demo's on "
                   "a CPU, light on a shared machine)")
    p.add_argument("--store-cap-mb", type=float, default=5.0,
                   help="the store's size cap ([store] max_gb) in MB (default 5: reached within the first hour)")
    p.add_argument("--defect-every", type=int, default=40, metavar="FRAMES",
                   help="a scheduled defect every FRAMES frames (default 40)")
    p.add_argument("--ack-every-s", type=float, default=20.0, metavar="S",
                   help="acknowledge a held stop/alarm every S seconds (default 20)")
    p.add_argument("--interval-s", type=float, default=None, metavar="S",
                   help="sample every S seconds (default: the run / 40, between 5 and 60)")
    p.add_argument("--warmup-s", type=float, default=None, metavar="S",
                   help="RSS growth is measured from the first sample after S seconds (default: 20%% of the "
                   "run, at most 600)")
    p.add_argument("--out", type=Path, default=None, metavar="JSONL",
                   help="the samples file (default WORKDIR/soak/soak-samples.jsonl)")
    p.add_argument("--steps", type=int, default=200, help="training steps when the model must be trained")
    add_config_option(p)
    add_run_options(p)
    p.set_defaults(func=cmd_bench_soak)
