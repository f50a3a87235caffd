"""Evaluation metrics for anomaly detection, numpy only (plus OpenCV's connected components).

Convention everywhere: a higher score means more anomalous; labels/masks are 1 (or True) for
anomalous and 0 for normal; a sample is predicted anomalous when ``score >= threshold``.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import ArrayLike


def _scores_labels(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    y = y.astype(bool)
    return s, y


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (tied scores count one half)."""
    s, y = _scores_labels(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both normal and anomalous samples")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # average ranks (1-based) of tie groups
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg_rank_of_group = first + (counts + 1) / 2.0
    ranks = np.empty_like(s)
    ranks[order] = np.repeat(avg_rank_of_group, counts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _counts_at_thresholds(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, true positives, false positives) of ``score >= threshold`` for each distinct score,
    thresholds decreasing."""
    order = np.argsort(-s, kind="mergesort")
    s_desc = s[order]
    y_desc = y[order]
    last_of_group = np.r_[np.nonzero(np.diff(s_desc))[0], s_desc.size - 1]
    return s_desc[last_of_group], np.cumsum(y_desc)[last_of_group], np.cumsum(~y_desc)[last_of_group]


def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct score, thresholds decreasing.

    The first point is (0, 0) at threshold +inf; the last is (1, 1) at the lowest score.
    """
    s, y = _scores_labels(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a ROC curve needs both normal and anomalous samples")
    thr, tp, fp = _counts_at_thresholds(s, y)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, thr]


def f1_at_threshold(scores: ArrayLike, labels: ArrayLike, threshold: float) -> float:
    """F1 of the prediction ``score >= threshold`` (0 when nothing is predicted or present)."""
    s, y = _scores_labels(scores, labels)
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2.0 * tp / denom


def best_f1_threshold(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """(threshold, F1) maximising F1 over thresholds equal to the observed scores.

    Ties in F1 go to the highest threshold (fewest alarms).
    """
    s, y = _scores_labels(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("best F1 needs at least one anomalous sample")
    thr, tp, fp = _counts_at_thresholds(s, y)
    f1 = 2.0 * tp / (2.0 * tp + fp + (n_pos - tp))
    best = int(np.argmax(f1))  # first maximum = highest threshold
    return float(thr[best]), float(f1[best])


def au_pro(maps: ArrayLike, masks: ArrayLike, max_fpr: float = 0.3, valid: ArrayLike | None = None) -> float:
    """Area under the per-region-overlap curve up to ``max_fpr``, normalised by ``max_fpr``.

    ``maps``: (N,H,W) anomaly maps or a list of (H_i,W_i) maps of different sizes; ``masks``: the
    ground truth in the same shapes (non-zero = defect); ``valid`` (optional, same shapes): pixels to
    evaluate (e.g. leaving out blank padding). Each 8-connected defect region of each mask is one
    region; at a threshold t the PRO is the mean over all regions of the fraction of the region's
    pixels with ``map >= t``, and the FPR is the fraction of all normal pixels with ``map >= t``. The
    curve is exact (every distinct map value is a threshold), integrated with the trapezoid rule and
    linearly interpolated at ``max_fpr`` (as in the MVTec AD evaluation).
    """
    maps_l = [np.asarray(x, dtype=np.float64) for x in (maps if isinstance(maps, list | tuple) else [maps])]
    masks_l = [np.asarray(x) for x in (masks if isinstance(masks, list | tuple) else [masks])]
    if len(maps_l) == 1 and maps_l[0].ndim == 3:
        maps_l, masks_l = list(maps_l[0]), list(masks_l[0])
    valid_l = [np.ones(x.shape, bool) for x in maps_l] if valid is None else (
        [np.asarray(v, bool) for v in (valid if isinstance(valid, list | tuple) else list(np.asarray(valid, bool)))])
    pairs = zip(maps_l, masks_l, strict=False)
    if len(maps_l) != len(masks_l) or any(a.shape != b.shape or a.ndim != 2 for a, b in pairs):
        raise ValueError("maps and masks must both be (N,H,W) or lists of equally shaped (H,W) arrays")
    if not 0 < max_fpr <= 1:
        raise ValueError("max_fpr must be in (0, 1]")
    # Per pixel weight on the PRO axis: 1 / (region size * number of regions); 0 for normal pixels.
    weights, scores, normals = [], [], []
    sizes: list[np.ndarray] = []
    for m, g, v in zip(maps_l, masks_l, valid_l, strict=True):
        n_lab, lab = cv2.connectedComponents(((g != 0) & v).astype(np.uint8), connectivity=8)
        counts = np.bincount(lab[v], minlength=n_lab).astype(np.float64)
        w = np.zeros(n_lab, dtype=np.float64)
        w[1:] = 1.0 / np.maximum(counts[1:], 1.0)
        sizes.append(counts[1:])
        weights.append(w[lab[v]])
        scores.append(m[v])
        normals.append(lab[v] == 0)
    n_regions = int(sum(int(np.sum(c > 0)) for c in sizes))
    if n_regions == 0:
        raise ValueError("AU-PRO needs at least one defect region in the masks")
    region_w = np.concatenate(weights) / n_regions
    m = np.concatenate(scores)
    g = ~np.concatenate(normals)
    normal = g == 0
    n_neg = int(normal.sum())
    if n_neg == 0:
        raise ValueError("AU-PRO needs normal pixels")
    s = m.ravel()
    order = np.argsort(-s, kind="mergesort")
    s_desc = s[order]
    pro = np.cumsum(region_w[order])
    fpr = np.cumsum(normal.ravel()[order]) / n_neg
    last = np.r_[np.nonzero(np.diff(s_desc))[0], s_desc.size - 1]
    fpr = np.r_[0.0, fpr[last]]
    pro = np.r_[0.0, pro[last]]
    # integrate up to max_fpr, interpolating the curve at the cut
    cut = int(np.searchsorted(fpr, max_fpr, side="right"))
    xs = fpr[:cut]
    ys = pro[:cut]
    if cut < fpr.size and xs[-1] < max_fpr:
        x0, x1 = fpr[cut - 1], fpr[cut]
        y0, y1 = pro[cut - 1], pro[cut]
        y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        xs = np.r_[xs, max_fpr]
        ys = np.r_[ys, y_cut]
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
    return area / max_fpr
