"""Tiler stage: frames -> tiles with the checkpoint's preprocessing (the one preprocessing path).

Receives frames from every capture process, cuts them with :class:`Preprocessor` (per camera, the
camera's ROI applied), and sends each frame's tiles as one contiguous buffer plus the frame itself
(for snapshots) to an inference worker.

Flow control is by credit on both sides (ROUTER sockets): inference workers tell how many tiles
they can take (``credit`` messages, absolute), and a frame goes to the worker with the most room;
a camera gets its next credit only once its previous frame has been handed on. So at most one
frame per camera waits here, nothing is dropped here, and capture - the only place that drops -
always sends its newest frame. A frame that arrives without a credit granted to its sender is not
taken (``unrequested_frames``): no peer can fill the queue here.

Models: each camera's frames are cut with its model's preprocessing and tagged with the model's id
(``model``); when the library's selection gives a camera another model, the tiler changes over at
the next frame once a worker lists that model in its credit, and sends each frame only to a worker
that has its model (:mod:`knitwatch.pipeline.modelswitch`).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any

import numpy as np
import zmq

from knitwatch.config.settings import CameraConfig, InferenceConfig, TilingConfig
from knitwatch.pipeline import wire
from knitwatch.pipeline.modelswitch import ModelSelection
from knitwatch.pipeline.preprocess import PreprocessConfig, Preprocessor
from knitwatch.pipeline.stages.common import Stage


def camera_preprocessors(preprocess: dict, cameras: list[CameraConfig],
                         tiling: TilingConfig) -> dict[str, Preprocessor]:
    """One live preprocessor per camera: the checkpoint's config with the camera's ROI (and an
    installation-wide fixed scale, when ``tiling.scale`` is set)."""
    base = PreprocessConfig.from_dict(preprocess)
    out = {}
    for cam in cameras:
        params = base.params
        if cam.roi is not None:
            params = dataclasses.replace(params, roi=cam.roi)
        target = base.target_pitch
        if tiling.scale is not None:
            params, target = dataclasses.replace(params, scale=tiling.scale), None
        out[cam.id] = Preprocessor(PreprocessConfig(params, target), every=tiling.pitch_refresh_frames)
    return out


class TilerStage(Stage):
    def __init__(self, name: str, control_endpoint: str, *, frames_endpoint: str, tiles_endpoint: str,
                 preprocess: dict, cameras: list[CameraConfig], tiling: TilingConfig,
                 inference: InferenceConfig | None = None, model_id: str = "default",
                 selection: str | None = None) -> None:
        """``inference``: the keys securing a tcp:// tiles endpoint; ``preprocess``/``model_id``: the daemon's
        checkpoint's; ``selection``: the model library's selection file (other models per camera)."""
        super().__init__(name, control_endpoint)
        self.inp = self.socket(zmq.ROUTER, frames_endpoint, bind=True, hwm=8, linger_ms=0)  # credits only
        self.out = self.socket(zmq.ROUTER, tiles_endpoint, bind=True, hwm=8, inference=inference)
        self.pre = camera_preprocessors(preprocess, cameras, tiling)
        self.cameras = {c.id: c for c in cameras}
        self.tiling = tiling
        self.default_id = model_id
        self.selection = ModelSelection(selection, {"id": model_id, "preprocess": preprocess, "path": ""})
        self.cam_model: dict[str, str | None] = {c.id: None for c in cameras}  # None: the checkpoint's (untagged)
        self.worker_models: dict[bytes, set[str]] = {}  # worker identity -> the models it runs (its last credit)
        self.switches: list[dict] = []
        self.poller = zmq.Poller()
        self.poller.register(self.inp, zmq.POLLIN)
        self.poller.register(self.out, zmq.POLLIN)
        self.waiting: collections.deque[tuple[bytes, dict, np.ndarray, np.ndarray]] = collections.deque()
        self.room: dict[bytes, int] = {}  # worker identity -> tiles it can take now
        self.sent_tiles: collections.Counter[bytes] = collections.Counter()  # per worker, since it appeared
        self.granted: dict[bytes, float] = {}  # capture identity -> when its outstanding credit was granted

    def _grant(self, peer: bytes) -> None:
        try:
            wire.send_routed(self.inp, peer, "credit", {"n": 1}, flags=zmq.NOBLOCK)
            self.granted[peer] = time.monotonic()
        except zmq.ZMQError:  # the capture process is gone; it says hello again when it is back
            self.granted.pop(peer, None)

    def step(self) -> None:
        events = dict(self.poller.poll(100))
        if self.out in events:
            while self.out.poll(0):
                got = self.receive_routed(self.out, expect=("credit",))
                if got is not None:
                    worker, msg = got  # its room, less the tiles on their way to it
                    in_flight = self.sent_tiles[worker] - int(msg.header.get("received", self.sent_tiles[worker]))
                    self.room[worker] = int(msg["n"]) - max(0, in_flight)
                    models = msg.header.get("models")
                    self.worker_models[worker] = set(models) if isinstance(models, list) else set()
        if self.inp in events:
            while self.inp.poll(0):
                got = self.receive_routed(self.inp, expect=("credit", "frame"))
                if got is not None:
                    self._on_capture(*got)
        self._follow_selection()
        self._dispatch()

    def _follow_selection(self) -> None:
        """Change a camera to its newly selected model once a worker has it: at a frame boundary (the next
        frame is cut and tagged with it; frames already tiled keep theirs)."""
        self.selection.poll()
        ready = set().union(*self.worker_models.values()) if self.worker_models else set()
        for cam_id, current in self.cam_model.items():
            want = self.selection.model_for(cam_id)
            want_id = None if want["id"] == self.default_id else want["id"]
            if want_id == current or (want_id is not None and want_id not in ready):
                continue
            self.pre[cam_id] = camera_preprocessors(want["preprocess"], [self.cameras[cam_id]], self.tiling)[cam_id]
            self.cam_model[cam_id] = want_id
            self.counters["model_switches"] += 1
            self.switches = (self.switches + [{"camera": cam_id, "from": current or self.default_id, "to": want["id"],
                                               "t_wall_ns": time.time_ns()}])[-10:]
            self.log.info("camera changed model", camera=cam_id, previous=current or self.default_id, model=want["id"])
        self.extra["camera_models"] = {c: m or self.default_id for c, m in self.cam_model.items()}
        self.extra["model_switches_recent"] = self.switches

    def _on_capture(self, peer: bytes, msg: wire.Message) -> None:
        if msg.kind == "credit":  # hello: a capture (re)started or lost its credit ...
            if not any(w[0] == peer for w in self.waiting):  # ... unless its last frame still waits here
                self._grant(peer)
            return
        if self.granted.pop(peer, None) is None:  # a frame is sent only against a credit granted here
            self.counters["unrequested_frames"] += 1
            self.warn_sometimes("frame sent without a credit dropped", count=self.counters["unrequested_frames"])
            return
        cam = msg["cam"]
        pre = self.pre.get(cam)
        if pre is None:
            self.counters["unknown_camera"] += 1
            self.warn_sometimes("frame from an unknown camera dropped", camera=cam,
                                count=self.counters["unknown_camera"])
            self._grant(peer)
            return
        frame = msg.arrays[0]
        try:
            tiles, grid = pre(frame)
        except Exception as e:  # noqa: BLE001 - no frame may stop the tiler: counted and dropped
            self.counters["bad_frames"] += 1
            self.warn_sometimes("frame cannot be tiled", camera=cam, seq=msg["seq"], error=str(e)[:300],
                                count=self.counters["bad_frames"])
            self._grant(peer)
            return
        header = {k: v for k, v in msg.header.items() if k not in ("v", "kind", "bufs")}
        header["t_tiled_ns"] = time.monotonic_ns()
        header["grid"] = grid.to_dict()
        header["scale"] = pre.scale
        if self.cam_model[cam] is not None:  # untagged: the checkpoint every worker runs
            header["model"] = self.cam_model[cam]
        self.counters["frames"] += 1
        self.counters["tiles"] += len(grid)
        self.waiting.append((peer, header, tiles, frame))

    def _dispatch(self) -> None:
        while self.waiting:
            peer, header, tiles, frame = self.waiting[0]
            tag = header.get("model")
            workers = [w for w, n in self.room.items()
                       if n > 0 and (tag is None or tag in self.worker_models.get(w, ()))]
            if not workers:
                break
            worker = max(workers, key=self.room.__getitem__)
            try:
                wire.send_routed(self.out, worker, "tiles", header, [tiles, frame], flags=zmq.NOBLOCK)
            except zmq.ZMQError:  # the worker is gone (or full): forget its credit, try another
                del self.room[worker]
                self.worker_models.pop(worker, None)
                continue
            self.waiting.popleft()
            self.room[worker] -= len(tiles)
            self.sent_tiles[worker] += len(tiles)
            self.counters["sent"] += 1
            self._grant(peer)
        self.extra["waiting_frames"] = len(self.waiting)
        self.extra["workers"] = len(self.room)

    def on_stop(self) -> None:
        deadline = time.monotonic() + self.drain_max_s
        while self.waiting and time.monotonic() < deadline:  # hand on what was already tiled
            self.step()
            self.heartbeat()
        self.counters["lost_at_shutdown"] += len(self.waiting)


def run(**kwargs: Any) -> int:  # the stage's keyword arguments (StageSpec.kwargs)
    return TilerStage(**kwargs).run()
