"""EfficientAD's training losses (hard feature loss, penalty, autoencoder and student-autoencoder
losses) and the autoencoder's input augmentation."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def augment_ae(x01: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The autoencoder's input augmentation: per image, one of brightness, contrast or saturation,
    with a factor drawn uniformly from [0.8, 1.2] (torchvision's ColorJitter(0.2) semantics), on
    [0, 1] RGB images; the result is clamped to [0, 1]."""
    n = x01.shape[0]
    dev = x01.device
    choice = torch.randint(0, 3, (n,), generator=generator).to(dev)
    factor = (0.8 + 0.4 * torch.rand(n, generator=generator)).to(dev, x01.dtype).view(n, 1, 1, 1)
    w = torch.tensor(_GRAY_WEIGHTS, device=dev, dtype=x01.dtype).view(1, 3, 1, 1)
    gray = (x01 * w).sum(dim=1, keepdim=True)
    bright = x01 * factor
    contrast = factor * x01 + (1 - factor) * gray.mean(dim=(2, 3), keepdim=True)
    saturation = factor * x01 + (1 - factor) * gray
    c = choice.view(n, 1, 1, 1)
    out = torch.where(c == 0, bright, torch.where(c == 1, contrast, saturation))
    return out.clamp(0.0, 1.0)


def hard_quantile(values: Tensor, q: float) -> Tensor:
    """torch.quantile(values, q) (linear interpolation) without its input-size limit, via topk."""
    flat = values.reshape(-1)
    n = flat.numel()
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    frac = pos - lo
    k = n - lo  # number of elements whose sorted index is >= lo
    top = torch.topk(flat, k, largest=True, sorted=True).values
    v_lo = top[-1]
    v_hi = top[-2] if k >= 2 else top[-1]
    return v_lo + frac * (v_hi - v_lo)


def hard_feature_loss(teacher_out: Tensor, student_out: Tensor, q: float = 0.999) -> Tensor:
    """Mean of the squared teacher-student differences at or above their q-quantile (paper, eq. 1)."""
    d = (teacher_out - student_out) ** 2
    d_hard = hard_quantile(d.detach(), q)
    return d[d >= d_hard].mean()


def penalty_loss(student_out_generic: Tensor) -> Tensor:
    """Mean squared student output (teacher half) on generic, non-target images."""
    return (student_out_generic**2).mean()


def autoencoder_loss(teacher_out: Tensor, ae_out: Tensor) -> Tensor:
    """Mean squared difference between the (normalised) teacher and the autoencoder."""
    return ((teacher_out - ae_out) ** 2).mean()


def student_ae_loss(ae_out: Tensor, student_ae_out: Tensor) -> Tensor:
    """Mean squared difference between the autoencoder and the student's second half."""
    return ((ae_out - student_ae_out) ** 2).mean()

