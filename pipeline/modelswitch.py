"""Which model each camera uses, as the running stages see it: switching models without a restart.

The daemon starts with its configured checkpoint (the *default* model). The model library's selection
file (``active.json``, written by ``knitwatch model use|rollback``, the API or ``learn train --use``;
see :mod:`knitwatch.models.articles`) may name another model per camera. The tiler, the inference
workers and the alert stage each poll that file's modification time (at most once a second) and
switch in this order, so that no frame is dropped or inspected by the wrong model:

1. an inference worker loads every selected model *beside* the ones it has (in a thread: inspection
   goes on with the old model meanwhile), and lists the models it can run in each credit it sends;
2. the tiler changes a camera over at a frame boundary once a worker lists the new model: the next
   frame is cut with the new model's preprocessing and tagged with its id (header ``model``); frames
   already tiled keep the old id, and each frame goes only to a worker that has its model;
3. the worker runs each frame with the model of its tag (one model per forward pass), and the result
   carries the tag on to the alert stage, which judges it with that model's thresholds and records the
   model in every decision and event.

A selection file that cannot be read keeps the last good selection (counted, logged).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import structlog

from knitwatch.models.articles import LibraryError, read_selection

log = structlog.get_logger(__name__)


class ModelSelection:
    """The model of each camera: the selection file's choice, else ``default`` (a checkpoint summary:
    path, id, kind, preprocess, thresholds)."""

    def __init__(self, path: Path | str | None, default: dict[str, Any], *, poll_s: float = 1.0) -> None:
        self.path = Path(path) if path else None
        self.default = dict(default)
        self.poll_s = poll_s
        self.errors = 0
        self._stamp: tuple[int, int] | None = None
        self._next = 0.0
        self._cameras: dict[str, dict[str, Any]] = {}
        self.poll(force=True)

    def poll(self, *, force: bool = False) -> bool:
        """Re-read the selection when its file changed (at most every ``poll_s``); True when it did."""
        now = time.monotonic()
        if self.path is None or (not force and now < self._next):
            return False
        self._next = now + self.poll_s
        try:
            st = self.path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        except OSError:
            return False
        if stamp == self._stamp and not force:
            return False
        self._stamp = stamp
        if stamp is None:
            changed = bool(self._cameras)
            self._cameras = {}
            return changed
        try:
            sel = read_selection(self.path)
            cams = {cam: dict(entry["model"]) for cam, entry in sel["cameras"].items()
                    if isinstance(entry, dict) and _usable(entry.get("model"))}
        except (LibraryError, KeyError, TypeError) as e:
            self.errors += 1
            log.warning("model selection unreadable: the cameras keep their models", path=str(self.path),
                        error=str(e)[:300])
            return False
        changed = cams != self._cameras
        self._cameras = cams
        return changed

    def model_for(self, camera: str) -> dict[str, Any]:
        return self._cameras.get(camera, self.default)

    def wanted(self) -> dict[str, dict[str, Any]]:
        """Every model some camera uses, and the default: id -> summary."""
        out = {self.default["id"]: self.default}
        for m in self._cameras.values():
            out.setdefault(m["id"], m)
        return out

    def find(self, model_id: str) -> dict[str, Any] | None:
        return self.wanted().get(model_id)


def _usable(m: Any) -> bool:  # noqa: ANN401 - a JSON value
    return (isinstance(m, dict) and isinstance(m.get("id"), str) and isinstance(m.get("path"), str)
            and isinstance(m.get("preprocess"), dict) and isinstance(m.get("thresholds"), dict))


def model_info(m: dict[str, Any]) -> dict[str, Any]:
    """What a decision or an event records about the model that made it."""
    return {k: m[k] for k in ("id", "kind", "path", "article", "version") if k in m}
