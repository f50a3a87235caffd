"""Capture stage: one process per camera. Read, timestamp, push; never block the camera.

Downstream full -> the oldest unsent frame is dropped and counted (``dropped``). Camera errors ->
reconnect with exponential back-off (``reconnects``); reads that return nothing or take longer than
``stall_s`` count as ``stalls``. Frames are paced at the configured fps for sources that do not pace
themselves (files, folders, the simulator).
"""

from __future__ import annotations

import collections
import time

import numpy as np
import zmq

from knitwatch.pipeline import wire
from knitwatch.pipeline.sources.base import FrameSource, SourceError, make_source, sleep_until
from knitwatch.pipeline.stages.common import Stage


class CaptureStage(Stage):
    drains = False

    def __init__(self, name: str, control_endpoint: str, *, camera: dict, frames_endpoint: str,
                 queue_frames: int = 1, stall_s: float = 2.0, max_backoff_s: float = 30.0,
                 source: FrameSource | None = None) -> None:
        super().__init__(name, control_endpoint)
        self.cam_id = camera["id"]
        self.fps = float(camera["fps"])
        self.source = source if source is not None else make_source(camera)
        self.out = self.socket(zmq.PUSH, frames_endpoint, bind=False, hwm=1)
        self.pending: collections.deque[list] = collections.deque()
        self.queue_frames = queue_frames
        self.stall_s = stall_s
        self.max_backoff_s = max_backoff_s
        self.backoff = 0.5
        self.is_open = False
        self.retry_at = 0.0
        self.seq = 0
        self.epoch = time.time_ns()  # tells receivers that sequence numbers started again
        self.next_t = time.monotonic()
        self.extra["camera"] = self.cam_id

    def _open(self) -> None:
        try:
            self.source.open()
        except SourceError as e:
            self.counters["open_failures"] += 1
            self.log.warning("camera unavailable, retrying", error=str(e), retry_in_s=self.backoff)
            self.retry_at = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, self.max_backoff_s)
            return
        if self.seq:  # not the first time
            self.counters["reconnects"] += 1
            self.log.info("camera reconnected", reconnects=self.counters["reconnects"])
        self.is_open = True
        self.backoff = 0.5
        self.next_t = time.monotonic()

    def _flush(self) -> None:
        while self.pending:
            try:
                self.out.send_multipart(self.pending[0], flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.pending.popleft()
            self.counters["sent"] += 1

    def step(self) -> None:
        if not self.is_open:
            self._flush()
            wait = self.retry_at - time.monotonic()
            if wait > 0:
                time.sleep(min(0.05, wait))
            else:
                self._open()
            return
        if not self.source.live:
            sleep_until(self.next_t)
            self.next_t = max(self.next_t + 1.0 / self.fps, time.monotonic() - 1.0 / self.fps)
        t0 = time.monotonic()
        try:
            frame = self.source.read()
        except SourceError as e:
            self.counters["read_errors"] += 1
            self.log.warning("camera failed, reconnecting", error=str(e))
            self.source.close()
            self.is_open = False
            self.retry_at = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, self.max_backoff_s)
            return
        if frame is None or time.monotonic() - t0 > self.stall_s:
            self.counters["stalls"] += 1
            if frame is None:
                time.sleep(0.01)
                self._flush()
                return
        self._push(frame)

    def _push(self, frame: np.ndarray) -> None:
        header = {
            "cam": self.cam_id,
            "seq": self.seq,
            "epoch": self.epoch,
            "t_wall_ns": time.time_ns(),
            "t_mono_ns": time.monotonic_ns(),
        }
        truth = getattr(self.source, "truth", None)
        if truth is not None:
            header["truth"] = truth
        self.seq += 1
        self.counters["captured"] += 1
        self.pending.append(wire.encode("frame", header, [frame]))
        while len(self.pending) > self.queue_frames:
            self.pending.popleft()
            self.counters["dropped"] += 1
        self._flush()

    def on_stop(self) -> None:
        self.source.close()


def run(**kwargs: object) -> int:
    return CaptureStage(**kwargs).run()
