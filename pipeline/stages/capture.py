"""Capture stage: one process per camera. Read, timestamp, send; never block the camera.

Flow control is by credit: the tiler grants a credit when it can take this camera's next frame, and
a frame is sent only against a credit, so no queue between the stages can grow and add latency.
Until then the newest frame waits here and an older waiting one is dropped and counted (``dropped``).
Without a credit for a second the stage says hello again (the tiler may have restarted). Camera errors ->
reconnect with exponential back-off (``reconnects``); reads that return nothing or take longer than
``stall_s`` count as ``stalls``. Frames are paced at the configured fps for sources that do not pace
themselves (files, folders, the simulator). Every frame carries its fabric position ``pos`` (revolution,
offset on the tube; :mod:`knitwatch.pipeline.position`, per the camera's ``position`` settings; absent
with ``source = "none"``), reported with its cost per frame under ``position`` in the stats.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import numpy as np
import zmq

from knitwatch.config.settings import CameraConfig
from knitwatch.pipeline import wire
from knitwatch.pipeline.position import PositionEstimator, make_position
from knitwatch.pipeline.sources.base import FrameSource, SourceError, make_source
from knitwatch.pipeline.stages.common import Stage


class CaptureStage(Stage):
    drains = False

    def __init__(self, name: str, control_endpoint: str, *, camera: CameraConfig, frames_endpoint: str,
                 queue_frames: int = 1, stall_s: float = 2.0, max_backoff_s: float = 30.0,
                 source: FrameSource | None = None) -> None:
        super().__init__(name, control_endpoint)
        self.cam_id = camera.id
        self.fps = float(camera.fps)
        self.source = source if source is not None else make_source(camera)
        self.position: PositionEstimator | None = make_position(camera)  # the fabric position ("pos") of each frame
        self.out = self.socket(zmq.DEALER, frames_endpoint, bind=False, hwm=4)
        self.pending: collections.deque[list] = collections.deque()
        self.credit = 0
        self.last_hello = 0.0
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
        while self.out.poll(0):  # credits granted by the tiler
            msg = self.receive(self.out, 0, expect=("credit",))
            if msg is not None and msg.kind == "credit":
                self.credit = min(1, self.credit + max(0, int(msg["n"])))
        while self.pending and self.credit > 0:
            try:
                self.out.send_multipart(self.pending[0], flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.pending.popleft()
            self.credit -= 1
            self.counters["sent"] += 1
        now = time.monotonic()
        if self.credit == 0 and now - self.last_hello > 1.0:
            self.last_hello = now
            try:  # "I am here": the tiler answers with a credit
                wire.send(self.out, "credit", {"n": 0, "cam": self.cam_id}, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass

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
            wait = self.next_t - time.monotonic()
            if wait > 0:  # until the next frame is due, wake up for credits and send what waits
                self.out.poll(int(min(wait, 0.1) * 1000) + 1)
                self._flush()
                return
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
        if self.position is not None:
            header["pos"] = self._locate(frame, truth)
        self.seq += 1
        self.counters["captured"] += 1
        self.pending.append(wire.encode("frame", header, [frame]))
        while len(self.pending) > self.queue_frames:
            self.pending.popleft()
            self.counters["dropped"] += 1
        self._flush()

    def _locate(self, frame: np.ndarray, truth: dict | None) -> dict[str, Any] | None:
        assert self.position is not None
        try:
            return self.position.update(frame, truth)
        except Exception as e:  # noqa: BLE001 - a position problem must not stop the camera: counted, logged
            self.counters["position_errors"] += 1
            if self.counters["position_errors"] == 1:
                self.log.exception("fabric position failed (logged once; counted in position_errors)", error=str(e))
            return None

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        if self.position is not None:  # source, revolution, circumference, ok/lost frames, ms per frame
            s["position"] = self.position.stats()
        bad_files = getattr(self.source, "bad_files", None)  # a folder source's skipped, unreadable images
        if bad_files is not None:
            s["bad_files"] = bad_files
        source_stats = getattr(self.source, "stats", None)  # an industrial camera's model, SDK counters, rates
        if callable(source_stats):
            s["camera_info"] = source_stats()
        return s

    def on_stop(self) -> None:
        self.source.close()
        if self.position is not None:
            self.position.close()


def run(**kwargs: Any) -> int:  # the stage's keyword arguments (StageSpec.kwargs)
    return CaptureStage(**kwargs).run()
