"""Training and calibration of EfficientAD on normal tiles (the paper's recipe).

`train_efficientad` runs: split of the normal tiles into train/validation; teacher channel mean/std
on the training tiles; ``steps`` Adam steps (lr 1e-4, weight decay 1e-5, learning rate x0.1 at 95% of
the steps) on the student and autoencoder with the hard feature loss, the optional penalty loss, the
autoencoder loss and the student-autoencoder loss; then map-quantile normalisation and threshold
calibration on the held-out normal validation tiles.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import structlog
import torch
from torch import Tensor

from knitwatch.models import metrics
from knitwatch.models.efficientad.model import (
    MAX_QUANTILE_VALUES,
    ChannelStats,
    EfficientAD,
    TeacherWeights,
    augment_ae,
    autoencoder_loss,
    distill_teacher,
    hard_feature_loss,
    imagenet_normalize,
    normalize_size,
    penalty_loss,
    student_ae_loss,
    tiles_to_tensor,
    to_unit_rgb,
)

log = structlog.get_logger(__name__)

CheckpointCallback = Callable[..., None]


def calibrate_f1_threshold(scores: np.ndarray | Tensor, labels: np.ndarray | Tensor) -> tuple[float, float]:
    """(threshold, F1): the image threshold maximising F1 on a labelled validation set."""
    s = scores.detach().cpu().numpy() if isinstance(scores, Tensor) else np.asarray(scores)
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    return metrics.best_f1_threshold(s, y)


def apply_f1_threshold(model: torch.nn.Module, cal: dict[str, Any], calib_tiles: np.ndarray | Tensor,
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


def quantile_threshold(values: Tensor, q: float, margin: float) -> float:
    """``quantile(values, q) + margin * (quantile(values, q) - median(values))``.

    The margin is a fraction of the normal spread above the median, so it does not depend on the
    map's units: 0 gives the plain quantile.
    """
    v = subsample(values.reshape(-1).double(), MAX_QUANTILE_VALUES, seed=0)
    hi = float(torch.quantile(v, q))
    med = float(torch.quantile(v, 0.5))
    return hi + margin * max(hi - med, 0.0)


def subsample(v: Tensor, max_n: int, seed: int) -> Tensor:
    if v.numel() <= max_n:
        return v
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(v.numel(), generator=gen)[:max_n]
    return v[idx.to(v.device)]


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


def _prep(batch_u8: Tensor, device: torch.device) -> Tensor:
    return imagenet_normalize(to_unit_rgb(batch_u8.to(device, non_blocking=True)))


@torch.no_grad()
def teacher_normalization(
    model: EfficientAD, tiles: Tensor, batch_size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of the teacher's output over ``tiles`` (uint8 (N,C,H,W))."""
    stats = ChannelStats()
    for i in range(0, tiles.shape[0], batch_size):
        stats.update(model.teacher(_prep(tiles[i : i + batch_size], device)))
    return stats.mean().view(1, -1, 1, 1), stats.std().clamp_min(1e-6).view(1, -1, 1, 1)


@torch.no_grad()
def _collect(model: EfficientAD, tiles: Tensor, batch_size: int, device: torch.device, fn: Callable) -> list:
    out = []
    for i in range(0, tiles.shape[0], batch_size):
        out.append(fn(_prep(tiles[i : i + batch_size], device)))
    return out


@torch.no_grad()
def calibrate(
    model: EfficientAD,
    val_tiles: Tensor,
    *,
    batch_size: int = 16,
    q_a: float = 0.9,
    q_b: float = 0.995,
    image_quantile: float = 0.99,
    pixel_quantile: float = 0.999,
    threshold_margin: float = 0.1,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Set the map quantiles and thresholds of ``model`` from normal validation tiles (uint8 NCHW).

    Map quantiles (paper): q_a = 0.9 and q_b = 0.995 quantiles of the raw st and ae maps (at most
    1e6 values, subsampled with a fixed seed). Thresholds: see `quantile_threshold`, on the image
    scores (image) and on the pixels of the final maps (pixel).
    """
    dev = device or model.input_mean.device
    was_training = model.training
    model.eval()
    raw = _collect(model, val_tiles, batch_size, dev, model.raw_maps)
    st = torch.cat([r[0].reshape(-1) for r in raw]).double()
    ae = torch.cat([r[1].reshape(-1) for r in raw]).double()
    st_s = subsample(st, MAX_QUANTILE_VALUES, 0)
    ae_s = subsample(ae, MAX_QUANTILE_VALUES, 1)
    q_st = (float(torch.quantile(st_s, q_a)), float(torch.quantile(st_s, q_b)))
    q_ae = (float(torch.quantile(ae_s, q_a)), float(torch.quantile(ae_s, q_b)))
    for name, (lo, hi) in (("st", q_st), ("ae", q_ae)):
        if not hi > lo:
            log.warning("degenerate_map_quantiles", map=name, q_a=lo, q_b=hi)
            q = (lo, lo + 1e-6)
            q_st, q_ae = (q, q_ae) if name == "st" else (q_st, q)
    model.set_map_quantiles(q_st, q_ae)
    outs = _collect(model, val_tiles, batch_size, dev, model)
    scores = torch.cat([o[1].float().cpu() for o in outs])
    n_pix = sum(o[0].numel() for o in outs)
    keep = []
    gen = torch.Generator().manual_seed(2)
    for o in outs:  # proportional random subsample of the pixels, at most ~1e6 in total
        flat = o[0].reshape(-1).float().cpu()
        k = min(flat.numel(), math.ceil(MAX_QUANTILE_VALUES * flat.numel() / n_pix))
        keep.append(flat[torch.randperm(flat.numel(), generator=gen)[:k]] if k < flat.numel() else flat)
    pixels = torch.cat(keep)
    image_thr = quantile_threshold(scores, image_quantile, threshold_margin)
    pixel_thr = quantile_threshold(pixels, pixel_quantile, threshold_margin)
    model.set_thresholds(image_thr, pixel_thr)
    model.train(was_training)
    return {
        "q_st": list(q_st),
        "q_ae": list(q_ae),
        "image_threshold": float(model.image_threshold),
        "pixel_threshold": float(model.pixel_threshold),
        "val_scores": {
            "n": int(scores.numel()),
            "min": float(scores.min()),
            "median": float(scores.median()),
            "max": float(scores.max()),
        },
        "rule": {
            "image_quantile": image_quantile,
            "pixel_quantile": pixel_quantile,
            "threshold_margin": threshold_margin,
        },
    }


def _call_checkpoint_cb(cb: CheckpointCallback, step: int, model: EfficientAD, state: Callable[[], dict]) -> None:
    try:
        inspect.signature(cb).bind(step, model, None)
        takes_state = True
    except (TypeError, ValueError):
        takes_state = False
    if takes_state:
        cb(step, model, state())
    else:
        cb(step, model)


def train_efficientad(
    train_tiles: np.ndarray | Tensor,
    *,
    size: str = "s",
    steps: int = 70_000,
    teacher_state: TeacherWeights | Mapping[str, Tensor] | None = None,
    penalty_tiles: np.ndarray | Tensor | None = None,
    val_fraction: float = 0.1,
    batch_size: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    checkpoint_cb: CheckpointCallback | None = None,
    checkpoint_every: int = 1000,
    resume_state: Mapping[str, Any] | None = None,
    teacher_backbone: str = "efficientnet-lite0",
    teacher_distill_steps: int = 10_000,
    allow_random_teacher: bool = False,
    calib_tiles: np.ndarray | Tensor | None = None,
    calib_labels: np.ndarray | Tensor | None = None,
    image_quantile: float = 0.99,
    pixel_quantile: float = 0.999,
    threshold_margin: float = 0.1,
    eval_batch_size: int = 16,
) -> tuple[EfficientAD, dict[str, Any]]:
    """Train EfficientAD-``size`` on normal uint8 tiles (N,H,W) or (N,H,W,3) (square).

    Teacher: ``teacher_state`` from `load_teacher_state`/`distill_teacher` (or a PDN state dict); when
    None, one is distilled from ``teacher_backbone`` on the training tiles for ``teacher_distill_steps``
    steps (``allow_random_teacher=True`` permits a random teacher if the backbone is missing).

    Penalty: ``penalty_tiles`` (generic non-fabric images, same tile size) switch on the penalty loss.

    Validation: ``val_fraction`` of the normal tiles is held out; it gives the map quantiles and the
    thresholds (quantile + margin, see `calibrate`). With labelled ``calib_tiles``/``calib_labels``
    (1 = defect), the image threshold is instead the best-F1 threshold on them.

    ``checkpoint_cb(step, model)`` or ``checkpoint_cb(step, model, resume_state)`` is called every
    ``checkpoint_every`` steps; ``resume_state`` (a dict of tensors and primitives, storable with
    torch.save and loadable with weights_only=True) passed back as ``resume_state=`` continues the run
    exactly where it stopped. Deterministic on CPU for a given seed.

    Returns (model in eval mode, info dict with losses, split sizes, quantiles, thresholds, timing).
    """
    from tqdm import tqdm

    t0 = time.monotonic()
    sz = normalize_size(size)
    dev = torch.device(device)
    tiles, tr_idx, val_idx = split_training_tiles(train_tiles, val_fraction, seed, "quantiles and thresholds")
    h = tiles.shape[-1]
    train_set = tiles[tr_idx]
    val_set = tiles[val_idx] if val_idx.numel() else train_set
    pen = tiles_to_tensor(penalty_tiles) if penalty_tiles is not None else None
    if pen is not None and pen.shape[-2:] != tiles.shape[-2:]:
        raise ValueError("penalty tiles must have the training tiles' size")

    if teacher_state is None and resume_state is not None:
        teacher_state = TeacherWeights(
            {k[len("teacher.") :]: v for k, v in resume_state["model"].items() if k.startswith("teacher.")},
            sz,
            "resumed",
        )
    if teacher_state is None:
        log.info("distilling_teacher", backbone=teacher_backbone, steps=teacher_distill_steps)
        teacher_state = distill_teacher(
            train_set,
            sz,
            backbone=teacher_backbone,
            steps=teacher_distill_steps,
            device=dev,
            seed=seed,
            progress=progress,
            allow_random_teacher=allow_random_teacher,
        )

    torch.manual_seed(seed)
    model = EfficientAD(size=sz, tile_size=h)
    model.load_teacher(teacher_state)
    if not isinstance(teacher_state, TeacherWeights):
        model.provenance["teacher"] = {"size": sz, "source": "state_dict", "random_teacher": False}
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)

    gen = torch.Generator().manual_seed(seed + 1)
    params = itertools.chain(model.student.parameters(), model.autoencoder.parameters())
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, int(0.95 * steps)), gamma=0.1)
    start = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"], strict=True)
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        gen.set_state(resume_state["generator"])
        torch.set_rng_state(resume_state["torch_rng"])
        start = int(resume_state["step"])
        model.provenance = json.loads(resume_state["provenance"])
        log.info("training_resumed", step=start)
    else:
        mean, std = teacher_normalization(model, train_set, eval_batch_size, dev)
        model.teacher_mean.copy_(mean)
        model.teacher_std.copy_(std)

    def resume_snapshot(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(opt.state_dict()),  # the live state is mutated in place
            "scheduler": sched.state_dict(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "provenance": json.dumps(model.provenance),
        }

    c = model.out_channels
    model.train()
    history: list[tuple[int, float]] = []
    loss_v = float("nan")
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"EfficientAD-{sz.upper()}", disable=not progress)
    for step in bar:
        idx = torch.randint(0, train_set.shape[0], (batch_size,), generator=gen)
        x01 = to_unit_rgb(train_set[idx].to(dev, non_blocking=True))
        x_st = imagenet_normalize(x01)
        x_ae = imagenet_normalize(augment_ae(x01, gen))
        # One teacher and one student pass over [x_st, x_ae] (and the penalty batch): the networks have
        # no batch-dependent layers, so this equals separate passes and is faster.
        xs = [x_st, x_ae]
        if pen is not None:
            pidx = torch.randint(0, pen.shape[0], (batch_size,), generator=gen)
            xs.append(_prep(pen[pidx], dev))
        with torch.no_grad():
            t_st, t_ae = model.teacher_features(torch.cat(xs[:2])).split(batch_size)
        s_all = model.student(torch.cat(xs)).split(batch_size)
        loss_st = hard_feature_loss(t_st, s_all[0][:, :c])
        if pen is not None:
            loss_st = loss_st + penalty_loss(s_all[2][:, :c])
        ae_out = model.autoencoder(x_ae)
        s_ae = s_all[1][:, c:]
        loss = loss_st + autoencoder_loss(t_ae, ae_out) + student_ae_loss(ae_out, s_ae)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == steps - 1:
            loss_v = float(loss.detach())
            if not math.isfinite(loss_v):
                raise FloatingPointError(f"EfficientAD training diverged at step {step} (loss {loss_v})")
            bar.set_postfix(loss=f"{loss_v:.4f}")
        if step % 100 == 0 or step == steps - 1:
            history.append((step, loss_v))
        done = step + 1
        if checkpoint_cb is not None and (done % checkpoint_every == 0 or done == steps):
            _call_checkpoint_cb(checkpoint_cb, done, model, lambda d=done: resume_snapshot(d))
    bar.close()

    model.eval()
    cal = calibrate(
        model,
        val_set,
        batch_size=eval_batch_size,
        image_quantile=image_quantile,
        pixel_quantile=pixel_quantile,
        threshold_margin=threshold_margin,
        device=dev,
    )
    if calib_tiles is not None:
        apply_f1_threshold(model, cal, calib_tiles, calib_labels, batch_size=eval_batch_size)
    model.provenance.update(
        {
            "trainer": "knitwatch.models.efficientad.train.train_efficientad",
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "seed": seed,
            "n_train": int(train_set.shape[0]),
            "n_val": int(val_idx.numel()),
            "penalty": pen is not None,
            "torch": torch.__version__,
        }
    )
    info = {
        "steps": steps,
        "final_loss": loss_v,
        "loss_history": history,
        "n_train": int(train_set.shape[0]),
        "n_val": int(val_idx.numel()),
        "calibration": cal,
        "teacher": model.provenance.get("teacher", {}),
        "seconds": time.monotonic() - t0,
    }
    log.info("efficientad_trained", size=sz, steps=steps, loss=loss_v, seconds=round(info["seconds"], 1))
    return model, info
