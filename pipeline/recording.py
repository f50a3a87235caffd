"""Recordings of normal fabric for learning a new article (``knitwatch learn record``).

A recording is a folder::

    frames/000000.png ...    the frames, lossless (PNG), as the camera delivered them
    frames.jsonl             one line per frame: index, file, seq, t_wall_ns, pos (the fabric position)
    meta.json                article, camera, how it was recorded (daemon | camera), status
                             (recording | done | failed | cancelled), frames, whole revolutions,
                             frames left out because the running model flagged them

Frames are recorded over whole revolutions: ``revolutions`` counts the revolutions seen from their
start to their end (the first, entered in its middle, does not count), so the cutline and the whole
circumference are in, and whole revolutions can be held back for validation.

The same writer serves both ways of recording: directly from a camera (the daemon not running) and
inside the running daemon's alert stage, which gets each frame with its decision and records only
frames the current model did not flag. The daemon is asked through a request file per camera in the
model library (``<library>/recording/<camera>.json``), polled by the alert stage.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

from knitwatch.models.articles import check_article, now_iso, write_json_atomic

REQUEST_DIR = "recording"
log = structlog.get_logger(__name__)


class RecordingError(RuntimeError):
    """A recording cannot be written or read (disk full, folder not writable, missing files)."""


def revolution_of(pos: Any) -> int | None:  # noqa: ANN401 - a frame header's pos (or anything)
    """The revolution of a frame's position when it is known and trusted, else None."""
    if not isinstance(pos, dict) or not pos.get("ok", False):
        return None
    rev = pos.get("rev")
    return rev if isinstance(rev, int) and not isinstance(rev, bool) else None


class RecordingWriter:
    def __init__(self, folder: Path | str, *, article: str, camera: str, how: str,
                 target_frames: int = 0, min_revolutions: int = 0, max_seconds: float | None = None) -> None:
        self.folder = Path(folder)
        self.meta: dict[str, Any] = {
            "article": check_article(article), "camera": camera, "how": how, "status": "recording",
            "started": now_iso(), "frames": 0, "revolutions": 0, "skipped_flagged": 0, "skipped_no_position": 0,
            "target_frames": int(target_frames), "min_revolutions": int(min_revolutions),
        }
        self.max_seconds = max_seconds
        self.t0 = self._meta_at = time.monotonic()
        self.first_rev: int | None = None
        self.current_rev: int | None = None
        try:
            (self.folder / "frames").mkdir(parents=True, exist_ok=False)
            self._lines = (self.folder / "frames.jsonl").open("w", encoding="utf-8")
            self._write_meta()
        except OSError as e:
            raise RecordingError(f"cannot create the recording in {self.folder}: {e}") from None

    # ------------------------------------------------------------------ progress
    @property
    def frames(self) -> int:
        return int(self.meta["frames"])

    @property
    def revolutions(self) -> int:
        return int(self.meta["revolutions"])

    def _write_meta(self) -> None:
        self._meta_at = time.monotonic()
        write_json_atomic(self.folder / "meta.json", self.meta)

    def _progress(self) -> None:
        """meta.json at most once a second while recording: the progress others read."""
        if time.monotonic() - self._meta_at >= 1.0:
            with contextlib.suppress(OSError):
                self._write_meta()

    def enough(self) -> bool:
        """Enough frames (``target_frames``) over enough whole revolutions (``min_revolutions``), or the time
        is up (``max_seconds``, still over whole revolutions)."""
        revs_ok = self.revolutions >= self.meta["min_revolutions"]
        if self.max_seconds is not None:
            return revs_ok and time.monotonic() - self.t0 >= self.max_seconds
        return revs_ok and self.frames >= self.meta["target_frames"]

    # ------------------------------------------------------------------ frames
    def would_end(self, pos: Any) -> bool:  # noqa: ANN401
        """True when this frame starts a new revolution and the recording has enough: it ends before it."""
        rev = revolution_of(pos)
        return rev is not None and self.current_rev is not None and rev > self.current_rev and self._enough_after(rev)

    def _enough_after(self, rev: int) -> bool:
        revolutions = self._whole(rev)
        if revolutions < self.meta["min_revolutions"]:
            return False
        if self.max_seconds is not None:
            return time.monotonic() - self.t0 >= self.max_seconds
        return self.frames >= self.meta["target_frames"]

    def _whole(self, rev: int) -> int:
        """Whole revolutions recorded when a frame of revolution ``rev`` arrives."""
        if self.first_rev is None:
            return 0
        return max(0, rev - self.first_rev - 1)

    def add(self, frame: np.ndarray, *, seq: int, pos: Any, t_wall_ns: int) -> bool:  # noqa: ANN401
        """Record one frame. Returns True when the recording is complete (this frame began a new
        revolution after enough: it is not recorded, the recording is finished)."""
        rev = revolution_of(pos)
        if rev is not None and self.current_rev is not None and rev > self.current_rev:
            self.meta["revolutions"] = self._whole(rev)
            if self._enough_after(rev):
                self.finish("done")
                return True
        if rev is not None:
            if self.first_rev is None:
                self.first_rev = rev
            self.current_rev = rev if self.current_rev is None else max(self.current_rev, rev)
        i = self.frames
        name = f"frames/{i:06d}.png"
        try:
            ok, png = cv2.imencode(".png", frame)
            if not ok:
                raise OSError("the PNG encoder failed")
            with open(self.folder / name, "wb") as f:  # a full disk is an OSError here (ENOSPC)
                f.write(png.tobytes())
            self._lines.write(json.dumps({"i": i, "file": name, "seq": int(seq), "t_wall_ns": int(t_wall_ns),
                                          "pos": pos if isinstance(pos, dict) else None}) + "\n")
            self._lines.flush()
        except (OSError, cv2.error) as e:
            with contextlib.suppress(OSError):
                (self.folder / name).unlink()
            self.finish("failed", error=f"cannot write frame {i}: {e}")
            raise RecordingError(f"recording {self.folder}: cannot write frame {i}: {e}") from None
        self.meta["frames"] = i + 1
        self._progress()
        return False

    def skipped(self, reason: str) -> None:
        """A frame left out: ``flagged`` by the running model, or ``no_position``."""
        self.meta[f"skipped_{reason}"] = int(self.meta.get(f"skipped_{reason}", 0)) + 1
        self._progress()

    def finish(self, status: str, *, error: str | None = None) -> None:
        if self.meta["status"] != "recording":
            return
        self.meta.update(status=status, finished=now_iso(), seconds=round(time.monotonic() - self.t0, 1))
        if error:
            self.meta["error"] = error
        with contextlib.suppress(OSError):
            self._lines.close()
        with contextlib.suppress(OSError):
            self._write_meta()


@dataclass(frozen=True)
class RecordedFrame:
    index: int
    path: Path
    seq: int
    t_wall_ns: int
    pos: dict | None

    @property
    def revolution(self) -> int | None:
        return revolution_of(self.pos)

    def image(self) -> np.ndarray:
        img = cv2.imread(str(self.path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise RecordingError(f"cannot read recorded frame {self.path}")
        return img


class Recording:
    """A finished recording, read back."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
            lines = (self.folder / "frames.jsonl").read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as e:
            raise RecordingError(f"{self.folder} is not a readable recording: {e}") from None
        self.frames = []
        for line in lines:
            if not line.strip():
                continue
            d = json.loads(line)
            self.frames.append(RecordedFrame(int(d["i"]), self.folder / d["file"], int(d["seq"]),
                                             int(d["t_wall_ns"]), d.get("pos")))

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[RecordedFrame]:
        return iter(self.frames)

    def split_revolutions(self, holdout: int) -> tuple[list[RecordedFrame], list[RecordedFrame]]:
        """(training frames, validation frames): the last ``holdout`` whole revolutions are held back (never
        neighbours of training frames: the revolution before them is left out of both), the rest trains.
        Without positions, the last ``holdout`` / (revolutions + 1) of the frames, with a gap of 5 %."""
        revs = sorted({f.revolution for f in self.frames if f.revolution is not None})
        if len(revs) >= holdout + 2:
            held = set(revs[-holdout:])
            gap = revs[-holdout - 1]
            train = [f for f in self.frames if f.revolution is not None and f.revolution < gap]
            val = [f for f in self.frames if f.revolution in held]
            return train, val
        n = len(self.frames)
        cut = n - max(1, n * holdout // (holdout + 2))
        gap = max(1, n // 20)
        return self.frames[: max(0, cut - gap)], self.frames[cut:]


# ---------------------------------------------------------------------- the daemon's part
def request_path(library: Path, camera: str) -> Path:
    return Path(library) / REQUEST_DIR / f"{camera}.json"


def write_request(library: Path, camera: str, *, article: str, folder: Path, target_frames: int,
                  min_revolutions: int, max_seconds: float | None) -> Path:
    """Ask the running daemon to record ``camera`` into ``folder`` (the alert stage picks it up)."""
    path = request_path(library, camera)
    write_json_atomic(path, {"article": check_article(article), "camera": camera, "folder": str(folder),
                             "target_frames": int(target_frames), "min_revolutions": int(min_revolutions),
                             "max_seconds": max_seconds, "requested": now_iso()})
    return path


class DaemonRecorder:
    """The running daemon's part (in the alert stage, which gets every frame with its decision): records the
    frames of the cameras that a request file asks for, leaving out (and counting) the frames the current
    model flags. A request file removed while recording cancels it. A recording that cannot be written
    fails alone (its meta.json says why); inspection never waits for it or stops because of it."""

    def __init__(self, library: Path | str | None, cameras: list[str], *, poll_s: float = 0.5) -> None:
        self.library = Path(library) if library else None
        self.cameras = list(cameras)
        self.poll_s = poll_s
        self._next = 0.0
        self.active: dict[str, tuple[Path, RecordingWriter]] = {}  # camera -> (its request file, writer)
        self.counters: dict[str, int] = {"recordings": 0, "recorded_frames": 0, "skipped_flagged": 0,
                                         "recording_errors": 0}

    def poll(self) -> None:
        now = time.monotonic()
        if self.library is None or now < self._next:
            return
        self._next = now + self.poll_s
        for cam in self.cameras:
            req = request_path(self.library, cam)
            if cam in self.active:
                if not req.exists():
                    self._end(cam, "cancelled")
                continue
            if not req.exists():
                continue
            try:
                r = json.loads(req.read_text(encoding="utf-8"))
                writer = RecordingWriter(r["folder"], article=r["article"], camera=cam, how="daemon",
                                         target_frames=int(r.get("target_frames") or 0),
                                         min_revolutions=int(r.get("min_revolutions") or 0),
                                         max_seconds=r.get("max_seconds"))
            except (OSError, ValueError, KeyError, TypeError, RecordingError) as e:
                self.counters["recording_errors"] += 1
                log.error("recording request refused", camera=cam, request=str(req), error=str(e)[:300])
                with contextlib.suppress(OSError):
                    write_json_atomic(req.with_suffix(".error.json"), {"error": str(e)[:500], "time": now_iso()})
                    req.unlink()
                continue
            self.active[cam] = (req, writer)
            self.counters["recordings"] += 1
            log.info("recording normal fabric for learning", camera=cam, article=r["article"], folder=r["folder"])

    def frame(self, cam: str, frame: np.ndarray, *, seq: int, pos: Any, t_wall_ns: int,  # noqa: ANN401
              flagged: bool, model_article: str | None = None) -> None:
        """One inspected frame; ``flagged``: the running model found a defect region in it; ``model_article``:
        the article that model was learned for (None: the configured checkpoint). Flagged frames are left out
        only when that model knows the recorded article: a model of another fabric (the jersey model after the
        machine changed to pique) flags the new fabric as a whole - its frames are recorded and counted
        (``flagged_kept``)."""
        got = self.active.get(cam)
        if got is None:
            return
        writer = got[1]
        if flagged and model_article == writer.meta["article"]:
            writer.skipped("flagged")
            self.counters["skipped_flagged"] += 1
            return
        if flagged:
            writer.meta["flagged_kept"] = int(writer.meta.get("flagged_kept", 0)) + 1
        try:
            done = writer.add(frame, seq=seq, pos=pos, t_wall_ns=t_wall_ns)
        except RecordingError as e:
            self.counters["recording_errors"] += 1
            log.error("recording failed: inspection goes on", camera=cam, error=str(e)[:300])
            self._end(cam, "failed")
            return
        self.counters["recorded_frames"] += 1
        if done:
            self._end(cam, "done")

    def _end(self, cam: str, status: str) -> None:
        req, writer = self.active.pop(cam)
        writer.finish(status)
        with contextlib.suppress(OSError):
            req.unlink()
        log.info("recording ended", camera=cam, status=status, frames=writer.frames, revolutions=writer.revolutions,
                 skipped_flagged=writer.meta.get("skipped_flagged", 0))

    def stop(self) -> None:
        for cam in list(self.active):
            self._end(cam, "cancelled")

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "active": {cam: {"frames": w.frames, "revolutions": w.revolutions}
                                            for cam, (_r, w) in self.active.items()}}
