"""What every knitwatch model shares (EfficientAD, MSFlow, PatchCore).

* input handling: uint8 tiles to tensors (`tiles_to_tensor`), [0, 1] RGB (`to_unit_rgb`), ImageNet
  normalisation (`imagenet_normalize`), and the shared batched ``predict`` (`predict_tiles`);
* `AnomalyModel`: calibrated thresholds and input normalisation as buffers, ``predict``;
* `ChannelStats`: running per-channel mean and std (feature and output standardisation);
* checkpoints of any model: `save_model` writes one, `restore_model` finishes a model built from one.

Input convention: tiles are RGB (or single-channel gray, replicated to three channels), uint8 in
[0, 255]; the models scale them to [0, 1] and normalise them with ImageNet statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import numpy as np
import structlog
import torch
from torch import Tensor, nn

from knitwatch.models.backbones.lite0 import IMAGENET_MEAN, IMAGENET_STD
from knitwatch.models.checkpoint import Checkpoint, save_checkpoint

log = structlog.get_logger(__name__)

# torch.quantile refuses inputs above 2**24 elements; quantiles are taken on at most this many values.
MAX_QUANTILE_VALUES = 1_000_000


# --------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------


def tiles_to_tensor(tiles: np.ndarray | Tensor) -> Tensor:
    """(N,H,W) or (N,H,W,1|3) or (N,1|3,H,W) tiles -> (N,C,H,W) tensor (dtype kept, no copy if possible)."""
    t = torch.from_numpy(np.ascontiguousarray(tiles)) if isinstance(tiles, np.ndarray) else tiles
    if t.ndim == 3:
        return t[:, None]
    if t.ndim == 4:
        if t.shape[1] in (1, 3) and t.shape[-1] not in (1, 3):
            return t
        if t.shape[-1] in (1, 3):
            return t.permute(0, 3, 1, 2)
    raise ValueError(f"tiles must be (N,H,W), (N,H,W,3) or (N,3,H,W); got shape {tuple(t.shape)}")


def to_unit_rgb(x: Tensor) -> Tensor:
    """uint8 (or float in [0, 255]) (N,1|3,H,W) -> float32 RGB in [0, 1]."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def imagenet_normalize(x01: Tensor) -> Tensor:
    """[0, 1] RGB -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
    return (x01 - mean) / std


def predict_tiles(
    model: AnomalyModel, tiles: np.ndarray | Tensor, batch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The shared ``predict`` of knitwatch's models: maps (N,H,W) float32 and scores (N,) float32.

    ``model`` has ``tile_size``, an ``input_mean`` buffer (its device is used), ``normalize_input`` and
    ``forward(x) -> (map (B,1,H,W), score (B,))``. ``tiles``: uint8 (N,H,W) gray, (N,H,W,3) RGB or a
    (N,C,H,W) tensor. Gray is replicated to three channels, ImageNet normalisation is applied, inputs
    go channels_last, on CUDA the networks run under fp16 autocast (results are float32). Batches of
    ``batch_size`` (default: all) are moved to the CPU one by one. Runs in eval mode, under
    ``torch.inference_mode``.
    """
    x_all = tiles_to_tensor(tiles)
    if x_all.dtype != torch.uint8:
        raise TypeError(f"predict expects uint8 tiles, got {x_all.dtype}")
    n = x_all.shape[0]
    if n == 0:
        return np.zeros((0, model.tile_size, model.tile_size), np.float32), np.zeros((0,), np.float32)
    device = model.input_mean.device
    bs = batch_size or n
    was_training = model.training
    model.eval()
    maps, scores = [], []
    try:
        with torch.inference_mode():
            for i in range(0, n, bs):
                x = x_all[i : i + bs].to(device, non_blocking=True)
                x = model.normalize_input(x).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=device.type == "cuda"):
                    m, s = model(x)
                maps.append(m[:, 0].float().cpu())
                scores.append(s.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(maps).numpy(), torch.cat(scores).numpy()


class AnomalyModel(nn.Module):
    """What every knitwatch model shares: calibrated thresholds and input normalisation as buffers
    (saved in the checkpoint), and ``predict`` on uint8 tiles (`predict_tiles`)."""

    image_threshold: Tensor
    pixel_threshold: Tensor
    input_mean: Tensor
    input_std: Tensor
    tile_size: int
    # Non-tensor facts about how the model was made (teacher or backbone weights, training run); saved in
    # the checkpoint's provenance by `save_model`.
    provenance: dict[str, Any]

    @property
    def kind(self) -> str:
        """The checkpoint kind (e.g. ``efficientad-s``); every model defines it."""
        raise NotImplementedError

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments saved in the checkpoint; every model defines them."""
        raise NotImplementedError

    def _register_common_buffers(self) -> None:
        """Thresholds (NaN until calibrated) and the ImageNet input normalisation."""
        self.register_buffer("image_threshold", torch.tensor(float("nan")))
        self.register_buffer("pixel_threshold", torch.tensor(float("nan")))
        self.register_buffer("input_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("input_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    @staticmethod
    def backbone_provenance(name: str, pretrained: bool, weights_path: str | Path | None) -> dict[str, Any]:
        """What the checkpoint records about a frozen pretrained backbone (MSFlow, PatchCore)."""
        return {"name": name, "pretrained": bool(pretrained), "random_weights": not pretrained,
                "weights_path": str(weights_path) if weights_path is not None else None}

    @property
    def is_calibrated(self) -> bool:
        return bool(torch.isfinite(self.image_threshold)) and bool(torch.isfinite(self.pixel_threshold))

    def normalize_input(self, x: Tensor) -> Tensor:
        """uint8 (B,1|3,H,W) -> ImageNet-normalised float (B,3,H,W); float input is returned as is."""
        if x.dtype != torch.uint8:
            return x
        x01 = x.to(self.input_mean.dtype) / 255.0
        if x01.shape[1] == 1:
            x01 = x01.expand(-1, 3, -1, -1)
        return (x01 - self.input_mean) / self.input_std

    def thresholds(self) -> dict[str, float]:
        """Calibrated thresholds as Python floats (exactly the float32 buffer values)."""
        return {"image": float(self.image_threshold), "pixel": float(self.pixel_threshold)}

    def set_thresholds(self, image: float, pixel: float) -> None:
        self.image_threshold.fill_(float(image))
        self.pixel_threshold.fill_(float(pixel))

    @torch.inference_mode()
    def predict(self, tiles: np.ndarray | Tensor, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly maps (N,H,W) float32 and scores (N,) float32 for uint8 tiles (see `predict_tiles`):
        gray replicated to three channels, ImageNet normalisation, channels_last, fp16 autocast on CUDA."""
        return predict_tiles(self, tiles, batch_size)

    def prepare_for_inference(self, device: str | torch.device = "cpu") -> Self:
        """eval(), move to ``device`` and use channels_last memory format (faster convolutions)."""
        self.eval()
        # torch's stub for Module.to has no overload taking a device and memory_format together
        return self.to(device=torch.device(device), memory_format=torch.channels_last)  # type: ignore[call-overload]


class ChannelStats:
    """Running per-channel mean and (population) variance of (B,C,H,W) tensors, in float64."""

    def __init__(self) -> None:
        self.n = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None

    def update(self, x: Tensor) -> None:
        x = x.detach().double()
        c = x.shape[1]
        flat = x.transpose(0, 1).reshape(c, -1)
        nb = flat.shape[1]
        mb = flat.mean(dim=1)
        m2b = ((flat - mb[:, None]) ** 2).sum(dim=1)
        if self._mean is None or self._m2 is None:
            self.n, self._mean, self._m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self._mean
        self._mean = self._mean + delta * (nb / n)
        self._m2 = self._m2 + m2b + delta**2 * (self.n * nb / n)
        self.n = n

    def mean(self) -> Tensor:
        if self._mean is None:
            raise ValueError("no data")
        return self._mean.float()

    def std(self) -> Tensor:
        if self._m2 is None:
            raise ValueError("no data")
        return torch.sqrt(self._m2 / self.n).float()


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def model_input_spec() -> dict[str, Any]:
    """How knitwatch's models treat their input (recorded under a checkpoint's ``extra["input"]``)."""
    return {
        "color": "rgb (gray replicated to 3 channels)",
        "input_range": [0, 255],
        "normalize_mean": list(IMAGENET_MEAN),
        "normalize_std": list(IMAGENET_STD),
    }


def save_model(
    path: str | Path,
    model: AnomalyModel,
    *,
    preprocess: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write any knitwatch model as a checkpoint (see `knitwatch.models.checkpoint`).

    The model provides ``kind``, ``tile_size``, ``hparams()``, ``thresholds()``, ``is_calibrated``,
    ``provenance`` (a dict) and its state dict (EfficientAD, MSFlow, PatchCore). ``preprocess`` is the tiler's
    parameter dict exactly as the dataset builder recorded it (the live tiler reads it back
    unchanged); its ``tile`` must equal the model's tile size. How the model itself treats its input
    (RGB, ImageNet normalisation) is recorded under ``extra["input"]``. ``provenance`` is merged over
    ``model.provenance``. Thresholds are stored only once calibrated.
    """
    tile_size = int(model.tile_size)
    pre = dict(preprocess or {})
    if int(pre.setdefault("tile", tile_size)) != tile_size:
        raise ValueError(f"preprocess tile {pre['tile']} differs from the model's tile size {tile_size}")
    ext = dict(extra or {})
    ext["input"] = model_input_spec()
    prov = dict(model.provenance)
    prov.update(provenance or {})
    thresholds = model.thresholds() if model.is_calibrated else {}
    return save_checkpoint(
        path,
        kind=model.kind,
        hparams=model.hparams(),
        state_dict=model.state_dict(),
        preprocess=pre,
        thresholds=thresholds,
        provenance=prov,
        extra=ext,
    )


@dataclass(frozen=True)
class UntrainedWarning:
    """A provenance flag that marks untrained (random) weights, and the warning a model built from
    such a checkpoint logs: ``provenance[section][flag]`` true -> ``log.warning(event, msg=msg)``."""

    section: str
    flag: str
    event: str
    msg: str


M = TypeVar("M", bound=AnomalyModel)


def restore_model(model: M, ckpt: Checkpoint, untrained: UntrainedWarning | None = None) -> M:
    """Finish a model freshly built from ``ckpt``'s hparams: load its state dict (strict) and provenance,
    warn about untrained weights (``untrained``) and missing calibration, then ready it for inference
    on the CPU (`AnomalyModel.prepare_for_inference`)."""
    model.load_state_dict(ckpt.state_dict, strict=True)
    model.provenance = dict(ckpt.provenance)
    if untrained is not None:
        part = ckpt.provenance.get(untrained.section, {})
        if isinstance(part, dict) and part.get(untrained.flag):
            log.warning(untrained.event, msg=untrained.msg)
    if not model.is_calibrated:
        log.warning("uncalibrated_checkpoint", msg="image/pixel thresholds are not calibrated (NaN)")
    return model.prepare_for_inference("cpu")
