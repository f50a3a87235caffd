"""The alert decision for one frame, and the k-of-n confirmation over a camera's frames.

A frame is *defective* when its stitched anomaly map, thresholded at the pixel threshold, has a
connected region of at least ``min_area_px`` pixels whose peak reaches the image threshold. A
defect is *confirmed* (may stop a machine) when at least ``k`` of the camera's last ``n`` frames,
in capture order, were defective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np


def frame_score(tile_scores: np.ndarray, valid: np.ndarray) -> float:
    """A frame's (or image's) score: the max over its fabric tiles; over all tiles when none is fabric."""
    sel = tile_scores[valid] if valid.any() else tile_scores
    return float(sel.max()) if sel.size else 0.0


@dataclass
class Region:
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    area: int
    peak: float

    def to_dict(self) -> dict:
        return {"bbox": list(self.bbox), "area": self.area, "peak": round(self.peak, 5)}


@dataclass
class FrameDecision:
    defect: bool
    regions: list[Region] = field(default_factory=list)
    mask: np.ndarray | None = None  # uint8 0/255 of the kept regions


def find_regions(anomaly_map: np.ndarray, *, pixel_threshold: float, image_threshold: float,
                 min_area_px: int, normal: Callable[[Region], bool] | None = None) -> FrameDecision:
    """The frame's defect regions, highest peak first; ``normal(region)``: True leaves a region that
    passed both thresholds out as known normal fabric (the cutline, `knitwatch.pipeline.decision.cutline`)."""
    amap = np.asarray(anomaly_map, dtype=np.float32)
    above = (amap >= pixel_threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(above, connectivity=8)
    regions = []
    keep = np.zeros(n, dtype=bool)
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < min_area_px:
            continue
        peak = float(amap[y : y + h, x : x + w][labels[y : y + h, x : x + w] == i].max())
        if peak < image_threshold:
            continue
        region = Region((x, y, x + w, y + h), area, peak)
        if normal is not None and normal(region):
            continue
        keep[i] = True
        regions.append(region)
    regions.sort(key=lambda r: r.peak, reverse=True)
    mask = (keep[labels] * 255).astype(np.uint8) if regions else None
    return FrameDecision(bool(regions), regions, mask)


class Confirmation:
    """k of the last n frames of one camera, in the frames' capture order (results of several
    inference workers may arrive out of order; frames that never arrive count as not defective)."""

    def __init__(self, k: int, n: int) -> None:
        if not 1 <= k <= n:
            raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
        self.k, self.n = k, n
        self.recent: dict[int, bool] = {}
        self.newest = -1

    def update(self, seq: int, defect: bool) -> bool:
        """Record frame ``seq``; True when the newest n sequence numbers hold at least k defective frames."""
        self.newest = max(self.newest, seq)
        if seq > self.newest - self.n:
            self.recent[seq] = defect
        self.recent = {s: d for s, d in self.recent.items() if s > self.newest - self.n}
        return sum(self.recent.values()) >= self.k

    def reset(self) -> None:
        self.recent.clear()
