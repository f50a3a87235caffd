"""Pictures of a defect for people: the frame with the anomaly heat map blended in, region contours,
boxes and score labels; a thumbnail of it; the binary region mask at frame size.

The heat map's colours are scaled to the thresholds (not to each map's own maximum), so pictures of
different events compare: transparent below half the pixel threshold, fully blended from the pixel
threshold on; the colour scale saturates at twice the image threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from knitwatch.pipeline.decision.regions import Region

_BOX = (0, 255, 255)  # yellow (BGR)
_CONTOUR = (0, 0, 255)  # red
_TEXT_BG = (0, 0, 0)
_TEXT = (255, 255, 255)


def to_bgr(frame: np.ndarray) -> np.ndarray:
    """A uint8 BGR copy of a grey (H,W), (H,W,1) or BGR (H,W,3) frame."""
    f = np.asarray(frame)
    if f.dtype != np.uint8:
        f = np.clip(f, 0, 255).astype(np.uint8)
    if f.ndim == 2:
        return cv2.cvtColor(f, cv2.COLOR_GRAY2BGR)
    if f.ndim == 3 and f.shape[2] == 1:
        return cv2.cvtColor(f[:, :, 0], cv2.COLOR_GRAY2BGR)
    if f.ndim == 3 and f.shape[2] == 3:
        return f.copy()
    if f.ndim == 3 and f.shape[2] == 4:
        return cv2.cvtColor(f, cv2.COLOR_BGRA2BGR)
    raise ValueError(f"cannot draw on a frame of shape {f.shape}")


def fit_map(amap: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, float, float]:
    """The anomaly map resized to ``shape`` (H, W) if needed, with the x and y scale factors applied."""
    amap = np.asarray(amap, dtype=np.float32)
    h, w = shape
    if amap.shape == (h, w):
        return amap, 1.0, 1.0
    sy, sx = h / max(1, amap.shape[0]), w / max(1, amap.shape[1])
    return cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR), sx, sy


def scale_regions(regions: Sequence[Region], sx: float, sy: float) -> list[Region]:
    if sx == 1.0 and sy == 1.0:
        return list(regions)
    out = []
    for r in regions:
        x0, y0, x1, y1 = r.bbox
        out.append(Region((round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy)),
                          round(r.area * sx * sy), r.peak))
    return out


def region_mask(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """The uint8 0/255 region mask at frame size ``shape`` (nearest-neighbour if it must be resized)."""
    h, w = shape
    if mask is None:
        return np.zeros((h, w), np.uint8)
    m: np.ndarray = np.asarray(mask, dtype=np.uint8)
    if m.shape != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
    return np.where(m > 0, 255, 0).astype(np.uint8)


def _label(img: np.ndarray, text: str, x: int, y: int, scale: float) -> None:
    font = cv2.FONT_HERSHEY_SIMPLEX
    thick = max(1, round(scale * 2))
    (tw, th), base = cv2.getTextSize(text, font, scale, thick)
    h, w = img.shape[:2]
    x = int(min(max(0, x), max(0, w - tw - 4)))
    y = int(min(max(th + 4, y), h - 1))
    cv2.rectangle(img, (x, y - th - base - 2), (x + tw + 4, y + 2), _TEXT_BG, cv2.FILLED)
    cv2.putText(img, text, (x + 2, y - base + 1), font, scale, _TEXT, thick, cv2.LINE_AA)


def render_overlay(frame: np.ndarray, amap: np.ndarray, regions: Sequence[Region], mask: np.ndarray | None, *,
                   pixel_threshold: float, image_threshold: float, title: str = "",
                   max_labels: int = 10) -> np.ndarray:
    """The frame (BGR) with the heat map blended in, region contours, boxes and score labels."""
    base = to_bgr(frame)
    h, w = base.shape[:2]
    amap, sx, sy = fit_map(amap, (h, w))
    regions = scale_regions(regions, sx, sy)
    vmax = max(2.0 * image_threshold, 1.5 * pixel_threshold, 1e-6)
    norm = np.clip(amap / vmax, 0.0, 1.0)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    lo = 0.5 * pixel_threshold
    alpha = np.clip((amap - lo) * (0.55 / max(pixel_threshold - lo, 1e-6)), 0.0, 0.55).astype(np.float32)
    out = cv2.blendLinear(heat, base, alpha, 1.0 - alpha)
    m = region_mask(mask, (h, w))
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    line = max(1, round(min(h, w) / 400))
    cv2.drawContours(out, contours, -1, _CONTOUR, line, cv2.LINE_AA)
    scale = max(0.35, min(h, w) / 1400)
    for i, r in enumerate(regions[:max_labels]):
        x0, y0, x1, y1 = r.bbox
        pad = 2 * line
        cv2.rectangle(out, (max(0, x0 - pad), max(0, y0 - pad)), (min(w - 1, x1 + pad), min(h - 1, y1 + pad)),
                      _BOX, line)
        _label(out, f"#{i + 1} {r.peak:.2f} {r.area}px", x0 - pad, y0 - pad - 2, scale)
    if title:
        _label(out, title, 0, h - 1, scale)
    return out


def thumbnail(img: np.ndarray, max_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    f = max_side / max(h, w)
    if f >= 1.0:
        return img
    return cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
