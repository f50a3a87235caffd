"""Inference stage: the batching worker (GPU when there is one, else CPU).

Collects whole frames' tiles until ``max_batch_tiles`` or ``max_wait_ms`` after the first queued
frame (DeepStream's rule), runs them through the model in forward passes of at most
``max_batch_tiles`` tiles - a large frame (a 2048x4096 frame cut into 2016 tiles) is split over
several passes, with a heartbeat between them, so the worker neither runs out of memory nor goes
silent long enough to be taken for stalled - stitches each frame's maps back into frame
coordinates and sends one result per frame. Several workers may take tiles from the same
tiler (this host over ``ipc://`` or others over ``tcp://``); results all go to the one alert stage.

The worker tells the tiler how many tiles it can take (``credit``: room for one batch beyond what it
holds, and how many tiles it has received so far, so the tiler can account for tiles in flight).
So at most the batch being computed and the next one wait here: latency stays bounded by about
two batches however far behind the cameras are.

Several models: the worker runs the daemon's checkpoint and every model the library's selection names
(:mod:`knitwatch.pipeline.modelswitch`); a newly selected model is loaded in a thread beside the others
while inspection goes on, and each credit lists the models ready (``models``). A frame's tiles are run
by the model of its ``model`` tag, one model per forward pass.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import numpy as np
import torch
import zmq

from knitwatch.config.settings import InferenceConfig
from knitwatch.pipeline import wire
from knitwatch.pipeline.decision.regions import frame_score
from knitwatch.pipeline.detector import Detector, load_detector
from knitwatch.pipeline.modelswitch import ModelSelection
from knitwatch.pipeline.preprocess import TileGrid, stitch
from knitwatch.pipeline.stages.common import Stage, percentiles

_BATCH_BINS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class InferStage(Stage):
    def __init__(self, name: str, control_endpoint: str, *, tiles_endpoint: str, results_endpoint: str,
                 checkpoint: str, inference: InferenceConfig, detector: Detector | None = None,
                 model_id: str | None = None, selection: str | None = None) -> None:
        """``model_id``: the checkpoint's id (the tag of frames without one); ``selection``: the model library's
        selection file (models to load beside it)."""
        super().__init__(name, control_endpoint)
        self.inp = self.socket(zmq.DEALER, tiles_endpoint, bind=False, hwm=8, linger_ms=0,  # credits only
                               inference=inference)
        self.out = self.socket(zmq.PUSH, results_endpoint, bind=False, hwm=4, inference=inference)
        self.max_tiles = inference.max_batch_tiles
        self.max_wait_s = inference.max_wait_ms / 1000.0
        self.model_ms: collections.deque[float] = collections.deque(maxlen=500)
        self.batch_hist: collections.Counter[int] = collections.Counter()
        self.extra["ready"] = False
        self.heartbeat(force=True)  # the supervisor sees us alive while the model loads
        self.inference = inference
        self.det = (detector if detector is not None
                    else load_detector(checkpoint, inference.device, inference.backend))
        self.det.warm_up()
        self.default_id = model_id or str(checkpoint)
        self.dets: dict[str, Detector] = {self.default_id: self.det}
        self.selection = ModelSelection(selection, {"id": self.default_id, "path": str(checkpoint)})
        self._loading: dict[str, threading.Thread] = {}
        self._loaded: list[tuple[str, Detector | None, float, str]] = []  # (id, detector, ms, error) from threads
        self._unwanted_since: dict[str, float] = {}
        self._next_follow = 0.0
        self._failed: dict[str, float] = {}  # model id -> when its load failed (retried after a minute)
        self.model_loads: list[dict[str, Any]] = []
        for mid, m in self.selection.wanted().items():  # at start: every selected model before we are ready
            if mid not in self.dets:
                self._load(mid, m["path"])
        self._install_loaded()
        self.extra.update(ready=True, device=self.det.device, model=self.det.kind)
        self.pending: list[wire.Message] = []
        self.first_at = 0.0
        self.received_tiles = 0
        self.last_credit = 0.0
        self._credit()
        self.log.info("inference worker ready", device=self.det.device, max_batch_tiles=self.max_tiles)

    # ------------------------------------------------------------------ models
    def _load(self, model_id: str, path: str) -> None:
        """Load a model (the calling thread); the result is installed by :meth:`_install_loaded`."""
        t0 = time.perf_counter()
        try:
            det = load_detector(path, self.inference.device, self.inference.backend)
            det.warm_up()
            self._loaded.append((model_id, det, (time.perf_counter() - t0) * 1000.0, ""))
        except Exception as e:  # noqa: BLE001 - a bad model file must not stop the worker: the camera keeps its model
            self._loaded.append((model_id, None, (time.perf_counter() - t0) * 1000.0, str(e)[:300]))

    def _install_loaded(self) -> None:
        while self._loaded:
            model_id, det, ms, error = self._loaded.pop(0)
            self._loading.pop(model_id, None)
            self.model_loads = (self.model_loads + [{"id": model_id, "ms": round(ms, 1), "error": error or None}])[-10:]
            if det is None:
                self._failed[model_id] = time.monotonic()
                self.counters["model_load_errors"] += 1
                self.log.error("model cannot be loaded: the camera keeps its model", model=model_id, error=error)
                continue
            self.dets[model_id] = det
            self.counters["model_loads"] += 1
            self.log.info("model loaded beside the others", model=model_id, load_ms=round(ms, 1),
                          models=sorted(self.dets))

    def _follow_selection(self) -> None:
        """Load newly selected models in a thread; forget the ones no camera has used for a minute. Once a
        second (when the selection is polled) or when a load has finished - not on every step."""
        if not self.selection.poll() and not self._loaded and time.monotonic() < self._next_follow:
            return
        self._next_follow = time.monotonic() + 1.0
        self._install_loaded()
        wanted = self.selection.wanted()
        now = time.monotonic()
        for mid, m in wanted.items():
            if now - self._failed.get(mid, -1e9) < 60.0:
                continue
            if mid not in self.dets and mid not in self._loading and not any(x[0] == mid for x in self._loaded):
                th = threading.Thread(target=self._load, args=(mid, m["path"]), name=f"load-{mid}", daemon=True)
                self._loading[mid] = th
                th.start()
        in_use = {self._model_of(m) for m in self.pending}
        for mid in list(self.dets):
            if mid in wanted or mid in in_use:
                self._unwanted_since.pop(mid, None)
            elif now - self._unwanted_since.setdefault(mid, now) > 60.0:
                del self.dets[mid]
                del self._unwanted_since[mid]
                self.log.info("model unloaded (no camera uses it)", model=mid)
        self.extra["models"] = sorted(self.dets)
        self.extra["models_loading"] = sorted(self._loading)

    def _model_of(self, m: wire.Message) -> str:
        tag = m.header.get("model")
        return tag if isinstance(tag, str) else self.default_id

    def _pending_tiles(self) -> int:
        return sum(len(m["grid"]["coords"]) for m in self.pending)

    def _credit(self) -> None:
        """Tell the tiler our room (absolute), how many tiles we have received and the models we run."""
        self.last_credit = time.monotonic()
        room = 0 if self.stopping else max(0, self.max_tiles - self._pending_tiles())
        try:
            wire.send(self.inp, "credit", {"n": room, "received": self.received_tiles, "models": sorted(self.dets)},
                      flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def step(self) -> None:
        if self.pending:
            wait_ms = (self.first_at + self.max_wait_s - time.monotonic()) * 1000.0
        else:
            wait_ms = 100.0
        self._follow_selection()
        msg = self.receive(self.inp, wait_ms, expect=("tiles",)) if wait_ms > 0 else None
        if msg is not None:
            tiles = msg.arrays[0]
            det = self.dets.get(self._model_of(msg))
            if det is None:  # the tiler sends a frame only to a worker that listed its model
                self.received_tiles += len(tiles)  # the tiler counted them as sent: they are not in flight
                self.bad_message("tiles.model", f"tiles for model {self._model_of(msg)!r}, which this worker has not")
                msg = None
            else:
                tile = int(det.preprocess["tile"])
                want = (tile, tile) if bool(det.preprocess.get("grayscale", True)) else (tile, tile, 3)
                if tiles.shape[1:] != want:  # well-formed, but not what this model takes
                    self.received_tiles += len(tiles)
                    self.bad_message("tiles.model", f"tiles of shape {tiles.shape[1:]}, the model takes {want}")
                    msg = None
        if msg is not None and self.pending and self._model_of(msg) != self._model_of(self.pending[0]):
            self._run_batch()  # one model per forward pass: the other model's frames go first
        if msg is not None:
            if not self.pending:
                self.first_at = time.monotonic()
            self.pending.append(msg)
            self.received_tiles += len(msg["grid"]["coords"])
        if not self.pending:
            if time.monotonic() - self.last_credit > 1.0:  # idle: repeat the credit (the tiler may be new)
                self._credit()
            return
        full = self._pending_tiles() >= self.max_tiles
        if full or time.monotonic() - self.first_at >= self.max_wait_s or self.stopping:
            self._run_batch()
        self._credit()

    def _run_batch(self) -> None:
        """Run the pending frames' tiles in passes of at most ``max_batch_tiles`` (a frame may span
        several passes; a heartbeat goes out between them) and send each frame's result as soon as
        its last tile is done."""
        msgs, self.pending = self.pending, []
        queue = [(m, 0) for m in msgs]  # (frame, tiles of it already in a pass)
        done: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {id(m): [] for m in msgs}
        frame_ms: dict[int, float] = {id(m): 0.0 for m in msgs}
        frame_batch: dict[int, int] = {id(m): 0 for m in msgs}
        while queue:
            parts: list[tuple[wire.Message, int, int]] = []  # (frame, first tile, end) of this pass
            room = self.max_tiles
            while queue and room > 0:
                m, start = queue.pop(0)
                n = m.arrays[0].shape[0]
                end = min(n, start + room)
                parts.append((m, start, end))
                room -= end - start
                if end < n:
                    queue.insert(0, (m, end))
            tiles = (parts[0][0].arrays[0][parts[0][1]:parts[0][2]] if len(parts) == 1
                     else np.concatenate([m.arrays[0][a:b] for m, a, b in parts]))
            t0 = time.perf_counter()
            maps, scores = self.dets[self._model_of(parts[0][0])].predict(tiles)
            model_ms = (time.perf_counter() - t0) * 1000.0
            self.model_ms.append(model_ms)
            n = len(tiles)
            self.batch_hist[next(b for b in _BATCH_BINS if n <= b)] += 1
            self.counters["batches"] += 1
            self.counters["tiles"] += n
            at = 0
            for m, a, b in parts:
                done[id(m)].append((maps[at : at + b - a], scores[at : at + b - a]))
                frame_ms[id(m)] += model_ms
                frame_batch[id(m)] = max(frame_batch[id(m)], n)
                at += b - a
                if b == m.arrays[0].shape[0]:  # the frame's last tile: stitch and send it
                    pieces = done.pop(id(m))
                    self._send_result(m, pieces, frame_ms[id(m)], frame_batch[id(m)])
            self.heartbeat()

    def _send_result(self, m: wire.Message, pieces: list[tuple[np.ndarray, np.ndarray]], model_ms: float,
                     batch_tiles: int) -> None:
        grid = TileGrid.from_dict(m["grid"])
        maps = pieces[0][0] if len(pieces) == 1 else np.concatenate([p[0] for p in pieces])
        scores = pieces[0][1] if len(pieces) == 1 else np.concatenate([p[1] for p in pieces])
        frame_map = stitch(maps, grid)
        header = {k: v for k, v in m.header.items() if k not in ("v", "kind", "bufs", "grid")}
        header.update(
            image_score=frame_score(scores, grid.valid),
            tile_scores=[float(s) for s in scores],
            t_infer_ns=time.monotonic_ns(),
            model_ms=model_ms,
            batch_tiles=batch_tiles,
            worker=self.name,
        )
        if self.send_blocking(self.out, "result", header, [frame_map.astype(np.float32), m.arrays[1]]):
            self.counters["frames"] += 1

    def stats(self) -> dict:
        s = super().stats()
        s["model_ms"] = percentiles(list(self.model_ms))
        s["batch_tiles_hist"] = {str(k): v for k, v in sorted(self.batch_hist.items())}
        s["model_loads_recent"] = list(getattr(self, "model_loads", []))
        det = getattr(self, "det", None)  # None while the model loads (the first heartbeat)
        if det is not None and str(det.device).startswith("cuda"):
            s["cuda_memory_allocated_bytes"] = int(torch.cuda.memory_allocated(det.device))
        return s

    def on_stop(self) -> None:
        if self.pending:
            self._run_batch()


def run(**kwargs: Any) -> int:  # the stage's keyword arguments (StageSpec.kwargs)
    return InferStage(**kwargs).run()
