"""The supervisor: starts the stage processes, watches their heartbeats, restarts what dies or
stalls, reports statistics, talks to systemd, and shuts everything down in order.

Start order: alert, tiler, inference workers; the cameras start once every worker has loaded and
warmed up its model (then ``READY=1``), so no frame is captured that nobody can inspect. Shutdown
order (SIGTERM/SIGINT): capture, tiler, infer, alert - each stage drains what is in flight within
``drain_s`` before the next one is asked to stop; what does not stop in time is killed.

The HTTP API and web page (:mod:`knitwatch.daemon.api.app`) run in a thread of this process: they read
the stats snapshot and the health computed by the main loop (never the processes themselves) and the
store; the main loop stays the only one that touches the stage processes.
"""

from __future__ import annotations

import collections
import importlib
import multiprocessing as mp
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import zmq

from knitwatch.config import Settings
from knitwatch.daemon.logs import setup_logging
from knitwatch.daemon.telemetry import GpuTelemetry, gpu_stats
from knitwatch.models.articles import SELECTION_FILE, library_dir
from knitwatch.pipeline import security, wire
from knitwatch.pipeline.stages.common import die_with_parent, max_message_bytes, set_max_message_bytes

log = structlog.get_logger(__name__)

LAYERS = ("capture", "tiler", "infer", "alert")
CONTROL_MAX_MESSAGE_BYTES = 4 * 2**20  # a heartbeat (a stage's stats) is a few kB


def sd_notify(message: str) -> bool:
    """Send a datagram to systemd's ``$NOTIFY_SOCKET`` (no-op when not run by systemd)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify failed", error=str(e))
        return False


def run_stage(module: str, name: str, kwargs: dict, log_level: str, log_format: str) -> None:
    """Run one stage in this process, as every stage process does (the target of the processes the
    supervisor spawns): logging for ``name``, then ``module``'s ``run(name=name, **kwargs)``; exits
    with its return code, 1 (and the traceback logged) when it raises.

    The first thing it does is to tie its life to the supervisor's: a stage that is still starting (an
    inference worker loading its model takes seconds) must not outlive a supervisor killed meanwhile,
    or it would join the next daemon with the old checkpoint."""
    die_with_parent(os.getppid())
    setup_logging(name, level=log_level, fmt=log_format)
    kwargs = dict(kwargs)
    limit = kwargs.pop("_max_message_bytes", None)
    if limit is None:  # from the stage's own camera settings (a stage started without a supervisor)
        cams = kwargs.get("cameras") or ([kwargs["camera"]] if "camera" in kwargs else [])
        limit = max_message_bytes(cams) if cams else None
    if limit is not None:
        set_max_message_bytes(limit)
    try:
        rc = importlib.import_module(module).run(name=name, **kwargs)
    except Exception:
        structlog.get_logger("knitwatch.stage").exception("stage crashed", stage_name=name)
        rc = 1
    sys.exit(rc)


@dataclass
class StageSpec:
    name: str
    layer: str
    module: str
    kwargs: dict


@dataclass
class StageProc:
    spec: StageSpec
    process: Any = None
    started_at: float = 0.0
    last_beat: float = 0.0
    stats: dict = field(default_factory=dict)
    restarts: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))
    restart_count: int = 0
    restart_at: float | None = None
    backoff: float = 1.0
    pid: int | None = None


class Counter:
    """Cumulative counter across process restarts (a stage's counters start again at 0)."""

    def __init__(self) -> None:
        self.base = 0
        self.last = 0

    def update(self, value: int) -> int:
        if value < self.last:
            self.base += self.last
        self.last = value
        return self.base + value


class GiveUp(Exception):
    pass


def _count(stats: dict, key: str) -> int:
    """A counter of a stage's heartbeat (a free key there may hold anything: not a count is 0)."""
    v = stats.get(key, 0)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def frames_held(layer: str, stats: dict) -> int:
    """Frames a stage had taken and not yet passed on, by its last heartbeat: lost if it dies now.

    capture: captured, not sent and not dropped (its queue); tiler: the tiled frames waiting for a worker;
    infer: the tiles messages taken (``taken``) less the results sent, the ones refused and the ones given
    up at shutdown; alert: results taken less the frames decided and those of unknown cameras. A frame
    taken after the last heartbeat is not seen (the count is a lower bound; one frame per stage at most)."""
    if layer == "capture":
        n = _count(stats, "captured") - _count(stats, "sent") - _count(stats, "dropped")
    elif layer == "tiler":
        n = _count(stats, "waiting_frames")
    elif layer == "infer":
        reasons = stats.get("bad_message_reasons")
        refused = _count(reasons, "tiles.model") if isinstance(reasons, dict) else 0
        n = _count(stats, "taken") - _count(stats, "frames") - refused - _count(stats, "lost_at_shutdown")
    elif layer == "alert":
        n = _count(stats, "taken") - _count(stats, "inspected") - _count(stats, "unknown_camera")
    else:
        n = 0
    return max(0, n)


class Supervisor:
    def __init__(self, settings: Settings, *, checkpoint: dict, log_level: str = "INFO", log_format: str = "json",
                 run_dir: Path | None = None) -> None:
        self.settings = settings
        self.ckpt = checkpoint  # {"path", "preprocess", "thresholds"}
        self.log_level, self.log_format = log_level, log_format
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.run_dir = run_dir or self._runtime_dir()
        self.endpoints = {
            "control": f"ipc://{self.run_dir}/control.sock",
            "frames": f"ipc://{self.run_dir}/frames.sock",
            "tiles": settings.inference.tiles_endpoint or f"ipc://{self.run_dir}/tiles.sock",
            "results": settings.inference.results_endpoint or f"ipc://{self.run_dir}/results.sock",
        }
        # tcp:// worker links need CURVE keys (or allow_insecure_tcp): refused here, before any process starts
        self.links = security.check_daemon_links(settings.inference)
        self.mp = mp.get_context("spawn")
        self.procs: dict[str, StageProc] = {s.name: StageProc(s) for s in self.specs()}
        self.stop_signal: int | None = None
        self.ready = False
        self.ready_at: float | None = None
        self._camera_progress: dict[str, tuple[int, float]] = {}  # capture stage -> (frames captured, when it changed)
        self.started = time.monotonic()
        self.snapshot: dict[str, Any] = {}
        self._health: dict[str, Any] = {"healthy": False, "ready": False, "stopping": False, "stages": {}}
        self.gpu = GpuTelemetry()
        self.api: Any = None  # knitwatch.daemon.api.app.ApiServer while serving
        self._totals: dict[tuple[str, str], Counter] = collections.defaultdict(Counter)
        self._window: collections.deque = collections.deque(maxlen=12)  # (t, {cam: (captured, inspected)})
        self.bad_control: collections.Counter[str] = collections.Counter()  # dropped control messages by reason
        self.lost_in_flight: collections.Counter[str] = collections.Counter()  # per stage: frames it died with
        self._bad_control_logged = 0.0

    def _runtime_dir(self) -> Path:
        d = self.settings.daemon.runtime_dir or os.environ.get("RUNTIME_DIRECTORY")
        if d:
            p = Path(str(d).split(":")[0])
            p.mkdir(parents=True, exist_ok=True)
            return p
        self._tmp = tempfile.TemporaryDirectory(prefix="knitwatch-")
        return Path(self._tmp.name)

    # ------------------------------------------------------------------ stages
    def specs(self) -> list[StageSpec]:
        """The stage processes and their arguments: the settings' sections themselves (pydantic models
        pickle, so a spawned stage gets the same typed objects)."""
        s = self.settings
        ep = self.endpoints
        library = library_dir(s)
        selection = str(library / SELECTION_FILE)
        model_id = str(self.ckpt.get("id") or self.ckpt["path"])
        out = [
            StageSpec("alert", "alert", "knitwatch.pipeline.stages.alert", {
                "results_endpoint": ep["results"], "thresholds": self.ckpt["thresholds"],
                "alert": s.alert, "cameras": s.cameras, "plc": s.plc, "store": s.store,
                "model": {"kind": self.ckpt.get("kind"), "path": self.ckpt["path"], "id": self.ckpt.get("id")},
                "inference": s.inference, "selection": selection, "library": str(library),
            }),
            StageSpec("tiler", "tiler", "knitwatch.pipeline.stages.tiler", {
                "frames_endpoint": ep["frames"], "tiles_endpoint": ep["tiles"], "preprocess": self.ckpt["preprocess"],
                "cameras": s.cameras, "tiling": s.tiling, "inference": s.inference, "model_id": model_id,
                "selection": selection,
            }),
        ]
        for i in range(s.inference.workers):
            out.append(StageSpec(f"infer.{i}", "infer", "knitwatch.pipeline.stages.infer", {
                "tiles_endpoint": ep["tiles"], "results_endpoint": ep["results"], "checkpoint": self.ckpt["path"],
                "inference": s.inference, "model_id": model_id, "selection": selection,
            }))
        for cam in s.cameras:
            out.append(StageSpec(f"capture.{cam.id}", "capture", "knitwatch.pipeline.stages.capture", {
                "camera": cam, "frames_endpoint": ep["frames"],
            }))
        return out

    def _start(self, sp: StageProc) -> None:
        kwargs = {"control_endpoint": self.endpoints["control"], **sp.spec.kwargs,
                  "_max_message_bytes": max_message_bytes(self.settings.cameras)}
        p = self.mp.Process(target=run_stage, name=f"knitwatch-{sp.spec.name}",
                            args=(sp.spec.module, sp.spec.name, kwargs, self.log_level, self.log_format))
        p.start()
        sp.process, sp.pid = p, p.pid
        sp.started_at = sp.last_beat = time.monotonic()
        sp.restart_at = None
        sp.stats = {}
        log.info("stage spawned", stage_name=sp.spec.name, child_pid=p.pid)

    def _alive(self, sp: StageProc) -> bool:
        return sp.process is not None and sp.process.is_alive()

    def _count_lost(self, sp: StageProc) -> int:
        """The frames a dead stage held (by its last heartbeat), counted as lost in flight."""
        n = frames_held(sp.spec.layer, sp.stats)
        if n:
            self.lost_in_flight[sp.spec.name] += n
        sp.stats = {k: v for k, v in sp.stats.items() if k == "ready"}  # counted once
        return n

    def _schedule_restart(self, sp: StageProc, reason: str) -> None:
        now = time.monotonic()
        sp.restarts.append(now)
        sp.restart_count += 1
        recent = sum(1 for t in sp.restarts if now - t < 60)
        limit = self.settings.daemon.max_restarts_per_minute
        lost = self._count_lost(sp)
        log.error("stage failed, restarting", stage_name=sp.spec.name, reason=reason, restarts=sp.restart_count,
                  retry_in_s=sp.backoff, frames_lost_in_flight=lost)
        if recent > limit:
            raise GiveUp(f"stage {sp.spec.name} failed {recent} times within a minute (limit {limit}): giving up")
        sp.restart_at = now + sp.backoff
        sp.backoff = min(sp.backoff * 2, 30.0)

    def _watch(self) -> None:
        now = time.monotonic()
        d = self.settings.daemon
        for sp in self.procs.values():
            if sp.process is None:
                continue
            if sp.restart_at is not None:
                if now >= sp.restart_at:
                    self._start(sp)
                continue
            if not sp.process.is_alive():
                self._schedule_restart(sp, f"exited with code {sp.process.exitcode}")
                continue
            # a stage that has not sent its first heartbeat is still starting (importing torch, loading a model)
            ready = bool(sp.stats) and sp.stats.get("ready", True)
            limit = d.startup_grace_s if not ready else d.stall_s
            if now - sp.last_beat > limit:
                sp.process.kill()
                sp.process.join(5)
                self._schedule_restart(sp, f"no heartbeat for {now - sp.last_beat:.1f} s")
            elif sp.last_beat - sp.started_at > 30 and sp.backoff > 1.0:
                sp.backoff = 1.0  # ran well for a while: the next failure restarts quickly again

    def healthy(self) -> bool:
        now = time.monotonic()
        return all(
            sp.process is not None and sp.process.is_alive() and sp.restart_at is None
            and now - sp.last_beat <= self.settings.daemon.stall_s and sp.stats.get("ready", True)
            for sp in self.procs.values()
        )

    def _update_health(self) -> None:
        """Per-stage health for the API (computed here, in the main loop, so that no other thread
        ever polls the stage processes)."""
        now = time.monotonic()
        stages = {}
        for name, sp in self.procs.items():
            alive = self._alive(sp)
            ready = bool(sp.stats.get("ready", True))
            age = now - sp.last_beat if sp.process is not None else None
            ok = alive and sp.restart_at is None and age is not None and age <= self.settings.daemon.stall_s and ready
            stages[name] = {"healthy": ok, "alive": alive, "ready": ready, "restarting": sp.restart_at is not None,
                            "last_heartbeat_s": None if age is None else round(age, 2),
                            "restarts": sp.restart_count}
        alert = self.procs.get("alert")
        # the alert stage's action runner says what is degraded: PLC unreachable, store or latch file unusable
        degraded = [str(r) for r in ((alert.stats.get("actions") or {}).get("degraded") or [])] if alert else []
        degraded += self._silent_cameras(now)
        self._health = {"healthy": all(s["healthy"] for s in stages.values()) and self.stop_signal is None,
                        "ready": self.ready, "stopping": self.stop_signal is not None, "stages": stages,
                        "degraded": degraded}

    def _silent_cameras(self, now: float) -> list[str]:
        """Cameras that have delivered no new frame for ``stall_s`` while the daemon inspects (a camera
        that never delivered one included): its coverage says nothing, so health must."""
        out = []
        for name, sp in self.procs.items():
            if sp.spec.layer != "capture":
                continue
            n = int(sp.stats.get("captured", 0) or 0)
            last = self._camera_progress.get(name)
            if last is None or n != last[0]:
                self._camera_progress[name] = last = (n, now)
            since = max(last[1], self.ready_at or now)
            if self.ready_at is not None and now - since > self.settings.daemon.stall_s:
                cam = sp.spec.kwargs["camera"].id
                out.append(f"camera {cam}: no frame for {now - since:.0f} s"
                           + (" (none since the start)" if n == 0 else ""))
        return out

    # the API's view of the daemon (read from the API's thread)
    def stats_snapshot(self) -> dict[str, Any]:
        return self.snapshot

    def health(self) -> dict[str, Any]:
        return self._health

    # ------------------------------------------------------------------ statistics
    def _collect(self, ctl: zmq.Socket, timeout_ms: int) -> None:
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            if not ctl.poll(max(0, left)):
                return
            try:  # every field checked by the heartbeat's schema (wire.decode): a bad message is dropped
                msg = wire.recv(ctl)
                if msg.kind != "heartbeat":
                    raise wire.WireError(f"a {msg.kind} message on the control socket", f"unexpected.{msg.kind}")
                sp = self.procs.get(msg["stage"])
                if sp is None:
                    raise wire.WireError(f"heartbeat from unknown stage {msg['stage']!r}", "heartbeat.unknown_stage")
            except wire.WireError as e:
                self._bad_control(e)
                continue
            if sp.process is not None and msg["pid"] == sp.process.pid:
                sp.last_beat = time.monotonic()
                sp.stats = msg["stats"]

    def _bad_control(self, e: wire.WireError) -> None:
        """Count a control message that cannot be used (by reason); log at most once a second."""
        self.bad_control[e.reason] += 1
        now = time.monotonic()
        if now - self._bad_control_logged >= 1.0:
            self._bad_control_logged = now
            log.warning("bad control message dropped", reason=e.reason, detail=str(e)[:300],
                        count=sum(self.bad_control.values()))

    def _stats(self) -> dict[str, Any]:
        now = time.monotonic()
        stages = {}
        captured: dict[str, int] = {}
        inspected: dict[str, int] = {}
        for name, sp in self.procs.items():
            st = dict(sp.stats)
            stages[name] = {"pid": sp.pid, "alive": self._alive(sp), "restarts": sp.restart_count,
                            "last_heartbeat_s": round(now - sp.last_beat, 2), **st}
            if sp.spec.layer == "capture":
                cam = sp.spec.kwargs["camera"].id
                captured[cam] = self._totals[(name, "captured")].update(int(st.get("captured", 0)))
                self._totals[(name, "dropped")].update(int(st.get("dropped", 0)))
            if sp.spec.layer == "alert":
                for cam, cs in st.get("cameras", {}).items():
                    inspected[cam] = self._totals[(f"alert/{cam}", "inspected")].update(int(cs["inspected"]))
                    self._totals[(f"alert/{cam}", "events")].update(int(cs.get("events", 0)))
        self._window.append((now, {c: (captured.get(c, 0), inspected.get(c, 0)) for c in captured}))
        cameras = {}
        t0, first = self._window[0]
        for cam, (cap, ins) in self._window[-1][1].items():
            cap0, ins0 = first.get(cam, (0, 0))
            dcap, dins = cap - cap0, ins - ins0
            coverage = min(1.0, dins / dcap) if dcap > 0 else None
            alert_cam = stages.get("alert", {}).get("cameras", {}).get(cam, {})
            cameras[cam] = {
                "captured": cap,
                "inspected": ins,
                "dropped": self._totals[(f"capture.{cam}", "dropped")].update(
                    int(self.procs[f"capture.{cam}"].stats.get("dropped", 0))),
                "fps": round(dcap / (now - t0), 2) if now > t0 else None,
                "coverage": None if coverage is None else round(coverage, 4),
                "latency_ms": alert_cam.get("latency_ms", {}),
                "events": self._totals[(f"alert/{cam}", "events")].update(int(alert_cam.get("events", 0))),
                "inspected_s": round(now - self.ready_at, 3) if self.ready_at is not None else None,
                "model": stages.get("tiler", {}).get("camera_models", {}).get(cam),  # the model its frames go to now
            }
        model_ms = [s.get("model_ms", {}).get("p50") for n, s in stages.items() if n.startswith("infer")]
        out = {
            "uptime_s": round(now - self.started, 1),
            "ready": self.ready,
            "healthy": self.healthy(),
            "cameras": cameras,
            "stages": stages,
            "model_ms_p50": [m for m in model_ms if m is not None],
            "bad_control_messages": dict(self.bad_control),
            "lost_in_flight": {"total": sum(self.lost_in_flight.values()), "by_stage": dict(self.lost_in_flight)},
            "stats_time": time.time(),
        }
        gpu = gpu_stats(self.gpu, stages, {sp.pid for sp in self.procs.values() if sp.pid is not None})
        if gpu is not None:  # absent, not an error, on a host without a GPU
            out["gpu"] = gpu
        if self.api is not None:
            out["api"] = {"url": self.api.url}
        return out

    def _report(self) -> None:
        self.snapshot = self._stats()
        extra = {"gpu": self.snapshot["gpu"]} if "gpu" in self.snapshot else {}
        if self._health.get("degraded"):
            extra["degraded"] = self._health["degraded"]
        if self.lost_in_flight:
            extra["lost_in_flight"] = self.snapshot["lost_in_flight"]
        log.info("stats", cameras=self.snapshot["cameras"], healthy=self.snapshot["healthy"],
                 restarts={n: sp.restart_count for n, sp in self.procs.items() if sp.restart_count}, **extra)
        for cam, c in self.snapshot["cameras"].items():
            if c["coverage"] is not None and c["coverage"] < self.settings.daemon.coverage_warn:
                log.warning("inspection coverage is low: defects may pass uninspected", camera=cam,
                            coverage=c["coverage"], dropped=c["dropped"])

    # ------------------------------------------------------------------ run
    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stop_signal = signum

    def _start_api(self) -> None:
        """Serve the HTTP API and web page (``[api]``). A failure is loud but never stops inspection; an
        unreadable token file means no API at all (never an unprotected one)."""
        if not self.settings.api.enabled:
            return
        try:
            from knitwatch.daemon.api.app import start_api
            from knitwatch.daemon.api.security import ApiError
        except ImportError as e:
            log.error("HTTP API not started: a package is missing", error=str(e))
            return
        try:
            self.api = start_api(self.settings, self)
        except ApiError as e:
            log.error("HTTP API not started (inspection goes on without it)", error=str(e))
            self.api = None

    def _stop_api(self) -> None:
        if self.api is not None:
            self.api.stop()
            self.api = None

    def run(self, duration_s: float | None = None) -> int:
        """Run until SIGTERM/SIGINT or ``duration_s`` (exit 0), or until a stage fails too often (exit 1)."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        zctx = zmq.Context()
        ctl = zctx.socket(zmq.PULL)
        ctl.setsockopt(zmq.LINGER, 0)
        ctl.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAX_MESSAGE_BYTES)  # heartbeats are small: no peer makes us allocate
        ctl.bind(self.endpoints["control"])
        code = 0
        try:
            self.snapshot = {"uptime_s": 0.0, "ready": False, "healthy": False, "cameras": {}, "stages": {}}
            self._start_api()
            for sp in self.procs.values():
                if sp.spec.layer != "capture":
                    self._start(sp)
            watchdog_s = int(os.environ.get("WATCHDOG_USEC", "0")) / 2e6
            last_stats = last_dog = time.monotonic()
            while self.stop_signal is None:
                if duration_s is not None and time.monotonic() - self.started >= duration_s:
                    self.stop_signal = signal.SIGTERM
                    break
                self._collect(ctl, 200)
                if not self.ready and all(
                    sp.stats.get("ready") for sp in self.procs.values() if sp.spec.layer == "infer"
                ) and all(self._alive(sp) for sp in self.procs.values() if sp.spec.layer != "capture"):
                    for sp in self.procs.values():
                        if sp.spec.layer == "capture":
                            self._start(sp)
                    self.ready = True
                    self.ready_at = time.monotonic()
                    sd_notify("READY=1\nSTATUS=inspecting")
                    log.info("daemon ready", cameras=[c.id for c in self.settings.cameras],
                             run_dir=str(self.run_dir))
                self._watch()
                self._update_health()
                now = time.monotonic()
                if watchdog_s and now - last_dog >= watchdog_s and self.healthy():
                    sd_notify("WATCHDOG=1")
                    last_dog = now
                if now - last_stats >= self.settings.daemon.stats_interval_s:
                    self._report()
                    last_stats = now
        except GiveUp as e:
            log.critical(str(e))
            sd_notify(f"STATUS={e}")
            code = 1
        finally:
            sd_notify("STOPPING=1")
            self._update_health()
            self.shutdown(ctl)
            self._update_health()
            self._stop_api()
            self.gpu.close()
            ctl.close()
            zctx.term()
            if self._tmp is not None:
                self._tmp.cleanup()
        log.info("daemon stopped", exit_code=code, signal=self.stop_signal)
        return code

    def shutdown(self, ctl: zmq.Socket | None = None) -> None:
        drain = self.settings.daemon.drain_s
        for layer in LAYERS:
            group = [sp for sp in self.procs.values() if sp.spec.layer == layer and self._alive(sp)]
            for sp in group:
                os.kill(sp.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + drain
            for sp in group:
                while sp.process.is_alive() and time.monotonic() < deadline:
                    if ctl is not None:
                        self._collect(ctl, 50)
                    else:
                        sp.process.join(0.05)
                if sp.process.is_alive():
                    sp.process.kill()
                    log.warning("stage did not stop in time, killed", stage_name=sp.spec.name,
                                frames_lost_in_flight=self._count_lost(sp))
                sp.process.join(5)
        if ctl is not None:
            self._collect(ctl, 0)
        self.snapshot = self._stats()
        log.info("final stats", cameras=self.snapshot["cameras"], lost_in_flight=self.snapshot["lost_in_flight"])
