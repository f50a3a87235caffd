"""``knitwatch demo``: the whole product on a simulated knitting machine, in one command.

First run: trains a small EfficientAD-S on the simulator's defect-free fabric (a few minutes on a
CPU; kept in the work folder and reused). Then it starts a simulated PLC (a Modbus TCP server on
loopback: coil 0 = stop, 1 = heartbeat, 2 = alarm) and the real daemon - capture, tiler, inference,
alert as separate processes, the HTTP API and web page - on a simulated camera whose fabric carries
scheduled defects (a hole at frame 12, an oil stain at frame 50, a broken needle's line from frame 100
that comes back every revolution of 80 frames) and a cutline every revolution. A status line shows
fps, inspection coverage, defects, stops and latency; defects appear in the web page, and a stop stays
latched on the simulated PLC until acknowledged there (or with --auto-ack). Runs until Ctrl-C or
--duration.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import structlog

from knitwatch.config import Settings
from knitwatch.config.settings import ApiConfig, CameraConfig, PlcConfig, SimulatorConfig, StoreConfig
from knitwatch.daemon.cli.common import CliError, checkpoint_summary, fmt_coverage, load_config
from knitwatch.daemon.logs import setup_logging
from knitwatch.pipeline.actions.simplc import (
    ALARM_COIL,
    HEARTBEAT_COIL,
    STOP_COIL,
    SimulatedPlc,
    SimulatedPlcError,
    free_port,
)

log = structlog.get_logger(__name__)

DEMO_W, DEMO_H, DEMO_TILE = 512, 256, 64
DEMO_SPEED, DEMO_REV = 32.0, 80
TRAIN_FRAMES = 40
# EfficientAD-S needs about 0.9 CPU-seconds for a 512x256 frame's 32 tiles of 64 px (one thread): at
# 1 fps the model takes under half of a 2-core CPU, leaving room for capture, tiler, alert and the API.
CPU_FPS, GPU_FPS = 1.0, 10.0


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
                {"kind": "hole", "frame": 12, "size": 2.5},
                {"kind": "oil_stain", "frame": 50, "size": 2.0},
                {"kind": "needle_line", "frame": 100, "every_revolution": True, "size": 1.5, "intensity": 1.5},
            ],
        ),
    )


def port_free(host: str, port: int) -> bool:
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
        return True
    except OSError:
        return False


class DemoMonitor:
    """The demo's terminal: a status line (in place on a terminal, a line every few seconds otherwise),
    a line per new defect event, and the simulated PLC's stops; optionally acknowledges stops itself."""

    def __init__(self, sup: Any, plc: SimulatedPlc, store_path: Path, url: str, out: TextIO, *,  # noqa: ANN401
                 auto_ack_s: float = 0.0, every_s: float = 1.0) -> None:
        self.sup, self.plc, self.store_path, self.url, self.out = sup, plc, store_path, url, out
        self.auto_ack_s = auto_ack_s
        self.every_s = every_s
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self.last_id = 0
        self.events = 0
        self._revs: dict[int, int] = {}  # event id -> revolutions its defect was seen in (printed so far)
        self.auto_acks = 0
        self._store: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="knitwatch-demo-status", daemon=True)
        self._last_line = 0.0
        self.line = ""

    def start(self) -> DemoMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self._store is not None:
            self._store.close()
        if self.tty and self.line:
            self.out.write("\n")
            self.out.flush()

    def _run(self) -> None:
        next_status = 0.0
        while not self._stop.wait(0.25):
            try:
                self.plc.poll()
            except Exception as e:  # noqa: BLE001 - the display must not die
                log.warning("cannot read the simulated PLC", error=str(e))
            self._new_events()
            self._auto_ack()
            now = time.monotonic()
            if now >= next_status:
                next_status = now + self.every_s
                self._status()

    def _open_store(self) -> Any:  # noqa: ANN401
        if self._store is None:
            from knitwatch.pipeline.store.database import Store, StoreError

            try:
                self._store = Store.from_config(StoreConfig(path=self.store_path, fsync=False), create=False)
            except StoreError:
                return None
            ids = self._store.list_events(limit=1)["items"]
            self.last_id = ids[0]["id"] if ids else 0  # events of earlier runs are not new
        return self._store

    def _new_events(self) -> None:
        store = self._open_store()
        if store is None:
            return
        try:
            items = [e for e in store.list_events(limit=20)["items"] if e["id"] > self.last_id]
        except Exception:  # noqa: BLE001
            return
        self._recurrences(store)
        for e in sorted(items, key=lambda e: e["id"]):
            self.last_id = max(self.last_id, e["id"])
            self.events += 1
            full = store.get_event(e["id"]) or {}
            record = full.get("record") or {}
            truth = record.get("truth") or {}
            kinds = sorted({d.get("kind") for d in truth.get("defects", []) if d.get("kind")})
            what = f" (the simulator put there: {', '.join(kinds)})" if kinds else (
                " (the simulator put no defect there: a false alarm)" if "defects" in truth else "")
            revs = int((record.get("recurrence") or {}).get("revolutions") or 1)
            again = (f"; a recurring defect, back at the same place of the tube in {revs} revolutions"
                     + (f" (acknowledged as #{record['previous_event_id']})" if record.get("previous_event_id") else "")
                     if revs > 1 else "")
            self._print(f"defect #{e['id']}: camera {e['camera']}, frame {e['seq']}, {e['severity']} -> "
                        f"{e['action'].upper()}, score {e['image_score']:.2f}, {e['max_area_px']} px{what}{again}")
            self._revs[e["id"]] = revs
            while len(self._revs) > 20:  # the newest events are the ones that can still come back
                del self._revs[min(self._revs)]

    def _recurrences(self, store: Any) -> None:  # noqa: ANN401
        """A line when an event's defect came back in another revolution (a broken needle's line)."""
        for eid, seen in list(self._revs.items()):
            record = (store.get_event(eid) or {}).get("record") or {}
            revs = int((record.get("recurrence") or {}).get("revolutions") or 1)
            if revs > seen:
                self._revs[eid] = revs
                self._print(f"defect #{eid} is back: the same place of the tube in {revs} revolutions - a recurring "
                            f"defect (a broken needle?), severity {record.get('severity')}")

    def _auto_ack(self) -> None:
        if self.auto_ack_s <= 0 or self.plc.stopped_since is None:
            return
        if time.monotonic() - self.plc.stopped_since < self.auto_ack_s:
            return
        store = self._open_store()
        if store is None:
            return
        pending = [a for a in store.list_acks(limit=5) if a["handled_ns"] is None]
        if not pending:
            store.request_ack("demo --auto-ack", note=f"acknowledged by the demo after {self.auto_ack_s:g} s")
            self.auto_acks += 1
            self._print(f"the demo acknowledges the stop (--auto-ack {self.auto_ack_s:g}): the machine runs again")
        self.plc.stopped_since = time.monotonic()  # wait again before the next try

    def summary(self) -> dict[str, Any]:
        snap = self.sup.snapshot or {}
        cam = (snap.get("cameras") or {}).get("demo", {})
        return {"seconds": round(time.monotonic() - self.t0, 1), "fps": cam.get("fps"),
                # the whole run's coverage (the stats' own is over the last minute)
                "coverage": (cam.get("inspected", 0) / cam["captured"]) if cam.get("captured") else None,
                "captured": cam.get("captured", 0),
                "inspected": cam.get("inspected", 0), "dropped": cam.get("dropped", 0),
                "latency_ms": cam.get("latency_ms", {}), "events": self.events, "stops": self.plc.stops,
                "stop_output": self.plc.stop_on, "heartbeats": self.plc.heartbeats, "auto_acks": self.auto_acks,
                "lost_in_flight": int((snap.get("lost_in_flight") or {}).get("total") or 0),
                "url": self.url}

    def _status(self) -> None:
        snap = self.sup.snapshot or {}
        health = self.sup.health()
        cam = (snap.get("cameras") or {}).get("demo", {})
        el = int(time.monotonic() - self.t0)
        clock = f"[{el // 60:d}:{el % 60:02d}]"
        if not health.get("ready"):
            line = f"{clock} starting: loading the model into the inference worker ..."
        else:
            lat = cam.get("latency_ms") or {}
            cov = cam.get("coverage")
            machine = ("machine STOPPED - acknowledge in the web page" if self.plc.stop_on else "machine running")
            beat = self.plc.last_beat is not None and time.monotonic() - self.plc.last_beat < 3.5
            line = (f"{clock} {'inspecting' if health.get('healthy') else 'NOT HEALTHY'} | "
                    f"{cam.get('fps') or 0:.1f} fps | coverage "
                    f"{fmt_coverage(cov)} | frames {cam.get('inspected', 0)} | "
                    f"defects {self.events} | stops {self.plc.stops} | latency "
                    + (f"p50 {lat['p50'] / 1000:.2f} s p99 {lat['p99'] / 1000:.2f} s" if "p50" in lat else "-")
                    + f" | {machine} | PLC heartbeat {'ok' if beat else '-'}")
        self.line = line
        if self.tty:
            self.out.write("\r\x1b[K" + line)
            self.out.flush()
        elif time.monotonic() - self._last_line >= 10.0:
            self._last_line = time.monotonic()
            self.out.write(line + "\n")
            self.out.flush()

    def _print(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\x1b[K" + text + "\n" + self.line)
        else:
            self.out.write(text + "\n")
        self.out.flush()


def _model(args: argparse.Namespace, work: Path, out: TextIO) -> Path:
    """The demo model: ``--model``, else the cached one in the work folder, else trained now."""
    if args.model is not None:
        if not args.model.is_file():
            raise CliError(f"--model {args.model}: no such file")
        return args.model
    model = work / "model.ckpt"
    if model.is_file():
        try:
            tile = int(checkpoint_summary(model)["preprocess"]["tile"])
        except (CliError, KeyError, TypeError, ValueError):
            tile = -1
        if tile == DEMO_TILE:
            out.write(f"using the demo model {model} (delete it to train a new one)\n")
            return model
        out.write(f"{model} is not a demo model (tile {tile} px): training a new one\n")
    from knitwatch.pipeline.offline.demo import train_simulator_model

    out.write(f"training the demo model on simulated defect-free fabric ({args.steps} steps; once - about 5 "
              "minutes on a 2-core CPU, seconds on a GPU) ...\n")
    out.flush()
    t0 = time.monotonic()
    tmp = model.with_name(".model.ckpt.tmp")
    train_simulator_model(tmp, width=DEMO_W, height=DEMO_H, speed_px=DEMO_SPEED, revolution_frames=DEMO_REV,
                          tile=DEMO_TILE, frames=args.train_frames, steps=args.steps,
                          distill_steps=max(1, args.steps // 2), progress=not args.quiet)
    os.replace(tmp, model)
    out.write(f"trained in {time.monotonic() - t0:.0f} s: {model}\n")
    return model


def cmd_demo(args: argparse.Namespace) -> int:
    from knitwatch.daemon.supervisor import Supervisor

    out = sys.stdout
    settings: Settings = load_config(args)
    verbose = args.verbose or args.log_format is not None or args.log_level is not None
    level = args.log_level or ("INFO" if verbose else "WARNING")
    fmt = args.log_format or settings.logging.format
    setup_logging("demo", level=level, fmt=fmt)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = _model(args, work, out)

    gpu = False
    try:
        import torch

        gpu = torch.cuda.is_available() and settings.inference.device != "cpu"
    except ImportError:
        pass
    fps = args.fps if args.fps is not None else (GPU_FPS if gpu else CPU_FPS)
    host = args.host
    if args.port == 0 or not port_free(host, args.port):
        port = free_port(host)
        if args.port:
            out.write(f"port {args.port} is in use: the web page gets port {port}\n")
    else:
        port = args.port
    try:
        settings.api = ApiConfig(host=host, port=port, token=args.token)
    except ValueError as e:
        raise CliError(f"--host {host}: {e}") from None
    try:
        plc = SimulatedPlc(port=args.plc_port).start()
    except SimulatedPlcError as e:
        raise CliError(str(e)) from None
    settings.cameras = [demo_camera(fps)]
    settings.model.checkpoint = model
    settings.store.path = work / "store"
    settings.alert.decisions_log = work / "decisions.jsonl"
    settings.daemon.stats_interval_s = 2.0
    settings.plc = PlcConfig(driver="modbus", host=plc.host, port=plc.port, unit_id=1, output="coil",
                             stop_address=STOP_COIL, heartbeat_address=HEARTBEAT_COIL, alarm_address=ALARM_COIL,
                             heartbeat_s=1.0, timeout_s=1.0)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    log_path = work / "daemon.log"
    out.write(f"knitwatch demo: simulated camera {DEMO_W}x{DEMO_H} at {fps:g} fps ({'GPU' if gpu else 'CPU'}), "
              f"model {model}, simulated PLC modbus://{plc.host}:{plc.port} (coil 0 stop, 1 heartbeat, 2 alarm)\n"
              f"web page: {url}   store: {settings.store.path}   "
              + ("" if verbose else f"logs: {log_path}   ") + "Ctrl-C stops\n")
    out.flush()

    # Without --verbose the daemon's logs (all processes: they inherit stderr) go to a file, the terminal
    # shows the status line and the defects.
    saved_err = None
    logf = None
    if not verbose:
        sys.stderr.flush()
        logf = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed below
        saved_err = os.dup(2)
        os.dup2(logf.fileno(), 2)
        level, fmt = "INFO", "json"
    setup_logging("supervisor", level=level, fmt=fmt)
    sup = Supervisor(settings, checkpoint=checkpoint_summary(model), log_level=level,
                     log_format="json" if fmt == "auto" else fmt)
    monitor = DemoMonitor(sup, plc, settings.store.path, url, out, auto_ack_s=args.auto_ack).start()
    try:
        rc = sup.run(duration_s=args.duration)
    finally:
        monitor.stop()
        plc.stop()
        if saved_err is not None:
            sys.stderr.flush()
            os.dup2(saved_err, 2)
            os.close(saved_err)
        if logf is not None:
            logf.close()
        setup_logging("demo", level=args.log_level or "WARNING", fmt=args.log_format or settings.logging.format)
    summary = monitor.summary()
    summary["exit_code"] = rc
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    cov = summary["coverage"]
    out.write(f"demo stopped after {summary['seconds']:.0f} s: {summary['inspected']} frames inspected, coverage "
              f"{fmt_coverage(cov)}, {summary['events']} defect event(s), "
              f"{summary['stops']} stop(s) on the simulated PLC\n"
              f"look them up: KNITWATCH_STORE__PATH={settings.store.path} knitwatch defects list\n")
    if summary["lost_in_flight"]:
        out.write(f"{summary['lost_in_flight']} frame(s) lost in flight when a stage died (see {log_path})\n")
    if cov is not None and cov < 0.95:
        out.write(f"this CPU did not keep up at {fps:g} fps (coverage {fmt_coverage(cov)}): try --fps {fps / 2:g}\n")
    if rc != 0 and not verbose:
        out.write(f"the daemon failed (exit code {rc}): see {log_path}\n")
    return rc


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo",
        help="the daemon, web page and a simulated PLC on a simulated knitting machine (trains a small model once)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--config", type=Path, metavar="PATH", default=argparse.SUPPRESS,
                   help="TOML config (its cameras, model, store, plc and api are replaced by the demo's)")
    d.add_argument("--workdir", type=Path, default=Path("knitwatch-demo"),
                   help="where the demo keeps its model, store, logs and decisions (default ./knitwatch-demo)")
    d.add_argument("--model", type=Path, help="use this checkpoint instead of the demo model")
    d.add_argument("--steps", type=int, default=200, help="training steps of the demo model (default 200)")
    d.add_argument("--train-frames", type=int, default=TRAIN_FRAMES, help=argparse.SUPPRESS)
    d.add_argument("--fps", type=float, default=None,
                   help="simulated camera frame rate (default 1 on a CPU, which a 2-core CPU keeps up with; "
                   "10 with a GPU)")
    d.add_argument("--duration", "--seconds", dest="duration", type=float, default=None, metavar="S",
                   help="stop after S seconds (default: run until Ctrl-C)")
    d.add_argument("--host", default="127.0.0.1",
                   help="address of the web page (default 127.0.0.1; any other needs --token)")
    d.add_argument("--port", type=int, default=8080, help="port of the web page (default 8080; 0 or busy: a free one)")
    d.add_argument("--token", default=None, help="API token (required with --host other than loopback)")
    d.add_argument("--plc-port", type=int, default=0, help="port of the simulated PLC (default: a free one)")
    d.add_argument("--auto-ack", type=float, default=0.0, metavar="S",
                   help="acknowledge a stop after S seconds, as an operator would (default 0: never; use the page)")
    d.add_argument("--verbose", action="store_true", help="daemon logs on the terminal instead of WORKDIR/daemon.log")
    d.add_argument("--quiet", action="store_true", help="no training progress bar")
    d.set_defaults(func=cmd_demo)
