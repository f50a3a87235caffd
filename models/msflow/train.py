"""Training and calibration of MSFlow on normal tiles.

`train_msflow` runs: split of the normal tiles into train/validation (the same split as EfficientAD's
trainer); one pass of the frozen extractor over every tile, whose pooled features are cached (on the
CPU, ``cache_dtype``), so the flows train on cached features; per-channel feature standardisation from
the training features; ``meta_epochs x sub_epochs`` epochs (seed: 25 x 4) or a fixed number of
``steps`` of Adam on the negative log-likelihood (`knitwatch.models.msflow.model.nll_loss`), with a linear
warm-up, step decay at fractions of the run and gradient-norm clipping; fp16 autocast with a gradient
scaler on CUDA; then calibration on the held-out normal validation tiles (`calibrate_msflow`): the
per-scale map statistics that make scores comparable across images, and the thresholds, with the
same rule as the other models (`knitwatch.models.calibration.quantile_threshold`, or best F1 on labelled tiles).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch import Tensor

from knitwatch.models.backbones.extractor import default_backbone
from knitwatch.models.base import MAX_QUANTILE_VALUES, ChannelStats
from knitwatch.models.calibration import (
    apply_f1_threshold,
    calibrate_model,
    keep_random,
    map_quantiles,
    split_training_tiles,
)
from knitwatch.models.msflow.model import (
    DEFAULT_CLAMP,
    DEFAULT_FLOW_BLOCKS,
    DEFAULT_PE_CHANNELS,
    DEFAULT_TOPK,
    MSFlow,
    nll_loss,
    scale_nll_maps,
)

log = structlog.get_logger(__name__)

FeatureCache = list[Tensor]  # one (N, C_i, h_i, w_i) tensor per scale


@torch.no_grad()
def extract_features(
    model: MSFlow,
    tiles_u8: Tensor,
    *,
    batch_size: int = 32,
    device: torch.device | None = None,
    cache_dtype: torch.dtype = torch.float32,
) -> FeatureCache:
    """Raw pooled extractor features of uint8 (N,C,H,W) tiles, batch by batch, kept on the CPU."""
    dev = device or model.input_mean.device
    parts: list[list[Tensor]] = []
    for i in range(0, tiles_u8.shape[0], batch_size):
        x = model.normalize_input(tiles_u8[i : i + batch_size].to(dev, non_blocking=True))
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=dev.type == "cuda"):
            feats = model.extract(x)
        parts.append([f.to("cpu", cache_dtype).contiguous() for f in feats])
    return [torch.cat([p[s] for p in parts]) for s in range(len(parts[0]))]


def _batch(cache: FeatureCache, idx: Tensor, device: torch.device) -> list[Tensor]:
    return [c[idx].to(device, torch.float32, non_blocking=True) for c in cache]


@torch.no_grad()
def feature_statistics(cache: FeatureCache, batch_size: int = 256) -> tuple[list[Tensor], list[Tensor]]:
    """Per-scale per-channel mean and std of cached features."""
    means, stds = [], []
    for c in cache:
        stats = ChannelStats()
        for i in range(0, c.shape[0], batch_size):
            stats.update(c[i : i + batch_size])
        means.append(stats.mean())
        stds.append(stats.std().clamp_min(1e-6))
    return means, stds


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type="cuda", dtype=torch.float16, enabled=device.type == "cuda")


@torch.no_grad()
def calibrate_msflow(
    model: MSFlow,
    val_cache: FeatureCache,
    *,
    batch_size: int = 32,
    map_quantile: float = 0.99,
    image_quantile: float = 0.99,
    pixel_quantile: float = 0.999,
    threshold_margin: float = 0.1,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Set ``model``'s per-scale map statistics and thresholds from normal validation features.

    Pass 1: per scale, the median and the ``map_quantile`` quantile of the per-cell negative
    log-likelihood (native resolution) give ``map_loc`` and ``map_spread`` (quantile - median).
    Pass 2: image scores and the pixels of the final maps give the thresholds (`quantile_threshold`:
    the quantile plus ``threshold_margin`` times its distance to the median). Everything streams per
    batch; at most ~1e6 values per statistic are kept (fixed-seed subsample). The passes are those of
    `knitwatch.models.calibration.calibrate_model`.
    """
    dev = device or model.input_mean.device
    n = val_cache[0].shape[0]
    if n == 0:
        raise ValueError("no validation tiles to calibrate on")
    per_batch = max(1, MAX_QUANTILE_VALUES // math.ceil(n / batch_size))
    gen = torch.Generator().manual_seed(3)  # one stream for both passes

    def keep(v: Tensor) -> Tensor:
        return keep_random(v.double(), per_batch, gen)

    def batches() -> Iterator[list[Tensor]]:
        """The flow's outputs z (one per scale) of each validation batch."""
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(i + batch_size, n))
            with _autocast(dev):
                zs, _ = model.flow(model.standardize(_batch(val_cache, idx, dev)))
            yield zs

    def fit_maps() -> dict[str, Any]:
        loc, spread = [], []
        for s, (med, hi) in enumerate(map_quantiles(batches(), scale_nll_maps, (0.5, map_quantile), keep)):
            if not hi > med:
                log.warning("degenerate_map_statistics", scale=s, median=med, quantile=hi)
            loc.append(med)
            spread.append(max(hi - med, 1e-6))
        model.set_map_stats(loc, spread)
        return {"map_loc": loc, "map_spread": spread}

    def maps_and_scores(zs: list[Tensor]) -> tuple[Tensor, Tensor]:
        with _autocast(dev):
            return model.maps_from_z(zs, (model.tile_size, model.tile_size))

    return calibrate_model(
        model,
        batches,
        maps_and_scores,
        fit_maps=fit_maps,
        keep_pixels=keep,
        image_quantile=image_quantile,
        pixel_quantile=pixel_quantile,
        threshold_margin=threshold_margin,
        rule={"map_quantile": map_quantile},
    )


def lr_factor(step: int, total: int, warmup_steps: int, milestones: Sequence[float], gamma: float) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup_steps``, then x``gamma`` at each milestone
    (fractions of ``total`` steps)."""
    f = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    passed = sum(1 for m in milestones if step >= int(m * total))
    return f * gamma**passed


def train_msflow(
    train_tiles: np.ndarray | Tensor,
    *,
    backbone: str | None = None,
    weights_path: str | Path | None = None,
    pretrained: bool = True,
    flow_blocks: Sequence[int] = DEFAULT_FLOW_BLOCKS,
    fusion_blocks: int = 1,
    clamp: float = DEFAULT_CLAMP,
    pe_channels: int = DEFAULT_PE_CHANNELS,
    hidden_ratio: float = 1.0,
    topk: float = DEFAULT_TOPK,
    meta_epochs: int = 25,
    sub_epochs: int = 4,
    steps: int | None = None,
    batch_size: int = 16,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup_fraction: float = 0.08,
    lr_milestones: Sequence[float] = (0.7, 0.9),
    lr_gamma: float = 0.1,
    grad_clip: float = 5.0,
    val_fraction: float = 0.1,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    extract_batch_size: int = 32,
    cache_dtype: torch.dtype = torch.float32,
    calib_tiles: np.ndarray | Tensor | None = None,
    calib_labels: np.ndarray | Tensor | None = None,
    map_quantile: float = 0.99,
    image_quantile: float = 0.99,
    pixel_quantile: float = 0.999,
    threshold_margin: float = 0.1,
    eval_batch_size: int = 32,
    epoch_cb: Callable[[int, MSFlow, dict[str, Any]], None] | None = None,
) -> tuple[MSFlow, dict[str, Any]]:
    """Train MSFlow on normal uint8 tiles (N,H,W) or (N,H,W,3) (square).

    ``backbone``: 'resnet18', 'resnet34', 'wide_resnet50_2' (torchvision weights from its cache or
    ``weights_path``; `BackboneWeightsMissingError` names the missing file) or 'efficientnet-lite0';
    None picks `default_backbone()` (resnet18 when its weights are cached, else Lite0).
    ``pretrained=False`` trains on a randomly initialised backbone (mechanics tests only).

    Length: ``steps`` optimiser steps when given, else ``meta_epochs * sub_epochs`` passes over the
    training tiles in batches of ``batch_size``. The learning rate warms up linearly over
    ``warmup_fraction`` of the steps and is multiplied by ``lr_gamma`` at each of ``lr_milestones``
    (fractions of the steps); gradients are clipped to norm ``grad_clip``. ``epoch_cb(meta_epoch,
    model, info)`` is called after each meta-epoch (of ``sub_epochs`` epochs; with ``steps``, every
    ``steps / meta_epochs`` steps).

    Validation: ``val_fraction`` of the normal tiles is held out for `calibrate_msflow`; with labelled
    ``calib_tiles``/``calib_labels`` (1 = defect) the image threshold is instead the best-F1 threshold.
    Deterministic on CPU for a given seed. Returns (model in eval mode, info dict).
    """
    from tqdm import tqdm

    t0 = time.monotonic()
    dev = torch.device(device)
    tiles, tr_idx, val_idx = split_training_tiles(train_tiles, val_fraction, seed, "map statistics and thresholds")
    h = tiles.shape[-1]
    bb = backbone or default_backbone()

    torch.manual_seed(seed)
    model = MSFlow(
        bb,
        h,
        flow_blocks,
        fusion_blocks,
        clamp,
        pe_channels,
        hidden_ratio,
        topk,
        pretrained=pretrained,
        weights_path=weights_path,
    ).to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    model.eval()

    t_ext = time.monotonic()
    cache = extract_features(model, tiles, batch_size=extract_batch_size, device=dev, cache_dtype=cache_dtype)
    train_cache = [c[tr_idx] for c in cache]
    val_cache = [c[val_idx] for c in cache] if val_idx.numel() else train_cache
    del cache
    extract_s = time.monotonic() - t_ext
    means, stds = feature_statistics(train_cache)
    model.set_feature_stats([m.to(dev) for m in means], [s.to(dev) for s in stds])

    n_train = int(tr_idx.numel())
    bs = max(1, min(batch_size, n_train))
    steps_per_epoch = math.ceil(n_train / bs)
    total = int(steps) if steps is not None else meta_epochs * sub_epochs * steps_per_epoch
    if total < 1:
        raise ValueError("nothing to train: steps / epochs must be positive")
    meta_every = max(1, total // meta_epochs) if steps is not None else sub_epochs * steps_per_epoch
    warmup = int(round(warmup_fraction * total))

    params = model.trainable_parameters()
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, tuple(lr_milestones), lr_gamma)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda")
    gen = torch.Generator().manual_seed(seed + 1)

    model.flows.train()
    history: list[tuple[int, float]] = []
    meta_losses: list[float] = []
    running: list[float] = []
    loss_v = float("nan")
    step = 0
    perm = torch.randperm(n_train, generator=gen)
    pos = 0
    bar = tqdm(total=total, desc=f"MSFlow ({bb})", disable=not progress)
    while step < total:
        if pos >= n_train:  # a new epoch: reshuffle (an epoch's last batch may be short)
            perm = torch.randperm(n_train, generator=gen)
            pos = 0
        idx = perm[pos : pos + bs]
        pos += bs
        feats = model.standardize(_batch(train_cache, idx, dev))
        with _autocast(dev):
            zs, logdet = model.flow(feats)
        loss = nll_loss(zs, logdet)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        step += 1
        bar.update(1)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"MSFlow training diverged at step {step} (loss {lv})")
        running.append(lv)
        loss_v = lv
        if step % 10 == 0 or step == total:
            bar.set_postfix(loss=f"{loss_v:.4f}")
        if step % 50 == 0 or step == total:
            history.append((step, loss_v))
        if step % meta_every == 0 or step == total:
            meta = len(meta_losses) + 1
            meta_losses.append(float(np.mean(running)))
            running = []
            log.info("msflow_meta_epoch", meta_epoch=meta, step=step, loss=round(meta_losses[-1], 5))
            if epoch_cb is not None:
                epoch_cb(meta, model, {"step": step, "loss": meta_losses[-1]})
    bar.close()
    model.eval()

    cal = calibrate_msflow(
        model,
        val_cache,
        batch_size=eval_batch_size,
        map_quantile=map_quantile,
        image_quantile=image_quantile,
        pixel_quantile=pixel_quantile,
        threshold_margin=threshold_margin,
        device=dev,
    )
    if calib_tiles is not None:
        apply_f1_threshold(model, cal, calib_tiles, calib_labels, batch_size=eval_batch_size)
    model.provenance.update(
        {
            "trainer": "knitwatch.models.msflow.train.train_msflow",
            "steps": total,
            "meta_epochs": meta_epochs if steps is None else None,
            "sub_epochs": sub_epochs if steps is None else None,
            "batch_size": bs,
            "lr": lr,
            "weight_decay": weight_decay,
            "warmup_fraction": warmup_fraction,
            "lr_milestones": list(lr_milestones),
            "lr_gamma": lr_gamma,
            "grad_clip": grad_clip,
            "seed": seed,
            "n_train": n_train,
            "n_val": int(val_idx.numel()),
            "torch": torch.__version__,
        }
    )
    info: dict[str, Any] = {
        "backbone": bb,
        "steps": total,
        "final_loss": loss_v,
        "loss_history": history,
        "meta_epoch_losses": meta_losses,
        "n_train": n_train,
        "n_val": int(val_idx.numel()),
        "calibration": cal,
        "extract_seconds": extract_s,
        "seconds": time.monotonic() - t0,
    }
    log.info("msflow_trained", backbone=bb, steps=total, loss=loss_v, seconds=round(info["seconds"], 1))
    return model, info
