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
"""

from __future__ import annotations

import collections
import time
from typing import Any

import numpy as np
import torch
import zmq

from knitwatch.config.settings import InferenceConfig
from knitwatch.pipeline import wire
from knitwatch.pipeline.decision.regions import frame_score
from knitwatch.pipeline.detector import Detector, load_detector
from knitwatch.pipeline.preprocess import TileGrid, stitch
from knitwatch.pipeline.stages.common import Stage, percentiles

_BATCH_BINS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class InferStage(Stage):
    def __init__(self, name: str, control_endpoint: str, *, tiles_endpoint: str, results_endpoint: str,
                 checkpoint: str, inference: InferenceConfig, detector: Detector | None = None) -> None:
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
        self.det = (detector if detector is not None
                    else load_detector(checkpoint, inference.device, inference.backend))
        self.det.warm_up()
        self.tile = int(self.det.preprocess["tile"])
        self.grayscale = bool(self.det.preprocess.get("grayscale", True))
        self.extra.update(ready=True, device=self.det.device, model=self.det.kind)
        self.pending: list[wire.Message] = []
        self.first_at = 0.0
        self.received_tiles = 0
        self.last_credit = 0.0
        self._credit()
        self.log.info("inference worker ready", device=self.det.device, max_batch_tiles=self.max_tiles)

    def _pending_tiles(self) -> int:
        return sum(len(m["grid"]["coords"]) for m in self.pending)

    def _credit(self) -> None:
        """Tell the tiler our room (absolute) and how many tiles we have received."""
        self.last_credit = time.monotonic()
        room = 0 if self.stopping else max(0, self.max_tiles - self._pending_tiles())
        try:
            wire.send(self.inp, "credit", {"n": room, "received": self.received_tiles}, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def step(self) -> None:
        if self.pending:
            wait_ms = (self.first_at + self.max_wait_s - time.monotonic()) * 1000.0
        else:
            wait_ms = 100.0
        msg = self.receive(self.inp, wait_ms, expect=("tiles",)) if wait_ms > 0 else None
        if msg is not None:
            tiles = msg.arrays[0]
            want = (self.tile, self.tile) if self.grayscale else (self.tile, self.tile, 3)
            if tiles.shape[1:] != want:  # well-formed, but not what this model takes
                self.received_tiles += len(tiles)  # the tiler counted them as sent: they are not in flight
                self.bad_message("tiles.model", f"tiles of shape {tiles.shape[1:]}, the model takes {want}")
                msg = None
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
            maps, scores = self.det.predict(tiles)
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
        det = getattr(self, "det", None)  # None while the model loads (the first heartbeat)
        if det is not None and str(det.device).startswith("cuda"):
            s["cuda_memory_allocated_bytes"] = int(torch.cuda.memory_allocated(det.device))
        return s

    def on_stop(self) -> None:
        if self.pending:
            self._run_batch()


def run(**kwargs: Any) -> int:  # the stage's keyword arguments (StageSpec.kwargs)
    return InferStage(**kwargs).run()
