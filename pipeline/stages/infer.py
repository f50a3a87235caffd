"""Inference stage: the batching worker (GPU when there is one, else CPU).

Collects whole frames' tiles into a batch until ``max_batch_tiles`` or ``max_wait_ms`` after the
first queued frame (DeepStream's rule), runs one forward pass, stitches each frame's maps back
into frame coordinates and sends one result per frame. Several workers may take tiles from the same
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
        self.inp = self.socket(zmq.DEALER, tiles_endpoint, bind=False, hwm=8, linger_ms=0)  # credits only
        self.out = self.socket(zmq.PUSH, results_endpoint, bind=False, hwm=4)
        self.max_tiles = inference.max_batch_tiles
        self.max_wait_s = inference.max_wait_ms / 1000.0
        self.model_ms: collections.deque[float] = collections.deque(maxlen=500)
        self.batch_hist: collections.Counter[int] = collections.Counter()
        self.extra["ready"] = False
        self.heartbeat(force=True)  # the supervisor sees us alive while the model loads
        self.det = (detector if detector is not None
                    else load_detector(checkpoint, inference.device, inference.backend))
        self.det.warm_up()
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
        msg = self.receive(self.inp, wait_ms) if wait_ms > 0 else None
        if msg is not None:
            try:
                TileGrid.from_dict(msg["grid"])
                if msg.arrays[0].shape[0] != len(msg["grid"]["coords"]):
                    raise ValueError("tile count differs from the grid")
            except (KeyError, TypeError, ValueError) as e:
                self.counters["bad_messages"] += 1
                self.log.warning("dropped malformed tiles message", reason=str(e))
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
        msgs, self.pending = self.pending, []
        tiles = np.concatenate([m.arrays[0] for m in msgs]) if len(msgs) > 1 else msgs[0].arrays[0]
        t0 = time.perf_counter()
        maps, scores = self.det.predict(tiles)
        model_ms = (time.perf_counter() - t0) * 1000.0
        self.model_ms.append(model_ms)
        n = len(tiles)
        self.batch_hist[next(b for b in _BATCH_BINS if n <= b)] += 1
        self.counters["batches"] += 1
        self.counters["tiles"] += n
        start = 0
        for m in msgs:
            grid = TileGrid.from_dict(m["grid"])
            k = len(grid)
            frame_map = stitch(maps[start : start + k], grid)
            header = {k2: v for k2, v in m.header.items() if k2 not in ("v", "kind", "bufs", "grid")}
            header.update(
                image_score=frame_score(scores[start : start + k], grid.valid),
                tile_scores=[float(s) for s in scores[start : start + k]],
                t_infer_ns=time.monotonic_ns(),
                model_ms=model_ms,
                batch_tiles=n,
                worker=self.name,
            )
            start += k
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
