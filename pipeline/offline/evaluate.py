"""Evaluate a detector on whole images (or strips) and load training tiles from a built dataset.

Images are cut with the checkpoint's preprocessing (the one preprocessing path), scored tile by
tile, and the maps are stitched back, so an image's score is the max over its fabric tiles and pixel
metrics are computed on whole images. Blank/padding areas (tiles below ``min_tile_std``) are left out
of pixel metrics.

Metrics (see ``../shared/data/aitex-dev/README.md`` for why the "within defective images" ones exist):

- ``image_auroc``: good images vs defective images (confounded when the two were captured differently);
- ``pixel_auroc`` and ``au_pro`` (FPR up to 0.3) over all test images;
- ``pixel_auroc_in_defective`` / ``au_pro_in_defective``: only pixels of defective images;
- ``tile_auroc_in_defective``: tiles of defective images with >= ``min_defect_px`` defect pixels vs
  the tiles of the same images with none;
- ``precision``/``recall``/``f1`` of image decisions at the stored image threshold;
- ``tiles_per_s`` (model only), ``peak_rss_mb``, ``cuda_max_allocated_mb``.
"""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from tqdm import tqdm

from knitwatch.models import metrics
from knitwatch.pipeline.decision.regions import frame_score
from knitwatch.pipeline.detector import Detector
from knitwatch.pipeline.offline.dataset import DatasetError, discover_images, load_manifest, read_image, read_mask
from knitwatch.pipeline.preprocess import PreprocessConfig, Preprocessor, TileGrid, stitch

log = structlog.get_logger(__name__)


def load_tiles(dataset: Path, *, split: str = "train", label: str = "good") -> tuple[np.ndarray, dict]:
    """The tiles of a built dataset (``knitwatch dataset build``) as one uint8 array, plus its manifest."""
    manifest = load_manifest(dataset)
    grayscale = bool(manifest["preprocess"].get("grayscale", True))
    rows = [t for t in manifest["tiles"] if t["split"] == split and t["label"] == label]
    if not rows:
        raise DatasetError(f"dataset {dataset} has no {split}/{label} tiles")
    tiles = []
    for row in rows:
        img = read_image(Path(dataset) / row["file"])
        if grayscale and img.ndim == 3:
            img = img[:, :, 0]
        tiles.append(img)
    return np.stack(tiles), manifest


@dataclass
class ImageResult:
    path: str
    label: str
    score: float
    amap: np.ndarray
    valid: np.ndarray  # bool, pixels covered by fabric tiles
    mask: np.ndarray | None
    grid: TileGrid
    tile_scores: np.ndarray
    tile_defect_px: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ImageScorer:
    """Score whole images with a detector: tile, predict, stitch."""

    def __init__(self, det: Detector, batch_tiles: int = 32) -> None:
        self.det = det
        self.pre = Preprocessor(PreprocessConfig.from_dict(det.preprocess))
        self.batch_tiles = batch_tiles
        self.model_s = 0.0
        self.tiles = 0

    def score(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, TileGrid, np.ndarray]:
        """(stitched map, valid-pixel mask, grid, tile scores) for one image."""
        tiles, grid = self.pre(image)
        maps, scores = [], []
        for i in range(0, len(tiles), self.batch_tiles):
            t0 = time.perf_counter()
            m, s = self.det.predict(tiles[i : i + self.batch_tiles])
            self.model_s += time.perf_counter() - t0
            maps.append(m)
            scores.append(s)
        self.tiles += len(tiles)
        tile_maps = np.concatenate(maps)
        tile_scores = np.concatenate(scores)
        amap = stitch(tile_maps, grid)
        valid = stitch(np.broadcast_to(grid.valid[:, None, None], (len(grid), 1, 1)).astype(np.float32), grid) > 0.5
        return amap, valid, grid, tile_scores


def tile_defect_pixels(mask: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Defect pixels per tile, counted in original-image pixels under each tile's footprint."""
    x0, y0, x1, y1 = grid.roi
    sh, sw = grid.scaled_shape
    fy, fx = (y1 - y0) / sh, (x1 - x0) / sw
    out = np.zeros(len(grid), np.int64)
    for i, (ty, tx) in enumerate(grid.coords):
        ya, yb = y0 + int(round(ty * fy)), y0 + int(round(min(ty + grid.tile, sh) * fy))
        xa, xb = x0 + int(round(tx * fx)), x0 + int(round(min(tx + grid.tile, sw) * fx))
        out[i] = int(mask[ya:yb, xa:xb].sum())
    return out


def score_folder(det: Detector, data: Path, *, split: str | None = "test", progress: bool = True,
                 min_defect_px: int = 10) -> list[ImageResult]:
    """Score every image of an MVTec-style folder of whole images (``split`` None: all images)."""
    sources = [s for s in discover_images(Path(data)) if split is None or s.split == split]
    if not sources:
        raise DatasetError(f"no {split or ''} images found in {data}")
    scorer = ImageScorer(det)
    results = []
    for src in tqdm(sources, desc="scoring", unit="img", disable=not progress):
        img = read_image(src.path)
        mask = read_mask(src.mask_path, img.shape[:2], src.path) if src.mask_path else None
        amap, valid, grid, ts = scorer.score(img)
        if mask is None and src.label != "good":
            log.warning("defective image without a mask: left out of pixel metrics", image=str(src.path))
        res = ImageResult(str(src.path), src.label, frame_score(ts, grid.valid), amap, valid, mask, grid, ts)
        if mask is not None:
            res.tile_defect_px = tile_defect_pixels(mask, grid)
        results.append(res)
    results[0].extra["timing"] = {"model_s": scorer.model_s, "tiles": scorer.tiles}
    return results


def _pixels(results: list[ImageResult], only_defective: bool, max_px: int = 4_000_000,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = [], []
    for r in results:
        if r.label == "good" and only_defective:
            continue
        if r.label != "good" and r.mask is None:
            continue
        m = r.mask if r.mask is not None else np.zeros(r.amap.shape, bool)
        scores.append(r.amap[r.valid])
        labels.append(m[r.valid])
    if not scores:
        return np.zeros(0), np.zeros(0, bool)
    s, y = np.concatenate(scores), np.concatenate(labels)
    if s.size > max_px:  # keep the metrics' memory bounded on long strips
        idx = np.random.default_rng(seed).choice(s.size, max_px, replace=False)
        s, y = s[idx], y[idx]
    return s, y


def _safe(fn: Any, *args: Any, **kw: Any) -> float | None:  # noqa: ANN401
    try:
        v = fn(*args, **kw)
    except ValueError:  # one class only
        return None
    return None if v is None or not np.isfinite(v) else float(v)


def _au_pro(results: list[ImageResult], only_defective: bool) -> float | None:
    sel = [r for r in results
           if (r.label != "good" and r.mask is not None) or (r.label == "good" and not only_defective)]
    if not any(r.mask is not None and r.mask.any() for r in sel):
        return None
    masks = [r.mask if r.mask is not None else np.zeros(r.amap.shape, bool) for r in sel]
    return _safe(metrics.au_pro, [r.amap for r in sel], masks, max_fpr=0.3, valid=[r.valid for r in sel])


def compute_metrics(results: list[ImageResult], *, image_threshold: float, min_defect_px: int = 10) -> dict:
    labels = np.array([r.label != "good" for r in results])
    scores = np.array([r.score for r in results])
    out: dict[str, Any] = {
        "images": len(results),
        "defective_images": int(labels.sum()),
        "image_auroc": _safe(metrics.auroc, scores, labels),
    }
    s, y = _pixels(results, only_defective=False)
    out["pixel_auroc"] = _safe(metrics.auroc, s, y) if y.any() else None
    s, y = _pixels(results, only_defective=True)
    out["pixel_auroc_in_defective"] = _safe(metrics.auroc, s, y) if y.any() and (~y).any() else None
    out["au_pro"] = _au_pro(results, only_defective=False)
    out["au_pro_in_defective"] = _au_pro(results, only_defective=True)
    ts, ty = [], []
    for r in results:
        if r.label == "good" or r.tile_defect_px is None:
            continue
        pos = r.tile_defect_px >= min_defect_px
        neg = r.tile_defect_px == 0
        keep = (pos | neg) & r.grid.valid
        ts.append(r.tile_scores[keep])
        ty.append(pos[keep])
    if ts:
        out["tile_auroc_in_defective"] = _safe(metrics.auroc, np.concatenate(ts), np.concatenate(ty))
    pred = scores >= image_threshold
    tp, fp, fn = int((pred & labels).sum()), int((pred & ~labels).sum()), int((~pred & labels).sum())
    out["precision"] = tp / (tp + fp) if tp + fp else None
    out["recall"] = tp / (tp + fn) if tp + fn else None
    p, r_ = out["precision"], out["recall"]
    out["f1"] = 2 * p * r_ / (p + r_) if p and r_ else 0.0
    out["image_threshold"] = image_threshold
    timing = results[0].extra.get("timing", {})
    if timing.get("model_s"):
        out["tiles_per_s"] = timing["tiles"] / timing["model_s"]
    out.update(peak_memory())
    return out


def process_memory_mb(key: str) -> float:
    """A memory figure of this process from /proc/self/status ('VmRSS': now, 'VmHWM': peak), in MiB.

    Not getrusage's ru_maxrss: Linux carries it over from the parent across fork and exec, so a fresh
    process (a benchmark's isolated evaluation or variant) would report its parent's peak. Where
    /proc is absent: ru_maxrss for the peak, NaN otherwise."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    if key == "VmHWM":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return float("nan")


def peak_memory() -> dict[str, float]:
    out = {"peak_rss_mb": process_memory_mb("VmHWM")}
    try:
        import torch

        if torch.cuda.is_available():
            out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return out
