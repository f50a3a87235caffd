"""Learn jobs started over the API (``POST /api/learn``): ``knitwatch learn record`` then ``knitwatch learn
train`` as subprocesses of the daemon, one job per camera at a time.

A job runs in a thread of its own: the record command (``--via-daemon``: the running daemon's alert stage
records the frames its current model does not flag, so inspection goes on) and, when it succeeded, the train
command (which trains in a low-priority process of its own, validates on held-back revolutions and installs
the new version, or refuses it with exit code 3). The commands get the daemon's effective settings as a
TOML file in the job's folder (``<library>/jobs/<started>-<camera>/config.toml``, without the API section:
no token is written) and no ``KNITWATCH_*`` environment, so they see what the daemon sees.

States: ``recording`` (frames and revolutions from the recording's ``meta.json``), ``training``
(``progress``: the trainer's progress bar, 0..1, when it shows one), ``validating``, then ``done`` (the
installed version in ``model``), ``refused`` (``reason``), ``failed`` (``error``: the last lines the command
wrote on stderr) or ``cancelled``. Jobs live in memory: a daemon restart forgets them (their folders and
recordings stay). Cancelling interrupts the command as Ctrl-C does (it withdraws the recording request),
then terminates, then kills it; a stopping daemon cancels its jobs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from knitwatch.models.articles import check_article, now_iso
from knitwatch.pipeline.recording import request_path

log = structlog.get_logger(__name__)

KNITWATCH = (sys.executable, "-m", "knitwatch.daemon")
EXIT_REFUSED = 3
RUNNING = ("starting", "recording", "training", "validating")
TAIL_BYTES = 4096
_PERCENT = re.compile(rb"(\d{1,3})%\|")


class JobConflict(RuntimeError):
    """The camera has a learn job running already."""


@dataclass(frozen=True)
class LearnRequest:
    camera: str
    article: str
    frames: int | None = None
    minutes: float | None = None
    model: str | None = None
    steps: int | None = None
    use: bool = False
    by: str = ""


def _tail_lines(data: bytes, n: int = 5) -> list[str]:
    """The last ``n`` non-empty lines (progress bars' carriage returns split lines too)."""
    text = data.decode("utf-8", "replace")
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    return lines[-n:]


def _reason(data: bytes) -> str:
    """What a command said last about why it stopped: its last ``knitwatch:`` line among its last five (a
    message such as ``knitwatch: error: ...``), else its last three lines (a traceback's end)."""
    lines = _tail_lines(data, 5)
    said = [ln for ln in lines if ln.startswith("knitwatch:")]
    if said:
        return said[-1].removeprefix("knitwatch:").strip().removeprefix("error:").strip()
    return " | ".join(lines[-3:]) or "no message"


class LearnJob:
    """One camera's learn job: its commands, its state and its thread."""

    def __init__(self, jobs: LearnJobs, req: LearnRequest, folder: Path) -> None:
        self.jobs = jobs
        self.req = req
        self.folder = folder
        self.recording = jobs.library / "recordings" / req.article / folder.name
        self.state = "starting"
        self.started = now_iso()
        self.finished: str | None = None
        self.model: str | None = None
        self.reason: str | None = None
        self.error: str | None = None
        self.result: dict[str, Any] = {}
        self.progress: float | None = None
        self._validating = False
        self._cancel = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._run, name=f"learn-{req.camera}", daemon=True)

    # ------------------------------------------------------------------ commands
    def _base(self) -> list[str]:
        return [*self.jobs.command, "--config", str(self.folder / "config.toml")]

    def record_argv(self) -> list[str]:
        r = self.req
        argv = [*self._base(), "learn", "record", "--camera", r.camera, "--article", r.article,
                "--out", str(self.recording), f"--{self.jobs.via}", "--quiet"]
        if r.frames is not None:
            argv += ["--frames", str(r.frames)]
        elif r.minutes is not None:
            argv += ["--minutes", f"{r.minutes:g}"]
        return argv

    def train_argv(self) -> list[str]:
        r = self.req
        argv = [*self._base(), "learn", "train", "--article", r.article, "--recording", str(self.recording), "--json"]
        if r.model:
            argv += ["--model", r.model]
        if r.steps is not None:
            argv += ["--steps", str(r.steps)]
        if r.use:
            argv += ["--use", "--camera", r.camera]
        return argv

    # ------------------------------------------------------------------ running
    @property
    def running(self) -> bool:
        return self.state in RUNNING

    def start(self) -> LearnJob:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.state = "recording"
            rc, _out, err = self._step("record", self.record_argv())
            if self._cancel.is_set():
                return self._end("cancelled")
            if rc != 0:
                self.error = _reason(err)
                return self._end("failed")
            self.state = "training"
            rc, out, err = self._step("train", self.train_argv())
            if self._cancel.is_set():
                return self._end("cancelled")
            with contextlib.suppress(ValueError):
                self.result = json.loads(out.decode("utf-8", "replace") or "{}")
            if rc == 0:
                self.model = self.result.get("model")
                self.progress = 1.0
                return self._end("done")
            if rc == EXIT_REFUSED:
                self.reason = str(self.result.get("refused") or _reason(err))
                return self._end("refused")
            self.error = _reason(err)
            return self._end("failed")
        except Exception as e:  # noqa: BLE001 - a job that cannot run fails alone, with its reason
            self.error = f"{type(e).__name__}: {e}"
            log.exception("learn job failed", camera=self.req.camera)
            return self._end("failed")

    def _end(self, state: str) -> None:
        self.state = state
        self.finished = now_iso()
        log.info("learn job ended", camera=self.req.camera, article=self.req.article, state=state, model=self.model,
                 reason=self.reason, error=self.error)

    def _step(self, name: str, argv: list[str]) -> tuple[int, bytes, bytes]:
        """Run one command to its end (or until cancelled): exit code, stdout, stderr."""
        out_path, err_path = self.folder / f"{name}.out", self.folder / f"{name}.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KNITWATCH_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            if self._cancel.is_set():
                return -1, b"", b""
            self._proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,  # noqa: S603
                                          cwd=self.folder, start_new_session=True)
            seen = 0
            while True:
                try:
                    rc = self._proc.wait(timeout=self.jobs.poll_s)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if self._cancel.is_set():
                    rc = self._stop()
                    break
                seen = self._watch(name, err_path, seen)
            self._watch(name, err_path, seen)
        return rc, out_path.read_bytes(), err_path.read_bytes()

    def _watch(self, name: str, err_path: Path, seen: int) -> int:
        """Follow the train command's stderr: its progress bar and when it validates."""
        if name != "train":
            return seen
        start = max(seen - 64, 0)  # a little overlap: a word cut between two reads is still found
        try:
            with open(err_path, "rb") as f:
                f.seek(start)
                new = f.read()
        except OSError:
            return seen
        if b"validating" in new:
            self._validating = True
            self.state = "validating"
        found = _PERCENT.findall(new)
        if found and not self._validating:
            self.progress = min(int(found[-1]), 100) / 100.0
        return start + len(new)

    def _stop(self) -> int:
        """Ctrl-C (the record command withdraws its request), then SIGTERM, then SIGKILL, to the process group."""
        proc = self._proc
        assert proc is not None
        for sig, wait in ((signal.SIGINT, self.jobs.grace_s), (signal.SIGTERM, self.jobs.grace_s), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                return proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        return -9

    def cancel(self) -> None:
        self._cancel.set()
        req = request_path(self.jobs.library, self.req.camera)
        with contextlib.suppress(OSError, ValueError):  # our recording request: the daemon stops recording
            if Path(json.loads(req.read_text(encoding="utf-8")).get("folder", "")) == self.recording:
                req.unlink()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # ------------------------------------------------------------------ what the API shows
    def _recording_meta(self) -> dict[str, Any]:
        try:
            meta = json.loads((self.recording / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def to_dict(self) -> dict[str, Any]:
        r = self.req
        meta = self._recording_meta()
        out: dict[str, Any] = {
            "camera": r.camera, "article": r.article, "state": self.state, "running": self.running,
            "started": self.started, "finished": self.finished, "by": r.by, "use": r.use,
            "request": {"frames": r.frames, "minutes": r.minutes, "model": r.model, "steps": r.steps},
            "recording": {k: meta.get(k) for k in ("status", "frames", "revolutions", "target_frames",
                                                   "min_revolutions", "skipped_flagged", "error") if k in meta},
            "progress": self.progress, "model": self.model, "reason": self.reason, "error": self.error,
        }
        for k in ("false_stops_per_hour", "simulator_recall", "validation_frames", "train_frames", "kind"):
            if k in self.result:
                out.setdefault("figures", {})[k] = self.result[k]
        return out


class LearnJobs:
    """The learn jobs of a daemon. ``settings``: the daemon's (written for the commands); ``command``: the
    ``knitwatch`` command line (tests give another real program); ``via``: how ``learn record`` records
    (``via-daemon`` in the daemon; ``direct`` from the camera, for a test without a running daemon)."""

    def __init__(self, library: Path | str, settings: Any = None, *,  # noqa: ANN401 - knitwatch.config.Settings
                 command: Sequence[str] = KNITWATCH, via: str = "via-daemon", poll_s: float = 0.5,
                 grace_s: float = 5.0) -> None:
        if via not in ("via-daemon", "direct"):
            raise ValueError(f"via must be 'via-daemon' or 'direct', not {via!r}")
        self.library = Path(library)
        self.via = via
        self.settings = settings
        self.command = list(command)
        self.poll_s = poll_s
        self.grace_s = grace_s
        self._jobs: dict[str, LearnJob] = {}
        self._lock = threading.Lock()

    def _config_text(self) -> str:
        from knitwatch.daemon.cli.common import to_toml

        if self.settings is None:
            return ""
        data = self.settings.model_dump(mode="json")
        data["api"] = {"enabled": False}  # the commands need no API, and no token is written to disk
        return to_toml(data)

    def start(self, req: LearnRequest) -> LearnJob:
        """Start a job; :class:`JobConflict` when the camera has one running, LibraryError for a bad article,
        OSError when the job's folder cannot be written."""
        check_article(req.article)
        with self._lock:
            old = self._jobs.get(req.camera)
            if old is not None and old.running:
                raise JobConflict(f"camera {req.camera} is learning {old.req.article} already ({old.state}): "
                                  "wait for it or cancel it")
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            folder = self.library / "jobs" / f"{stamp}-{req.camera}"
            n = 1
            while folder.exists():
                n += 1
                folder = self.library / "jobs" / f"{stamp}-{n}-{req.camera}"
            folder.mkdir(parents=True)
            fd = os.open(folder / "config.toml", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._config_text())
            job = LearnJob(self, req, folder)
            self._jobs[req.camera] = job
        log.info("learn job started", camera=req.camera, article=req.article, frames=req.frames, minutes=req.minutes,
                 model=req.model, steps=req.steps, use=req.use, by=req.by, folder=str(folder))
        return job.start()

    def get(self, camera: str) -> LearnJob | None:
        with self._lock:
            return self._jobs.get(camera)

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            jobs = list(self._jobs.values())
        return [j.to_dict() for j in sorted(jobs, key=lambda j: j.req.camera)]

    def cancel(self, camera: str, timeout: float | None = None) -> LearnJob | None:
        """Cancel the camera's running job (None when it has none); waits up to ``timeout`` s for its end."""
        job = self.get(camera)
        if job is None or not job.running:
            return None
        job.cancel()
        job.join(timeout)
        return job

    def close(self, timeout: float = 15.0) -> None:
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.running]
        for j in jobs:
            j.cancel()
        for j in jobs:
            j.join(timeout)
