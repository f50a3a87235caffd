"""Frame sources: what a capture process reads from.

Every source has ``open()``, ``read() -> ndarray | None`` (None: no frame now - a stall or the end)
and ``close()``; ``open``/``read`` raise :class:`SourceError` when the device is gone. The capture
stage owns pacing, reconnects with back-off and counting; sources stay simple.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import cv2
import numpy as np
import structlog

from knitwatch.config.settings import CameraConfig, SimulatorConfig

if TYPE_CHECKING:
    from knitwatch.pipeline.sources.knitsim import KnitStream

log = structlog.get_logger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class SourceError(RuntimeError):
    """The source cannot deliver frames (device missing, stream broken, folder empty ...)."""


class FrameSource(Protocol):
    #: True when the source produces frames at its own pace (a live camera); False when the capture
    #: stage must pace it at the configured fps (files, folders, the simulator).
    live: bool
    #: ground truth of the last frame read, when the source knows it (the simulator), else None
    truth: dict | None

    def open(self) -> None: ...
    def read(self) -> np.ndarray | None: ...
    def close(self) -> None: ...


def _to_gray_or_bgr(img: np.ndarray) -> np.ndarray:
    if img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if img.ndim == 3 and img.shape[2] == 3 and _is_gray(img):
        img = img[:, :, 0].copy()
    return img


def _is_gray(img: np.ndarray) -> bool:
    sub = img[::16, ::16]
    return bool(np.array_equal(sub[:, :, 0], sub[:, :, 1]) and np.array_equal(sub[:, :, 1], sub[:, :, 2]))


class OpenCVSource:
    """OpenCV ``VideoCapture``: a device index ("0"), a file, an RTSP/HTTP URL or a GStreamer pipeline."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.live = not Path(uri).is_file()
        self.truth: dict | None = None
        self._cap: cv2.VideoCapture | None = None

    def open(self) -> None:
        target: int | str = int(self.uri) if self.uri.isdigit() else self.uri
        backend = cv2.CAP_GSTREAMER if "!" in self.uri else cv2.CAP_ANY
        cap = cv2.VideoCapture(target, backend)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open video source {self.uri!r}")
        self._cap = cap

    def read(self) -> np.ndarray | None:
        if self._cap is None:
            raise SourceError("source is not open")
        ok, img = self._cap.read()
        if not ok or img is None:
            if not self.live:  # a file ended: start again
                self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, img = self._cap.read()
            if not ok or img is None:
                raise SourceError(f"video source {self.uri!r} stopped delivering frames")
        return _to_gray_or_bgr(img)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class FolderSource:
    """Images of a folder in name order, replayed (at the capture stage's fps), optionally looping.

    An image that cannot be read (corrupt, unreadable, removed) is skipped - logged, counted in
    ``bad_files`` (shown in the capture stage's stats) and left out of the rotation - so the replay
    goes on with the next file; only a folder without any readable image is an error."""

    live = False
    truth: dict | None = None

    def __init__(self, folder: str | Path, *, loop: bool) -> None:
        self.folder = Path(folder)
        self.loop = loop
        self._files: list[Path] = []
        self._i = 0
        self.bad_files = 0  # unreadable images skipped (each time the folder is opened)

    def open(self) -> None:
        if not self.folder.is_dir():
            raise SourceError(f"image folder {self.folder} does not exist")
        try:
            self._files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        except OSError as e:
            raise SourceError(f"image folder {self.folder} cannot be listed: {e}") from None
        if not self._files:
            raise SourceError(f"image folder {self.folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self._i = 0

    def read(self) -> np.ndarray | None:
        while self._files:
            if self._i >= len(self._files):
                if not self.loop:
                    return None
                self._i = 0
            path = self._files[self._i]
            try:
                img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            except cv2.error:  # e.g. an image too large for OpenCV's limits
                img = None
            if img is not None and img.size > 0:
                self._i += 1
                if img.dtype != np.uint8:
                    img = cv2.convertScaleAbs(img, alpha=255.0 / max(1.0, float(img.max())))
                return _to_gray_or_bgr(img)
            del self._files[self._i]  # the next file moves up to index _i
            self.bad_files += 1
            log.warning("image cannot be read, skipped", file=str(path), skipped=self.bad_files)
        raise SourceError(f"image folder {self.folder} holds no readable image")

    def close(self) -> None:
        self._files = []


class SimulatorSource:
    """The knit simulator as a camera (see :mod:`knitwatch.pipeline.sources.knitsim`)."""

    live = False

    def __init__(self, width: int, height: int, *, fps: float, sim: SimulatorConfig) -> None:
        self.width, self.height, self.fps, self.sim = width, height, fps, sim
        self._stream: KnitStream | None = None
        self._after: KnitStream | None = None
        self._revs_before = 0
        self._i = 0
        self.truth: dict | None = None

    def open(self) -> None:
        from knitwatch.pipeline.sources.knitsim import FabricSpec, KnitStream, ScheduledDefect

        sim = self.sim
        change = sim.change_frame

        def stream(texture: str, pitch_px: float, brightness: float, first: int, end: int | None,
                   seed: int) -> KnitStream:
            return KnitStream(
                self.width,
                self.height,
                FabricSpec(texture=texture, pitch_px=pitch_px, brightness=brightness),
                seed=seed,
                speed_px=sim.speed_px,
                fps=self.fps,
                revolution_frames=sim.revolution_frames,
                defects=[ScheduledDefect(**{**d.model_dump(), "frame": d.frame - first}) for d in sim.defects
                         if d.frame >= first and (end is None or d.frame < end)],
                random_defect_rate=sim.random_defect_rate,
            )

        self._stream = stream(sim.texture, sim.pitch_px, sim.brightness, 0, change, sim.seed)
        self._after = (None if change is None  # the machine's new article, from frame ``change`` on
                       else stream(sim.change_texture, sim.change_pitch_px or sim.pitch_px,
                                   sim.change_brightness or sim.brightness, change, None, sim.seed + 1))
        # the revolutions count on across the change: the new fabric's first revolution is the next one
        self._revs_before = 0 if change is None else self._stream.frame(change - 1)[1].revolution + 1

    def read(self) -> np.ndarray | None:
        if self._stream is None:
            raise SourceError("source is not open")
        change = self.sim.change_frame
        after = self._after is not None and change is not None and self._i >= change
        revs_before = 0
        if after and self._after is not None and change is not None:
            img, truth = self._after.frame(self._i - change)
            revs_before = self._revs_before
        else:
            img, truth = self._stream.frame(self._i)
        self.truth = {
            "frame": self._i,
            "texture": self.sim.change_texture if after else self.sim.texture,
            "revolution": truth.revolution + revs_before,
            "cutline": truth.cutline_visible,
            "offset_px": truth.offset_px,
            "circumference_px": truth.circumference_px,
            "cutline_px": truth.cutline_px,
            "defects": [{"id": d.get("id"), "kind": d["kind"], "box": [int(v) for v in d["box"]]}
                        for d in truth.defects],
        }
        self._i += 1
        return img

    def close(self) -> None:
        self._stream = self._after = None


def make_source(cam: CameraConfig) -> FrameSource:
    """A source from a camera's settings."""
    kind = cam.source
    if kind == "opencv":
        return OpenCVSource(cam.uri)
    if kind == "folder":
        return FolderSource(cam.uri, loop=cam.loop)
    if kind == "simulator":
        return SimulatorSource(cam.width, cam.height, fps=cam.fps, sim=cam.simulator)
    if kind == "pylon":  # industrial cameras: imported here, their SDKs are optional extras
        from knitwatch.pipeline.sources.pylon import PylonSource

        return PylonSource(cam)
    if kind == "genicam":
        from knitwatch.pipeline.sources.genicam import GenICamSource

        return GenICamSource(cam)
    raise SourceError(f"unknown source kind {kind!r}")
