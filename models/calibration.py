"""Calibration shared by every model: the train/validation split of the normal tiles, and thresholds
from the held-out normal validation tiles.

The rule (`quantile_threshold`): a high quantile of the normal image scores (image threshold) and of
the normal map pixels (pixel threshold), plus a margin proportional to their spread above the median.
With labelled calibration tiles, the image threshold is instead the best-F1 one (`apply_f1_threshold`).

`calibrate_model` is the routine of the trained models (EfficientAD, MSFlow): first the model's own
map normalisation from the validation batches (what differs between models: a callback, helped by
`map_quantiles`), then one pass for the scores and (subsampled) map pixels, whose quantiles set the
thresholds (`set_quantile_thresholds`, also used by PatchCore). Every subsample is seeded, so a
calibration is reproducible; at most about `MAX_QUANTILE_VALUES` values enter any quantile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import structlog
import torch
from torch import Tensor

from knitwatch.models import metrics
from knitwatch.models.base import MAX_QUANTILE_VALUES, AnomalyModel, tiles_to_tensor

log = structlog.get_logger(__name__)

B = TypeVar("B")

# --------------------------------------------------------------------------------------------------
# Train/validation split
# --------------------------------------------------------------------------------------------------


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    if n - n_val < 1:
        raise ValueError(f"{n} tiles leave nothing to train on with val_fraction={val_fraction}")
    return perm[n_val:], perm[:n_val]


def split_training_tiles(train_tiles: np.ndarray | Tensor, val_fraction: float, seed: int,
                         calibrated: str) -> tuple[Tensor, Tensor, Tensor]:
    """Square uint8 training tiles -> (NCHW tensor, training indices, held-out validation indices).

    Without a validation split (``val_fraction`` 0) it warns that ``calibrated`` (what the held-out
    tiles would have calibrated) comes from the training tiles: the caller then uses those."""
    tiles = tiles_to_tensor(train_tiles)
    if tiles.dtype != torch.uint8:
        raise ValueError("train_tiles must be uint8")
    _, _, h, w = tiles.shape
    if h != w:
        raise ValueError(f"tiles must be square, got {h}x{w}")
    tr_idx, val_idx = split_indices(len(tiles), val_fraction, seed)
    if not val_idx.numel():
        log.warning("no_validation_split", msg=f"{calibrated} calibrated on the training tiles")
    return tiles, tr_idx, val_idx


# --------------------------------------------------------------------------------------------------
# Sampling and thresholds
# --------------------------------------------------------------------------------------------------


def subsample(v: Tensor, max_n: int, seed: int) -> Tensor:
    if v.numel() <= max_n:
        return v
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(v.numel(), generator=gen)[:max_n]
    return v[idx.to(v.device)]


def keep_random(values: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """``values`` flattened, on the CPU; when there are more than ``k``, ``k`` of them drawn with ``gen``
    (the per-batch share of a streamed subsample)."""
    v = values.reshape(-1).cpu()
    return v if v.numel() <= k else v[torch.randperm(v.numel(), generator=gen)[:k]]


def quantile_threshold(values: Tensor, q: float, margin: float) -> float:
    """``quantile(values, q) + margin * (quantile(values, q) - median(values))``.

    The margin is a fraction of the normal spread above the median, so it does not depend on the
    map's units: 0 gives the plain quantile.
    """
    v = subsample(values.reshape(-1).double(), MAX_QUANTILE_VALUES, seed=0)
    hi = float(torch.quantile(v, q))
    med = float(torch.quantile(v, 0.5))
    return hi + margin * max(hi - med, 0.0)


def map_quantiles(
    batches: Iterable[B],
    maps: Callable[[B], Sequence[Tensor]],
    qs: tuple[float, float],
    keep: Callable[[Tensor], Tensor],
) -> list[tuple[float, float]]:
    """The quantiles ``qs`` of each of a model's raw maps over the validation batches.

    ``maps(batch)`` gives the raw maps of a batch (e.g. EfficientAD's student-teacher and autoencoder
    maps, MSFlow's per-scale likelihoods); ``keep`` turns one into the values kept (all, or a per-batch
    random share). Map ``i``'s values are subsampled to at most `MAX_QUANTILE_VALUES` with seed ``i``.
    """
    kept: list[list[Tensor]] = []
    for b in batches:
        for i, m in enumerate(maps(b)):
            if i == len(kept):
                kept.append([])
            kept[i].append(keep(m))
    out = []
    for i, vals in enumerate(kept):
        v = subsample(torch.cat(vals), MAX_QUANTILE_VALUES, seed=i)
        out.append((float(torch.quantile(v, qs[0])), float(torch.quantile(v, qs[1]))))
    return out


def score_summary(scores: np.ndarray | Tensor) -> dict[str, Any]:
    """n, min, median and max of validation scores. The median is numpy's (mean of the two middle
    values) for an array and torch's (the lower one) for a tensor: what each trainer has reported."""
    median = np.median(scores) if isinstance(scores, np.ndarray) else scores.median()
    return {"n": int(scores.size if isinstance(scores, np.ndarray) else scores.numel()),
            "min": float(scores.min()), "median": float(median), "max": float(scores.max())}


def set_quantile_thresholds(
    model: AnomalyModel,
    scores: np.ndarray | Tensor,
    pixels: Tensor,
    *,
    image_quantile: float,
    pixel_quantile: float,
    threshold_margin: float,
    rule: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Set ``model``'s thresholds from normal validation image ``scores`` and map ``pixels``
    (`quantile_threshold`); returns what the calibration report says about them (``rule`` comes first
    in its rule entry)."""
    image_thr = quantile_threshold(torch.as_tensor(scores), image_quantile, threshold_margin)
    pixel_thr = quantile_threshold(pixels, pixel_quantile, threshold_margin)
    model.set_thresholds(image_thr, pixel_thr)
    return {
        "image_threshold": float(model.image_threshold),
        "pixel_threshold": float(model.pixel_threshold),
        "val_scores": score_summary(scores),
        "rule": {
            **(rule or {}),
            "image_quantile": image_quantile,
            "pixel_quantile": pixel_quantile,
            "threshold_margin": threshold_margin,
        },
    }


@torch.no_grad()
def calibrate_model(
    model: AnomalyModel,
    batches: Callable[[], Iterable[B]],
    maps_and_scores: Callable[[B], tuple[Tensor, Tensor]],
    *,
    fit_maps: Callable[[], Mapping[str, Any]],
    keep_pixels: Callable[[Tensor], Tensor],
    image_quantile: float,
    pixel_quantile: float,
    threshold_margin: float,
    rule: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Calibrate a trained model on normal validation data, in eval mode (its mode is restored after).

    1. ``fit_maps()`` sets the model's own map normalisation (reading ``batches()`` as it needs) and
       returns what the report says about it;
    2. one pass over ``batches()``: ``maps_and_scores(batch)`` gives the final maps (B,1,H,W) and image
       scores (B,); all scores are kept, of the maps' pixels what ``keep_pixels`` keeps;
    3. `set_quantile_thresholds` (``rule``: the model's own calibration parameters for the report).

    Returns the report: ``fit_maps``'s entries, then the thresholds, ``val_scores`` and ``rule``.
    """
    was_training = model.training
    model.eval()
    report = dict(fit_maps())
    scores, pixels = [], []
    for b in batches():
        amap, score = maps_and_scores(b)
        scores.append(score.float().cpu())
        pixels.append(keep_pixels(amap))
    report.update(
        set_quantile_thresholds(
            model,
            torch.cat(scores),
            torch.cat(pixels),
            image_quantile=image_quantile,
            pixel_quantile=pixel_quantile,
            threshold_margin=threshold_margin,
            rule=rule,
        )
    )
    model.train(was_training)
    return report


# --------------------------------------------------------------------------------------------------
# Labelled calibration tiles
# --------------------------------------------------------------------------------------------------


def calibrate_f1_threshold(scores: np.ndarray | Tensor, labels: np.ndarray | Tensor) -> tuple[float, float]:
    """(threshold, F1): the image threshold maximising F1 on a labelled validation set."""
    s = scores.detach().cpu().numpy() if isinstance(scores, Tensor) else np.asarray(scores)
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    return metrics.best_f1_threshold(s, y)


def apply_f1_threshold(model: AnomalyModel, cal: dict[str, Any], calib_tiles: np.ndarray | Tensor,
                       calib_labels: np.ndarray | Tensor | None, *, batch_size: int) -> None:
    """Replace the model's image threshold by the best-F1 one on labelled tiles (1 = defect); notes it in ``cal``."""
    if calib_labels is None:
        raise ValueError("calib_tiles needs calib_labels")
    _, scores = model.predict(calib_tiles, batch_size=batch_size)
    thr, f1 = calibrate_f1_threshold(scores, np.asarray(calib_labels))
    model.image_threshold.fill_(thr)
    cal["image_threshold"] = float(model.image_threshold)
    cal["rule"]["image"] = "best F1 on labelled calibration tiles"
    cal["calib_f1"] = f1
