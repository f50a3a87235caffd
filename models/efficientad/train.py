"""Training and calibration of EfficientAD on normal tiles (the paper's recipe).

`train_efficientad` runs: split of the normal tiles into train/validation; teacher channel mean/std
on the training tiles; ``steps`` Adam steps (lr 1e-4, weight decay 1e-5, learning rate x0.1 at 95% of
the steps) on the student and autoencoder with the hard feature loss, the optional penalty loss, the
autoencoder loss and the student-autoencoder loss; then map-quantile normalisation and threshold
calibration on the held-out normal validation tiles.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import structlog
import torch
from torch import Tensor

from knitwatch.models.base import MAX_QUANTILE_VALUES, ChannelStats, imagenet_normalize, tiles_to_tensor, to_unit_rgb
from knitwatch.models.calibration import (
    apply_f1_threshold,
    calibrate_model,
    keep_random,
    map_quantiles,
    split_training_tiles,
)
from knitwatch.models.efficientad.loss import (
    augment_ae,
    autoencoder_loss,
    hard_feature_loss,
    penalty_loss,
    student_ae_loss,
)
from knitwatch.models.efficientad.model import EfficientAD
from knitwatch.models.efficientad.pdn import normalize_size
from knitwatch.models.efficientad.teacher import TeacherWeights, distill_teacher

log = structlog.get_logger(__name__)

CheckpointCallback = Callable[..., None]


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
    scores (image) and on the pixels of the final maps (pixel; a proportional random share of each
    batch, at most ~1e6 in total) - `knitwatch.models.calibration.calibrate_model`.
    """
    dev = device or model.input_mean.device

    def batches() -> Iterator[Tensor]:
        for i in range(0, val_tiles.shape[0], batch_size):
            yield _prep(val_tiles[i : i + batch_size], dev)

    def fit_maps() -> dict[str, Any]:
        q_st, q_ae = map_quantiles(batches(), model.raw_maps, (q_a, q_b), keep=lambda m: m.reshape(-1).double())
        for name, (lo, hi) in (("st", q_st), ("ae", q_ae)):
            if not hi > lo:
                log.warning("degenerate_map_quantiles", map=name, q_a=lo, q_b=hi)
                q = (lo, lo + 1e-6)
                q_st, q_ae = (q, q_ae) if name == "st" else (q_st, q)
        model.set_map_quantiles(q_st, q_ae)
        return {"q_st": list(q_st), "q_ae": list(q_ae)}

    n_pix = val_tiles.shape[0] * val_tiles.shape[-2] * val_tiles.shape[-1]  # pixels of all final maps
    gen = torch.Generator().manual_seed(2)
    return calibrate_model(
        model,
        batches,
        model,
        fit_maps=fit_maps,
        keep_pixels=lambda m: keep_random(m, math.ceil(MAX_QUANTILE_VALUES * m.numel() / n_pix), gen),
        image_quantile=image_quantile,
        pixel_quantile=pixel_quantile,
        threshold_margin=threshold_margin,
    )


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
            _call_checkpoint_cb(checkpoint_cb, done, model, functools.partial(resume_snapshot, done))
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
