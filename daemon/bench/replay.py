"""Record the model's outputs on simulated fabric, and replay the alert stage's decision layer over them.

``knitwatch bench detection CKPT --record DIR``: simulated fabric (the camera and defect schedule of
``bench detection``, or ``--defect-free``) goes frame by frame through the live daemon's code, in batch
and without real-time waiting: the capture stage's source and fabric position estimator, the tiler's
preprocessor (:func:`~knitwatch.pipeline.stages.tiler.camera_preprocessors`), the inference worker's
detector (:func:`~knitwatch.pipeline.detector.load_detector`, forward passes over the tiles of many
frames), its stitching and frame score. Per frame the recording keeps what the inference stage sends
the alert stage - image score, tile scores, stitched anomaly map, the fabric position header - and the
simulator's truth.

The folder holds ``recording.json`` (format version, the model, the camera, the stream, the chunks
written so far; rewritten after every chunk, so an interrupted recording can still be replayed up to
its last chunk) and ``chunk-NNNNN.npz`` files of ``CHUNK_FRAMES`` frames each. Anomaly maps are kept
*sparse*: only the pixels at or above ``map_floor`` (default half the lower of the checkpoint's image
and pixel thresholds), as exact float32 values with their flat index; the rest read back as 0. Every
decision at thresholds at or above the floor is the one the full map gives (a region is made of the
pixels at or above the pixel threshold, its peak is the highest of them); replay refuses thresholds
below it.

``knitwatch bench detection --replay DIR [--set alert.KEY=VALUE ...]``: the decision layer - the very
function the live alert stage calls per frame (:func:`~knitwatch.pipeline.decision.frame.decide_frame`:
regions, per-track confirmation, tracking on the fabric, recurrence, severity) - runs over the recording
with the ``[alert]`` settings (of ``--config``, else their defaults; changed by ``--set``), no waiting;
its per-frame records (the decisions log's lines) go to ``bench detection``'s per-defect report: false
stops, false stops per hour of defect-free fabric, events, recall and duplicates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knitwatch.config.settings import AlertConfig, CameraConfig, PositionConfig, SimulatorConfig, TilingConfig
from knitwatch.daemon.cli.common import EXIT_FAIL, CliError, load_config

FORMAT = "knitwatch-recording"
VERSION = 1
CHUNK_FRAMES = 1000
MANIFEST = "recording.json"


# ---------------------------------------------------------------------------------------------- recording


def bench_camera(*, fps: float, seed: int, defects: list[dict[str, Any]], position: str, width: int,
                 height: int, texture: str = "jersey", pitch_px: float = 6.0,
                 brightness: float = 128.0) -> CameraConfig:
    """The simulated camera of ``bench detection`` (the demo's fabric, speed and revolution; ``texture``:
    jersey, the demo's, or pique - another article a machine may change to, with its own loop pitch and
    yarn brightness)."""
    from knitwatch.daemon.cli.demo import DEMO_REV, DEMO_SPEED

    return CameraConfig(id="bench", source="simulator", fps=fps, width=width, height=height,
                        simulator=SimulatorConfig(pitch_px=pitch_px, speed_px=DEMO_SPEED, revolution_frames=DEMO_REV,
                                                  seed=seed, defects=defects, texture=texture, brightness=brightness),
                        position=PositionConfig(source=position))  # type: ignore[arg-type]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class _Frame:
    seq: int
    tiles: np.ndarray
    grid: Any  # TileGrid
    head: dict[str, Any]  # pos, truth


class ChunkWriter:
    """Collects frames' outputs and writes them as one ``.npz`` chunk."""

    def __init__(self, floor: float) -> None:
        self.floor = floor
        self.seq: list[int] = []
        self.score: list[float] = []
        self.tiles: list[np.ndarray] = []
        self.count: list[int] = []
        self.index: list[np.ndarray] = []
        self.value: list[np.ndarray] = []
        self.heads: list[dict[str, Any]] = []
        self.kept = 0

    def add(self, seq: int, score: float, tile_scores: np.ndarray, amap: np.ndarray, head: dict[str, Any]) -> None:
        flat = np.asarray(amap, dtype=np.float32).ravel()
        idx = np.flatnonzero(flat >= self.floor).astype(np.uint32)
        self.seq.append(seq)
        self.score.append(score)
        self.tiles.append(np.asarray(tile_scores, dtype=np.float32))
        self.count.append(len(idx))
        self.index.append(idx)
        self.value.append(flat[idx])
        self.heads.append(head)
        self.kept += len(idx)

    def __len__(self) -> int:
        return len(self.seq)

    def write(self, path: Path) -> None:
        width = max((len(t) for t in self.tiles), default=0)
        tiles = np.full((len(self.tiles), width), np.nan, np.float32)  # frames of one stream have one grid
        for i, t in enumerate(self.tiles):
            tiles[i, : len(t)] = t
        heads = np.frombuffer(json.dumps(self.heads).encode(), dtype=np.uint8)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(tmp, seq=np.asarray(self.seq, np.int64), image_score=np.asarray(self.score, np.float32),
                            tile_scores=tiles, map_count=np.asarray(self.count, np.int64),
                            map_index=np.concatenate(self.index) if self.index else np.zeros(0, np.uint32),
                            map_value=np.concatenate(self.value) if self.value else np.zeros(0, np.float32),
                            heads=heads)
        os.replace(tmp, path)


def record(ckpt_path: Path, out: Path, *, frames: int, fps: float, defect_free: bool, seed: int, position: str,
           width: int, height: int, device: str, backend: str, batch_frames: int, map_floor: float | None,
           tiling: TilingConfig | None = None, progress_every_s: float = 10.0,
           texture: str = "jersey", pitch_px: float = 6.0, brightness: float = 128.0) -> dict[str, Any]:
    """Record ``frames`` frames of simulated fabric through the live code path into ``out`` (see the
    module's description); returns the manifest."""
    from knitwatch.daemon.bench.detection import detection_schedule
    from knitwatch.models.export import checkpoint_sha256
    from knitwatch.pipeline.decision.regions import frame_score
    from knitwatch.pipeline.detector import load_detector
    from knitwatch.pipeline.position import make_position
    from knitwatch.pipeline.preprocess import stitch
    from knitwatch.pipeline.sources.base import make_source
    from knitwatch.pipeline.stages.tiler import camera_preprocessors

    det = load_detector(ckpt_path, device, backend)
    thresholds = {k: float(v) for k, v in det.thresholds.items()}
    floor = map_floor if map_floor is not None else 0.5 * min(det.image_threshold, det.pixel_threshold)
    defects = [] if defect_free else detection_schedule(frames)
    cam = bench_camera(fps=fps, seed=seed, defects=defects, position=position, width=width, height=height,
                       texture=texture, pitch_px=pitch_px, brightness=brightness)
    source = make_source(cam)
    source.open()
    estimator = make_position(cam)
    pre = camera_preprocessors(det.preprocess, [cam], tiling or TilingConfig())[cam.id]
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "complete": False,
        "model": {"id": det.checkpoint_id, "kind": det.kind, "sha256": checkpoint_sha256(ckpt_path),
                  "path": str(ckpt_path), "thresholds": thresholds, "backend": det.backend, "device": det.device},
        "camera": json.loads(cam.model_dump_json()),
        "fps": fps, "frames_planned": frames, "defect_free": defect_free, "map_floor": floor,
        "map_shape": [cam.height, cam.width], "chunks": [], "frames": 0, "simulated_hours": 0.0,
        "map_pixels_kept": 0, "seconds": 0.0,
    }
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    t0 = time.monotonic()
    next_report = t0 + progress_every_s
    chunk = ChunkWriter(floor)
    pending: list[_Frame] = []
    max_tiles = max(1, batch_frames) * 64

    def flush_chunk() -> None:
        name = f"chunk-{len(manifest['chunks']):05d}.npz"
        chunk.write(out / name)
        manifest["chunks"].append(name)
        manifest["frames"] += len(chunk)
        manifest["map_pixels_kept"] += chunk.kept
        manifest["simulated_hours"] = round(manifest["frames"] / fps / 3600.0, 4)
        manifest["seconds"] = round(time.monotonic() - t0, 1)
        _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())

    def run_batch() -> None:  # the inference worker's part: forward passes, stitching, the frame's score
        nonlocal chunk
        tiles = np.concatenate([f.tiles for f in pending])
        maps_l, scores_l = [], []
        for a in range(0, len(tiles), max_tiles):
            m, s = det.predict(tiles[a : a + max_tiles])
            maps_l.append(m)
            scores_l.append(s)
        maps, scores = np.concatenate(maps_l), np.concatenate(scores_l)
        at = 0
        for f in pending:
            n = len(f.tiles)
            fm, fs = maps[at : at + n], scores[at : at + n]
            at += n
            chunk.add(f.seq, frame_score(fs, f.grid.valid), fs, stitch(fm, f.grid), f.head)
            if len(chunk) >= CHUNK_FRAMES:
                flush_chunk()
                chunk = ChunkWriter(floor)
        pending.clear()

    for seq in range(frames):
        img = source.read()
        assert img is not None  # the simulator always has a next frame
        truth = getattr(source, "truth", None)
        head: dict[str, Any] = {"truth": truth}
        if estimator is not None:  # the capture stage's header (None when the estimator fails, as there)
            try:
                head["pos"] = estimator.update(img, truth)
            except Exception:  # noqa: BLE001 - counted by the stage; here the frame goes on without a position
                head["pos"] = None
        tiles, grid = pre(img)
        pending.append(_Frame(seq, tiles, grid, head))
        if len(pending) < batch_frames:
            continue
        run_batch()
        now = time.monotonic()
        if now >= next_report:
            next_report = now + progress_every_s
            done = seq + 1  # simulated, positioned, tiled and inferred
            rate = done / (now - t0)
            sys.stderr.write(f"  recorded {done}/{frames} frames ({done / fps / 3600:.2f} of "
                             f"{frames / fps / 3600:.2f} simulated h), {rate:.1f} frames/s, "
                             f"ETA {(frames - done) / rate / 60:.1f} min\n")
    if pending:
        run_batch()
    if len(chunk):
        flush_chunk()
    manifest["complete"] = True
    manifest["seconds"] = round(time.monotonic() - t0, 1)
    if estimator is not None:
        manifest["position"] = estimator.stats()
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1, default=str).encode())
    return manifest


# ---------------------------------------------------------------------------------------------- reading


def load_manifest(folder: Path) -> dict[str, Any]:
    """A recording's manifest, checked: a missing or foreign folder, or another format version -> CliError."""
    if not folder.is_dir():
        raise CliError(f"--replay {folder}: no such folder")
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CliError(f"--replay {folder}: not a recording (no {MANIFEST}; make one with "
                       "'knitwatch bench detection CKPT --record DIR')") from None
    except (OSError, ValueError) as e:
        raise CliError(f"{path}: cannot read it ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CliError(f"{path}: not a knitwatch recording")
    if manifest.get("version") != VERSION:
        raise CliError(f"{path}: recording format version {manifest.get('version')!r}, this knitwatch reads version "
                       f"{VERSION}: record it again")
    for key in ("model", "camera", "fps", "map_floor", "map_shape", "chunks"):
        if key not in manifest:
            raise CliError(f"{path}: incomplete manifest (no {key!r})")
    missing = [c for c in manifest["chunks"] if not (folder / c).is_file()]
    if missing:
        raise CliError(f"{folder}: chunk files missing: {', '.join(missing[:5])}")
    return manifest


@dataclass
class RecordedFrame:
    seq: int
    image_score: float
    tile_scores: np.ndarray
    amap: np.ndarray  # float32, frame pixels; values below the recording's floor read as 0
    head: dict[str, Any]  # "pos" (when the camera had a position source), "truth"


def frames_of(folder: Path, manifest: dict[str, Any]) -> Iterator[RecordedFrame]:
    """The recorded frames in order (one chunk in memory at a time)."""
    shape = tuple(int(v) for v in manifest["map_shape"])
    size = int(np.prod(shape))
    for name in manifest["chunks"]:
        path = folder / name
        try:
            with np.load(path) as z:
                seq, score, tiles = z["seq"], z["image_score"], z["tile_scores"]
                count, index, value = z["map_count"], z["map_index"], z["map_value"]
                heads = json.loads(z["heads"].tobytes().decode())
        except (OSError, ValueError, KeyError) as e:
            raise CliError(f"{path}: not a readable chunk of a recording ({e})") from None
        if not (len(seq) == len(score) == len(count) == len(heads)) or int(count.sum()) != len(index):
            raise CliError(f"{path}: inconsistent chunk (frame counts differ)")
        if len(index) and int(index.max()) >= size:
            raise CliError(f"{path}: map index beyond the map's {shape} pixels")
        ends = np.cumsum(count)
        for i in range(len(seq)):
            amap = np.zeros(size, np.float32)
            a, b = int(ends[i] - count[i]), int(ends[i])
            amap[index[a:b]] = value[a:b]
            t = tiles[i]
            yield RecordedFrame(int(seq[i]), float(score[i]), t[~np.isnan(t)], amap.reshape(shape), heads[i])


# ---------------------------------------------------------------------------------------------- replay


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``alert.KEY=VALUE`` items -> {KEY: value} (VALUE as JSON when it parses, else the string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key.startswith("alert.") or len(key) <= len("alert."):
            raise CliError(f"--set {item!r}: expected alert.KEY=VALUE (the decision settings of [alert], "
                           "e.g. alert.confirm_k=3)")
        name = key[len("alert."):]
        if name not in AlertConfig.model_fields or name == "decisions_log":
            known = ", ".join(k for k in AlertConfig.model_fields if k != "decisions_log")
            raise CliError(f"--set {key}: no such decision setting (one of: {known})")
        try:
            out[name] = json.loads(raw)
        except ValueError:
            out[name] = raw
    return out


def alert_settings(base: AlertConfig, sets: dict[str, Any]) -> AlertConfig:
    """``base`` (the config's ``[alert]``) with the ``--set`` values, validated as the config is."""
    from pydantic import ValidationError

    try:
        return AlertConfig(**{**base.model_dump(exclude={"decisions_log"}), **sets})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or ", ".join(sorted(sets))
        raise CliError(f"--set alert.{where}: {err['msg']}") from None


def replay(folder: Path, manifest: dict[str, Any], alert: AlertConfig, *,
           progress_every_s: float = 10.0, reposition: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the decision layer over a recording: its per-frame records (the decisions log's lines) and
    the settings it ran with. ``reposition``: each frame's fabric position is computed again by this
    version's estimator over the simulator's frames, rendered again (a recording made before the
    position estimator changed; the maps are the recorded ones)."""
    from knitwatch.pipeline.decision.frame import decide_frame, decision_record, tracker_config
    from knitwatch.pipeline.decision.tracking import Tracker, parse_position

    thr = manifest["model"]["thresholds"]
    image_thr = float(alert.image_threshold if alert.image_threshold is not None else thr["image"])
    pixel_thr = float(alert.pixel_threshold if alert.pixel_threshold is not None else thr.get("pixel", thr["image"]))
    floor = float(manifest["map_floor"])
    if min(image_thr, pixel_thr) < floor:
        raise CliError(f"thresholds image {image_thr:g} / pixel {pixel_thr:g}: the recording kept the anomaly maps "
                       f"only at or above {floor:g} (its map floor); record again with a lower --map-floor")
    tracker = Tracker(tracker_config(alert, image_thr))
    cam = str(manifest["camera"].get("id", "bench"))
    rows: list[dict[str, Any]] = []
    positions: Counter[str] = Counter()
    next_id = 0
    total = int(manifest.get("frames") or 0)
    t0 = time.monotonic()
    next_report = t0 + progress_every_s
    positions_of = _repositioned(manifest) if reposition else None
    for f in frames_of(folder, manifest):
        if positions_of is not None:
            f.head["pos"] = positions_of(f.seq)
        pos, how = parse_position(f.head.get("pos"))
        positions[how] += 1
        outcome = decide_frame(tracker, f.amap, seq=f.seq, pos=pos, pixel_threshold=pixel_thr,
                               image_threshold=image_thr, min_area_px=alert.min_area_px)
        new_events = []
        for d in outcome.tracks.decisions:
            if d.new_event:  # the live stage binds the store's id here
                next_id += 1
                d.event.event_id = next_id
                new_events.append(next_id)
        rows.append(decision_record(cam, f.seq, f.image_score, outcome, pos=pos, new_events=new_events,
                                    latency_ms=None, truth=f.head.get("truth")))
        now = time.monotonic()
        if now >= next_report:
            next_report = now + progress_every_s
            rate = len(rows) / (now - t0)
            sys.stderr.write(f"  replayed {len(rows)}/{total} frames, {rate:.0f} frames/s, "
                             f"ETA {(total - len(rows)) / rate:.0f} s\n")
    used = {"image_threshold": image_thr, "pixel_threshold": pixel_thr, "min_area_px": alert.min_area_px,
            "confirm": f"{alert.confirm_k} of {alert.confirm_n}", "cooldown_frames": alert.cooldown_frames,
            "recurrence_stop_revolutions": alert.recurrence_stop_revolutions,
            "severity": [f"{c.name}:{c.action}" for c in alert.severity], "position": dict(positions),
            "replay_seconds": round(time.monotonic() - t0, 1), "recurring_defects": tracker.recurring_defects,
            **{k: v for k, v in tracker.stats().items() if k.startswith("cutline_")}}
    return rows, used


# ---------------------------------------------------------------------------------------------- commands


def _repositioned(manifest: dict[str, Any]) -> Callable[[int], dict[str, Any] | None]:
    """``seq -> pos`` of this version's position estimator over the recording's simulated camera (frames
    in order, as recorded)."""
    from knitwatch.config.settings import CameraConfig
    from knitwatch.pipeline.position import make_position
    from knitwatch.pipeline.sources.base import make_source

    cam = CameraConfig.model_validate(manifest["camera"])
    if cam.source != "simulator":
        raise CliError(f"--reposition needs a recording of the simulator's camera, not {cam.source!r}")
    source = make_source(cam)
    source.open()
    estimator = make_position(cam)
    state = {"next": 0}

    def position(seq: int) -> dict[str, Any] | None:
        if seq < state["next"]:
            raise CliError(f"--reposition: the recording's frames are not in order (frame {seq})")
        pos = None
        while state["next"] <= seq:
            img = source.read()
            assert img is not None  # the simulator always has a next frame
            pos = estimator.update(img, getattr(source, "truth", None)) if estimator is not None else None
            state["next"] += 1
        return pos

    return position


def writable_folder(folder: Path, option: str) -> None:
    """Make ``folder`` when missing and check that it can be written; else a CliError naming ``option``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".knitwatch-write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise CliError(f"{option} {folder}: cannot make or write the folder ({e.strerror or e})") from None


def cmd_record(args: argparse.Namespace) -> dict[str, Any]:
    """``--record DIR``: checks, then the recording; its manifest."""
    from knitwatch.models.checkpoint import CheckpointError, load_checkpoint

    if args.checkpoint is None:
        raise CliError("--record needs the model: knitwatch bench detection CKPT --record DIR")
    if not args.checkpoint.is_file():
        raise CliError(f"checkpoint not found: {args.checkpoint}")
    try:
        load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        raise CliError(str(e)) from None
    if args.hours is not None:
        if not 0 < args.hours <= 1000:
            raise CliError(f"--hours must be above 0 and at most 1000 (got {args.hours})")
        args.frames = max(1, int(round(args.hours * 3600 * args.fps)))
    if args.frames < 60 and not args.defect_free:
        raise CliError(f"--frames must be at least 60 (got {args.frames}): the defects are spread over the run")
    if args.frames < 1:
        raise CliError(f"--frames must be at least 1 (got {args.frames})")
    if not 2 <= args.pitch <= 64:
        raise CliError(f"--pitch must be within 2 .. 64 px (got {args.pitch:g})")
    if not 10 <= args.brightness <= 245:
        raise CliError(f"--brightness must be within 10 .. 245 (got {args.brightness:g})")
    if not (64 <= args.width <= 8192 and 32 <= args.height <= 8192):
        raise CliError(f"--size {args.width}x{args.height}: width 64 .. 8192, height 32 .. 8192")
    if args.batch_frames < 1:
        raise CliError(f"--batch-frames must be at least 1 (got {args.batch_frames})")
    if args.map_floor is not None and not args.map_floor >= 0:
        raise CliError(f"--map-floor must not be negative (got {args.map_floor})")
    out: Path = args.record
    created = not out.exists()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CliError(f"--record {out}: exists and is not an empty folder (a recording is never written over)")
    tiling = load_config(args).tiling  # [tiling] of --config, as the live tiler takes it: a bad config exits 2
    writable_folder(out, "--record")
    fabric = f"{args.texture} (pitch {args.pitch:g} px, brightness {args.brightness:g})"
    what = f"defect-free {fabric}" if args.defect_free else f"{fabric} with one scheduled defect of every kind"
    sys.stderr.write(f"recording {args.frames} frames ({args.frames / args.fps / 3600:.2f} simulated h at "
                     f"{args.fps:g} fps) of {what} with {args.checkpoint} into {out} ...\n")
    try:
        return record(args.checkpoint, out, frames=args.frames, fps=args.fps, defect_free=args.defect_free,
                      seed=args.seed, position=args.position, width=args.width, height=args.height,
                      device=args.device, backend=args.backend,
                      batch_frames=args.batch_frames, map_floor=args.map_floor, tiling=tiling,
                      texture=args.texture, pitch_px=args.pitch, brightness=args.brightness)
    except BaseException as e:
        # no chunk written yet: nothing worth keeping (a later failure leaves a replayable, unfinished recording)
        if created and not any(out.glob("chunk-*.npz")):
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, RuntimeError):  # the model cannot run on that device / backend
            raise CliError(str(e), EXIT_FAIL) from None
        raise


def cmd_replay(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """``--replay DIR``: checks, then the replay; (records, settings used, manifest)."""
    folder: Path = args.replay
    manifest = load_manifest(folder)
    if args.checkpoint is not None:  # the user names the model they think it is: it must be the one recorded
        from knitwatch.models.export import checkpoint_sha256

        if not args.checkpoint.is_file():
            raise CliError(f"checkpoint not found: {args.checkpoint}")
        if checkpoint_sha256(args.checkpoint) != manifest["model"].get("sha256"):
            raise CliError(f"{folder} was recorded with another model ({manifest['model'].get('id')}, "
                           f"{manifest['model'].get('path')}), not {args.checkpoint}")
    # the [alert] of --config (and KNITWATCH_ALERT__*; the defaults without them), changed by --set
    alert = alert_settings(load_config(args).alert, parse_sets(args.set or []))
    if not manifest.get("chunks"):
        raise CliError(f"{folder}: the recording holds no frames yet")
    if not manifest.get("complete"):
        sys.stderr.write(f"note: {folder} is an unfinished recording: replaying its {manifest.get('frames')} "
                         "frames written so far\n")
    sys.stderr.write(f"replaying {manifest.get('frames')} recorded frames ({manifest.get('simulated_hours')} "
                     f"simulated h) through the decision layer ...\n")
    rows, used = replay(folder, manifest, alert, reposition=args.reposition)
    used["repositioned"] = bool(args.reposition)
    if args.decisions_log is not None:
        try:
            with args.decisions_log.open("w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        except OSError as e:
            raise CliError(f"--decisions-log {args.decisions_log}: cannot write it ({e.strerror or e})") from None
    return rows, used, manifest
