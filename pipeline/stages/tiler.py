"""Tiler stage: frames -> tiles with the checkpoint's preprocessing (the one preprocessing path).

Receives frames from every capture process, cuts them with :class:`Preprocessor` (per camera, the
camera's ROI applied), and sends each frame's tiles as one contiguous buffer plus the frame itself
(for snapshots). It never drops: when the inference workers are busy it waits, and capture - the
only place that drops - sees the back-pressure.
"""

from __future__ import annotations

import dataclasses
import time

import zmq

from knitwatch.pipeline.preprocess import PreprocessConfig, Preprocessor
from knitwatch.pipeline.stages.common import Stage


def camera_preprocessors(preprocess: dict, cameras: list[dict], *, scale: float | None = None,
                         refresh_frames: int = 50) -> dict[str, Preprocessor]:
    """One live preprocessor per camera: the checkpoint's config with the camera's ROI (and an
    installation-wide fixed scale, when given)."""
    base = PreprocessConfig.from_dict(preprocess)
    out = {}
    for cam in cameras:
        params = base.params
        if cam.get("roi") is not None:
            params = dataclasses.replace(params, roi=tuple(cam["roi"]))
        target = base.target_pitch
        if scale is not None:
            params, target = dataclasses.replace(params, scale=scale), None
        out[cam["id"]] = Preprocessor(PreprocessConfig(params, target), every=refresh_frames)
    return out


class TilerStage(Stage):
    def __init__(self, name: str, control_endpoint: str, *, frames_endpoint: str, tiles_endpoint: str,
                 preprocess: dict, cameras: list[dict], scale: float | None = None,
                 refresh_frames: int = 50) -> None:
        super().__init__(name, control_endpoint)
        self.inp = self.socket(zmq.PULL, frames_endpoint, bind=True, hwm=1)
        self.out = self.socket(zmq.PUSH, tiles_endpoint, bind=True, hwm=1)
        self.pre = camera_preprocessors(preprocess, cameras, scale=scale, refresh_frames=refresh_frames)

    def step(self) -> None:
        msg = self.receive(self.inp, 100)
        if msg is None:
            return
        cam = msg["cam"]
        pre = self.pre.get(cam)
        if pre is None:
            self.counters["unknown_camera"] += 1
            self.log.warning("frame from an unknown camera dropped", camera=cam)
            return
        frame = msg.arrays[0]
        try:
            tiles, grid = pre(frame)
        except ValueError as e:
            self.counters["bad_frames"] += 1
            self.log.warning("frame cannot be tiled", camera=cam, seq=msg["seq"], error=str(e))
            return
        header = {k: v for k, v in msg.header.items() if k not in ("v", "kind", "bufs")}
        header["t_tiled_ns"] = time.monotonic_ns()
        header["grid"] = grid.to_dict()
        header["scale"] = pre.scale
        self.counters["frames"] += 1
        self.counters["tiles"] += len(grid)
        if self.send_blocking(self.out, "tiles", header, [tiles, frame]):
            self.counters["sent"] += 1


def run(**kwargs: object) -> int:
    return TilerStage(**kwargs).run()
