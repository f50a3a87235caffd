"""Learning a new fabric on the machine: record normal frames from a camera, train a model on them,
validate it on held-back revolutions through the decision layer, and say whether it may be installed.

The command side (progress bars, the training process at low priority, the model library) is
``knitwatch learn`` (:mod:`knitwatch.daemon.cli.learn`); this module holds the work itself:

* :func:`record_from_camera`: the camera's source and fabric position estimator, opened as the capture
  stage opens them (:func:`~knitwatch.pipeline.sources.base.make_source`,
  :func:`~knitwatch.pipeline.position.make_position`), each frame with the ``pos`` header the capture
  stage would send, into a :class:`~knitwatch.pipeline.recording.RecordingWriter`;
* :func:`train_article`: whole revolutions split into training and validation frames, the loop pitch
  estimated from the training frames, tiles cut by the one preprocessing path, the host's default
  model kind trained and calibrated by its trainer, the checkpoint written;
* :func:`validate`: the new model over the held-back frames as the daemon runs it (the tiler's
  preprocessor, the detector, stitching) and the decision layer (:func:`decide_frame` with a fresh
  tracker): estimated false stops per hour at the calibrated thresholds;
* :func:`recall_on_simulator`: for a simulator camera, one scheduled defect of every kind on the same
  fabric, and how many the new model confirms and stops.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from knitwatch.config.settings import AlertConfig, CameraConfig, TilingConfig
from knitwatch.pipeline.recording import RecordedFrame, Recording, RecordingError, RecordingWriter

log = structlog.get_logger(__name__)

CPU_MODEL = "msflow-efficientnet-lite0"
GPU_MODEL = "efficientad-s"
# Default training length per model family: msflow in optimiser steps over cached features (batch 16),
# efficientad in student/autoencoder steps (batch 8). See `default_steps`.
DEFAULT_STEPS = {"msflow": 1000, "efficientad": 5000}
DEFAULT_DISTILL_STEPS = 2000  # EfficientAD's teacher, distilled from EfficientNet-Lite0 on the training tiles
DEFAULT_TILE = {"msflow": 128, "efficientad": 64}
MAX_TRAIN_FRAMES = 240  # training frames beyond this are thinned evenly (training time does not grow)
PITCH_FRAMES = 16  # training frames whose loop pitch is measured (evenly spread)
MIN_TRAIN_FRAMES = 4

ProgressFn = Callable[[dict[str, Any]], None]


class LearnError(ValueError):
    """A recording or camera that cannot be learned from; the message names it and says what to do."""


# ---------------------------------------------------------------------------------------------- model choice


def default_model(device: str) -> str:
    """The model kind ``learn train`` trains on a host: ``msflow-efficientnet-lite0`` on a CPU,
    ``efficientad-s`` on a GPU.

    Why (README "Accuracy on real and simulated fabric" and "Benchmarks and speed"): at the training
    a CPU can afford, MSFlow-Lite0 beats the PatchCore baseline and EfficientAD-S on pixel AUROC and
    AU-PRO (mean over the real fabrics 0.823 / 0.427 against 0.724 / 0.274 for EfficientAD-S at 300
    steps) and on the simulated knit (0.980 against 0.860), trains in about 2 minutes where EfficientAD
    needs its teacher distilled (21 min) and many steps at about 1 s each, and runs 3.4-3.7x faster
    under ONNX Runtime, the daemon's CPU backend. On a GPU the paper's EfficientAD recipe is affordable
    (thousands of steps in minutes) and EfficientAD-S is the fastest model at inference there (the
    daemon's GPU target model), so a GPU host gets it.
    """
    return GPU_MODEL if device == "cuda" else CPU_MODEL


def family(kind: str) -> str:
    return "msflow" if kind.startswith("msflow-") else "efficientad"


def default_steps(kind: str) -> int:
    """Training steps when none are given. MSFlow: 1000 steps of batch 16 over the cached features of
    the training tiles (the features are computed once; a step costs the flows only), a few minutes on
    one CPU thread at nice 10 (the demo's 512x256 frames: 1280 tiles of 128 px, 218 s on the 2-core VM
    shared with other jobs; 300 steps already stopped every simulated defect kind); EfficientAD (GPU
    hosts): 5000 steps of batch 8 after a 2000-step teacher distillation (65 s on an H200)."""
    return DEFAULT_STEPS[family(kind)]


# ---------------------------------------------------------------------------------------------- recording


def open_camera(camera: CameraConfig) -> tuple[Any, Any]:
    """The camera's source (opened) and its fabric position estimator, made as the capture stage makes
    them; :class:`RecordingError` naming the camera when it cannot be opened."""
    from knitwatch.pipeline.position import make_position
    from knitwatch.pipeline.sources.base import SourceError, make_source

    try:
        source = make_source(camera)
        source.open()
    except (SourceError, OSError, ValueError, RuntimeError) as e:
        raise RecordingError(f"camera {camera.id!r} ({camera.source}) cannot be opened: {e}") from None
    try:
        position = make_position(camera)
    except Exception as e:  # noqa: BLE001 - whatever the estimator's setup raises: the camera is closed, named
        source.close()
        raise RecordingError(f"camera {camera.id!r}: its fabric position ({camera.position.source}) cannot be "
                             f"set up: {e}") from None
    return source, position


def locate(position: Any, frame: np.ndarray, source: Any) -> dict[str, Any] | None:  # noqa: ANN401
    """The ``pos`` header of a frame as the capture stage computes it (None when the estimator fails)."""
    if position is None:
        return None
    try:
        return position.update(frame, getattr(source, "truth", None))
    except Exception:  # noqa: BLE001 - as in the capture stage: a position problem leaves the frame without one
        return None


def record_from_camera(camera: CameraConfig, writer: RecordingWriter, *, progress: ProgressFn | None = None,
                       pace: bool = True, position_timeout_s: float = 120.0, revolution_timeout_s: float = 600.0,
                       timeout_s: float | None = None, max_frames: int | None = None,
                       should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Record normal fabric from ``camera`` into ``writer`` until it has enough (``writer.add`` returns
    True: the first frame of the revolution after enough, so the recording ends on a whole revolution);
    returns the recording's meta.

    A source that does not pace itself (files, folders, the simulator) is paced at the camera's fps,
    unless ``pace=False`` (tests, measurements). Times below are camera time: wall time for a live
    camera, frames / fps otherwise. Errors (:class:`RecordingError`, naming the camera; the writer is
    finished as ``failed``): the camera cannot be opened or fails; no frame has a trusted fabric position
    within ``position_timeout_s``; ``revolution_timeout_s`` passes without a new revolution; the
    recording has not got enough within ``timeout_s`` (default: the two limits above for every revolution
    needed, plus the writer's own time limit) or ``max_frames``. ``should_stop()`` True ends it as
    ``cancelled``.
    """
    from knitwatch.pipeline.recording import revolution_of

    if camera.position.source == "none":
        raise RecordingError(f"camera {camera.id!r} has no fabric position (position.source = \"none\"): "
                             "learning needs whole revolutions; set its [cameras.position] source")
    source, position = open_camera(camera)
    writer.meta.update(fps=float(camera.fps), paced=bool(pace or source.live), source=camera.source,
                       position_source=camera.position.source)
    if timeout_s is None:
        revs = int(writer.meta["min_revolutions"]) + 2
        timeout_s = position_timeout_s + revolution_timeout_s * revs + (writer.max_seconds or 0.0)
    t0 = time.monotonic()
    next_t = t0
    n = 0
    positioned = 0
    last_rev: tuple[int, float] | None = None  # the newest revolution seen and when (camera time)
    status = "failed"
    try:
        while True:
            if should_stop is not None and should_stop():
                status = "cancelled"
                break
            if pace and not source.live:
                wait = next_t - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                next_t = max(next_t + 1.0 / camera.fps, time.monotonic() - 1.0 / camera.fps)
            try:
                frame = source.read()
            except Exception as e:  # noqa: BLE001 - SourceError or an SDK's own: the recording fails, named
                raise RecordingError(f"camera {camera.id!r} failed while recording: {e}") from None
            t_cam = (time.monotonic() - t0) if source.live else n / camera.fps
            if frame is None:
                if t_cam > timeout_s:
                    raise RecordingError(f"camera {camera.id!r} delivered no frame for {timeout_s:.0f} s")
                time.sleep(0.01)
                continue
            seq = n
            n += 1
            pos = locate(position, frame, source)
            if revolution_of(pos) is None and positioned == 0:
                writer.skipped("no_position")  # before the first trusted position: of no use for revolutions
                if t_cam > position_timeout_s:
                    raise RecordingError(
                        f"camera {camera.id!r}: no frame got a trusted fabric position ({camera.position.source}) "
                        f"in {position_timeout_s:.0f} s ({n} frames): is the fabric moving, is the cutline in "
                        "view (position source image) or the PLC's revolution counter readable?")
                continue
            positioned += 1
            rev = revolution_of(pos)
            if rev is not None and (last_rev is None or rev != last_rev[0]):
                last_rev = (rev, t_cam)
            elif last_rev is not None and t_cam - last_rev[1] > revolution_timeout_s:
                raise RecordingError(
                    f"camera {camera.id!r}: no new revolution for {t_cam - last_rev[1]:.0f} s (still revolution "
                    f"{last_rev[0]} after {n} frames): is the machine turning, and does the fabric position "
                    f"({camera.position.source}) count revolutions (the cutline in view, the PLC's counter)?")
            if writer.frames == 0:
                writer.meta["frame_size"] = [int(frame.shape[1]), int(frame.shape[0])]
            if writer.add(frame, seq=seq, pos=pos, t_wall_ns=time.time_ns()):
                status = "done"
                break
            if progress is not None:
                progress({"frames": writer.frames, "revolutions": writer.revolutions, "captured": n})
            if t_cam > timeout_s or (max_frames is not None and n >= max_frames):
                raise RecordingError(
                    f"camera {camera.id!r}: the recording did not cover {writer.meta['min_revolutions']} whole "
                    f"revolutions in {n} frames ({t_cam:.0f} s): {writer.revolutions} so far; is the machine "
                    "turning and the fabric position counting revolutions?")
    except RecordingError as e:
        writer.finish("failed", error=str(e))
        raise
    except BaseException:
        writer.finish("cancelled")
        raise
    finally:
        source.close()
        if position is not None:
            position.close()
    if status == "cancelled":
        writer.finish("cancelled")
    writer.finish("done")  # no-op when add() already finished it
    return dict(writer.meta)


# ---------------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    checkpoint: Path
    kind: str
    device: str
    preprocess: dict[str, Any]
    thresholds: dict[str, float]
    train_frames: int
    validation_frames: int
    train_revolutions: list[int]
    validation_revolutions: list[int]
    tiles: int
    pitch: float | None
    steps: int
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["checkpoint"] = str(self.checkpoint)
        return d


def split_frames(recording: Recording, holdout: int) -> tuple[list[RecordedFrame], list[RecordedFrame]]:
    """(training frames, validation frames) by whole revolutions; :class:`LearnError` when the recording
    has too few revolutions or frames for that."""
    revs = sorted({f.revolution for f in recording.frames if f.revolution is not None})
    need = holdout + 2  # training revolution(s), the gap revolution, the held-back one(s)
    if len(revs) < need:
        raise LearnError(
            f"recording {recording.folder} covers {len(revs)} revolution(s) with positioned frames "
            f"({len(recording)} frames); learning needs at least {need}: {holdout} held back for validation, "
            "one left out between them and the training frames, and one or more to train on. Record longer "
            "(learn record --minutes/--frames) or lower [learn] validation_revolutions")
    train, val = recording.split_revolutions(holdout)
    if len(train) < MIN_TRAIN_FRAMES or not val:
        raise LearnError(f"recording {recording.folder}: {len(train)} training and {len(val)} validation frames; "
                         f"needs at least {MIN_TRAIN_FRAMES} and 1: record more frames per revolution")
    return train, val


def thin(frames: list[RecordedFrame], n: int) -> list[RecordedFrame]:
    """At most ``n`` frames, evenly spread over ``frames`` (their order kept)."""
    if len(frames) <= n:
        return list(frames)
    idx = np.unique(np.linspace(0, len(frames) - 1, n).round().astype(int))
    return [frames[i] for i in idx]


def measure_pitch(frames: list[RecordedFrame],
                  roi: tuple[int, int, int, int] | None = None) -> tuple[float | None, int]:
    """(median loop pitch, frames measured) over up to :data:`PITCH_FRAMES` frames; None when fewer than
    half of them show a periodic texture."""
    from knitwatch.pipeline.preprocess import estimate_pitch

    sample = thin(frames, PITCH_FRAMES)
    pitches = []
    for f in sample:
        img = f.image()
        if roi is not None:
            x0, y0, x1, y1 = roi
            img = img[y0:y1, x0:x1]
        p = estimate_pitch(img)
        if p is not None:
            pitches.append(p)
    if len(pitches) * 2 < len(sample):
        return None, len(sample)
    return float(np.median(pitches)), len(sample)


def preprocess_config(frames: list[RecordedFrame], *, tile: int, roi: tuple[int, int, int, int] | None,
                      scale: float | None, where: str) -> tuple[Any, float | None]:
    """The checkpoint's preprocessing: with ``scale`` every frame is resized by it; otherwise the loop
    pitch measured on the training frames becomes the target pitch (the live tiler then brings any frame
    to that loop size). :class:`LearnError` "no fabric texture" when the pitch cannot be measured."""
    from knitwatch.pipeline.preprocess import PreprocessConfig, PreprocessParams

    pitch, measured = measure_pitch(frames, roi)
    try:
        if scale is not None:
            return PreprocessConfig(PreprocessParams(scale=scale, tile=tile, stride=tile)), pitch
        if pitch is None:
            raise LearnError(
                f"no fabric texture in the recorded frames of {where}: the loop pitch could not be measured in "
                f"{measured} of them (no periodic knit texture: lens covered, out of focus, wrong camera?); "
                "give a fixed scale (--scale 1.0) to train without scale normalisation")
        return PreprocessConfig(PreprocessParams(scale=1.0, tile=tile, stride=tile), target_pitch=pitch), pitch
    except ValueError as e:
        if isinstance(e, LearnError):
            raise
        raise LearnError(f"preprocessing of {where}: {e}") from None


def frame_tiles(frames: list[RecordedFrame], config: Any, roi: tuple[int, int, int, int] | None) -> np.ndarray:  # noqa: ANN401
    """The training tiles of ``frames``: each frame cut by the one preprocessing path at its own scale
    (target pitch / its measured pitch), as the live tiler cuts it; blank tiles left out."""
    from knitwatch.pipeline.preprocess import PreprocessConfig, Preprocessor

    params = config.params if roi is None else dataclasses.replace(config.params, roi=roi)
    pre = Preprocessor(PreprocessConfig(params, config.target_pitch), every=1, window=1)
    out = []
    for f in frames:
        tiles, grid = pre(f.image())
        out.append(tiles[grid.valid] if grid.valid.any() else tiles)
    return np.concatenate(out)


def resolve_kind(model_kind: str, device: str) -> str:
    from knitwatch.models.registry import trainable_kinds

    kind = default_model(device) if model_kind == "auto" else model_kind
    if kind not in trainable_kinds():
        raise LearnError(f"model kind {model_kind!r} cannot be trained here; one of auto, "
                         f"{', '.join(trainable_kinds())}")
    return kind


def train_article(recording: Recording, out_dir: Path | str, *, model_kind: str = "auto", steps: int | None = None,
                  tile: int | None = None, scale: float | None = None, validation_revolutions: int = 1,
                  device: str = "auto", threads: int | None = None, distill_steps: int = DEFAULT_DISTILL_STEPS,
                  batch_size: int | None = None, roi: tuple[int, int, int, int] | None = None,
                  max_train_frames: int = MAX_TRAIN_FRAMES, seed: int = 0, progress: bool = True) -> TrainResult:
    """Train a model for the fabric of ``recording`` into ``out_dir/model.ckpt`` (see the module)."""
    import torch

    from knitwatch.models.base import save_model
    from knitwatch.pipeline.detector import resolve_device

    t0 = time.monotonic()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    dev = resolve_device(device)
    kind = resolve_kind(model_kind, dev)
    fam = family(kind)
    n_steps = int(steps) if steps is not None else default_steps(kind)
    if n_steps < 1:
        raise LearnError(f"--steps must be >= 1, got {n_steps}")
    tile = int(tile) if tile is not None else DEFAULT_TILE[fam]
    train, val = split_frames(recording, validation_revolutions)
    used = thin(train, max_train_frames)
    config, pitch = preprocess_config(used, tile=tile, roi=roi, scale=scale, where=str(recording.folder))
    tiles = frame_tiles(used, config, roi)
    if len(tiles) < 8:
        raise LearnError(f"recording {recording.folder}: only {len(tiles)} fabric tiles of {tile} px in the training "
                         "frames; record larger frames or train with a smaller --tile")
    log.info("learning a fabric", recording=str(recording.folder), kind=kind, device=dev, tiles=len(tiles),
             tile=tile, pitch=pitch, steps=n_steps, train_frames=len(used), validation_frames=len(val))
    common: dict[str, Any] = {"val_fraction": 0.1, "device": dev, "seed": seed, "progress": progress}
    model: Any
    if fam == "msflow":
        from knitwatch.models.msflow.train import train_msflow

        model, info = train_msflow(tiles, backbone=kind[len("msflow-"):], steps=n_steps,
                                   batch_size=batch_size or 16, **common)
    else:
        from knitwatch.models.efficientad.train import train_efficientad

        model, info = train_efficientad(tiles, size=kind.split("-")[1], steps=n_steps, batch_size=batch_size or 8,
                                        teacher_distill_steps=distill_steps, **common)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "model.ckpt"
    article = str(recording.meta.get("article", "fabric"))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    train_revs = sorted({f.revolution for f in train if f.revolution is not None})
    val_revs = sorted({f.revolution for f in val if f.revolution is not None})
    provenance = {"id": f"{article}-{kind}-{stamp}", "dataset": f"recording {recording.folder}",
                  "article": article, "camera": recording.meta.get("camera"), "train_tiles": int(len(tiles)),
                  "train_frames": len(used), "created": datetime.now(UTC).isoformat(timespec="seconds"),
                  "device": dev}
    save_model(ckpt, model, preprocess=config.to_dict(), provenance=provenance,
               extra={"training": _scalars(info)})
    return TrainResult(checkpoint=ckpt, kind=kind, device=dev, preprocess=config.to_dict(),
                       thresholds={k: float(v) for k, v in model.thresholds().items()},
                       train_frames=len(used), validation_frames=len(val), train_revolutions=train_revs,
                       validation_revolutions=val_revs, tiles=int(len(tiles)), pitch=pitch, steps=n_steps,
                       seconds=round(time.monotonic() - t0, 1),
                       info={"recorded_train_frames": len(train), "tile": tile,
                             "threads": torch.get_num_threads(), "final_loss": _scalars(info).get("final_loss")})


def _scalars(info: dict[str, Any]) -> dict[str, Any]:
    """The plain numbers and words of a trainer's info dict (what a checkpoint's JSON part can hold)."""
    out: dict[str, Any] = {}
    for k, v in info.items():
        if isinstance(v, bool | int | str):
            out[k] = v
        elif isinstance(v, float):
            out[k] = v if math.isfinite(v) else None
    return out


# ---------------------------------------------------------------------------------------------- validation


class _Inspector:
    """One camera's frames through the daemon's path: the tiler's preprocessor, the detector, stitching,
    the frame score, then the decision layer with a fresh tracker."""

    def __init__(self, ckpt_path: Path, alert: AlertConfig, *, camera: CameraConfig | None,
                 tiling: TilingConfig | None, device: str, backend: str) -> None:
        from knitwatch.pipeline.decision.frame import tracker_config
        from knitwatch.pipeline.decision.tracking import Tracker
        from knitwatch.pipeline.detector import load_detector
        from knitwatch.pipeline.preprocess import Preprocessor
        from knitwatch.pipeline.stages.tiler import camera_preprocessors

        self.det = load_detector(ckpt_path, device, backend)
        thr = self.det.thresholds
        self.image_thr = float(alert.image_threshold if alert.image_threshold is not None else thr["image"])
        cam_pixel = camera.pixel_threshold if camera is not None else None
        pixel = next(v for v in (cam_pixel, alert.pixel_threshold, thr.get("pixel"), thr["image"]) if v is not None)
        self.pixel_thr = float(pixel)
        self.alert = alert
        if camera is not None:
            self.pre = camera_preprocessors(self.det.preprocess, [camera], tiling or TilingConfig())[camera.id]
        else:
            every = (tiling or TilingConfig()).pitch_refresh_frames
            self.pre = Preprocessor.from_dict(self.det.preprocess, every=every)
        self.tracker = Tracker(tracker_config(alert, self.image_thr))
        self.next_id = 0
        self.stopped: set[int] = set()
        self.alarmed: set[int] = set()
        self.positions = {"ok": 0, "missing": 0, "not_ok": 0, "bad": 0}
        self.max_score = 0.0
        self.max_map = 0.0

    def frame(self, img: np.ndarray, seq: int, pos_header: Any) -> Any:  # noqa: ANN401
        from knitwatch.pipeline.decision.frame import decide_frame
        from knitwatch.pipeline.decision.regions import frame_score
        from knitwatch.pipeline.decision.tracking import parse_position
        from knitwatch.pipeline.preprocess import stitch

        tiles, grid = self.pre(img)
        maps, scores = self.det.predict(tiles)
        amap = stitch(maps, grid)
        self.max_score = max(self.max_score, frame_score(scores, grid.valid))
        self.max_map = max(self.max_map, float(amap.max()) if amap.size else 0.0)
        pos, how = parse_position(pos_header)
        self.positions[how] = self.positions.get(how, 0) + 1
        outcome = decide_frame(self.tracker, amap, seq=seq, pos=pos, pixel_threshold=self.pixel_thr,
                               image_threshold=self.image_thr, min_area_px=self.alert.min_area_px)
        for d in outcome.tracks.decisions:
            if d.new_event:
                self.next_id += 1
                d.event.event_id = self.next_id
            eid = d.event.event_id
            if eid is None:
                continue
            if d.event.severity.action == "stop":
                self.stopped.add(eid)
            elif d.event.severity.action == "alarm":
                self.alarmed.add(eid)
        return outcome


def validate(ckpt_path: Path | str, frames: list[RecordedFrame], alert: AlertConfig, *, fps_hint: float | None,
             paced: bool = True, camera: CameraConfig | None = None, tiling: TilingConfig | None = None,
             device: str = "auto", backend: str = "auto", progress: ProgressFn | None = None) -> dict[str, Any]:
    """The new model over held-back normal frames, through the daemon's path and the decision layer.

    Every event on these frames is a false one (they are normal fabric by definition: recorded from
    running production, through the daemon without the frames its model flagged). Hours: the frames'
    wall-clock span (plus one frame period) when they were recorded at the camera's pace, else
    frames / ``fps_hint``. ``false_stops_per_hour`` is stops / hours; ``false_stops_per_hour_upper95``
    the 95 % upper bound of a Poisson rate with that many stops in that time (3 / hours for none): short
    validations cannot promise a low rate, and this says how much they can.
    """
    if not frames:
        raise LearnError("no validation frames")
    insp = _Inspector(Path(ckpt_path), alert, camera=camera, tiling=tiling, device=device, backend=backend)
    t0 = time.monotonic()
    for i, f in enumerate(frames):
        insp.frame(f.image(), f.seq, f.pos)
        if progress is not None:
            progress({"validated": i + 1, "of": len(frames)})
    n = len(frames)
    span_s = (frames[-1].t_wall_ns - frames[0].t_wall_ns) / 1e9
    period = 1.0 / fps_hint if fps_hint else (span_s / (n - 1) if n > 1 else 1.0)
    if paced and span_s > 0:
        seconds, how = span_s + period, "wall clock"
    elif fps_hint:
        seconds, how = n / fps_hint, "frames / fps"
    else:
        seconds, how = max(span_s + period, 1e-3), "wall clock"
    hours = seconds / 3600.0
    stops = len(insp.stopped)
    return {
        "frames": n, "hours": round(hours, 5), "hours_from": how,
        "stops": stops, "alarms": len(insp.alarmed), "events": insp.next_id,
        "false_stops_per_hour": round(stops / hours, 3),
        "false_stops_per_hour_upper95": round(_poisson_upper95(stops) / hours, 3),
        "image_threshold": round(insp.image_thr, 5), "pixel_threshold": round(insp.pixel_thr, 5),
        "max_image_score": round(insp.max_score, 5), "max_map_value": round(insp.max_map, 5),
        "max_score_vs_threshold": round(insp.max_score / insp.image_thr, 3) if insp.image_thr > 0 else None,
        "positions": insp.positions, "backend": insp.det.backend, "device": insp.det.device,
        "seconds": round(time.monotonic() - t0, 1),
    }


def _poisson_upper95(k: int) -> float:
    """The one-sided 95 % upper confidence limit of a Poisson mean after ``k`` events (exact, by bisection
    on the cumulative probability)."""
    def cdf(mu: float) -> float:
        term = total = math.exp(-mu)
        for i in range(1, k + 1):
            term *= mu / i
            total += term
        return total

    lo, hi = float(k), float(k) + 10.0 + 5.0 * math.sqrt(k + 1)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if cdf(mid) > 0.05:
            lo = mid
        else:
            hi = mid
    return hi


def refusal(figures: dict[str, Any], max_false_stops_per_hour: float) -> str | None:
    """Why a validated model must not be installed (None: it may)."""
    rate = float(figures["false_stops_per_hour"])
    if rate > max_false_stops_per_hour:
        return (f"estimated {rate:g} false stops per hour ({figures['stops']} stop(s) in {figures['frames']} "
                f"held-back normal frames, {figures['hours'] * 60:.1f} min) exceeds [learn] "
                f"max_false_stops_per_hour = {max_false_stops_per_hour:g}; the highest frame score was "
                f"{figures['max_image_score']:g} against the image threshold {figures['image_threshold']:g}. "
                "Record longer (more revolutions to learn from) or train longer (--steps)")
    return None


# ---------------------------------------------------------------------------------------------- recall


SIM_DEFECTS = ("hole", "ladder", "needle_line", "tension_stripe", "oil_stain", "slub", "fly")


def recall_on_simulator(ckpt_path: Path | str, camera: CameraConfig, alert: AlertConfig, *, frames: int | None = None,
                        tiling: TilingConfig | None = None, device: str = "auto", backend: str = "auto",
                        seed: int | None = None, progress: ProgressFn | None = None) -> dict[str, Any]:
    """For a simulator camera: its fabric with one scheduled defect of every kind (the needle line a
    broken needle, back every revolution), through the daemon's path and the decision layer with the
    new model. A defect counts as found when a confirmed track overlaps its true box in some frame, and
    as stopped when that track's event is a stop. Returns per kind and the recall (found / defects)."""
    from knitwatch.config.settings import ScheduledDefectConfig
    from knitwatch.pipeline.decision.frame import union_box

    if camera.source != "simulator":
        raise LearnError(f"recall on the simulator needs a simulator camera; {camera.id!r} is {camera.source!r}")
    gap = max(20, camera.simulator.revolution_frames // 2)
    n = frames if frames is not None else 10 + gap * len(SIM_DEFECTS) + 20
    defects = [ScheduledDefectConfig(kind=k, frame=10 + i * gap, size=2.0, intensity=1.5,
                                     every_revolution=k == "needle_line")
               for i, k in enumerate(SIM_DEFECTS) if 10 + i * gap < n - 10]
    sim = camera.simulator.model_copy(update={"defects": defects, "random_defect_rate": 0.0,
                                              "seed": camera.simulator.seed + 1 if seed is None else seed})
    cam = camera.model_copy(update={"simulator": sim})
    source, position = open_camera(cam)
    insp = _Inspector(Path(ckpt_path), alert, camera=cam, tiling=tiling, device=device, backend=backend)
    found: dict[int, dict[str, Any]] = {}
    false_events: set[int] = set()
    try:
        for seq in range(n):
            img = source.read()
            truth = getattr(source, "truth", None) or {}
            outcome = insp.frame(img, seq, locate(position, img, source))
            boxes = {int(d["id"]): d for d in truth.get("defects", []) if d.get("id") is not None}
            for d in outcome.tracks.decisions:
                x0, y0, x1, y1 = union_box(d.track)
                hit = [i for i, t in boxes.items() if x0 < t["box"][2] + 8 and t["box"][0] - 8 < x1
                       and y0 < t["box"][3] + 8 and t["box"][1] - 8 < y1]
                for i in hit:
                    rec = found.setdefault(i, {"kind": boxes[i]["kind"], "stopped": False, "frame": seq})
                    rec["stopped"] = rec["stopped"] or d.event.severity.action == "stop"
                if not hit and d.event.event_id is not None:
                    false_events.add(d.event.event_id)
            if progress is not None:
                progress({"recall_frames": seq + 1, "of": n})
    finally:
        source.close()
        if position is not None:
            position.close()
    kinds = {d.kind: {"found": False, "stopped": False} for d in defects}
    for rec in found.values():
        kinds[rec["kind"]] = {"found": True, "stopped": bool(rec["stopped"]) or kinds[rec["kind"]]["stopped"]}
    total = len(defects)
    return {"defects": total, "found": sum(v["found"] for v in kinds.values()),
            "stopped": sum(v["stopped"] for v in kinds.values()),
            "recall": round(sum(v["found"] for v in kinds.values()) / total, 3) if total else None,
            "stop_recall": round(sum(v["stopped"] for v in kinds.values()) / total, 3) if total else None,
            "events_elsewhere": len(false_events), "frames": n, "per_kind": kinds}
